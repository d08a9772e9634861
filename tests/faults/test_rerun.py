"""Rerunning never destroys work: the run folder decides how a run starts, before any model loads.
Checkpoints of the same config are resumed (keys that change nothing trained aside), another
config is refused naming the differing keys and the ways out, and nothing is deleted without
overwrite=True."""
from __future__ import annotations

import pytest
from _faults import assert_same_adapter, tiny_config

from opsd_kit.config import ConfigError, resumable_fields
from opsd_kit.run.rundir import RunDir, RunStart
from opsd_kit.trainer import Trainer


def fake_run(run_dir, steps=(2,), **overrides):
    """A run folder as a run of ``tiny_config(**overrides)`` leaves it (config and marked checkpoints)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tiny_config(run_dir, **overrides).save(run_dir / "config.json")
    for step in steps:
        folder = run_dir / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "COMPLETE").write_text(str(step))
    return run_dir


def _start(config) -> RunStart:
    return RunDir(config.run_dir).plan_start(config)


def test_an_empty_run_dir_starts_fresh(tmp_path):
    assert _start(tiny_config(tmp_path / "new")) == RunStart()


def test_checkpoints_of_the_same_config_are_resumed(tmp_path):
    run_dir = fake_run(tmp_path / "run", steps=(2, 4), max_steps=4)
    start = _start(tiny_config(run_dir, max_steps=4))
    assert start.checkpoint.name == "step-000004" and not start.discard
    # keys that do not change what is trained may change, max_steps included (extending a finished run)
    same = dict(max_steps=10, save_every=5, keep_checkpoints=4, progress=True, max_generated_tokens=100,
                micro_batch_size=1, gradient_checkpointing=True)
    assert set(same) <= set(resumable_fields())
    assert _start(tiny_config(run_dir, **same)).checkpoint.name == "step-000004"


def test_a_saved_value_of_a_field_the_algorithm_does_not_use_is_no_other_config(tmp_path):
    """A config.json may hold a value its algorithm never read (a profile's GRPO group size in an
    OPSD run): resuming with the field at its default continues the run."""
    import json

    run_dir = fake_run(tmp_path / "run")
    saved = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(dict(saved, num_generations=4, clip_tau=0.5)))
    assert RunDir(run_dir).config_changes(tiny_config(run_dir)) == {"clip_tau": (0.5, None)}  # OPSD's own knob counts
    (run_dir / "config.json").write_text(json.dumps(dict(saved, num_generations=4)))
    assert RunDir(run_dir).plan_start(tiny_config(run_dir)).checkpoint.name == "step-000002"


def test_a_run_saved_with_a_retired_key_still_resumes_and_loads(tmp_path):
    """An older config.json may hold a key that is no longer a setting (`config.RETIRED_FIELDS`)
    and profile values in fields its algorithm never read: it resumes, and loads for evaluation."""
    import json

    from opsd_kit.config import RETIRED_FIELDS, TrainConfig
    from opsd_kit.evaluation.study import load_run_config

    run_dir = fake_run(tmp_path / "run")
    saved = json.loads((run_dir / "config.json").read_text())
    old = dict(saved, num_generations=4, **dict.fromkeys(RETIRED_FIELDS, True))
    (run_dir / "config.json").write_text(json.dumps(old))
    assert RunDir(run_dir).config_changes(tiny_config(run_dir)) == {}
    loaded = load_run_config(run_dir)
    assert loaded.num_generations == TrainConfig().num_generations and loaded.lora_r == saved["lora_r"]


def test_another_config_is_refused_before_any_model_loads(tmp_path, no_model_loads):
    run_dir = fake_run(tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        Trainer(tiny_config(run_dir, learning_rate=0.01, seed=3))
    message = str(info.value)
    for part in ("seed: 0 -> 3", "learning_rate: 0.001 -> 0.01", "--set resume=false overwrite=true",
                 "another run_dir", "step 2"):
        assert part in message, message
    assert (run_dir / "checkpoints" / "step-000002").is_dir(), "nothing was deleted"
    assert RunDir(run_dir).config_changes(tiny_config(run_dir, max_steps=50)) == {}


@pytest.mark.parametrize("overrides, fragments", [
    ({"resume": False}, ["resume=False", "overwrite=True", "another run_dir"]),
    ({"resume": True, "seed": 1}, ["seed: 0 -> 1"]),
    ({"max_steps": 1}, ["step 2", "max_steps=1", "max_steps >= 2"]),
], ids=["fresh-needs-overwrite", "resume-true-checks-config", "past-max-steps"])
def test_refusals_name_the_way_out(tmp_path, no_model_loads, overrides, fragments):
    run_dir = fake_run(tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        Trainer(tiny_config(run_dir, **overrides))
    for part in fragments:
        assert part in str(info.value), str(info.value)


def test_resume_true_needs_a_checkpoint(tmp_path, no_model_loads):
    with pytest.raises(ConfigError, match="resume=True.*no complete checkpoint"):
        Trainer(tiny_config(tmp_path / "empty", resume=True))
    with pytest.raises(ConfigError, match="resume=True.*overwrite=True"):
        tiny_config(tmp_path / "empty", resume=True, overwrite=True)


def test_overwrite_is_what_allows_starting_over(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    assert _start(tiny_config(run_dir, resume=False, overwrite=True)) == RunStart(discard=True)
    assert _start(tiny_config(run_dir, seed=5, overwrite=True)) == RunStart(discard=True)
    assert _start(tiny_config(run_dir, overwrite=True)).checkpoint is not None  # same config: resumed


def test_a_finished_run_is_one_that_would_resume_at_its_end(tmp_path):
    """`RunDir.finished` (the demo reuses such a run): the same config up to the keys a resumed run
    may change, a checkpoint at max_steps or past the token budget, and the final adapter."""
    run_dir = fake_run(tmp_path / "run", steps=(2,), max_steps=2)
    folder = RunDir(run_dir)
    assert not folder.finished(tiny_config(run_dir, max_steps=2)), "no final adapter yet"
    (run_dir / "adapter").mkdir()
    assert folder.finished(tiny_config(run_dir, max_steps=2))
    assert folder.finished(tiny_config(run_dir, max_steps=2, micro_batch_size=1, progress=True))  # resumable keys
    assert folder.finished(tiny_config(tmp_path / "moved", max_steps=2))  # run_dir itself is one
    assert not folder.finished(tiny_config(run_dir, max_steps=3))  # would resume and train on
    assert not folder.finished(tiny_config(run_dir, max_steps=1))  # refused: past max_steps
    assert not folder.finished(tiny_config(run_dir, max_steps=2, seed=3))  # another config
    assert not folder.finished(tiny_config(run_dir, max_steps=2, resume=False, overwrite=True))  # starts over
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "tokens/generated_total": 30}\n'
                                           '{"step": 2, "tokens/generated_total": 60}\n')
    assert folder.finished(tiny_config(run_dir, max_steps=5, max_generated_tokens=60))  # the budget is spent
    assert not folder.finished(tiny_config(run_dir, max_steps=5, max_generated_tokens=61))


def test_checkpoints_without_a_readable_config_are_refused(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    (run_dir / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json cannot be read"):
        _start(tiny_config(run_dir))


def test_missing_tracker_package_fails_before_any_model_loads(tmp_path, no_model_loads):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    with pytest.raises(ConfigError, match=r"needs the 'tensorboard' package.*pip install tensorboard"):
        Trainer(tiny_config(tmp_path / "run", trackers=("tensorboard",)))


def test_a_finished_run_rerun_does_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    trained = Trainer(tiny_config(run_dir, "sft", max_steps=2))
    first = trained.train()
    weights = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    again = Trainer(tiny_config(run_dir, "sft", max_steps=2))
    result = again.train()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{run_dir} is already finished (step 2 of 2): nothing to do; raise max_steps to train further."]
    assert result.steps == 2 and not result.interrupted and result.ledger == first.ledger
    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == weights
    assert_same_adapter(trained.policy.lora_state_dict(), again.policy.lora_state_dict(), atol=0)  # restored
    extended = Trainer(tiny_config(run_dir, "sft", max_steps=3)).train()  # a longer run resumes it
    assert extended.steps == 3
    assert capsys.readouterr().out.splitlines()[0] == f"resuming from step 2 of 3 in {run_dir}"



def _lrs(run_dir) -> list[float]:
    from _faults import metric_rows

    return [row["train/lr"] for row in metric_rows(run_dir)]


def test_extending_a_run_in_warmup_trains_as_a_fresh_run_of_the_new_length(tmp_path):
    """A linear schedule with warmup_steps=3: 2 steps planned for max_steps=2, then extended to 5,
    take the learning rates (and reach the weights) of a fresh 5-step run: factors s / 3 for
    s < 3, then 1 - (s - 3) / (5 - 3)."""
    lr = tiny_config(tmp_path).learning_rate
    schedule = dict(lr_schedule="linear", warmup_steps=3)
    short = Trainer(tiny_config(tmp_path / "run", "sft", max_steps=2, **schedule))
    short.train()
    assert _lrs(tmp_path / "run") == pytest.approx([0.0, lr / 3])
    extended = Trainer(tiny_config(tmp_path / "run", "sft", max_steps=5, **schedule))
    assert extended.train().steps == 5
    fresh = Trainer(tiny_config(tmp_path / "fresh", "sft", max_steps=5, **schedule))
    fresh.train()
    expected = [0.0, lr / 3, 2 * lr / 3, lr, lr / 2]
    assert _lrs(tmp_path / "run") == pytest.approx(expected, rel=1e-12) and _lrs(tmp_path / "fresh") == _lrs(
        tmp_path / "run")
    assert_same_adapter(fresh.policy.lora_state_dict(), extended.policy.lora_state_dict(), atol=0)


def test_extending_a_constant_run_continues_at_its_rate(tmp_path):
    lr = tiny_config(tmp_path).learning_rate
    Trainer(tiny_config(tmp_path / "run", "sft", max_steps=2, warmup_steps=1)).train()
    Trainer(tiny_config(tmp_path / "run", "sft", max_steps=4, warmup_steps=1)).train()
    assert _lrs(tmp_path / "run") == pytest.approx([0.0, lr, lr, lr], rel=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("new_max_steps", [8, 3])  # extended, or shortened to the step it reached
def test_changing_max_steps_of_a_decaying_schedule_past_warmup_is_refused(tmp_path, no_model_loads, schedule,
                                                                          new_max_steps):
    """Going on would switch schedules midway: a finished cosine run's rate from about 0 back up."""
    run_dir = fake_run(tmp_path / "run", steps=(3,), max_steps=4, lr_schedule=schedule, warmup_steps=1)
    with pytest.raises(ConfigError) as info:
        Trainer(tiny_config(run_dir, max_steps=new_max_steps, lr_schedule=schedule, warmup_steps=1))
    message = str(info.value)
    for part in (f"'{schedule}' learning-rate schedule planned for max_steps=4", f"max_steps={new_max_steps}",
                 "Keep max_steps=4", "--set resume=false overwrite=true", "lr_schedule='constant'"):
        assert part in message, message
    same = tiny_config(run_dir, max_steps=4, lr_schedule=schedule, warmup_steps=1)
    assert RunDir(run_dir).plan_start(same).checkpoint


def test_changing_max_steps_in_warmup_is_resumed(tmp_path):
    # 2 steps taken with warmup_steps=1: factors 0 and 1 whatever max_steps is
    run_dir = fake_run(tmp_path / "run", steps=(2,), max_steps=4, lr_schedule="cosine", warmup_steps=1)
    longer = tiny_config(run_dir, max_steps=8, lr_schedule="cosine", warmup_steps=1)
    assert RunDir(run_dir).plan_start(longer).checkpoint
    run_dir = fake_run(tmp_path / "constant", steps=(3,), max_steps=4, warmup_steps=1)
    assert RunDir(run_dir).plan_start(tiny_config(run_dir, max_steps=8, warmup_steps=1)).checkpoint
