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
