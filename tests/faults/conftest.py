"""Fixtures of the fault-injection tests: cached uninterrupted reference runs, and a guard that
fails the test if any model weights load."""
from __future__ import annotations

import pytest
from _faults import ledger_counts, tiny_config

_REFERENCES: dict = {}


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """``reference(algorithm, **overrides)`` -> (final LoRA weights, ledger counts) of an
    uninterrupted tiny run with those settings; each setting is trained once per session."""
    from opsd_kit.trainer import Trainer

    def run(algorithm, **overrides):
        key = (algorithm, tuple(sorted(overrides.items())))
        if key not in _REFERENCES:
            run_dir = tmp_path_factory.mktemp(f"reference-{algorithm}")
            trainer = Trainer(tiny_config(run_dir, algorithm, **overrides))
            result = trainer.train()
            assert not result.interrupted
            _REFERENCES[key] = (trainer.policy.lora_state_dict(), ledger_counts(result.ledger))
        return _REFERENCES[key]

    return run


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Any attempt to load model weights fails the test."""
    import transformers

    import opsd_kit.models
    import opsd_kit.policy

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(opsd_kit.models, "load_causal_lm", refuse)
    monkeypatch.setattr(opsd_kit.policy.Policy, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(opsd_kit.policy, "build_policy", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
