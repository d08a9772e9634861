"""The GPU check's own configurations: a run that `TrainConfig.validate` refuses costs a lent GPU's
minutes, so every (profile, algorithm) `bench/gpu_check.sh` asks `bench/paper_check.py` for must
load, on both devices, from the overrides that script passes."""
from __future__ import annotations

import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import paper_check  # noqa: E402


def gpu_check_runs() -> list[str]:
    """The ``PAPER_RUNS`` of bench/gpu_check.sh."""
    match = re.search(r'^PAPER_RUNS="([^"]+)"', (ROOT / "bench" / "gpu_check.sh").read_text(), re.M)
    assert match, "bench/gpu_check.sh no longer sets PAPER_RUNS"
    return match.group(1).split()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("spec", gpu_check_runs())
def test_paper_check_overrides_load(spec, device, tmp_path):
    from opsd_kit.config import load_profile

    profile, algorithm = spec.split(":")
    args = Namespace(steps=2, tokens=64, device=device)
    overrides = paper_check._overrides(args, str(tmp_path / "model"), str(tmp_path / "problems.jsonl"), 8,
                                       tmp_path / "run", algorithm)
    cfg = load_profile(profile, algorithm, **overrides)
    assert cfg.algorithm == algorithm and cfg.max_steps == 2
    if algorithm != "sft":
        assert cfg.max_new_tokens == 64
    if spec == "paper:opsd":  # the vLLM variant paper_check trains where vLLM is installed
        load_profile(profile, algorithm, **overrides, rollout_backend="vllm")
