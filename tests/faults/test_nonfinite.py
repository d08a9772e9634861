"""Numerical guards: a non-finite loss or gradient skips the optimizer step (weights, optimizer
and schedule untouched), is counted in the metrics, and the run goes on; max_nonfinite_steps
in a row stop the run with NonFiniteLossError and a checkpoint. Masked or padded vocabulary
entries (-inf logits; the tiny model's logits dim exceeds its tokenizer) never give NaN."""
from __future__ import annotations

import math

import pytest
import torch
from _faults import assert_same_adapter, metric_rows, tiny_config

from opsd_kit.run.checkpoint import latest_checkpoint, load_trainer_state
from opsd_kit.trainer import NonFiniteLossError, Trainer


def poison_steps(trainer, bad_steps: set[int], how: str = "nan_loss"):
    """Make the loss (or, with how='nan_grad', only the gradient) non-finite on the given
    1-based steps; returns a list that records the LoRA weights after every step."""
    loss = trainer.algorithm.loss

    def poisoned(mb):
        loss_sum, metrics = loss(mb)
        if trainer.step + 1 in bad_steps:
            if how == "nan_loss":
                loss_sum = loss_sum * float("nan")
            elif how == "inf_loss":
                loss_sum = loss_sum + float("inf")
            else:  # finite loss, NaN gradient
                loss_sum = _NanGrad.apply(loss_sum)
        return loss_sum, metrics

    trainer.algorithm.loss = poisoned
    after = []
    step = trainer._optimizer_step

    def recording_step():
        out = step()
        after.append(trainer.policy.lora_state_dict())
        return out

    trainer._optimizer_step = recording_step
    return after


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("how", ["nan_loss", "inf_loss", "nan_grad"])
def test_nonfinite_step_is_skipped_counted_and_the_run_continues(tmp_path, how):
    trainer = Trainer(tiny_config(tmp_path / how, "opsd", max_steps=4))
    before = trainer.policy.lora_state_dict()
    after = poison_steps(trainer, {2}, how)
    adam_steps = []
    opt_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (adam_steps.append(trainer.step + 1), opt_step(*a, **k))[1]
    result = trainer.train()
    assert result.steps == 4
    assert adam_steps == [1, 3, 4], "no optimizer step at step 2"
    assert_same_adapter(after[0], after[1], atol=0)  # step 2 left the weights as step 1 did
    for a, b in ((before, after[0]), (after[1], after[2]), (after[2], after[3])):
        assert any(not torch.equal(a[k], b[k]) for k in a), "the other steps trained"
    for w in after:
        assert all(torch.isfinite(v).all() for v in w.values())
    rows = metric_rows(result.run_dir)
    assert [r["train/skipped_nonfinite"] for r in rows] == [0, 1, 0, 0]
    bad = rows[1]["loss/total"] if how != "nan_grad" else rows[1]["train/grad_norm"]
    assert isinstance(bad, str) and not math.isfinite(float(bad))  # logged as "nan"/"inf", still valid JSON
    state = load_trainer_state(latest_checkpoint(result.run_dir))
    assert state["scheduler"]["last_epoch"] == 3, "the schedule did not advance on the skipped step"


def test_too_many_nonfinite_steps_in_a_row_stop_with_a_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "sft", max_steps=6, max_nonfinite_steps=2, save_every=100))
    after = poison_steps(trainer, {2, 3, 4, 5, 6})
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    assert "2 optimizer steps in a row" in message and "max_nonfinite_steps=2" in message
    assert "checkpoint saved at step 3" in message and "learning_rate" in message
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.name == "step-000003"
    assert [r["train/skipped_nonfinite"] for r in metric_rows(tmp_path / "run")] == [0, 1, 1]
    # The checkpoint holds the last good weights (those after step 1), and resuming from it works.
    resumed = Trainer(tiny_config(tmp_path / "run", "sft", max_steps=4, max_nonfinite_steps=2, save_every=100,
                                  resume=True))
    resumed._restore(checkpoint)
    assert_same_adapter(after[0], resumed.policy.lora_state_dict(), atol=0)
    result = resumed.train()
    assert result.steps == 4 and [r["step"] for r in metric_rows(tmp_path / "run")] == [1, 2, 3, 4]


def test_nonfinite_steps_not_in_a_row_do_not_stop(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "sft", max_steps=5, max_nonfinite_steps=2))
    poison_steps(trainer, {1, 3, 5})
    result = trainer.train()
    assert result.steps == 5
    assert [r["train/skipped_nonfinite"] for r in metric_rows(result.run_dir)] == [1, 0, 1, 0, 1]


# ------------------------------------------------------------------------ masked vocabulary
def mask_padded_vocabulary(trainer, value=-math.inf):
    """Give the model's padded vocabulary entries (ids past the tokenizer's) a -inf logit."""
    n = len(trainer.policy.tokenizer)
    head = trainer.policy.head
    assert head.out_features > n, "the tiny model's logits dim exceeds its tokenizer (docs/algorithm.md, Pitfalls, 4)"

    def hook(module, inputs, output):
        output = output.clone()
        output[..., n:] = value
        return output

    return head.register_forward_hook(hook)


OPSD_LOSSES = [
    {"divergence": "forward_kl"}, {"divergence": "reverse_kl"}, {"divergence": "jsd", "jsd_beta": 0.3},
    {"divergence": "topk"}, {"divergence": "sampled_token"}, {"divergence": "forward_kl", "clip_tau": 0.05},
    {"divergence": "forward_kl", "loss_support": "truncated"}, {"divergence": "reverse_kl", "teacher": "live"},
]


@pytest.mark.parametrize("settings", OPSD_LOSSES, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_masked_vocabulary_never_gives_nan_in_opsd(tmp_path, settings):
    trainer = Trainer(tiny_config(tmp_path / "run", "opsd", max_steps=1, **settings))
    mask_padded_vocabulary(trainer)
    result = trainer.train()
    row = metric_rows(result.run_dir)[0]
    assert row["train/skipped_nonfinite"] == 0
    assert math.isfinite(row["loss/total"]) and math.isfinite(row["train/grad_norm"])
    assert row["train/grad_norm"] > 0


@pytest.mark.parametrize("algorithm", ["grpo", "sft"])
def test_masked_vocabulary_never_gives_nan_in_baselines(tmp_path, algorithm):
    trainer = Trainer(tiny_config(tmp_path / "run", algorithm, max_steps=1))
    mask_padded_vocabulary(trainer)
    if algorithm == "grpo":  # a random model earns no reward: a reward that varies within every group
        trainer.algorithm.reward = lambda rollouts, problems: ([float(i % 2) for i in range(len(rollouts))], {})
    row = metric_rows(trainer.train().run_dir)[0]
    assert row["train/skipped_nonfinite"] == 0 and math.isfinite(row["loss/total"])
    assert row["train/grad_norm"] > 0  # a forward and backward ran: no micro-batch was skipped as all-zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_divergence_with_masked_vocabulary_is_finite(kind, dtype):
    from opsd_kit.losses import DivergenceSpec, chunked_divergence

    torch.manual_seed(0)
    B, T, H, V, real = 2, 5, 8, 24, 17
    head = torch.nn.Linear(H, V, bias=True).to(dtype)
    with torch.no_grad():
        head.bias[real:] = -math.inf  # padded entries: -inf logits for both roles
    student = torch.randn(B, T, H, dtype=dtype, requires_grad=True)
    teacher = torch.randn(B, T, H, dtype=dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -2:] = False
    for spec in (DivergenceSpec(kind, beta=0.4, chunk_size=2),
                 DivergenceSpec(kind, beta=0.4, chunk_size=2, truncate=(5, 0.9)),
                 DivergenceSpec("topk", topk=4, chunk_size=2)):
        student.grad = None
        loss, per_token = chunked_divergence(student, teacher, head, mask, spec)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(per_token).all()
        assert torch.isfinite(student.grad).all()
