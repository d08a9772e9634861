"""Shared fixtures: the tiny model built in code, one torch thread, no network."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from opsd_kit.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture()
def tiny_model():
    """A fresh float32 tiny Qwen2-style model (random weights, fixed seed)."""
    from opsd_kit.models import load_causal_lm

    return load_causal_lm("tiny")


def assert_same_greedy(model, prompts, fast, hf):
    """Equal greedy rows, or rows that part only where the model's own two best logits are
    within float32 rounding of each other (a tie that summation order may break either way);
    the tolerance follows from the dtype and the reductions (tests/_numerics.py). ``fast`` and
    ``hf``: `Rollouts` of ``prompts`` (one row per prompt); ``model``: a peft or plain causal LM."""
    import torch
    from _numerics import tolerance

    cfg = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    for prompt, a, b in zip(prompts, fast.completion_ids, hf.completion_ids):
        k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            assert a == b
            continue
        with torch.no_grad():
            logits_V = model(input_ids=torch.tensor([prompt + b[:k]])).logits[0, -1].float()
        tol = tolerance(torch.float32, reduction=max(cfg.hidden_size, cfg.intermediate_size),
                        scale=float(logits_V.abs().max()), depth=cfg.num_hidden_layers)
        assert abs(float(logits_V[a[k]] - logits_V[b[k]])) <= tol["atol"], (prompt, k, a[k], b[k])
