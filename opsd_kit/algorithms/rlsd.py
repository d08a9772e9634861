"""RLSD beside OPSD (the official OPSD repository's rlsd_trainer.py): GRPO whose sequence
advantage is redistributed over the rollout's tokens by the privileged teacher.

GRPO gives every token of a rollout y its sequence's group-relative advantage A. RLSD weighs
each token by how the teacher, which also sees the reference solution y*, judges it:

    delta_t = sg(log p_T(y_t | x, y*, y_<t) - log p_S(y_t | x, y_<t))
    w_t     = clip(exp(sign(A) * delta_t), 1 - eps, 1 + eps)
    A_t     = A * ((1 - lambda) + lambda * w_t)

with lambda decayed linearly from lambda_0 (`rlsd_lambda`) to 0 over `rlsd_decay_steps`
optimizer steps, after which RLSD is GRPO (`rlsd_decay_steps <= 0`: lambda stays lambda_0).

The teacher (`rlsd_teacher`) is by default the live policy, the weights that sampled y with
the adapter on, reading the privileged prompt: the official rlsd_trainer.py scores the
teacher prompt with ``self.model`` (L100-109), so delta_t holds only what the reference
solution adds, and is 0 on every token when the two prompts are the same. ``"frozen"`` scores
with the initial model (adapter off, or the ``init_adapter``), whose delta_t also holds the
policy's drift from it.
Both log-probs of delta_t are taken in the same mode (eval, no dropout, no grad) with the
same weights but the adapter switch, at the rollout temperature, once per batch of rollouts.
Rollouts, rewards, group advantages, the clipped surrogate and its normalisation are GRPO's
(`opsd_kit.algorithms.grpo`); only the advantage changes.
"""
from __future__ import annotations

from opsd_kit.algorithms.grpo import GRPO, GRPOBatch


def rlsd_lambda_at(step: int, *, lam0: float, decay_steps: int) -> float:
    """lambda at optimizer step ``step`` (0-based): lam0 * max(0, 1 - step / decay_steps), so
    lam0 at step 0 and 0 from step ``decay_steps`` on; ``decay_steps <= 0``: lam0 at every step
    (official rlsd_trainer.py L41-45)."""
    if decay_steps <= 0:
        return lam0
    return lam0 * max(0.0, 1.0 - step / decay_steps)


def rlsd_token_advantages(adv_B, teacher_logp_BC, student_logp_BC, mask_BC, *, lam: float, eps: float):
    """RLSD's per-token advantages ``(adv_BC, weight_BC)``, both 0 on masked positions.

    delta_t = sg(log p_T(y_t) - log p_S(y_t)) (teacher minus student: > 0 where the teacher,
    seeing the reference solution, finds the token likelier than the student does);
    w_t = clip(exp(sign(A) delta_t), 1 - eps, 1 + eps); A_t = A ((1 - lam) + lam w_t).
    For A > 0 the tokens the teacher favours get more credit (w_t > 1), for A < 0 the tokens
    it disfavours get more blame; A = 0 gives A_t = 0, lam = 0 gives A_t = A. Gradients never
    flow through the weights (both log-probs are detached)."""
    import torch

    delta_BC = (teacher_logp_BC - student_logp_BC).detach()
    weight_BC = torch.exp(torch.sign(adv_B)[:, None] * delta_BC).clamp(1.0 - eps, 1.0 + eps)
    adv_BC = adv_B[:, None] * ((1.0 - lam) + lam * weight_BC)
    return adv_BC * mask_BC, weight_BC * mask_BC


class RLSD(GRPO):
    """GRPO with teacher-weighted token advantages. Collaborators: `Algorithm`'s."""

    uses_teacher_prompt = True

    def prepare(self, step: int):
        cfg = self.config
        self._lambda = rlsd_lambda_at(step, lam0=cfg.rlsd_lambda, decay_steps=cfg.rlsd_decay_steps)
        micro, metrics = super().prepare(step)
        return micro, dict(metrics, **{"rlsd/lambda": self._lambda,
                                       "prompt/teacher_middle_cut_total": self.prompts.teacher_middle_cut})

    def _micro_batch(self, problems, completions, adv_B) -> GRPOBatch:
        """GRPO's micro-batch plus the teacher batch [teacher prompt ++ the same completion], the
        teacher's log-probs of the completion tokens and the student's in the same mode (eval,
        no grad), computed once per batch of rollouts. The student's are GRPO's old log-probs
        (``num_iterations > 1``) where those equal them bit for bit (`Policy.trains_as_it_scores`)."""
        from opsd_kit.prompts import build_batch

        mb = super()._micro_batch(problems, completions, adv_B)
        if mb.zero_gradient:  # every token advantage is A * (...) = 0: no teacher pass needed
            return mb
        mb.teacher = build_batch([self.prompts.teacher[p.id] for p in problems], completions,
                                 self.tokenizer.pad_token_id)
        self.ledger.book_prompt_tokens(mb.teacher)
        with self.ledger.phase("teacher"):
            with self.policy.teacher():  # eval mode, no grad; live: adapter on, frozen: adapter off
                mb.teacher_logp_BC = self._logp(mb.teacher).cpu()
            if mb.old_logp_BC is not None and self.policy.trains_as_it_scores():
                # GRPO's old log-probs are this very forward (same weights, batch and temperature,
                # no grad, no dropout): the student's side of delta, not computed twice
                mb.student_score_logp_BC = mb.old_logp_BC
            else:
                with self.policy.scoring():  # eval mode, no grad, adapter on: the student's side of delta
                    mb.student_score_logp_BC = self._logp(mb.student).cpu()
        return mb

    def advantages(self, mb: GRPOBatch, old_logp_BC) -> tuple:
        """RLSD's token advantages at this step's lambda, [B, C], and the mean token weight."""
        device = old_logp_BC.device
        mask_BC = mb.student.completion_mask.to(device)
        adv_BC, weight_BC = rlsd_token_advantages(mb.adv_B.to(device), mb.teacher_logp_BC.to(device),
                                                  mb.student_score_logp_BC.to(device), mask_BC,
                                                  lam=self._lambda, eps=self.config.rlsd_eps)
        return adv_BC, {"rlsd/weight_mean": float(weight_BC.sum() / mask_BC.sum().clamp(min=1))}
