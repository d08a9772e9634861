"""Out of memory, injected on CPU: a CUDA OOM during rollouts, the loss, backward or the
optimizer saves a checkpoint of the last complete step and stops with OutOfMemoryStop naming
the settings to lower; resuming from it (same or lowered settings) completes the run."""
from __future__ import annotations

import pytest
import torch
from _faults import assert_same_adapter, ledger_counts, metric_rows, tiny_config

from opsd_kit.run.checkpoint import latest_checkpoint
from opsd_kit.trainer import OutOfMemoryStop, Trainer

MAX_STEPS, SAVE_EVERY = 4, 2
SETTINGS = {"max_steps": MAX_STEPS, "save_every": SAVE_EVERY}
SETTINGS_NAMED = {  # the settings that bound memory and that the algorithm reads
    "sampling": ("micro_batch_size", "max_new_tokens", "generation_batch_size", "gradient_checkpointing"),
    "sft": ("micro_batch_size", "max_target_tokens", "gradient_checkpointing"),
}


def oom_on_call(fn, n: int, error=torch.cuda.OutOfMemoryError):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return fn(*args, **kwargs)

    return wrapped


def stop_and_check(trainer, done: int) -> str:
    with pytest.raises(OutOfMemoryStop) as info:
        trainer.train()
    message = str(info.value)
    named = SETTINGS_NAMED["sft" if trainer.config.algorithm == "sft" else "sampling"]
    for name in named:
        assert name in message, message
    other = {"max_new_tokens", "max_target_tokens"} - set(named)  # the length the algorithm does not read
    assert not any(name in message for name in other), message
    assert f"checkpoint of step {done} was saved" in message and "then rerun" in message
    assert isinstance(info.value.__cause__, (torch.OutOfMemoryError, RuntimeError))
    assert latest_checkpoint(trainer.run_dir).name == f"step-{done:06d}"
    assert [r["step"] for r in metric_rows(trainer.run_dir)] == list(range(1, done + 1))
    assert all(p.grad is None for p in trainer.params)
    return message


def resume_same(run_dir, algorithm, reference):
    expected, counts = reference(algorithm, **SETTINGS)
    resumed = Trainer(tiny_config(run_dir, algorithm, resume=True, **SETTINGS))
    result = resumed.train()
    assert result.steps == MAX_STEPS
    assert_same_adapter(expected, resumed.policy.lora_state_dict())
    assert ledger_counts(result.ledger) == counts
    assert [r["step"] for r in metric_rows(run_dir)] == list(range(1, MAX_STEPS + 1))


def test_oom_during_rollouts_saves_and_stops(tmp_path, reference, monkeypatch):
    import opsd_kit.rollout.hf

    trainer = Trainer(tiny_config(tmp_path / "run", "opsd", **SETTINGS))
    monkeypatch.setattr(opsd_kit.rollout.hf, "generate", oom_on_call(opsd_kit.rollout.hf.generate, 3))
    message = stop_and_check(trainer, done=2)
    assert "now 8" in message and "now 12" in message  # the current values of the tiny profile
    monkeypatch.undo()
    resume_same(tmp_path / "run", "opsd", reference)


@pytest.mark.parametrize("algorithm, call, done", [("grpo", 7, 1), ("sft", 3, 1)])
def test_oom_in_the_step_saves_and_stops(tmp_path, reference, algorithm, call, done):
    trainer = Trainer(tiny_config(tmp_path / "run", algorithm, **SETTINGS))
    trainer.algorithm.loss = oom_on_call(trainer.algorithm.loss, call)
    stop_and_check(trainer, done)
    resume_same(tmp_path / "run", algorithm, reference)


def test_oom_in_the_optimizer_and_old_style_message(tmp_path, reference):
    """Some libraries raise a plain RuntimeError('... out of memory ...'); it is treated the same."""
    trainer = Trainer(tiny_config(tmp_path / "run", "opsd", **SETTINGS))
    trainer.optimizer.step = oom_on_call(trainer.optimizer.step, 3, error=RuntimeError)
    stop_and_check(trainer, done=2)
    resume_same(tmp_path / "run", "opsd", reference)


def test_oom_during_backward(tmp_path, reference):
    class OomInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected in backward)")

    trainer = Trainer(tiny_config(tmp_path / "run", "sft", **SETTINGS))
    loss, calls = trainer.algorithm.loss, []

    def loss_with_oom_in_backward(mb):
        calls.append(1)
        loss_sum, metrics = loss(mb)
        return (OomInBackward.apply(loss_sum) if len(calls) == 6 else loss_sum), metrics

    trainer.algorithm.loss = loss_with_oom_in_backward
    stop_and_check(trainer, done=2)
    resume_same(tmp_path / "run", "sft", reference)


def test_resume_after_oom_with_lowered_settings(tmp_path, reference):
    """The advice works: resume with a smaller micro-batch and gradient checkpointing on. Same
    data and rollouts; only the summation order of the gradient changes, so the adapter is close.
    (A smaller generation_batch_size also resumes, but it changes the sampled rollouts.)"""
    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(run_dir, "opsd", **SETTINGS))
    trainer.algorithm.loss = oom_on_call(trainer.algorithm.loss, 5)
    stop_and_check(trainer, done=2)
    lowered = Trainer(tiny_config(run_dir, "opsd", resume=True, micro_batch_size=1, gradient_checkpointing=True,
                                  **SETTINGS))
    result = lowered.train()
    assert result.steps == MAX_STEPS
    assert [r["step"] for r in metric_rows(run_dir)] == list(range(1, MAX_STEPS + 1))
    expected, _ = reference("opsd", **SETTINGS)
    assert_same_adapter(expected, lowered.policy.lora_state_dict(), atol=1e-5)
    smaller_generation = Trainer(tiny_config(run_dir, "opsd", resume=True, generation_batch_size=2,
                                             max_steps=MAX_STEPS + 1, save_every=SAVE_EVERY))
    assert smaller_generation.train().steps == MAX_STEPS + 1
