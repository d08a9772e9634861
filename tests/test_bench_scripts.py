"""The benchmarks' own logic. The GPU check's configurations: a run that `TrainConfig.validate`
refuses costs a lent GPU's minutes, so every (profile, algorithm) `bench/gpu_check.sh` asks
`bench/paper_check.py` for must load, on both devices, from the overrides that script passes. The
agreement checks of bench/scaling.py and bench/eval.py: what they call a parting and a gap."""
from __future__ import annotations

import re
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import _common  # noqa: E402
import paper_check  # noqa: E402
import scaling  # noqa: E402


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


def test_parted_rollouts_pairs_by_step_and_prompt():
    one = [[0, [1, 2], [5, 6]], [0, [3], [7]], [1, [1, 2], [8, 9]], [1, [3], [4]]]
    two = [[0, [3], [7]], [0, [1, 2], [5, 6]], [1, [3], [4]], [1, [1, 2], [8, 2]]]  # two ranks' order
    parted, same_prompts, compared = scaling.parted_rollouts({1: one, 2: two})
    assert same_prompts and compared == 4
    assert parted == {1: [([1, 2], [8, 9], [8, 2])]}
    parted, _, _ = scaling.parted_rollouts({1: one, 2: [two[1], two[0], two[2], [1, [1, 2], [8, 9]]]})
    assert parted == {}
    _, same_prompts, _ = scaling.parted_rollouts({1: one, 2: two[:3] + [[1, [2, 1], [8, 9]]]})
    assert not same_prompts  # a prompt one run decoded and the other did not


def test_logit_gap_is_the_models_own(tiny_model):
    import torch

    ids = [3, 4, 5]
    with torch.no_grad():
        logits_V = tiny_model(input_ids=torch.tensor([ids])).logits[0, -1]
    a, b = int(logits_V.argmax()), int(logits_V.argmin())
    out = _common.logit_gap(tiny_model, ids, a, b)
    assert out["gap"] == pytest.approx(float(logits_V[b] - logits_V[a]), abs=out["tolerance"])
    assert out["gap"] < 0 < out["tolerance"]
    assert out["top2"][0] == pytest.approx(float(logits_V.max()), abs=out["tolerance"])
    assert _common.logit_gap(tiny_model, ids, a, a)["gap"] == 0.0


def test_first_difference():
    assert _common.first_difference([1, 2, 3], [1, 4, 3]) == 1
    assert _common.first_difference([1, 2], [1, 2, 3]) is None  # a prefix: no token pair
    assert _common.first_difference([5], [5]) is None
