"""On-Policy Self-Distillation (arXiv 2601.18734, Algorithm 1 with a frozen teacher).

One step, per problem x with reference solution y* (docs/algorithm.md, The algorithm):
  1. the student samples y^ ~ p_S(. | x) (one sample per problem);
  2. teacher forward on [teacher prompt(x, y*) ++ y^] without grad, student forward on
     [student prompt(x) ++ y^]: the same completion ids, different contexts;
  3. at every completion position n, D(p_T(. | x, y*, y^<n) || p_S(. | x, y^<n)) over the full
     vocabulary (forward KL by default), summed over the step's completion tokens and divided
     by their count (the trainer does the division); gradients reach the student only.

OPSD + SFT (``sft_weight`` > 0, beyond the paper): the step's loss adds ``sft_weight`` times the
SFT loss of the same problems' reference solutions (`opsd_kit.algorithms.sft`), each term a sum
over its own tokens divided by the step's count of those tokens (all processes):

    L = sum_div / N_div + sft_weight * sum_nll / N_sft

The trainer divides every micro-batch's loss by N_div, so a micro-batch returns
``sum_div + sft_weight * (N_div / N_sft) * sum_nll``. Both parts are logged (``loss/divergence``,
``loss/sft``, unweighted).

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
    sft: Batch | None = None
    """[student prompt ++ reference solution] of the same problems (``sft_weight`` > 0), else None."""
    divergence_tokens: float = 1.0
    """N_div: the step's completion tokens over all processes (the trainer's divisor)."""
    sft_tokens: float = 1.0
    """N_sft: the step's reference-solution tokens over all processes."""


class OPSD(Algorithm):
    """OPSD's step: one rollout per problem, the divergence of the student from the teacher on it.
    Collaborators: `Algorithm`'s (``sampler`` samples the rollouts)."""

    uses_teacher_prompt = True
    summed_metrics = ("loss/divergence", "loss/sft")

    def __init__(self, config, policy, *, problems=None, context_length: int | None = None, sft_targets=None,
                 **collaborators):
        from opsd_kit.losses import DivergenceSpec

        super().__init__(config, policy, **collaborators)
        self.spec = DivergenceSpec.from_config(config)  # the loss settings, read once
        self.sft_targets = sft_targets
        """The reference solutions as SFT targets (``sft_weight`` > 0: given, or built from
        ``problems``), else None."""
        if config.sft_weight and sft_targets is None:
            from opsd_kit.algorithms.sft import SolutionTargets

            if problems is None:
                raise ValueError("OPSD with sft_weight > 0 needs the training problems (their reference solutions)")
            self.sft_targets = SolutionTargets(config, self.tokenizer, problems, self.prompts, context_length)
        self.prompt_pass = SharedPromptPass(policy, sampler=self.sampler, ledger=self.ledger,
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
        n_div = max(self.ledger.reduce_sum(sum(mb.num_loss_tokens for mb in micro)), 1.0)  # all processes
        for mb in micro:
            mb.divergence_tokens = n_div
        if self.sft_targets is not None:
            self._add_sft(micro, [[problems[rollouts.prompt_index[r]] for r in rows]
                                  for rows in self.chunks(len(rollouts))])
            metrics["sft/solutions_truncated"] = self.sft_targets.truncated
        return micro, metrics

    def _add_sft(self, micro: list[OPSDBatch], chosen: list[list]) -> None:
        """Give each micro-batch its problems' SFT batch and the step's reference-solution token count."""
        for mb, problems in zip(micro, chosen):
            mb.sft = self.sft_targets.batch(self.prompts, problems, self.tokenizer.pad_token_id)
            self.ledger.book_prompt_tokens(mb.sft)
        n_sft = self.ledger.reduce_sum(sum(int(mb.sft.completion_mask.sum()) for mb in micro))
        self.ledger.train_tokens += int(n_sft)  # the trainer counts the divergence's tokens
        for mb in micro:
            mb.sft_tokens = max(n_sft, 1.0)

    def loss(self, mb: OPSDBatch):
        """The micro-batch's divergence sum (plus, with ``sft_weight``, the scaled SFT sum: module
        doc). Metrics ``loss/divergence`` and ``loss/sft`` are this micro-batch's shares of the
        step's normalised terms (the trainer sums them over micro-batches and processes)."""
        loss_sum, per_token_BC = self.divergence(mb)
        real = per_token_BC[mb.student.completion_mask.bool().to(per_token_BC.device)]  # never padding
        metrics = {"loss/divergence_mean": float(real.mean()) if real.numel() else 0.0,
                   "loss/divergence_max": float(real.max()) if real.numel() else 0.0,
                   "loss/divergence": float(loss_sum.detach()) / mb.divergence_tokens}
        if mb.sft is not None:
            from opsd_kit.algorithms.sft import nll_sum

            with self.ledger.phase("student"):
                sft_sum = nll_sum(self.policy.completion_hidden(mb.sft), self.policy.head, mb.sft,
                                  chunk_size=self.config.loss_chunk_size)
            metrics["loss/sft"] = float(sft_sum.detach()) / mb.sft_tokens
            loss_sum = loss_sum + (self.config.sft_weight * mb.divergence_tokens / mb.sft_tokens) * sft_sum
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
