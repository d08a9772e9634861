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


@pytest.fixture()
def fast_trainer():
    """``fast_trainer(run_dir, **overrides)``: a `Trainer` on the tiny profile with "fast" rollouts
    of 10 tokens and a trained-looking adapter (``lora_B`` drawn with a fixed seed, so gradients
    also flow through the prompt's keys and values)."""
    def make(run_dir, **overrides):
        import torch

        from opsd_kit.config import load_profile
        from opsd_kit.trainer import Trainer

        cfg = dict(run_dir=str(run_dir), progress=False, rollout_backend="fast", max_new_tokens=10)
        trainer = Trainer(load_profile("tiny", **{**cfg, **overrides}))
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in trainer.policy.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        return trainer

    return make
