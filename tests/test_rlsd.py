"""RLSD: token advantages against hand-computed values, and training on the tiny model with
the teacher's log-probs taken from the live policy (default) or the adapter-off model on the
teacher prompt."""
import json
import math

import pytest
import torch
from _numerics import tolerance

from opsd_kit.algorithms.rlsd import rlsd_lambda_at, rlsd_token_advantages
from opsd_kit.config import load_profile
from opsd_kit.trainer import Trainer

ADV_B = torch.tensor([2.0, -1.0, 0.0])
TEACHER_BC = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -2.0, -3.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
STUDENT_BC = torch.tensor([[-1.1, -1.9, -1.5, -3.0], [-1.1, -1.9, -2.0, -1.5], [-2.0, -0.5, -1.0, -1.0]])
MASK_BC = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])


def test_token_advantages_by_hand():
    adv_BC, weight_BC = rlsd_token_advantages(ADV_B, TEACHER_BC, STUDENT_BC, MASK_BC, lam=0.5, eps=0.2)
    # delta = teacher - student. Row 0, A = 2 > 0: delta 0.1, -0.1, 1.0 (clipped to 1.2), masked.
    w0 = [math.exp(0.1), math.exp(-0.1), 1.2, 0.0]
    # Row 1, A = -1 < 0: -delta = -0.1, 0.1, 1.0 (clipped to 1.2), -0.5 (exp 0.61, clipped to 0.8).
    w1 = [math.exp(-0.1), math.exp(0.1), 1.2, 0.8]
    # Row 2, A = 0: sign 0, weight 1 on its two real tokens, advantage 0.
    w2 = [1.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(weight_BC, torch.tensor([w0, w1, w2]))
    a0 = [2.0 * (0.5 + 0.5 * w) for w in w0[:3]] + [0.0]  # A_t = A ((1 - lambda) + lambda w_t)
    a1 = [-1.0 * (0.5 + 0.5 * w) for w in w1]
    torch.testing.assert_close(adv_BC, torch.tensor([a0, a1, [0.0] * 4]))
    # A > 0: the token the teacher favours (delta 1.0) gains credit; A < 0: the token it
    # disfavours (delta -1.0, column 2 of row 1) takes more blame.
    assert adv_BC[0, 2] > 2.0 and adv_BC[1, 2] < -1.0


def test_lambda_zero_gives_grpo_and_no_gradient_flows_through_the_weights():
    student = STUDENT_BC.clone().requires_grad_()
    adv_BC, _ = rlsd_token_advantages(ADV_B, TEACHER_BC, student, MASK_BC, lam=0.0, eps=0.2)
    torch.testing.assert_close(adv_BC, ADV_B[:, None] * MASK_BC)
    adv_BC, _ = rlsd_token_advantages(ADV_B, TEACHER_BC, student, MASK_BC, lam=0.5, eps=0.2)
    assert not adv_BC.requires_grad  # sg(.): the advantage is a constant of the loss


def test_lambda_decays_linearly_to_zero():
    values = [rlsd_lambda_at(s, lam0=0.5, decay_steps=50) for s in (0, 25, 49, 50, 80)]
    assert values == pytest.approx([0.5, 0.25, 0.01, 0.0, 0.0])


@pytest.mark.parametrize("decay_steps", [0, -1])
def test_lambda_is_constant_without_decay(decay_steps):
    assert [rlsd_lambda_at(s, lam0=0.5, decay_steps=decay_steps) for s in (0, 1, 50, 10_000)] == [0.5] * 4
    assert load_profile("tiny", "rlsd", rlsd_decay_steps=decay_steps).rlsd_decay_steps == decay_steps


def _rlsd_trainer(tmp_path, **overrides):
    """A tiny RLSD trainer whose reward is the parity of the first token (a random model gets
    no math reward) and whose adapter is already away from zero, so that the student and the
    adapter-off teacher differ."""
    trainer = Trainer(load_profile("tiny", "rlsd", run_dir=str(tmp_path / "rlsd"), progress=False, **overrides))
    trainer.algorithm.reward = lambda rollouts, problems: ([float(c[0] % 2) for c in rollouts.completion_ids], {})
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    return trainer


def _logp_by_row(model, batch, temperature):
    """log p(completion token) of each unpadded row, one row at a time, from full logits."""
    rows = []
    for i in range(batch.input_ids.shape[0]):
        ids = batch.input_ids[i][batch.attention_mask[i].bool()]
        n = int(batch.completion_mask[i].sum())
        logits = model(input_ids=ids[None]).logits[0].float() / temperature
        rows.append(torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[-n:, 0])
    return rows


@pytest.mark.parametrize("rlsd_teacher", ["live", "frozen"])
def test_with_equal_prompts_delta_is_zero_on_every_token_for_the_live_teacher_only(tmp_path, rlsd_teacher):
    """The live teacher (the official rlsd_trainer.py's) given the student's own prompt is the
    student: delta_t = 0 and w_t = 1 on every token, so A_t = A. The frozen teacher's delta also
    holds the adapter's drift from the base model."""
    trainer = _rlsd_trainer(tmp_path, rlsd_teacher=rlsd_teacher)
    rlsd = trainer.algorithm
    rlsd.prompts.teacher = dict(rlsd.prompts.student)  # the teacher reads the student's prompt
    micro, _ = rlsd.prepare(0)
    learning = [mb for mb in micro if not mb.zero_gradient]
    assert learning
    for mb in learning:
        mask_BC = mb.student.completion_mask.bool()
        delta_BC = (mb.teacher_logp_BC - mb.student_score_logp_BC)[mask_BC]
        if rlsd_teacher == "live":
            assert torch.equal(delta_BC, torch.zeros_like(delta_BC))
            adv_BC, metrics = rlsd.advantages(mb, mb.student_score_logp_BC)
            assert torch.equal(adv_BC, mb.adv_B[:, None] * mask_BC)
            assert metrics["rlsd/weight_mean"] == 1.0
        else:
            assert delta_BC.abs().max() > 0.1


def test_student_score_is_grpo_old_logprobs_without_dropout(tmp_path):
    """GRPO's old log-probs (num_iterations > 1: train mode, no grad) and the student's score
    (eval mode, no grad) are one forward when nothing differs between the modes: RLSD computes
    it once, and its loss is bit-identical to the one with the score computed again."""
    trainer = _rlsd_trainer(tmp_path)
    rlsd, policy = trainer.algorithm, trainer.policy
    assert trainer.config.num_iterations > 1 and policy.model.training and policy.trains_as_it_scores()
    micro, _ = rlsd.prepare(0)
    learning = [mb for mb in micro if not mb.zero_gradient]
    assert learning
    for mb in learning:
        assert mb.student_score_logp_BC is mb.old_logp_BC  # no second forward
        with policy.scoring():
            scored = rlsd._logp(mb.student).cpu()
        assert torch.equal(scored, mb.old_logp_BC)
        reused, _ = rlsd.loss(mb)
        mb.student_score_logp_BC = scored
        again, _ = rlsd.loss(mb)
        assert torch.equal(reused, again)


def test_student_score_is_its_own_forward_with_dropout(tmp_path):
    trainer = _rlsd_trainer(tmp_path, lora_dropout=0.1)
    assert not trainer.policy.trains_as_it_scores()
    learning = [mb for mb in trainer.algorithm.prepare(0)[0] if not mb.zero_gradient]
    assert learning and all(mb.student_score_logp_BC is not mb.old_logp_BC for mb in learning)


def test_frozen_teacher_logprobs_are_the_adapter_off_model_on_the_teacher_prompt(tmp_path):
    trainer = _rlsd_trainer(tmp_path, rlsd_teacher="frozen")
    rlsd, policy, cfg = trainer.algorithm, trainer.policy, trainer.config
    micro, metrics = rlsd.prepare(0)
    assert metrics["rlsd/lambda"] == 0.5
    teacher_prompts = {tuple(rlsd.prompts.teacher[p.id]) for p in trainer.step_problems(0)}
    layers, vocab = policy.model.config.num_hidden_layers, policy.model.config.vocab_size
    assert all(mb.teacher is None for mb in micro if mb.zero_gradient)  # no advantage: no teacher pass
    learning = [mb for mb in micro if not mb.zero_gradient]
    assert learning
    for mb in learning:
        teacher_BC = mb.teacher_logp_BC
        torch.testing.assert_close(mb.teacher.completion_ids, mb.student.completion_ids)  # the same tokens
        with torch.no_grad():
            with policy.teacher():
                expected = _logp_by_row(policy.model, mb.teacher, cfg.temperature)
            adapter_on = _logp_by_row(policy.model, mb.teacher, cfg.temperature)
        for i, want in enumerate(expected):
            n = want.shape[0]
            prompt = mb.teacher.input_ids[i][mb.teacher.attention_mask[i].bool()][:-n]
            assert tuple(prompt.tolist()) in teacher_prompts  # the prompt holds the reference solution
            tol = tolerance(torch.float32, vocab + n, scale=float(want.abs().max()), depth=layers)
            torch.testing.assert_close(teacher_BC[i, :n], want, **tol)
            assert not torch.allclose(teacher_BC[i, :n], adapter_on[i], **tol)  # not the student's weights


def test_loss_uses_the_token_advantages(tmp_path):
    trainer = _rlsd_trainer(tmp_path)
    rlsd = trainer.algorithm
    micro, _ = rlsd.prepare(0)
    mb = next(m for m in micro if m.adv_B.abs().sum() > 0)
    mask_BC = mb.student.completion_mask
    adv_BC, _ = rlsd_token_advantages(mb.adv_B, mb.teacher_logp_BC, mb.student_score_logp_BC,
                                      mask_BC, lam=0.5, eps=trainer.config.rlsd_eps)
    loss_sum, metrics = rlsd.loss(mb)
    # First iteration: the importance ratio is 1, so the loss is -sum_t A_t over real tokens.
    tol = tolerance(torch.float32, int(mask_BC.sum()), scale=float(adv_BC.abs().sum()))
    torch.testing.assert_close(loss_sum.detach(), -adv_BC.sum(), **tol)
    grpo_loss = -(mb.adv_B[:, None] * mask_BC).sum()
    assert not torch.isclose(loss_sum.detach(), grpo_loss)  # not GRPO's sequence advantage
    assert 0.8 <= metrics["rlsd/weight_mean"] <= 1.2


def test_rlsd_steps_change_lora_and_not_base(tmp_path):
    trainer = _rlsd_trainer(tmp_path, max_steps=2)
    lora_before = trainer.policy.lora_state_dict()
    base_before = {n: p.detach().clone() for n, p in trainer.policy.causal_lm.named_parameters() if "lora_" not in n}
    result = trainer.train()
    assert result.steps == 2
    lora_after = trainer.policy.lora_state_dict()
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    for name, p in trainer.policy.causal_lm.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p.detach(), base_before[name]), name
    rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [r["rlsd/lambda"] for r in rows] == pytest.approx([0.5, 0.5 * (1 - 1 / 50)])
    assert all(0.8 <= r["rlsd/weight_mean"] <= 1.2 for r in rows)
    assert result.ledger["rollouts"] == 4 * 2  # one batch (4 problems x 2 generations) serves both iterations
