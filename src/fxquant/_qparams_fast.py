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


def per_channel_qparams(min_val: torch.Tensor, max_val: torch.Tensor, quant_min: int, quant_max: int,
                        qscheme: torch.qscheme, eps: float,
                        symmetric_zp: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-channel ``(scale, zero_point)`` of CPU float32 tensors ``min_val <= max_val`` (one shape), or None (see
    the module doc). Scale float32; zero point int64, or float32 for ``per_channel_affine_float_qparams``. The
    results are written into new torch tensors (numpy ``out=``), so they own ordinary, resizable storage."""
    lo, hi = min_val.detach().numpy(), max_val.detach().numpy()
    eps32 = np.float32(f32(eps))
    if lo.size == 0 or not 0.0 < eps32 < np.inf:
        return None
    # every value finite: the smallest low and the largest high are, and each low <= its high (NaN fails both)
    if not (math.isfinite(lo.min()) and math.isfinite(hi.max()) and (lo <= hi).all()):
        return None
    scale_t = torch.empty(lo.shape, dtype=torch.float32)
    scale = scale_t.numpy()
    with np.errstate(all="ignore"):  # an overflowing scale is refused below, without numpy's warning
        if qscheme == torch.per_channel_affine_float_qparams:
            np.copyto(scale, (hi - lo) / np.float32(float(quant_max - quant_min)))
            np.copyto(scale, np.float32(1.0), where=~(scale > eps32))
            zp_t = torch.empty(lo.shape, dtype=torch.float32)
            np.divide(-lo, scale, out=zp_t.numpy())
        else:
            min_neg, max_pos = np.minimum(lo, np.float32(0.0)), np.maximum(hi, np.float32(0.0))
            if qscheme in _SYMMETRIC:
                if symmetric_zp is None:
                    return None
                half = np.float32(float(quant_max - quant_min) / 2)
                np.maximum(np.maximum(-min_neg, max_pos) / half, eps32, out=scale)
                zp_t = torch.full(lo.shape, symmetric_zp, dtype=torch.int64)
            elif qscheme in _AFFINE:
                np.maximum((max_pos - min_neg) / np.float32(float(quant_max - quant_min)), eps32, out=scale)
                zp_t = torch.empty(lo.shape, dtype=torch.int64)
                np.clip(quant_min - np.rint(min_neg / scale).astype(np.int64), quant_min, quant_max,
                        out=zp_t.numpy())
            else:
                return None
        if not math.isfinite(scale.max()):
            return None
    return scale_t, zp_t
