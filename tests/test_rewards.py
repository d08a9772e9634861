"""GRPO's rewards: the built-ins by hand, their sum with weights, the default that reproduces
strict correctness, their logging and the early warning of a run that earns nothing."""
import json
import warnings

import pytest

from opsd_kit.algorithms import rewards
from opsd_kit.config import REWARD_NAMES, ConfigError, load_profile
from opsd_kit.data.problems import Problem
from opsd_kit.trainer import Trainer


def problem(answer: str) -> Problem:
    return Problem(id=f"p{answer}", question="?", solution=f"\\boxed{{{answer}}}", answer=answer, source="test")


TEXTS = [r"so \boxed{12}", r"\boxed{3} then \boxed{12}", "The answer is 12.", r"\boxed{1,234}", r"\boxed{}"]
GOLDS = ["12", "12", "12", "1234", "5"]


def test_builtins_by_hand():
    problems = [problem(a) for a in GOLDS]
    assert rewards.REWARDS["correct_strict"](TEXTS, problems) == [1.0, 1.0, 0.0, 1.0, 0.0]  # the last box
    assert rewards.REWARDS["correct_lenient"](TEXTS, problems) == [1.0, 1.0, 1.0, 1.0, 0.0]  # also "the answer is"
    assert rewards.REWARDS["format"](TEXTS, problems) == [1.0, 1.0, 0.0, 1.0, 0.0]  # an empty box is no answer
    # paper: the FIRST box, stripped and lower-cased, as a string: no math_verify, no comma removal
    assert rewards.REWARDS["paper"](TEXTS, problems) == [1.0, 0.0, 0.0, 0.0, 0.0]
    pairs = [(r"\boxed{ X }", "x"), (r"\boxed{0.5}", r"\frac{1}{2}")]
    assert rewards.REWARDS["paper"]([c for c, _ in pairs], [problem(a) for _, a in pairs]) == [1.0, 0.0]


def test_every_named_reward_is_defined():
    assert set(REWARD_NAMES) == {"correct", *rewards.REWARDS}


def test_weighted_sum_of_terms_by_hand():
    cfg = load_profile("tiny", "grpo", rewards=("correct_strict", "format", "paper"), reward_weights=(1.0, 0.25, -2.0))
    total, terms = rewards.reward_set(cfg)(TEXTS, [problem(a) for a in GOLDS])
    assert terms == {"correct_strict": [1.0, 1.0, 0.0, 1.0, 0.0], "format": [1.0, 1.0, 0.0, 1.0, 0.0],
                     "paper": [1.0, 0.0, 0.0, 0.0, 0.0]}
    assert total == [1 + 0.25 - 2, 1 + 0.25, 0.0, 1 + 0.25, 0.0]


@pytest.mark.parametrize("mode", ["strict", "lenient"])
def test_the_default_reward_is_correctness_in_the_grading_mode(mode):
    from opsd_kit.evaluation.grading import grade_many

    cfg = load_profile("tiny", "grpo", grading_mode=mode)
    assert cfg.rewards == ("correct",) and not cfg.reward_weights
    total, terms = rewards.reward_set(cfg)(TEXTS, [problem(a) for a in GOLDS])
    assert total == terms["correct"] == [float(ok) for ok in grade_many(TEXTS, GOLDS, mode)]


def test_bad_rewards_are_refused_before_anything_loads():
    with pytest.raises(ConfigError, match="'corect'.*did you mean 'correct'"):
        load_profile("tiny", "grpo", rewards=("corect",))
    with pytest.raises(ConfigError, match="reward_weights=.*2 weights for 1 rewards"):
        Trainer(load_profile("tiny", "grpo", reward_weights=(1.0, 2.0)))  # before any model loads
    with pytest.raises(ConfigError, match="rewards=\\(\\)"):
        load_profile("tiny", "grpo", rewards=())
    with pytest.raises(ConfigError, match="not a callable"):
        rewards.reward_set(load_profile("tiny", "grpo"), {"x": 3})


def test_a_custom_reward_must_give_one_value_per_completion():
    cfg = load_profile("tiny", "grpo")
    with pytest.raises(ValueError, match="reward 'short' returned 1 values for 2 completions"):
        rewards.reward_set(cfg, {"short": lambda c, p: [0.0]})(["a", "b"], [problem("1")] * 2)


def test_terms_and_mixed_groups_are_logged_and_a_run_without_reward_is_warned_early(tmp_path):
    """Tiny GRPO (random model: never boxes), one step per batch of rollouts: the terms are logged
    unweighted, no group is mixed, and after the third batch a warning says why."""
    from opsd_kit.algorithms.grpo import NO_REWARD_BATCHES
    from opsd_kit.trainer import Trainer

    cfg = load_profile("tiny", "grpo", run_dir=str(tmp_path), progress=False, num_iterations=1,
                       max_steps=NO_REWARD_BATCHES, rewards=("correct", "format"), reward_weights=(1.0, 0.5))
    with pytest.warns(RuntimeWarning, match=r"first 3 batches of rollouts earned no reward.*no completion of 8 "
                                            r"is boxed"):
        result = Trainer(cfg).train()
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    for row in rows:
        assert row["reward/correct"] == row["reward/format"] == row["grpo/reward_mean"] == 0.0
        assert row["grpo/mixed_groups"] == 0.0 and row["grpo/groups_all_same"] == 1.0
    card = (result.adapter_dir / "README.md").read_text()
    assert "- reward: 1 x `correct` + 0.5 x `format` (`correct` grades in `strict` mode)" in card


def test_mixed_groups_is_the_fraction_of_groups_whose_rewards_differ(tmp_path):
    """Rewards by hand: the first rollout of the batch earns 1 (one mixed group of 4), then nothing
    is warned, since the run has a signal."""
    from opsd_kit.trainer import Trainer

    def first(completions, problems):
        first.calls += 1
        return [float(i == 0 and first.calls == 1) for i in range(len(completions))]

    first.calls = 0
    cfg = load_profile("tiny", "grpo", run_dir=str(tmp_path), progress=False, num_iterations=1, max_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = Trainer(cfg, reward_funcs={"first": first}).train()
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [r["grpo/mixed_groups"] for r in rows] == [0.25, 0.0, 0.0]  # 4 problems x 2 rollouts
    assert [r["reward/first"] for r in rows] == [1 / 8, 0.0, 0.0]
    assert "- reward: 1 x `first`" in (result.adapter_dir / "README.md").read_text()


def test_custom_reward_functions_take_one_weight_each():
    """reward_funcs replace the named rewards: their weights are counted against them."""
    cfg = load_profile("tiny", "grpo", reward_weights=(1.0, 0.5))

    def right(completions, problems):
        return [1.0] * len(completions)

    def short(completions, problems):
        return [float(len(c) < 5) for c in completions]

    total, terms = rewards.reward_set(cfg, [right, short])(["abc", "abcdefgh"], [problem("1"), problem("2")])
    assert terms == {"right": [1.0, 1.0], "short": [1.0, 0.0]} and total == [1.5, 1.0]
    with pytest.raises(ConfigError, match="2 weights for 1 rewards"):
        rewards.reward_names(cfg, [right])
