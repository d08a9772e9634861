"""What OPSD, GRPO, RLSD and SFT share inside a step: cached prompt ids, rollouts booked in the
ledger and contiguous batches. Their final hidden states come from `Policy.completion_hidden`;
logits are never materialised here (the losses go through the output head in chunks).

An algorithm touches only the collaborators the trainer hands it (`Algorithm.__init__`); it
never reaches back into the trainer. Each algorithm has its own typed micro-batch dataclass
(`opsd.OPSDBatch`, `grpo.GRPOBatch`, `sft.SFTBatch`); the trainer reads only ``num_loss_tokens``
and, where a batch has it, ``loss_units`` (`loss_units`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from opsd_kit.config import TrainConfig
    from opsd_kit.data.problems import Problem
    from opsd_kit.policy import Policy
    from opsd_kit.prompts import PromptCache
    from opsd_kit.rollout.fast import Prefill
    from opsd_kit.rollout.hf import Rollouts
    from opsd_kit.rollout.sampler import RolloutSampler
    from opsd_kit.run.ledger import TokenLedger


class MicroBatch(Protocol):
    """What the trainer reads of a micro-batch: one forward/backward worth of rows."""

    num_loss_tokens: int
    """Tokens that carry a loss (the step's loss is divided by their sum over micro-batches,
    unless the batch gives ``loss_units``)."""


def loss_units(mb) -> int:
    """What a micro-batch adds to the step's loss divisor: its ``loss_units`` where it has one
    that is not None (GRPO's per-sequence normalisation: its rollouts), else its
    ``num_loss_tokens``."""
    units = getattr(mb, "loss_units", None)
    return mb.num_loss_tokens if units is None else units


class Algorithm:
    """Base class. Subclasses implement ``prepare(step)`` and ``loss(micro_batch)``.

    Args:
        config: the run's settings.
        policy: the model being trained and its teacher (`Policy.teacher`).
        prompts: every training problem's prompt ids, built once.
        ledger: books tokens (summed over processes) and times the phases.
        device: where the forward passes run.
        step_problems: this process's problems of an optimizer step.
        sampler: samples rollouts from the current student (None: the algorithm samples nothing).
    """

    uses_teacher_prompt = False
    """Whether ``prompts`` must hold the teacher prompts."""
    summed_metrics: tuple[str, ...] = ()
    """Metrics of ``loss`` that are a micro-batch's share of a step total: the trainer sums them over
    micro-batches and processes (every other metric is averaged, ``*_max`` maximised)."""

    def __init__(self, config: TrainConfig, policy: Policy, *, prompts: PromptCache, ledger: TokenLedger,
                 device: torch.device, step_problems: Callable[[int], list[Problem]],
                 sampler: RolloutSampler | None = None):
        self.config = config
        self.policy = policy
        self.tokenizer = policy.tokenizer
        self.prompts = prompts
        self.ledger = ledger
        self.device = device
        self.step_problems = step_problems
        self.sampler = sampler

    # -- subclass API --------------------------------------------------------------------
    def prepare(self, step: int) -> tuple[list[MicroBatch], dict]:
        raise NotImplementedError

    def loss(self, mb: MicroBatch):
        """Return ``(loss_sum, metrics)``: the SUM of per-token losses of the micro-batch, or
        ``(None, metrics)`` when that loss and its gradient are exactly 0 (nothing to backward)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- shared helpers ------------------------------------------------------------------
    def rollouts(self, problems: list[Problem], step: int, n: int, prefill: Prefill | None = None) -> Rollouts:
        """Sample ``n`` completions per problem from the current student; book the tokens.
        ``prefill``: the student's own pass over these prompts to sample from (`rollout.Prefill`)."""
        prompts = [self.prompts.student[p.id] for p in problems]
        with self.ledger.phase("generate"):
            out = self.sampler.sample(prompts, self.config.rollout_settings(n=n), step, prefill=prefill)
        self.ledger.book_rollouts(out)
        return out

    def grade(self, rollouts: Rollouts, problems: list[Problem]) -> list[float]:
        """1.0 where a rollout's answer, read in ``config.grading_mode`` ("strict": its last box only),
        matches the problem's answer, else 0.0 (``rollout/correct``; GRPO's default reward 'correct')."""
        from opsd_kit.evaluation.evaluate import grade_many

        golds = [problems[i].answer for i in rollouts.prompt_index]
        return [float(c) for c in grade_many(rollouts.texts, golds, mode=self.config.grading_mode)]

    def rollout_metrics(self, rollouts: Rollouts, correct: list[float]) -> dict:
        lengths = [len(c) for c in rollouts.completion_ids]
        return {
            "rollout/correct": sum(correct) / max(1, len(correct)),
            "rollout/len_mean": sum(lengths) / max(1, len(lengths)),
            "rollout/len_max": max(lengths, default=0),
            "rollout/truncated_rate": 1.0 - sum(rollouts.finished) / max(1, len(rollouts)),
            "tokens/generated": rollouts.num_generated_tokens,
        }

    def chunks(self, n: int) -> list[range]:
        """Index ranges of micro-batches over n rows."""
        size = self.config.micro_batch_size
        return [range(s, min(n, s + size)) for s in range(0, n, size)]
