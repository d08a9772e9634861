r"""GRPO's and RLSD's rewards: named built-ins or your own functions, summed with weights.

A reward function has TRL's ``reward_funcs`` shape: ``fn(completions, problems) -> list[float]``,
one float per completion, where ``problems[i]`` is the `Problem` that ``completions[i]`` (its
text) answers. A run's reward is the weighted sum of its terms (`RewardSet`); each term is
logged unweighted as ``reward/<name>``.

Built-ins (`REWARDS`; names listed in `opsd_kit.config.REWARDS`):

- ``correct``: 1.0 when the answer, read in the run's ``grading_mode``, equals the problem's
  answer (`opsd_kit.evaluation.grading.grade_many`: math_verify, then a normalised string match,
  every item bounded in time, in the main thread); the default, the reward of GRPO as the paper
  runs it;
- ``correct_strict`` / ``correct_lenient``: the same in a fixed mode (strict: the last box only;
  lenient: also ``####``, "the answer is", else the last number);
- ``format``: 1.0 when the completion's last ``\boxed{}`` is present, closed and non-empty (what
  strict grading reads; `opsd_kit.data.answers.extract_boxed`), whatever it holds;
- ``paper``: the official GRPO script's reward as the issue tracker describes it: the FIRST
  ``\boxed{}`` of the completion, compared with the answer by exact string match after
  normalisation (`first_boxed`, `paper_match`); no math_verify, so ``1/2`` and ``0.5`` differ.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opsd_kit.config import REWARDS as REWARD_NAMES
from opsd_kit.config import ConfigError

if TYPE_CHECKING:
    from opsd_kit.config import TrainConfig

RewardFunction = Callable[[list, list], list]
"""``fn(completions: list[str], problems: list[Problem]) -> list[float]`` (one per completion)."""


def correctness(mode: str) -> RewardFunction:
    """The 0/1 correctness reward in grading ``mode`` ('strict' or 'lenient')."""
    def correct(completions, problems):
        from opsd_kit.evaluation.grading import grade_many

        return [float(ok) for ok in grade_many(completions, [p.answer for p in problems], mode=mode)]

    correct.__name__ = f"correct_{mode}"
    return correct


def boxed_format(completions, problems) -> list[float]:
    r"""1.0 where the last ``\boxed{}`` is present, closed and non-empty, else 0.0."""
    from opsd_kit.data.answers import extract_boxed

    return [float(extract_boxed(c) is not None) for c in completions]


def first_boxed(text) -> str | None:
    r"""Content of the FIRST ``\boxed{...}``/``\fbox{...}`` of ``text``, stripped; None when there is
    no box, or the first one is empty or never closed (a brace-less ``\boxed 5`` gives ``5``).

    >>> first_boxed(r"\boxed{1} then \boxed{2}"), first_boxed(r"a \boxed{\frac{1}{2}}."), first_boxed("none")
    ('1', '\\frac{1}{2}', None)
    """
    from opsd_kit.data.answers import _BOX, _SPAN, _TOKEN, matching_brace

    if not isinstance(text, str):
        return None
    first = _BOX.search(text)
    if first is None:
        return None
    start = first.end()
    if text.startswith("{", start):
        close = matching_brace(text, start)
        return None if close is None else text[start + 1:close].strip() or None
    token = _TOKEN.match(text, start, start + _SPAN)
    return (token.group().rstrip(".,;").strip() if token else "") or None


def paper_match(completion, answer) -> bool:
    """The `paper` reward's verdict: the first box's content equals ``answer`` after the
    normalisation of the string match (`grading._normalize`: no spaces, ``$``, ``\\text{}``,
    ``\\left``/``\\right``, thousands commas, a trailing ``.0``)."""
    from opsd_kit.evaluation.grading import _normalize

    boxed = first_boxed(completion)
    if boxed is None or answer is None or not str(answer).strip():
        return False
    return _normalize(boxed) == _normalize(str(answer))


def paper_reward(completions, problems) -> list[float]:
    r"""1.0 where the first ``\boxed{}`` matches the answer as a normalised string (`paper_match`)."""
    return [float(paper_match(c, p.answer)) for c, p in zip(completions, problems)]


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
    "paper": paper_reward,
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
    ``config.reward_weights`` (empty: all 1)."""
    if reward_funcs is None:
        names = tuple(config.rewards)
        functions = tuple(builtin(n, config.grading_mode) for n in names)
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
        functions = tuple(fn for _, fn in items)
    weights = tuple(float(w) for w in config.reward_weights) or (1.0,) * len(names)
    if len(weights) != len(names):
        raise ConfigError(f"reward_weights={tuple(config.reward_weights)!r} gives {len(weights)} weights for "
                          f"{len(names)} rewards {names}: give one per reward, or ()")
    return RewardSet(names, functions, weights)


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
