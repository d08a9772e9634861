"""On-Policy Self-Distillation (arXiv 2601.18734, Algorithm 1 with a frozen teacher).

One step, per problem x with reference solution y*:
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

One pass over the prompts: with ``rollout_backend='fast'`` the student's forward over each
micro-batch's prompts runs before sampling (`OPSD.student_prompt_pass`); its key/value states
start the rollout (instead of the fused decoder's own pass over the same prompts with the same
weights), and the loss continues from them over the completion, gradients through both. The
result equals running the whole row (up to floating-point order; tested). It holds every
micro-batch's prompt activations until that micro-batch's backward (``share_prompt_pass=False``
trades the saved forward for that memory). Off by itself where the pass would not be the
sampling policy's (dropout), could not keep its cache (gradient checkpointing), or where its
graph would see the weights change before backward (the EMA teacher, and the frozen teacher of a
run started from ``init_adapter``, swap their weights in).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from opsd_kit.algorithms.base import Algorithm

if TYPE_CHECKING:
    import torch
    from transformers import DynamicCache

    from opsd_kit.prompts import Batch


@dataclass
class PromptPass:
    """The student's forward over a micro-batch's left-padded prompts, kept for the loss."""

    cache: DynamicCache
    """Every layer's key/value states of the prompt columns, with their autograd graph."""
    last_hidden_BH: torch.Tensor
    """The last prompt column's final hidden state (it predicts the first completion token)."""
    mask_BP: torch.Tensor
    """The attention mask of the cache's columns (their layout: `Policy.hidden_sharing_prefix`'s
    where the prompts share a prefix, else left padding)."""


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

    def __init__(self, config, policy, *, problems=None, context_length: int | None = None, **collaborators):
        from opsd_kit.losses import DivergenceSpec

        super().__init__(config, policy, **collaborators)
        self.spec = DivergenceSpec.from_config(config)  # the loss settings, read once
        self.sft_targets = None
        """The reference solutions as SFT targets (``sft_weight`` > 0: needs ``problems``), else None."""
        if config.sft_weight:
            from opsd_kit.algorithms.sft import SolutionTargets

            if problems is None:
                raise ValueError("OPSD with sft_weight > 0 needs the training problems (their reference solutions)")
            self.sft_targets = SolutionTargets(config, self.tokenizer, problems, self.prompts, context_length)
        self.shares_prompt_pass = self._can_share_prompt_pass()
        """Whether one student pass over the prompts serves the rollout and the loss (module docstring)."""

    def _can_share_prompt_pass(self) -> bool:
        """``config.share_prompt_pass``, where the fused decoder samples (backend 'fast', a model
        it supports, transformers' modules), the pass in train mode is the sampling policy (no
        dropout anywhere) and its graph lives until backward (no gradient checkpointing, which
        drops the cache; no teacher that writes its weights in before backward: EMA, or frozen at an
        init adapter, `Policy.swaps_teacher_weights`). Read from
        the policy itself, which need not have been built from this config."""
        from opsd_kit.rollout.fused_decoder import FusedDecoder

        if (not self.config.share_prompt_pass or self.sampler is None or self.sampler.backend != "fast"
                or self.policy.swaps_teacher_weights):
            return False
        return self.policy.can_run_in_pieces(training=True) and FusedDecoder.unsupported(self.policy.model) is None

    def prepare(self, step: int) -> tuple[list[OPSDBatch], dict]:
        from opsd_kit.prompts import build_batch

        problems = self.step_problems(step)
        passes = prefill = None
        if self.shares_prompt_pass:
            from opsd_kit.rollout.fast import Prefill

            with self.ledger.phase("student"):
                passes, parts = zip(*(self.student_prompt_pass([self.prompts.student[problems[r].id] for r in rows])
                                      for rows in self.chunks(len(problems))))
            prefill = Prefill.concat(parts)
        rollouts = self.rollouts(problems, step, n=1, prefill=prefill)
        metrics = self.rollout_metrics(rollouts, self.grade(rollouts, problems))
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
        metrics["prompt/teacher_truncated_total"] = self.prompts.teacher_truncated
        if self.sft_targets is not None:
            self._add_sft(micro, [[problems[rollouts.prompt_index[r]] for r in rows]
                                  for rows in self.chunks(len(rollouts))])
            metrics["sft/solutions_truncated"] = self.sft_targets.truncated
        return micro, metrics

    def _add_sft(self, micro: list[OPSDBatch], chosen: list[list]) -> None:
        """Give each micro-batch its problems' SFT batch and the step's token counts of both terms."""
        for mb, problems in zip(micro, chosen):
            mb.sft = self.sft_targets.batch(self.prompts, problems, self.tokenizer.pad_token_id)
            self.ledger.book_prompt_tokens(mb.sft)
        n_div = self.ledger.reduce_sum(sum(mb.num_loss_tokens for mb in micro))
        n_sft = self.ledger.reduce_sum(sum(int(mb.sft.completion_mask.sum()) for mb in micro))
        self.ledger.train_tokens += int(n_sft)  # the trainer counts the divergence's tokens
        for mb in micro:
            mb.divergence_tokens, mb.sft_tokens = max(n_div, 1.0), max(n_sft, 1.0)

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
                sft_sum = nll_sum(self.hidden(mb.sft), self.policy.head, mb.sft,
                                  chunk_size=self.config.loss_chunk_size)
            metrics["loss/sft"] = float(sft_sum.detach()) / mb.sft_tokens
            loss_sum = loss_sum + (self.config.sft_weight * mb.divergence_tokens / mb.sft_tokens) * sft_sum
        return loss_sum, metrics

    def divergence(self, mb: OPSDBatch):
        """``(loss_sum, per_token_BC)`` of a micro-batch: teacher hidden states (adapter off, no
        grad), student hidden states, then `losses.divergence` under the run's spec."""
        from opsd_kit.losses import divergence

        device = self.device
        with self.ledger.phase("teacher"), self.policy.teacher():
            teacher_h_BCH = self.hidden(mb.teacher)
            wrong_h_BCH = None if mb.wrong_teacher is None else self.hidden(mb.wrong_teacher)
        with self.ledger.phase("student"):
            student_h_BCH = self.student_hidden(mb)
            return divergence(student_h_BCH, teacher_h_BCH, self.policy.head, mb.student.completion_mask.to(device),
                              self.spec, targets_BT=mb.student.completion_ids.to(device),
                              wrong_teacher_hidden_BTH=wrong_h_BCH)

    def student_prompt_pass(self, prompt_ids: list[list[int]]):
        """The student's forward over left-padded prompts (one micro-batch), with gradients:
        ``(PromptPass, rollout.Prefill)``, the second detached for sampling (in the left-padded
        layout). A prefix all prompts share runs once (`Policy.hidden_sharing_prefix`)."""
        import torch

        from opsd_kit.prompts import left_padded_columns, position_ids, shared_prefix_length
        from opsd_kit.rollout.fast import Prefill
        from opsd_kit.rollout.hf import left_pad

        ids_BP, mask_BP = (t.to(self.device) for t in left_pad(prompt_ids, self.tokenizer.pad_token_id))
        width, prefix = ids_BP.shape[1], shared_prefix_length(prompt_ids)
        hidden_BWH, cache, cache_mask_BP = self.policy.hidden_sharing_prefix(
            ids_BP, mask_BP, position_ids(mask_BP), width, prefix)
        last_BH = hidden_BWH[:, -1]
        order_BP = left_padded_columns(mask_BP, width, prefix)  # the identity without a prefix

        def left_padded(states_BGPD):
            return states_BGPD.detach().gather(2, order_BP[:, None, :, None].expand_as(states_BGPD))

        with torch.no_grad():
            sampling = Prefill([left_padded(layer.keys) for layer in cache.layers],
                               [left_padded(layer.values) for layer in cache.layers],
                               self.policy.head(last_BH.detach()))
        return PromptPass(cache=cache, last_hidden_BH=last_BH, mask_BP=cache_mask_BP), sampling

    def student_hidden(self, mb: OPSDBatch):
        """The student's hidden states at the columns that predict the completion, [B, C, H]:
        the whole row, or (``mb.student_prompt``) the completion's columns continuing from the
        prompt pass (the last prompt column's state predicts the first completion token), which
        is then dropped from ``mb``: its cache now holds the completion's columns as well."""
        import torch

        prompt_pass, mb.student_prompt = mb.student_prompt, None
        if prompt_pass is None:
            return self.hidden(mb.student)
        b = mb.student.to(self.device)
        P, C = b.prompt_width, b.completion_ids.shape[1]
        first_B1H = prompt_pass.last_hidden_BH[:, None]
        if C == 1:
            return first_B1H
        cols = slice(P, P + C - 1)  # completion tokens 0 .. C-2 predict tokens 1 .. C-1
        mask_BT = torch.cat([prompt_pass.mask_BP, b.attention_mask[:, P:P + C - 1]], 1)
        rest_BCH = self.policy.backbone_hidden(b.input_ids[:, cols], mask_BT, b.position_ids[:, cols],
                                               cache=prompt_pass.cache)
        return torch.cat([first_B1H, rest_BCH], dim=1)
