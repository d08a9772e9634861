"""Kill and resume: a tiny run SIGKILLed at a seeded random point (mid-step, inside a checkpoint
write, half-way through deleting a checkpoint, half-way through a metrics line) resumes from
its last complete checkpoint to the same final adapter as an uninterrupted run, with metrics
for steps 1..max_steps exactly once. Half-written checkpoints are never loaded.

The killed run is a subprocess (`_train_child.py`); the resume and the reference run are in
this process. Training is deterministic on CPU given the seed (rollout seeds derive from the
seed and the step), so "the same adapter" means bit for bit.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _faults import assert_same_adapter, ledger_counts, tiny_config

from opsd_kit.config import ConfigError
from opsd_kit.run.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    complete_checkpoints,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from opsd_kit.trainer import Trainer

CHILD = Path(__file__).with_name("_train_child.py")
MAX_STEPS, SAVE_EVERY = 5, 2  # checkpoints at steps 2, 4 and 5
LOSS_CALLS_PER_STEP = {"opsd": 2, "grpo": 4, "sft": 2}  # tiny: 4 problems (x2 generations for GRPO), micro-batch 2
WRITES = len({*range(SAVE_EVERY, MAX_STEPS + 1, SAVE_EVERY), MAX_STEPS})
REQUIRED = ("COMPLETE", "trainer_state.pt", "adapter/adapter_config.json", "adapter/adapter_model.safetensors")


def config(run_dir, algorithm, **overrides):
    return tiny_config(run_dir, algorithm, **{"max_steps": MAX_STEPS, "save_every": SAVE_EVERY, **overrides})


def kill_point(algorithm: str, where: str) -> int:
    """A seeded random occurrence of ``where`` within the run."""
    rng = random.Random(f"{algorithm}/{where}")
    if where == "loss":
        return rng.randint(1, MAX_STEPS * LOSS_CALLS_PER_STEP[algorithm])
    if where == "metrics":
        return rng.randint(1, MAX_STEPS)
    if where == "checkpoint_prune":  # with keep_checkpoints=1 the writes at steps 4 and 5 each delete one
        return rng.randint(1, WRITES - 1)
    return rng.randint(1, WRITES)


def run_killed_child(run_dir, algorithm, where, at, **overrides):
    spec = {"algorithm": algorithm, "overrides": dict(run_dir=str(run_dir), max_steps=MAX_STEPS,
                                                      save_every=SAVE_EVERY, progress=False, **overrides),
            "kill": {"where": where, "at": at}}
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(CHILD), json.dumps(spec)], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert out.returncode == -signal.SIGKILL, f"rc={out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def resume(run_dir, algorithm, **overrides):
    """Rerun the same config (resume left unset) to completion; return (trainer, result, the
    checkpoint restored or None)."""
    trainer = Trainer(config(run_dir, algorithm, **overrides))
    restored = []
    restore = trainer._restore
    trainer._restore = lambda path: (restored.append(Path(path)), restore(path))
    result = trainer.train()
    return trainer, result, (restored[0] if restored else None)


def metric_steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_complete(path: Path) -> None:
    for name in REQUIRED:
        assert (path / name).is_file(), f"restored checkpoint {path} lacks {name}"


CASES = [
    ("opsd", "loss"), ("grpo", "loss"), ("sft", "loss"),
    ("opsd", "checkpoint_state"), ("grpo", "checkpoint_rename"), ("sft", "checkpoint_adapter"),
    ("opsd", "checkpoint_prune"), ("grpo", "metrics"),
]


@pytest.mark.parametrize("algorithm, where", CASES, ids=[f"{a}-{w}" for a, w in CASES])
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path, reference, algorithm, where):
    overrides = {"keep_checkpoints": 1} if where == "checkpoint_prune" else {}
    expected, expected_counts = reference(algorithm, max_steps=MAX_STEPS, save_every=SAVE_EVERY, **overrides)
    run_dir = tmp_path / "run"
    at = kill_point(algorithm, where)
    run_killed_child(run_dir, algorithm, where, at, **overrides)

    # What the kill left behind: a checkpoint write or deletion cut half-way stays unloadable.
    folder = checkpoint_dir(run_dir)
    leftovers = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if where in ("checkpoint_state", "checkpoint_rename", "checkpoint_adapter"):
        assert any(name.startswith(".step-") for name in leftovers), leftovers  # the kill hit inside the write
    if where == "checkpoint_prune":
        assert any(name.startswith(".trash-") for name in leftovers), leftovers
    for path in folder.glob("step-*"):  # every folder that looks like a checkpoint is whole
        assert_complete(path)
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        assert_complete(latest)

    trainer, result, restored = resume(run_dir, algorithm, **overrides)
    assert restored == latest  # the newest complete checkpoint, never a temporary or torn one
    assert result.steps == MAX_STEPS and not result.interrupted
    assert_same_adapter(expected, trainer.policy.lora_state_dict())
    assert ledger_counts(result.ledger) == expected_counts  # no step's tokens counted twice or lost
    assert metric_steps(run_dir) == list(range(1, MAX_STEPS + 1))
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporaries were cleaned up"
    # The saved adapter file holds the same weights.
    from safetensors.torch import load_file

    saved = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert_same_adapter({k.replace(".default.", "."): v for k, v in expected.items()}, saved)


def test_kill_points_are_seeded():
    """The same kill points in a fresh interpreter under another hash seed (so a rerun kills at
    the same points): neither the global RNG nor ``hash()`` may choose them."""
    here = [kill_point(a, w) for a, w in CASES]
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_kill_resume as t; "
            "print(json.dumps([t.kill_point(a, w) for a, w in t.CASES]))")
    env = dict(os.environ, PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == here


class _Died(BaseException):
    """Stands in for SIGKILL in-process: nothing catches it, so nothing is saved on the way out."""


def test_starting_over_in_a_used_run_dir_needs_overwrite_and_never_resumes_the_old_run(tmp_path, reference):
    expected, _ = reference("sft", max_steps=MAX_STEPS, save_every=SAVE_EVERY)
    run_dir = tmp_path / "run"
    Trainer(config(run_dir, "sft", max_steps=MAX_STEPS + 2, seed=1)).train()  # an older, longer run
    assert latest_checkpoint(run_dir).name == f"step-{MAX_STEPS + 2:06d}"
    with pytest.raises(ConfigError, match=r"seed: 1 -> 0.*resume=false overwrite=true"):
        Trainer(config(run_dir, "sft"))  # another config: refused, nothing deleted
    with pytest.raises(ConfigError, match="overwrite=True"):
        Trainer(config(run_dir, "sft", resume=False))
    assert latest_checkpoint(run_dir).name == f"step-{MAX_STEPS + 2:06d}"
    fresh = Trainer(config(run_dir, "sft", resume=False, overwrite=True))  # starts over in the same folder
    loss, calls = fresh.algorithm.loss, []

    def dying_loss(mb):
        calls.append(1)
        if len(calls) == LOSS_CALLS_PER_STEP["sft"] + 1:  # dies in step 2, before its first checkpoint
            raise _Died
        return loss(mb)

    fresh.algorithm.loss = dying_loss
    with pytest.raises(_Died):
        fresh.train()
    assert complete_checkpoints(run_dir) == [] and not (run_dir / "adapter").exists()
    trainer, _result, restored = resume(run_dir, "sft")
    assert restored is None  # nothing of the old run was picked up
    assert_same_adapter(expected, trainer.policy.lora_state_dict())
    assert metric_steps(run_dir) == list(range(1, MAX_STEPS + 1))


class _RunsCode:
    """A pickled object that runs a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_tampered_trainer_state_is_refused_without_running_its_code(tmp_path):
    import torch

    run_dir = tmp_path / "run"
    Trainer(config(run_dir, "grpo", max_steps=3, save_every=1)).train()  # mid-batch: GRPO's rollouts in flight
    state = latest_checkpoint(run_dir) / "trainer_state.pt"
    assert load_trainer_state(state.parent)["extra"]["per_rank"][0]["algorithm"]["batch"] is not None
    torch.load(state, weights_only=True)  # what the kit writes loads without unpickling code

    marker = tmp_path / "pwned"
    payload = torch.load(state, weights_only=True)
    payload["extra"]["per_rank"][0]["rng"]["python"] = _RunsCode(marker)
    torch.save(payload, state)
    with pytest.raises(CheckpointError, match=r"trainer_state.pt holds objects other than tensors.*not loaded"):
        Trainer(config(run_dir, "grpo", max_steps=4)).train()
    assert not marker.exists(), "the pickle's code ran"


def _tiny_state(tmp_path):
    trainer = Trainer(config(tmp_path / "unit", "sft", max_steps=1))
    return {"policy": trainer.policy, "optimizer": trainer.optimizer, "scheduler": trainer.scheduler,
                "ledger": trainer.ledger}


def test_checkpoint_replaced_or_pruned_half_way_is_never_loaded(tmp_path, monkeypatch):
    """Deleting a checkpoint folder (replacing a same-step copy, or pruning an old one) that dies
    half-way must not leave a folder with a COMPLETE marker and missing files under a loadable name."""
    import opsd_kit.run.checkpoint as ckpt

    state = _tiny_state(tmp_path)
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, 1, keep=2, **state)
    save_checkpoint(run_dir, 2, keep=2, **state)
    real_rmtree = ckpt.shutil.rmtree

    def rmtree_dying_half_way(path, *args, **kwargs):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name != "COMPLETE")
        for p in files[::2]:
            p.unlink()
        raise _Died

    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree_dying_half_way)
    with pytest.raises(_Died):  # saving step 2 again (as Ctrl-C right after a save does) replaces it
        save_checkpoint(run_dir, 2, keep=2, **state)
    for path in complete_checkpoints(run_dir):
        assert_complete(path)
    with pytest.raises(_Died):  # saving step 3 prunes step 1
        save_checkpoint(run_dir, 3, keep=2, **state)
    for path in complete_checkpoints(run_dir):
        assert_complete(path)
    assert latest_checkpoint(run_dir).name == "step-000003"
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    save_checkpoint(run_dir, 4, keep=2, **state)
    assert sorted(p.name for p in checkpoint_dir(run_dir).iterdir()) == ["step-000003", "step-000004"]


def test_temporary_or_unmarked_folders_are_never_loaded(tmp_path):
    state = _tiny_state(tmp_path)
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, 2, **state)
    folder = checkpoint_dir(run_dir)
    (folder / "step-000009").mkdir()  # a checkpoint-looking folder without the COMPLETE marker
    (folder / "step-000009" / "trainer_state.pt").write_bytes(b"torn")
    tmp = folder / ".step-000010-abc"  # a write killed before its rename, marker and all
    tmp.mkdir()
    (tmp / "COMPLETE").write_text("10")
    assert latest_checkpoint(run_dir).name == "step-000002"
