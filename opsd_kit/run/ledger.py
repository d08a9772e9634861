"""The token ledger: what a run generated, read and trained on, and where its time went.

Generated tokens are the paper's token-efficiency axis (arXiv 2601.18734): OPSD samples one
short rollout per problem, GRPO a group of them, SFT none. Algorithms book what they sample and
feed (`TokenLedger.book_rollouts`, `TokenLedger.book_prompt_tokens`) and time their phases
(`TokenLedger.phase`); the counts are summed over processes by the ``reduce_sum`` the trainer
gives the ledger.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import ClassVar

PHASES = ("generate", "teacher", "student", "backward", "optimizer")


@dataclass
class TokenLedger:
    generated_tokens: int = 0
    """Completion tokens sampled by rollouts (all processes)."""
    prompt_tokens: int = 0
    """Prompt tokens fed to forward passes, both roles (all processes)."""
    train_tokens: int = 0
    """Tokens that carried a loss (all processes)."""
    rollouts: int = 0
    """Sampled completions (all processes)."""
    seconds: dict = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    """Wall time per phase on this process, summed over the run."""
    wall_seconds: float = 0.0
    """Wall time of the training loop, summed over the run (resumes included, restarts not)."""

    # Not counts (never saved): how this process reaches the others and the device's clock.
    reduce_sum: ClassVar[Callable[[float], float]] = float
    """Sums a number over processes (the trainer sets it; one process: the number itself)."""
    sync: ClassVar[Callable[[], None] | None] = None
    """Runs before each clock read of `phase` (e.g. torch.cuda.synchronize), or None."""

    @contextmanager
    def phase(self, name: str):
        """Time a phase, ``sync`` before each clock read."""
        if self.sync:
            self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def book_rollouts(self, rollouts) -> None:
        """Count a `rollout.Rollouts`' completions and generated tokens, summed over processes."""
        self.generated_tokens += int(self.reduce_sum(rollouts.num_generated_tokens))
        self.rollouts += int(self.reduce_sum(len(rollouts)))

    def book_prompt_tokens(self, *batches) -> None:
        """Count the prompt tokens of `prompts.Batch` es about to be fed, summed over processes."""
        n = sum(int(b.attention_mask.sum() - b.completion_mask.sum()) for b in batches)
        self.prompt_tokens += int(self.reduce_sum(n))

    def metrics(self) -> dict:
        out = {f"tokens/{k.removesuffix('_tokens')}_total": v for k, v in asdict(self).items()
               if k not in ("seconds", "wall_seconds")}
        out.update({f"time/{k}_total": round(v, 4) for k, v in self.seconds.items()})
        return out

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Take the counts and times of ``state`` in place (whoever holds this ledger sees them)."""
        for key, value in state.items():
            setattr(self, key, dict(value) if isinstance(value, dict) else value)
