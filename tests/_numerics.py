"""Comparison tolerances derived from the dtype and the size of the reductions behind a value,
never from what passed on one machine.

A value computed as a sum of n rounded terms is off by at most about n * eps * sum|terms|
(the worst case of recursive summation, whatever the order). CPUs differ in the order
(AVX-512 and AVX2 kernels block a dot product differently), not in that bound, so a tolerance
built from it holds on every CPU.
"""
from __future__ import annotations

import torch


def tolerance(dtype: torch.dtype, reduction: int, scale: float = 1.0, depth: int = 1) -> dict:
    """``torch.testing.assert_close`` keyword arguments for two computations of one quantity.

    Args:
        dtype: the dtype the computations ran in (not the dtype they were upcast to afterwards).
        reduction: the length of the longest sum behind each compared value (a dot product's
            length, the vocabulary of a softmax, the tokens a gradient sums over).
        scale: the magnitude of the summed terms (e.g. the largest compared value).
        depth: how many such reductions are chained (layers of a model).

    Bound: ``reduction * eps`` per reduction, per computation; two computations compared.
    """
    bound = 2 * depth * reduction * torch.finfo(dtype).eps
    return {"rtol": bound, "atol": bound * scale}


def trainer_tolerance(trainer, scale: float, tokens: int = 0) -> dict:
    """`tolerance` for a value a trainer's model computes: dot products over the hidden, MLP or
    vocabulary width through every layer; a weight's gradient (``tokens`` > 0) also sums over the
    batch's tokens and chains the backward's reductions after the forward's."""
    cfg = trainer.policy.causal_lm.config
    return tolerance(trainer.policy.causal_lm.dtype,
                     max(cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, tokens), scale=scale,
                     depth=cfg.num_hidden_layers * (2 if tokens else 1))


def assert_same_greedy(model, prompts, fast, hf) -> None:
    """Equal greedy rows, or rows that part only where the student's own two best logits are
    within float32 rounding of each other (a tie that summation order may break either way).
    ``model``: a peft or plain causal LM."""
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
