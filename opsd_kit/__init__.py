"""opsd_kit: On-Policy Self-Distillation (arXiv 2601.18734) on one GPU or a laptop CPU.

Importing the package is light: torch, transformers and peft load only when a submodule that
needs them is used. The public names below resolve lazily.
"""
from __future__ import annotations

import importlib

from opsd_kit.models import quiet_bitsandbytes

__version__ = "0.1.0"
quiet_bitsandbytes()  # before anything imports bitsandbytes (peft and transformers do when it is installed)

_LAZY = {
    # models
    "resolve_model_path": "models", "load_causal_lm": "models", "load_tokenizer": "models",
    # data
    "Problem": "data.problems", "load_problems": "data.problems", "load_builtin": "data.sources",
    "load_source": "data.sources", "split_problems": "data.splits", "check_leakage": "data.splits",
    # prompts
    "PromptBuilder": "prompts", "build_batch": "prompts",
    # losses
    "per_token_divergence": "losses", "sampled_token_loss": "losses",
    "topk_divergence": "losses", "chunked_divergence": "losses",
    # answers, grading and evaluation
    "extract_boxed": "data.answers", "extract_marked": "data.answers",
    "is_correct": "evaluation.grading", "grade_many": "evaluation.grading",
    "pass_at_k": "evaluation.evaluate", "evaluate_model": "evaluation.evaluate", "EvalResult": "evaluation.evaluate",
    # rollouts
    "GenerationSettings": "rollout.hf", "generate": "rollout.hf",
    # training
    "TrainConfig": "config", "load_profile": "config",
    "Policy": "policy", "LoraSettings": "policy", "train": "trainer", "Trainer": "trainer",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'opsd_kit' has no attribute {name!r}")


def __dir__():
    return __all__
