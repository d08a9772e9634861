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


class SolutionTargets:
    """Every training problem's reference solution as target ids (EOS appended), tokenised once
    and cut at ``max_target_tokens``; shared by SFT and OPSD's ``sft_weight`` term. Without a cap,
    every prompt + target must fit the model's ``context_length`` (None: unknown, no check)."""

    def __init__(self, config, tokenizer, problems: list[Problem], prompts, context_length: int | None):
        eos = tokenizer.eos_token_id
        cap = config.max_target_tokens
        self.truncated = 0
        self.ids: dict[str, list[int]] = {}
        for p in problems:
            ids = tokenizer(p.solution, add_special_tokens=False)["input_ids"] + [eos]
            if cap is not None and len(ids) > cap:
                self.truncated += 1
                ids = ids[:cap]
            self.ids[p.id] = ids
        if cap is None:
            over = [p.id for p in problems if context_length is not None
                    and len(prompts.student[p.id]) + len(self.ids[p.id]) > context_length]
            if over:
                raise ConfigError(
                    f"max_target_tokens=None: {len(over)} reference solutions (first: {over[0]!r}) do not fit the "
                    f"model's context of {context_length} tokens after their prompt; set max_target_tokens to at "
                    f"most {context_length - config.max_prompt_tokens} to cut them")

    def batch(self, prompts, problems: list[Problem], pad_token_id: int) -> Batch:
        """[student prompt ++ reference solution] of ``problems``, the solution the completion."""
        from opsd_kit.prompts import build_batch

        return build_batch([prompts.student[p.id] for p in problems], [self.ids[p.id] for p in problems],
                           pad_token_id)


def nll_sum(hidden_BCH, head, batch: Batch, *, chunk_size: int):
    """The SUM over ``batch``'s completion tokens of -log p(token) at temperature 1 (the SFT loss
    before the trainer's division by the step's token count), from hidden states [B, C, H]."""
    from opsd_kit.losses import chunked_token_logprobs

    device = hidden_BCH.device
    logp = chunked_token_logprobs(hidden_BCH, head, batch.completion_ids.to(device), temperature=1.0,
                                  chunk_size=chunk_size)
    return -(logp * batch.completion_mask.to(device)).sum()


class SFT(Algorithm):
    """SFT's step: the NLL of the step's reference solutions. Collaborators: `Algorithm`'s (no
    sampler), plus the training problems' ``targets`` (`SolutionTargets`), or every training
    problem (``problems``, tokenised once as targets) and the model's ``context_length`` (None:
    unknown) to build them from."""

    def __init__(self, config, policy, *, problems: list[Problem] | None = None, context_length: int | None = None,
                 targets: SolutionTargets | None = None, **collaborators):
        super().__init__(config, policy, **collaborators)
        if targets is None and problems is None:
            raise ValueError("SFT needs the training problems (their reference solutions) or their targets")
        self.targets = targets or SolutionTargets(config, self.tokenizer, problems, self.prompts, context_length)

    def prepare(self, step: int) -> tuple[list[SFTBatch], dict]:
        problems = self.step_problems(step)
        micro = []
        for rows in self.chunks(len(problems)):
            batch = self.targets.batch(self.prompts, [problems[r] for r in rows], self.tokenizer.pad_token_id)
            self.ledger.book_prompt_tokens(batch)
            micro.append(SFTBatch(student=batch, num_loss_tokens=int(batch.completion_mask.sum())))
        return micro, {"sft/solutions_truncated": self.targets.truncated}

    def loss(self, mb: SFTBatch):
        with self.ledger.phase("student"):
            loss_sum = nll_sum(self.policy.completion_hidden(mb.student), self.policy.head, mb.student,
                               chunk_size=self.config.loss_chunk_size)  # summed; trainer normalises
        return loss_sum, {}
