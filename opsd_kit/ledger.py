"""The token ledger: what a run generated, read and trained on, and where its time went.

Generated tokens are the paper's token-efficiency axis (arXiv 2601.18734): OPSD samples one
short rollout per problem, GRPO a group of them, SFT none.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

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

    @contextmanager
    def phase(self, name: str, sync=None):
        """Time a phase; ``sync`` (e.g. torch.cuda.synchronize) runs before each clock read."""
        if sync:
            sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict:
        out = {f"tokens/{k.removesuffix('_tokens')}_total": v for k, v in asdict(self).items()
               if k not in ("seconds", "wall_seconds")}
        out.update({f"time/{k}_total": round(v, 4) for k, v in self.seconds.items()})
        return out

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "TokenLedger":
        return cls(**state)
