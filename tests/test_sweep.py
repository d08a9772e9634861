"""The GRPO sweep driver: its grid, its validation before training, its JSONL rows and resume
(training replaced by a stub that writes a run's metrics; no model loads)."""
import json

import pytest

from opsd_kit.apps import sweep
from opsd_kit.config import ConfigError


def test_grid_is_every_combination_first_key_slowest():
    trials = sweep.grid_trials({"num_generations": [4, 8], "temperature": [0.6, 1.0, 1.2]})
    assert trials[:4] == [{"num_generations": 4, "temperature": 0.6}, {"num_generations": 4, "temperature": 1.0},
                          {"num_generations": 4, "temperature": 1.2}, {"num_generations": 8, "temperature": 0.6}]
    assert len(trials) == 6 and len(sweep.grid_trials(sweep.DEFAULT_GRID)) == 48
    with pytest.raises(ValueError, match="non-empty list"):
        sweep.grid_trials({"temperature": []})


def test_one_at_a_time_is_the_profiles_settings_then_each_value_alone():
    grid = {"num_generations": [8], "temperature": [1.0, 1.2]}
    assert sweep.grid_trials(grid, "one-at-a-time") == [{}, {"num_generations": 8}, {"temperature": 1.0},
                                                         {"temperature": 1.2}]
    with pytest.raises(ValueError, match="design must be one of"):
        sweep.grid_trials(grid, "random")


def fake_train(calls):
    def train(config, problems):
        calls.append(config)
        run = config.run_dir
        from pathlib import Path

        Path(run).mkdir(parents=True)
        rows = [{"step": s, "tokens/generated_total": 100 * s, "grpo/reward_mean": r, "grpo/mixed_groups": m,
                 "rollout/correct": r, "time/elapsed": float(s)} for s, r, m in ((1, 0.0, 0.0), (2, 0.5, 0.25))]
        (Path(run) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train


def test_rows_summarise_each_trial_and_a_rerun_skips_finished_trials(tmp_path):
    grid = {"rewards": [["correct"], ["correct_lenient", "format"]], "learning_rate": [1e-4]}
    calls = []
    rows = sweep.run_sweep("tiny", tmp_path, grid, train_fn=fake_train(calls))
    assert [c.rewards for c in calls] == [("correct",), ("correct_lenient", "format")]
    assert all(c.max_steps == 3 and c.learning_rate == 1e-4 for c in calls)  # the profile's other settings
    assert rows[1] == {"trial": rows[1]["trial"], "overrides": {"rewards": ["correct_lenient", "format"],
                                                                "learning_rate": 1e-4},
                       "steps": 2, "generated_tokens": 200, "reward_mean": 0.25, "mixed_groups_mean": 0.125,
                       "rollout_correct_last": 0.5, "train_seconds": 2.0}
    lines = (tmp_path / "sweep.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    again = sweep.run_sweep("tiny", tmp_path, grid, train_fn=fake_train(calls))
    assert len(calls) == 2 and again == rows  # nothing trained twice


def test_a_bad_trial_is_refused_before_any_trial_trains(tmp_path):
    calls = []
    with pytest.raises(ConfigError, match="rewards contains 'corect'"):
        sweep.run_sweep("tiny", tmp_path, {"rewards": [["correct"], ["corect"]]}, train_fn=fake_train(calls))
    assert calls == []
