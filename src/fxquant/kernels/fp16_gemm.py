"""Matrix-vector products with integer weights held exactly in float16 (fbgemm's fp16-weight GEMM, an aten op).

A linear layer at one or a few rows is a pass over its weight: memory-bound. Every int8 weight value (and an int8
value minus an int8 zero point) is an integer of at most 9 bits, which float16 holds exactly, so
``x @ W_int.T`` through ``torch.fbgemm_linear_fp16_weight_fp32_activation`` reads half the bytes of fp32's
``F.linear`` and accumulates in float32 like it; the per-channel weight scales are applied to the N outputs
afterwards. Measured here (one thread, AVX2, 1280 -> 1000 at one row): 67 vs 143 us with the weight in cache,
~550 vs ~970 us with it in memory.

torch marks these ops deprecated (they exist in every torch this package supports); :func:`available` checks they
run, once, with their one-time deprecation warnings silenced, and callers fall back to ``F.linear`` otherwise.
"""
from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["available", "pack", "linear"]


@functools.cache
def available() -> bool:
    """fbgemm's fp16 GEMM exists, runs on this CPU, and multiplies integer weights exactly."""
    pack_fn = getattr(torch, "fbgemm_pack_gemm_matrix_fp16", None)
    run_fn = getattr(torch, "fbgemm_linear_fp16_weight_fp32_activation", None)
    if pack_fn is None or run_fn is None:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices, printed once per process by torch
            w = torch.arange(-8.0, 8.0).reshape(4, 4)
            x = torch.arange(4.0).reshape(1, 4)
            y = run_fn(x, pack_fn(w), torch.zeros(4))
        return bool(torch.equal(y, x @ w.t()))
    except (RuntimeError, AttributeError):
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """Pack an ``(N, K)`` float32 weight of small integers (opaque; rebuild it, never save it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.fbgemm_pack_gemm_matrix_fp16(weight.to(torch.float32).contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor, zero_bias: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for 2-d float32 ``x`` (``zero_bias``: N zeros; the op requires a bias)."""
    return torch.fbgemm_linear_fp16_weight_fp32_activation(x, packed, zero_bias)
