"""Ctrl-C and SIGTERM: a KeyboardInterrupt anywhere in a step (loss, backward, rollouts, a
checkpoint write), or a SIGINT/SIGTERM, saves a checkpoint of the last complete step, returns
cleanly with interrupted=True (the command line exits 130 or 143), and rerunning the same
config resumes to the uninterrupted run's adapter and token counts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _faults import assert_same_adapter, ledger_counts, metric_rows, tiny_config

from opsd_kit.apps.cli import main
from opsd_kit.run.checkpoint import latest_checkpoint
from opsd_kit.trainer import Trainer

CHILD = Path(__file__).with_name("_train_child.py")

MAX_STEPS, SAVE_EVERY = 4, 2
SETTINGS = {"max_steps": MAX_STEPS, "save_every": SAVE_EVERY}


def interrupt_on_call(fn, n: int):
    """``fn`` that raises KeyboardInterrupt on its n-th call (1-based)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapped


def finish_and_compare(run_dir, algorithm, reference):
    """Rerun the same config (resume left unset): it resumes to the uninterrupted run's end."""
    expected, counts = reference(algorithm, **SETTINGS)
    resumed = Trainer(tiny_config(run_dir, algorithm, **SETTINGS))
    result = resumed.train()
    assert result.steps == MAX_STEPS and not result.interrupted
    assert_same_adapter(expected, resumed.policy.lora_state_dict())
    assert ledger_counts(result.ledger) == counts  # the interrupted step's tokens were not booked twice
    assert [r["step"] for r in metric_rows(run_dir)] == list(range(1, MAX_STEPS + 1))


# (algorithm, loss call that is interrupted, steps complete by then): 2 loss calls a step for OPSD and SFT, 4 for GRPO
LOSS_CASES = [
    ("opsd", 6, 2),  # 2nd micro-batch of step 3, after one backward; step 2's checkpoint exists and is re-saved
    ("grpo", 15, 3),  # step 4 = the 2nd iteration over GRPO's cached batch
    ("sft", 1, 0),  # the very first micro-batch: the checkpoint is of step 0
]


@pytest.mark.parametrize("algorithm, call, done", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_keyboard_interrupt_in_the_loss_saves_and_returns_cleanly(tmp_path, reference, capsys, algorithm, call,
                                                                  done):
    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(run_dir, algorithm, **SETTINGS))
    trainer.algorithm.loss = interrupt_on_call(trainer.algorithm.loss, call)
    result = trainer.train()  # no exception escapes
    assert result.interrupted and result.steps == done
    assert latest_checkpoint(run_dir).name == f"step-{done:06d}"
    assert [r["step"] for r in metric_rows(run_dir)] == list(range(1, done + 1))
    assert all(p.grad is None for p in trainer.params), "the half step's gradients were dropped"
    assert "rerun the same command to resume" in capsys.readouterr().out
    finish_and_compare(run_dir, algorithm, reference)


def test_keyboard_interrupt_during_rollouts(tmp_path, reference, monkeypatch):
    import opsd_kit.rollout.hf

    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(run_dir, "opsd", **SETTINGS))
    monkeypatch.setattr(opsd_kit.rollout.hf, "generate", interrupt_on_call(opsd_kit.rollout.hf.generate, 2))
    result = trainer.train()
    assert result.interrupted and result.steps == 1
    monkeypatch.undo()
    finish_and_compare(run_dir, "opsd", reference)


def test_keyboard_interrupt_during_backward(tmp_path, reference):
    import torch

    class InterruptInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(run_dir, "sft", **SETTINGS))
    loss, calls = trainer.algorithm.loss, []

    def loss_interrupting_backward(mb):
        calls.append(1)
        loss_sum, metrics = loss(mb)
        return (InterruptInBackward.apply(loss_sum) if len(calls) == 5 else loss_sum), metrics

    trainer.algorithm.loss = loss_interrupting_backward
    result = trainer.train()
    assert result.interrupted and result.steps == 2
    finish_and_compare(run_dir, "sft", reference)


def test_keyboard_interrupt_inside_a_checkpoint_write(tmp_path, reference, monkeypatch):
    """Ctrl-C while step 2's checkpoint is being written: the handler writes it again, whole."""
    import torch

    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(run_dir, "opsd", **SETTINGS))
    real_save, calls = torch.save, []

    def interrupted_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted_save)
    result = trainer.train()
    monkeypatch.undo()
    assert result.interrupted and result.steps == 2
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-000002"], "whole, and the interrupted temporary was cleaned up"
    finish_and_compare(run_dir, "opsd", reference)


def test_sigterm_is_handled_like_ctrl_c(tmp_path, reference):
    """A scheduler's SIGTERM mid-step: checkpoint, interrupted=True with the signal, handlers restored."""
    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(run_dir, "opsd", **SETTINGS))
    loss, calls = trainer.algorithm.loss, []

    def loss_then_sigterm(mb):
        calls.append(1)
        if len(calls) == 5:  # the 1st micro-batch of step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(mb)

    trainer.algorithm.loss = loss_then_sigterm
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    result = trainer.train()
    assert result.interrupted and result.signal == signal.SIGTERM and result.steps == 2
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert latest_checkpoint(run_dir).name == "step-000002"
    finish_and_compare(run_dir, "opsd", reference)


@pytest.mark.slow
@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_the_command_line_checkpoints_and_exits_128_plus_the_signal(tmp_path, reference, capsys, name, code):
    """`opsd-kit train` stopped by a signal exits 130 (Ctrl-C) or 143 (SIGTERM) after its checkpoint;
    rerunning the same command prints one line and resumes to the uninterrupted adapter; once
    more, it has nothing to do."""
    run_dir = tmp_path / "run"
    args = ["train", "--profile", "tiny", "--algorithm", "sft", "--set", f"run_dir={run_dir}", "progress=false",
            *(f"{k}={v}" for k, v in SETTINGS.items())]
    spec = {"cli": args, "signal": {"name": name, "at_step": 4}}  # as step 4 begins: 3 steps are done
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(CHILD), json.dumps(spec)], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert out.returncode == code, f"rc={out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    assert f"Interrupted ({name}): checkpoint saved at step 3" in out.stdout
    assert latest_checkpoint(run_dir).name == "step-000003"

    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"resuming from step 3 of {MAX_STEPS} in {run_dir}" and json.loads(lines[1])["steps"] == 4
    expected, _ = reference("sft", **SETTINGS)
    from safetensors.torch import load_file

    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert sorted(t.sum().item() for t in saved.values()) == pytest.approx(sorted(t.sum().item()
                                                                                 for t in expected.values()))
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("nothing to do; raise max_steps to train further.")
