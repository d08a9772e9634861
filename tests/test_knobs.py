"""Every TrainConfig knob reaches the code it names: each test fails if its field were ignored.

lr_schedule and warmup_steps: tests/test_trainer.py::test_learning_rate_schedule (the trainer's
`make_scheduler` at given steps).
"""
from __future__ import annotations

import pytest
import torch

from opsd_kit import losses
from opsd_kit.config import load_profile
from opsd_kit.losses import DivergenceSpec


def _divergence(spec: DivergenceSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``losses.divergence`` under ``spec`` on fixed random hidden states, head and targets."""
    gen = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(2, 5, 8, generator=gen) for _ in range(2))
    head = torch.nn.Linear(8, 11, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(11, 8, generator=gen))
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    return losses.divergence(student, teacher, head, torch.ones(2, 5), spec, targets_BT=targets)


def _spec(**overrides) -> DivergenceSpec:
    return DivergenceSpec.from_config(load_profile("tiny", "opsd", **overrides))


# -- the OPSD loss ---------------------------------------------------------------------------
def test_loss_temperature():
    assert _spec(loss_temperature=0.7).temperature == 0.7
    assert _spec(loss_temperature=None, temperature=1.3).temperature == 1.3  # None: the rollout temperature
    cool, warm = (_divergence(_spec(loss_temperature=t))[1] for t in (0.5, 2.0))
    assert not torch.allclose(cool, warm)


def test_contrast_clip():
    """hint_contrast's log-ratio clip reaches the loss: a tighter clip gives another divergence."""
    gen = torch.Generator().manual_seed(1)
    student, teacher, wrong = (3 * torch.randn(2, 5, 8, generator=gen) for _ in range(3))
    head = torch.nn.Linear(8, 11, bias=False)

    def loss(**overrides):
        spec = _spec(divergence="hint_contrast", **overrides)
        return losses.divergence(student, teacher, head, torch.ones(2, 5), spec, wrong_teacher_hidden_BTH=wrong)[1]

    assert _spec(divergence="hint_contrast", contrast_clip=0.25).contrast_clip == 0.25
    tight, loose, off = loss(contrast_clip=0.25), loss(contrast_clip=1.0), loss(contrast_clip=None)
    assert not torch.allclose(tight, loose) and not torch.allclose(loose, off)


def test_distill_topk():
    assert _spec(divergence="topk", distill_topk=3).topk == 3
    narrow, wide = (_divergence(_spec(divergence="topk", distill_topk=k))[1] for k in (2, 9))
    assert not torch.allclose(narrow, wide)


def test_sampled_token_clamp(monkeypatch):
    seen = []
    real = losses.sampled_token_loss

    def spy(*args, clamp=None):
        seen.append(clamp)
        return real(*args, clamp=clamp)

    monkeypatch.setattr(losses, "sampled_token_loss", spy)
    tight, loose = (_divergence(_spec(divergence="sampled_token", sampled_token_clamp=c))[0] for c in (0.01, 100.0))
    assert seen == [0.01, 100.0]
    assert not torch.allclose(tight, loose)


# -- GRPO: advantages and the clipped surrogate through the algorithm ---------------------------
@pytest.mark.parametrize("scale_rewards, ratio_clip_eps", [(True, 0.05), (False, 0.3)])
def test_grpo_scale_rewards_and_ratio_clip_eps(tmp_path, monkeypatch, scale_rewards, ratio_clip_eps):
    """Hand-made rollouts (one right answer per group of two) through GRPO's advantages and loss."""
    from opsd_kit.algorithms.grpo import group_advantages, grpo_token_loss
    from opsd_kit.rollout import hf as rollout
    from opsd_kit.trainer import Trainer

    cfg = load_profile("tiny", "grpo", run_dir=str(tmp_path / "run"), progress=False, lora_dropout=0.0,
                       kl_coef=0.0, num_iterations=2, scale_rewards=scale_rewards, ratio_clip_eps=ratio_clip_eps)
    trainer = Trainer(cfg)
    problems = trainer.step_problems(0)
    group = cfg.num_generations

    def fake_generate(model, tokenizer, prompt_ids, settings, *, seed=None, progress=False):
        index = [i for i in range(len(prompt_ids)) for _ in range(settings.n)]
        texts = [f"\\boxed{{{problems[i].answer}}}" if j == 0 else "\\boxed{-1}"
                 for i in range(len(prompt_ids)) for j in range(settings.n)]
        return rollout.Rollouts(prompt_index=index, completion_ids=[[5, 6, 7]] * len(index), texts=texts,
                                finished=[True] * len(index))

    monkeypatch.setattr(rollout, "generate", fake_generate)
    micro, _ = trainer.algorithm.prepare(0)
    adv = torch.cat([mb.adv_B for mb in micro])
    rewards = torch.tensor([1.0 if j == 0 else 0.0 for _ in problems for j in range(group)])
    torch.testing.assert_close(adv, group_advantages(rewards, group, scale=scale_rewards))
    assert not torch.allclose(adv, group_advantages(rewards, group, scale=not scale_rewards))

    mb = micro[0]
    logp = mb.old_logp_BC  # the current weights' log-probs (nothing trained since)
    offsets = torch.full_like(logp, 0.5)
    offsets[:, 1::2] = -0.5  # ratios e^{-0.5} and e^{0.5}: outside any of these clip ranges
    old = logp + offsets
    mb.old_logp_BC = old
    with torch.no_grad():
        loss, _ = trainer.algorithm.loss(mb)
    mask = mb.student.completion_mask
    want = grpo_token_loss(logp, old, mb.adv_B, mask, clip_eps=ratio_clip_eps)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    assert not torch.isclose(want, grpo_token_loss(logp, old, mb.adv_B, mask, clip_eps=0.2))


# -- the optimizer and the LoRA adapter the trainer builds --------------------------------------
def test_weight_decay_and_lora_settings_reach_the_built_policy(tmp_path):
    from opsd_kit.trainer import Trainer

    cfg = load_profile("tiny", "opsd", run_dir=str(tmp_path / "run"), progress=False, weight_decay=0.05,
                       lora_dropout=0.25, lora_target_modules=["q_proj", "down_proj"])
    trainer = Trainer(cfg)
    assert [group["weight_decay"] for group in trainer.optimizer.param_groups] == [0.05]
    model = trainer.policy.model
    lora = model.peft_config[model.active_adapter]
    assert lora.lora_dropout == 0.25 and set(lora.target_modules) == {"q_proj", "down_proj"}
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "down_proj"}
    dropouts = {m.lora_dropout[model.active_adapter].p for m in model.modules() if hasattr(m, "lora_dropout")
                and isinstance(m.lora_dropout, torch.nn.ModuleDict)}
    assert dropouts == {0.25}
