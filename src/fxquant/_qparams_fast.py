"""Scale / zero point without tensor ops, bit-identical to the tensor formula of :mod:`fxquant.qparams`.

The tensor formula costs a few dozen tiny tensor ops (~150 µs on a small CPU) per observer, and convert calls it
once per observer and per weight. The same IEEE float32 operations are evaluated here

* per tensor on Python floats: each intermediate is rounded to float32 (:func:`f32`) after the double-precision
  operation, which gives the correctly rounded float32 result of ``+ - * /`` (double has more than twice float32's
  precision plus two bits, so rounding twice never differs from rounding once); Python's ``round`` rounds half to
  even like ``torch.round``;
* per channel on numpy float32 arrays (numpy's float32 ``+ - * /`` are IEEE operations, ``rint`` rounds half to
  even).

Only the common case is handled: finite ``min_val <= max_val``, a positive finite eps, a finite scale. Anything else
returns None and the caller takes the tensor path, which raises the right errors.
"""
from __future__ import annotations

import math
import struct

import numpy as np
import torch

__all__ = ["f32", "per_tensor_qparams", "per_channel_qparams"]

_FLOAT32 = struct.Struct("<f")
_AFFINE = (torch.per_tensor_affine, torch.per_channel_affine)
_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (as a Python float); +-inf on overflow."""
    try:
        return float(_FLOAT32.unpack(_FLOAT32.pack(x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


def per_tensor_qparams(lo: float, hi: float, quant_min: int, quant_max: int, qscheme: torch.qscheme,
                       eps: float, symmetric_zp: int | None) -> tuple[float, int] | None:
    """``(scale, zero_point)`` of the range ``[lo, hi]`` as torch.ao's float32 formula gives them, or None.

    Args:
        lo, hi: the observed range (rounded to float32 here, as ``torch.as_tensor(..., float32)`` does).
        quant_min, quant_max: the integer range.
        qscheme: affine or symmetric (per tensor or per channel: one value of either).
        eps: the smallest scale (rounded to float32 here).
        symmetric_zp: the zero point symmetric schemes use (see ``qparams.symmetric_zero_point``); unused for affine.

    Returns:
        The float32 scale as a Python float and the int64 zero point, or None when the inputs are outside the
        common case (non-finite or inverted range, eps not positive, scale overflow, unknown qscheme).
    """
    lo, hi, eps = f32(lo), f32(hi), f32(eps)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi and 0.0 < eps < math.inf):
        return None
    min_neg, max_pos = min(lo, 0.0), max(hi, 0.0)
    if qscheme in _SYMMETRIC:
        if symmetric_zp is None:
            return None
        scale = max(f32(max(-min_neg, max_pos) / f32(float(quant_max - quant_min) / 2)), eps)
        return (scale, symmetric_zp) if math.isfinite(scale) else None
    if qscheme not in _AFFINE:
        return None
    scale = max(f32(f32(max_pos - min_neg) / f32(float(quant_max - quant_min))), eps)
    if not math.isfinite(scale):
        return None
    zero_point = quant_min - round(f32(min_neg / scale))
    return scale, min(max(zero_point, quant_min), quant_max)


def per_channel_qparams(lo: np.ndarray, hi: np.ndarray, quant_min: int, quant_max: int, qscheme: torch.qscheme,
                        eps: float, symmetric_zp: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel ``(scale, zero_point)`` of float32 arrays ``lo <= hi`` (any shape), or None (see module doc).

    Scale float32; zero point int64, or float32 for ``per_channel_affine_float_qparams``.
    """
    eps32 = np.float32(f32(eps))
    if not (0.0 < eps32 < np.inf) or lo.dtype != np.float32 or hi.dtype != np.float32:
        return None
    with np.errstate(all="ignore"):
        if not (np.isfinite(lo).all() and np.isfinite(hi).all() and (lo <= hi).all()):
            return None
        span = np.float32(float(quant_max - quant_min))
        if qscheme == torch.per_channel_affine_float_qparams:
            scale = (hi - lo) / span
            scale = np.where(scale > eps32, scale, np.float32(1.0))
            zero_point: np.ndarray = -lo / scale
        else:
            min_neg, max_pos = np.minimum(lo, np.float32(0.0)), np.maximum(hi, np.float32(0.0))
            if qscheme in _SYMMETRIC:
                if symmetric_zp is None:
                    return None
                scale = np.maximum(np.maximum(-min_neg, max_pos) / np.float32(float(quant_max - quant_min) / 2),
                                   eps32)
                zero_point = np.full(scale.shape, symmetric_zp, dtype=np.int64)
            elif qscheme in _AFFINE:
                scale = np.maximum((max_pos - min_neg) / span, eps32)
                offset = np.rint(min_neg / scale).astype(np.int64)
                zero_point = np.clip(quant_min - offset, quant_min, quant_max)
            else:
                return None
        if not np.isfinite(scale).all() or scale.dtype != np.float32:
            return None
    return scale, zero_point
