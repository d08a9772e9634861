r"""GRPO's and RLSD's rewards: named built-ins or your own functions, summed with weights.

A reward function has TRL's ``reward_funcs`` shape: ``fn(completions, problems) -> list[float]``,
one float per completion, where ``problems[i]`` is the `Problem` that ``completions[i]`` (its
text) answers. A run's reward is the weighted sum of its terms (`RewardSet`); each term is
logged unweighted as ``reward/<name>``.

Built-ins (`REWARDS`; names listed in `opsd_kit.config.REWARD_NAMES`):

- ``correct``: 1.0 when the answer, read in the run's ``grading_mode``, equals the problem's
  answer (`opsd_kit.evaluation.grading.grade_many`: math_verify, then a normalised string match,
  every item bounded in time, in the main thread); the default, the reward of GRPO as the paper
  runs it;
- ``correct_strict`` / ``correct_lenient``: the same in a fixed mode (strict: the last box only;
  lenient: also ``####``, "the answer is", else the last number);
- ``format``: 1.0 when the completion's last ``\boxed{}`` is present, closed and non-empty (what
  strict grading reads; `opsd_kit.data.answers.extract_boxed`), whatever it holds;
- ``paper``: the official GRPO script's reward (grpo_train.py): the FIRST ``\boxed{}`` of the
  completion, stripped and lower-cased, equal to the answer as a string
  (`opsd_kit.evaluation.grading.first_box_exact_match`, grading mode ``first_box_exact``); no
  math_verify, so ``1/2`` and ``0.5`` differ, and so do ``1,234`` and ``1234``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opsd_kit.config import REWARD_NAMES, ConfigError

if TYPE_CHECKING:
    from opsd_kit.config import TrainConfig

RewardFunction = Callable[[list, list], list]
"""``fn(completions: list[str], problems: list[Problem]) -> list[float]`` (one per completion)."""


def correctness(mode: str) -> RewardFunction:
    """The 0/1 correctness reward in grading ``mode`` (`opsd_kit.data.answers.GRADING_MODES`)."""
    def correct(completions, problems):
        from opsd_kit.evaluation.grading import grade_many

        return [float(ok) for ok in grade_many(completions, [p.answer for p in problems], mode=mode)]

    correct.__name__ = f"correct_{mode}"
    return correct


def boxed_format(completions, problems) -> list[float]:
    r"""1.0 where the last ``\boxed{}`` is present, closed and non-empty, else 0.0."""
    from opsd_kit.data.answers import extract_boxed

    return [float(extract_boxed(c) is not None) for c in completions]


def builtin(name: str, grading_mode: str = "strict") -> RewardFunction:
    """The built-in reward ``name`` (``correct`` grades in ``grading_mode``)."""
    if name not in REWARD_NAMES:
        raise ConfigError(f"unknown reward {name!r}; choose one of {list(REWARD_NAMES)}")
    if name == "correct":
        return correctness(grading_mode)
    return REWARDS[name]


REWARDS: dict[str, RewardFunction] = {
    "correct_strict": correctness("strict"),
    "correct_lenient": correctness("lenient"),
    "format": boxed_format,
    "paper": correctness("first_box_exact"),
}
"""The fixed built-ins; ``correct`` is built per run from its ``grading_mode`` (`builtin`)."""


@dataclass
class RewardSet:
    """Named reward terms and their weights; calling it gives the summed reward and each term."""

    names: tuple[str, ...]
    functions: tuple[RewardFunction, ...]
    weights: tuple[float, ...]

    def __call__(self, completions: list, problems: list) -> tuple[list[float], dict[str, list[float]]]:
        """``(total, terms)``: ``total[i] = sum_j weights[j] * terms[names[j]][i]``."""
        terms = {}
        for name, fn in zip(self.names, self.functions):
            values = [float(v) for v in fn(completions, problems)]
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions; "
                                 "a reward function returns one float per completion")
            terms[name] = values
        total = [sum(w * terms[n][i] for n, w in zip(self.names, self.weights)) for i in range(len(completions))]
        return total, terms


def reward_set(config: TrainConfig, reward_funcs=None) -> RewardSet:
    """The run's rewards: ``config.rewards`` (built-in names), or ``reward_funcs`` when given (a
    sequence of callables, named by their ``__name__``, or ``{name: callable}``), weighted by
    ``config.reward_weights`` (empty: all 1; else one per reward, `reward_names`)."""
    names = reward_names(config, reward_funcs)
    if reward_funcs is None:
        functions = tuple(builtin(n, config.grading_mode) for n in names)
    elif isinstance(reward_funcs, dict):
        functions = tuple(reward_funcs.values())
    else:
        functions = tuple(_as_sequence(reward_funcs))
    weights = tuple(float(w) for w in config.reward_weights) or (1.0,) * len(names)
    return RewardSet(names, functions, weights)


def reward_names(config: TrainConfig, reward_funcs=None) -> tuple[str, ...]:
    """The names of the run's reward terms (``reward/<name>`` in the metrics), checked: callables,
    names that do not repeat, and ``config.reward_weights`` empty or one per term. Cheap: the
    trainer calls it before any model loads."""
    if reward_funcs is None:
        names = tuple(config.rewards)
    else:
        items = list(reward_funcs.items()) if isinstance(reward_funcs, dict) else [
            (getattr(fn, "__name__", f"reward{i}"), fn) for i, fn in enumerate(_as_sequence(reward_funcs))]
        if not items:
            raise ConfigError("reward_funcs is empty; give at least one reward function")
        for name, fn in items:
            if not callable(fn):
                raise ConfigError(f"reward_funcs[{name!r}] is {type(fn).__name__}, not a callable "
                                  "fn(completions, problems) -> list[float]")
        names = tuple(str(n) for n, _ in items)
        if len(set(names)) != len(names):
            raise ConfigError(f"reward_funcs names {names} repeat; pass a dict to name them apart")
    if config.reward_weights and len(config.reward_weights) != len(names):
        raise ConfigError(f"reward_weights={tuple(config.reward_weights)!r} gives {len(config.reward_weights)} "
                          f"weights for {len(names)} rewards {names}: give one per reward, or ()")
    return names


def _as_sequence(funcs) -> Sequence:
    return [funcs] if callable(funcs) else list(funcs)


def no_reward_diagnosis(completions: list, finished: list, problems: list) -> str:
    """Why a batch of rollouts may earn nothing: how many completions boxed an answer, how many
    were cut at the token cap, how many were right when read leniently."""
    from opsd_kit.data.answers import extract_boxed

    n = len(completions)
    boxed = sum(extract_boxed(c) is not None for c in completions)
    cut = sum(not f for f in finished)
    lenient = sum(REWARDS["correct_lenient"](completions, problems))
    parts = [f"{boxed} of {n} completions boxed an answer" if boxed else f"no completion of {n} is boxed",
             f"{cut} hit max_new_tokens", f"{int(lenient)} are right when read leniently"]
    return "; ".join(parts)
