"""SFT baseline (the official scripts/run_sft.sh): train on (student prompt -> reference
solution), loss on the solution tokens only (the prompt is context, never a target). Generates
no tokens; the ledger counts the training tokens.

Targets are capped by ``max_target_tokens`` (None: no cap), never by the rollout cap
``max_new_tokens``: reference solutions are far longer than OPSD's 1024-token rollouts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from opsd_kit.algorithms.base import Algorithm
from opsd_kit.config import ConfigError

if TYPE_CHECKING:
    from opsd_kit.data.problems import Problem
    from opsd_kit.prompts import Batch


@dataclass
class SFTBatch:
    """One micro-batch of SFT: [student prompt ++ reference solution], the solution the target."""

    student: Batch
    num_loss_tokens: int


class SFT(Algorithm):
    """SFT's step: the NLL of the step's reference solutions. Collaborators: `Algorithm`'s (no
    sampler), plus every training problem (``problems``, tokenised once as targets) and the
    model's ``context_length`` (None: unknown)."""

    def __init__(self, config, policy, *, problems: list[Problem], context_length: int | None, **collaborators):
        super().__init__(config, policy, **collaborators)
        eos = self.tokenizer.eos_token_id
        cap = self.config.max_target_tokens
        self.truncated = 0
        self._targets: dict[str, list[int]] = {}
        for p in problems:
            ids = self.tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [eos]
            if cap is not None and len(ids) > cap:
                self.truncated += 1
                ids = ids[:cap]
            self._targets[p.id] = ids
        if cap is None:
            self._check_uncapped_targets(problems, context_length)

    def _check_uncapped_targets(self, problems: list[Problem], context_length: int | None) -> None:
        """Without a cap, every prompt + target must fit the model's context (unknown: no check)."""
        over = [p.id for p in problems if context_length is not None
                and len(self.prompts.student[p.id]) + len(self._targets[p.id]) > context_length]
        if over:
            raise ConfigError(
                f"max_target_tokens=None: {len(over)} reference solutions (first: {over[0]!r}) do not fit the "
                f"model's context of {context_length} tokens after their prompt; set max_target_tokens to at most "
                f"{context_length - self.config.max_prompt_tokens} to cut them")

    def prepare(self, step: int) -> tuple[list[SFTBatch], dict]:
        from opsd_kit.prompts import build_batch

        problems = self.step_problems(step)
        micro = []
        for rows in self.chunks(len(problems)):
            chosen = [problems[r] for r in rows]
            batch = build_batch([self.prompts.student[p.id] for p in chosen], [self._targets[p.id] for p in chosen],
                                self.tokenizer.pad_token_id)
            self.ledger.book_prompt_tokens(batch)
            micro.append(SFTBatch(student=batch, num_loss_tokens=int(batch.completion_mask.sum())))
        return micro, {"sft/solutions_truncated": self.truncated}

    def loss(self, mb: SFTBatch):
        from opsd_kit.losses import chunked_token_logprobs

        device = self.device
        with self.ledger.phase("student"):
            targets = mb.student.completion_ids.to(device)
            logp = chunked_token_logprobs(self.policy.completion_hidden(mb.student), self.policy.head, targets,
                                          temperature=1.0, chunk_size=self.config.loss_chunk_size)
            loss_sum = -(logp * mb.student.completion_mask.to(device)).sum()  # NLL summed; trainer normalises
        return loss_sum, {}
