"""On-Policy Self-Distillation (arXiv 2601.18734, Algorithm 1 with a frozen teacher).

One step, per problem x with reference solution y* (docs/algorithm.md, The algorithm):
  1. the student samples y^ ~ p_S(. | x) (one sample per problem);
  2. teacher forward on [teacher prompt(x, y*) ++ y^] without grad, student forward on
     [student prompt(x) ++ y^]: the same completion ids, different contexts;
  3. at every completion position n, D(p_T(. | x, y*, y^<n) || p_S(. | x, y^<n)) over the full
     vocabulary (forward KL by default), summed over the step's completion tokens and divided
     by their count (the trainer does the division); gradients reach the student only.

Controls that tell signal from style: ``teacher_hint='shuffled'`` puts another problem's
solution in the teacher prompt (what is left is style); ``divergence='hint_contrast'`` adds a
third forward pass, the teacher with that wrong hint, and trains on what the correct hint adds
over it (``losses.hint_contrast_divergence``).

Speed: with ``rollout_backend='fast'`` one student pass over the prompts serves steps 1 and 2
(`opsd_kit.algorithms.prompt_pass`); the loss is the same up to floating-point order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from opsd_kit.algorithms.base import Algorithm
from opsd_kit.algorithms.prompt_pass import PromptPass, SharedPromptPass

if TYPE_CHECKING:
    from opsd_kit.prompts import Batch


@dataclass
class OPSDBatch:
    """One micro-batch of OPSD: the same completions under three contexts."""

    student: Batch
    """[student prompt ++ completion]."""
    teacher: Batch
    """[teacher prompt ++ the same completion]."""
    wrong_teacher: Batch | None
    """[wrong-hint teacher prompt ++ the same completion] (divergence='hint_contrast'), else None."""
    num_loss_tokens: int
    student_prompt: PromptPass | None = None
    """The student's pass over the prompt columns, already run (the rollout started from it);
    the loss uses it once and drops it (its cache grows in place). None: the loss runs the student
    over the whole row."""


class OPSD(Algorithm):
    """OPSD's step: one rollout per problem, the divergence of the student from the teacher on it.
    Collaborators: `Algorithm`'s (``sampler`` samples the rollouts)."""

    uses_teacher_prompt = True

    def __init__(self, config, policy, **collaborators):
        from opsd_kit.losses import DivergenceSpec

        super().__init__(config, policy, **collaborators)
        self.spec = DivergenceSpec.from_config(config)  # the loss settings, read once
        self.prompt_pass = SharedPromptPass(config, policy, sampler=self.sampler, ledger=self.ledger,
                                            device=self.device)

    def prepare(self, step: int) -> tuple[list[OPSDBatch], dict]:
        from opsd_kit.prompts import build_batch

        problems = self.step_problems(step)
        # 1. the student samples one completion per problem (from its pass over the prompts, if shared)
        passes, prefill = self.prompt_pass.before_sampling(
            [[self.prompts.student[problems[r].id] for r in rows] for rows in self.chunks(len(problems))])
        rollouts = self.rollouts(problems, step, n=1, prefill=prefill)
        metrics = self.rollout_metrics(rollouts, self.grade(rollouts, problems))
        # the rows of step 2: the same completion ids under the student's and the teacher's prompts
        pad = self.tokenizer.pad_token_id
        micro = []
        for k, rows in enumerate(self.chunks(len(rollouts))):
            completions = [rollouts.completion_ids[r] for r in rows]
            chosen = [problems[rollouts.prompt_index[r]] for r in rows]
            student = build_batch([self.prompts.student[p.id] for p in chosen], completions, pad)
            teacher = build_batch([self.prompts.teacher[p.id] for p in chosen], completions, pad)
            wrong = (build_batch([self.prompts.wrong_teacher[p.id] for p in chosen], completions, pad)
                     if self.spec.needs_wrong_teacher else None)
            self.ledger.book_prompt_tokens(*(b for b in (student, teacher, wrong) if b is not None))
            micro.append(OPSDBatch(student=student, teacher=teacher, wrong_teacher=wrong,
                                   num_loss_tokens=int(student.completion_mask.sum()),
                                   student_prompt=passes[k] if passes else None))
        metrics["prompt/teacher_middle_cut_total"] = self.prompts.teacher_middle_cut
        return micro, metrics

    def loss(self, mb: OPSDBatch):
        loss_sum, per_token_BC = self.divergence(mb)
        real = per_token_BC[mb.student.completion_mask.bool().to(per_token_BC.device)]  # never padding
        metrics = {"loss/divergence_mean": float(real.mean()) if real.numel() else 0.0,
                   "loss/divergence_max": float(real.max()) if real.numel() else 0.0}
        return loss_sum, metrics

    def divergence(self, mb: OPSDBatch):
        """``(loss_sum, per_token_BC)`` of a micro-batch: teacher hidden states (adapter off, no
        grad), student hidden states, then `losses.divergence` under the run's spec (steps 2 and 3)."""
        from opsd_kit.losses import divergence

        device = self.device
        with self.ledger.phase("teacher"), self.policy.teacher():
            teacher_h_BCH = self.policy.completion_hidden(mb.teacher)
            wrong_h_BCH = None if mb.wrong_teacher is None else self.policy.completion_hidden(mb.wrong_teacher)
        with self.ledger.phase("student"):
            prompt_pass, mb.student_prompt = mb.student_prompt, None  # used once: its cache grows
            student_h_BCH = self.prompt_pass.student_hidden(mb.student, prompt_pass)
            return divergence(student_h_BCH, teacher_h_BCH, self.policy.head, mb.student.completion_mask.to(device),
                              self.spec, targets_BT=mb.student.completion_ids.to(device),
                              wrong_teacher_hidden_BTH=wrong_h_BCH)
