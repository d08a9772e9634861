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
