"""Per-step metrics as JSONL (one object per line; `pandas.read_json(path, lines=True)`).

Keys are namespaced (`loss/...`, `tokens/...`, `time/...`, `rollout/...`, `train/...`).
TensorBoard or wandb receive the same dicts only when asked for.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    """Append step metrics to ``path``; on resume, drop lines past ``resume_step`` first so
    the file never holds a duplicated or missing step."""

    def __init__(self, path, *, trackers=(), resume_step: int | None = None, config: dict | None = None,
                 enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._sinks = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            truncate_after(self.path, resume_step)
        for name in trackers:
            self._sinks.append(_make_sink(name, self.path.parent, config or {}))

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        for sink in self._sinks:
            sink(clean)


def read_metrics(path):
    """The metrics file as a pandas DataFrame."""
    import pandas as pd

    return pd.read_json(path, lines=True)


def truncate_after(path: Path, step: int) -> None:
    """Keep only complete lines with ``step <= step`` (a torn last line is dropped too)."""
    if not path.exists():
        path.write_text("")
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _make_sink(name: str, folder: Path, config: dict):
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(folder / "tensorboard"))
        return lambda m: [writer.add_scalar(k, v, m.get("step", 0)) for k, v in m.items()
                          if isinstance(v, (int, float))]
    if name == "wandb":
        import wandb

        run = wandb.init(config=config, dir=str(folder))
        return lambda m: run.log(m, step=m.get("step"))
    raise ValueError(f"unknown tracker {name!r}")
