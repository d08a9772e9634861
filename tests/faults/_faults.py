"""Helpers shared by the fault-injection tests (fixtures are in conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from opsd_kit.config import load_profile


def tiny_config(run_dir, algorithm="opsd", **overrides):
    values = {"run_dir": str(run_dir), "progress": False}
    values.update(overrides)
    return load_profile("tiny", algorithm, **values)


def ledger_counts(ledger: dict) -> dict:
    """The ledger without its wall-clock seconds (which no two runs share)."""
    return {k: v for k, v in ledger.items() if k not in ("seconds", "wall_seconds")}


def metric_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_adapter(expected: dict, got: dict, atol: float = 1e-6) -> None:
    assert expected.keys() == got.keys()
    for k, want in expected.items():
        torch.testing.assert_close(got[k], want, atol=atol, rtol=0, msg=k)
