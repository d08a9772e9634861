"""Atomic checkpoints: written under a temporary name, completed by a marker file, then
renamed. A folder without the marker (a write killed half-way) is never loaded. Folders are
deleted by first renaming them out of the checkpoint namespace (to ``.trash-*``), so a
deletion killed half-way never leaves a marked folder with missing files behind.

A checkpoint holds the adapter (peft format), the optimizer and scheduler states, each process's RNG
and algorithm state, the token ledger, the policy's extra state (EMA weights) and the step.
``trainer_state.pt`` holds only tensors, numbers, strings and lists/dicts/tuples of them, and is
loaded with ``torch.load(weights_only=True)``: opening a shared checkpoint never runs code from it.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely."""


_DONE = "COMPLETE"
_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / _DONE).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path) -> int:
    """The step of checkpoint folder ``path`` (from its name)."""
    return int(_NAME.match(Path(path).name).group(1))


def latest_checkpoint(run_dir) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir, step: int, *, policy, optimizer, scheduler, ledger, keep: int = 2,
                    extra: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``."""
    import torch

    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=folder))
    policy.save_adapter(tmp / "adapter")
    torch.save({
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ledger": ledger.state_dict(),
        "policy_extra": policy.extra_state(),
        "extra": extra or {},
    }, tmp / "trainer_state.pt")
    (tmp / _DONE).write_text(str(step))
    _fsync_dir(tmp)
    if final.exists():  # a stale copy of the same step (e.g. saved again on Ctrl-C)
        _discard(final)
    os.rename(tmp, final)
    _fsync_dir(folder)
    for old in complete_checkpoints(run_dir)[:-keep]:
        _discard(old)
    for stale in [*folder.glob(".step-*"), *folder.glob(".trash-*")]:  # left by killed writes or deletions
        shutil.rmtree(stale, ignore_errors=True)
    return final


def remove_checkpoints(run_dir) -> int:
    """Delete every checkpoint of ``run_dir`` (a fresh run must never resume from an older
    run's checkpoints); return how many complete ones there were."""
    folder = checkpoint_dir(run_dir)
    found = complete_checkpoints(run_dir)
    if folder.is_dir():
        for path in folder.iterdir():
            if _NAME.match(path.name):
                _discard(path)
        shutil.rmtree(folder, ignore_errors=True)
    return len(found)


def _discard(path: Path) -> None:
    """Rename ``path`` out of the checkpoint namespace (atomic), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=path.parent))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def load_trainer_state(path: Path) -> dict:
    """``trainer_state.pt`` of checkpoint ``path``, loaded with ``weights_only=True``."""
    import pickle

    import torch

    file = Path(path) / "trainer_state.pt"
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{file} holds objects other than tensors, numbers, strings and containers, so it was not loaded "
            "(unpickling them could run code they carry). opsd_kit never writes such a file: it was altered or "
            "written by an older version. Resume from a checkpoint you trust, or start over with resume=False "
            f"overwrite=True. Detail: {str(err).splitlines()[0]}") from err


def rng_state() -> dict:
    """Python's, numpy's and torch's RNG states as tensors, numbers and strings."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    import numpy as np
    import torch

    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
