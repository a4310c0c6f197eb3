"""Bit-exact quantization arithmetic on plain dtypes (the numerics behind :mod:`fxquant.ops`).

torch's quantized CPU kernels do not share one formula; each entry point rounds differently, and fxquant
reproduces each one exactly (checked against torch in ``tests/test_ops_numerics.py``). With
``inv = RN32(1 / scale)``, ``RN32`` round-to-nearest-even to float32 and ``rint`` round half to even:

=======================================  ==========================================  =====================
torch entry point                        integer before clamping                     NaN becomes
=======================================  ==========================================  =====================
quantize_per_tensor, 8/16-bit            ``rint(RN32(x * inv + zp))`` (one FMA)      quant_max
quantize_per_tensor, int32               ``rint(RN32(RN32(x * inv) + zp))``          quant_min
quantize_per_channel (and per token)     ``rint(RN32(RN32(x * inv) + zp))``          0 (int32: quant_min)
fake_quantize_*, integer zero point      ``rint(x * inv) + zp``                      quant_min
fake_quantize_per_channel, float zp      ``rint(RN32(x * inv + zp))`` (one FMA)      quant_min
=======================================  ==========================================  =====================

The fused multiply-add is emulated in float64. The product of two float32 numbers is exact in float64, but the
float64 sum rounds, and rounding that to float32 can then land exactly on a float32 half-way point the exact sum
was not on (double rounding). :func:`exact_sum_f32` repairs exactly those half-way sums with the exact error of the
float64 addition (TwoSum), so the result equals a true single-rounding FMA for every input.

Dequantization is ``(q - zp) * scale`` in float32 (int32 per tensor subtracts in integers first, as torch does).
Float targets (fp16 / bf16 / fp8) use ``x / scale`` clamped to the dtype's finite range, then a cast.
"""
from __future__ import annotations

import math
import struct
from typing import Callable, Union

import torch
from torch import Tensor

__all__ = ["Number", "f32", "reciprocal_f32", "exact_sum_f32", "fused_round", "split_round", "shift_round",
           "to_integer", "float_bounds", "INT64_MIN", "INT64_MAX", "quantize_float", "dequantize_int",
           "dequantize_float", "fake_round", "fake_quantize_mask", "fake_quantize"]

Number = Union[float, int, Tensor]

# A float64 value lies exactly half-way between two float32 values when the 29 significand bits that rounding to
# float32 drops read 1000...0; shifting them to the top of an int64 turns that pattern into INT64_MIN.
_DROPPED_BITS_SHIFT = 64 - 29
_HALFWAY_PATTERN = -(2**63)


def f32(value: float) -> float:
    """``value`` rounded to the nearest float32 (a Python float holding a float32 number)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def reciprocal_f32(scale: Number) -> Number:
    """``RN32(1 / scale)``, torch's ``inv_scale`` (a float32 tensor, or a float32-valued Python float)."""
    if isinstance(scale, Tensor):
        return 1.0 / scale.to(torch.float32)
    return f32(1.0 / f32(scale))  # float64 division then rounding to float32 is correctly rounded (53 >= 2*24+2)


def _as_f64(v: Number) -> Number:
    return v.to(torch.float64) if isinstance(v, Tensor) else float(v)


def _halfway(s: Tensor) -> Tensor:
    """Where the float64 ``s`` lies exactly half-way between two float32 values."""
    return (s.view(torch.int64) << _DROPPED_BITS_SHIFT) == _HALFWAY_PATTERN


def _step_towards_exact(s: Tensor, a: Number, b: Number) -> Tensor:
    back = s - a
    err = (a - (s - back)) + (b - back)  # TwoSum: s + err == a + b exactly
    return torch.where(err != 0, torch.nextafter(s, err * math.inf), s)


def _pick(v: Number, shape: torch.Size, where: tuple[Tensor, ...]) -> Number:
    return torch.broadcast_to(v, shape)[where] if isinstance(v, Tensor) and v.dim() > 0 else v


def _repair_dense(s: Tensor, a: Number, b: Number) -> Tensor:
    """The repair without data-dependent control flow (accelerators: no host synchronisation)."""
    return torch.where(_halfway(s), _step_towards_exact(s, a, b), s)


def _repair_sparse(s: Tensor, a: Number, b: Number) -> Tensor:
    """CPU: one cheap test, then the repair on the half-way elements only (in place).

    Half-way sums are rare for most scales; a scale whose reciprocal has few significant bits (1/256, 0.02 -> 50)
    makes many sums exact float32 ties, and gathering those is still cheaper than the dense form.
    """
    where = _halfway(s).nonzero(as_tuple=True)
    if where[0].numel():
        s.index_put_(where, _step_towards_exact(s[where], _pick(a, s.shape, where), _pick(b, s.shape, where)))
    return s


_REPAIR: dict[str, Callable[[Tensor, Number, Number], Tensor]] = {"cpu": _repair_sparse}


def exact_sum_f32(a: Tensor, b: Number) -> Tensor:
    """``RN32(a + b)`` of float64 ``a`` and ``b`` with a single rounding (float32 result).

    ``s = RN64(a + b)`` rounds to float32 like the exact sum unless ``s`` lies exactly half-way between two
    float32 values; there the exact error of the addition says which neighbour is right and ``s`` moves one float64
    step towards it before the final rounding.
    """
    s = _REPAIR.get(a.device.type, _repair_dense)(a + b, a, b)
    return s.to(torch.float32)


def fused_round(x: Tensor, inv: Number, zp: Number) -> Tensor:
    """``rint(RN32(x * inv + zp))`` with one rounding of the multiply-add, as an FMA does (float32 result)."""
    p = x.to(torch.float64) * _as_f64(inv)  # exact: 24-bit by 24-bit significands
    if not isinstance(zp, Tensor) and zp == 0:
        return p.to(torch.float32).round_()  # nothing is added: the product is exact, one rounding
    return exact_sum_f32(p, _as_f64(zp)).round_()


def split_round(x: Tensor, inv: Number, zp: Number) -> Tensor:
    """``rint(RN32(RN32(x * inv) + zp))``: separately rounded float32 product and sum (float32 result)."""
    zp = zp.to(torch.float32) if isinstance(zp, Tensor) else f32(float(zp))
    return (x.to(torch.float32) * inv).add_(zp).round_()


def shift_round(x: Tensor, inv: Number, zp: Number) -> Tensor:
    """``rint(x * inv) + zp`` in ``x``'s (floating) dtype, unclamped (torch's fake quantization)."""
    if isinstance(inv, Tensor):
        inv = inv.to(x.dtype)
    if isinstance(zp, Tensor):
        zp = zp.to(x.dtype)
    return torch.round(x * inv).add_(zp)


def to_integer(v: Tensor, quant_min: int, quant_max: int, nan_fill: int, dtype: torch.dtype) -> Tensor:
    """Replace NaN by ``nan_fill``, clamp to ``[quant_min, quant_max]`` and store as ``dtype``."""
    if max(abs(quant_min), abs(quant_max)) > 2**24:  # bounds not exact in float32
        v = v.to(torch.float64)
    return torch.nan_to_num_(v, nan=float(nan_fill)).clamp_(quant_min, quant_max).to(dtype)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def float_bounds(dtype: torch.dtype, quant_min: int, quant_max: int) -> tuple[float, float]:
    """Clamp range of a float target: the dtype's finite range intersected with ``[quant_min, quant_max]``.

    The int64 extremes mean "no bound" (bfloat16's range exceeds int64).
    """
    info = torch.finfo(dtype)
    lo = float(info.min) if quant_min <= INT64_MIN else max(float(info.min), float(quant_min))
    hi = float(info.max) if quant_max >= INT64_MAX else min(float(info.max), float(quant_max))
    return lo, hi


def quantize_float(x: Tensor, scale: Number, quant_min: int, quant_max: int, dtype: torch.dtype) -> Tensor:
    """Float target: ``x / scale`` in float32, clamped to the finite range, then cast (NaN stays NaN)."""
    if isinstance(scale, Tensor):
        scale = scale.to(torch.float32)
    lo, hi = float_bounds(dtype, quant_min, quant_max)
    return (x.to(torch.float32) / scale).clamp_(lo, hi).to(dtype)


def dequantize_int(q: Tensor, scale: Number, zp: Number, subtract_in_int: bool) -> Tensor:
    """``(q - zp) * scale`` in float32; ``subtract_in_int`` subtracts exactly before converting (int32 per tensor)."""
    if isinstance(scale, Tensor):
        scale = scale.to(torch.float32)
    if subtract_in_int:
        diff = (q.to(torch.int64) - zp).to(torch.float32)
    else:
        diff = q.to(torch.float32) - (zp.to(torch.float32) if isinstance(zp, Tensor) else f32(float(zp)))
    return diff.mul_(scale)


def dequantize_float(q: Tensor, scale: Number) -> Tensor:
    """Float target: ``q * scale`` in float32 (the zero point plays no part)."""
    if isinstance(scale, Tensor):
        scale = scale.to(torch.float32)
    return q.to(torch.float32) * scale


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fake_round(x: Tensor, scale: Number, zp: Number) -> Tensor:
    """Unclamped grid value of torch's fake quantization: ``RN(rint(x * inv) + zp)`` in the compute dtype.

    The compute dtype is float32 (float64 for float64 inputs). Float zero points (embeddings) use one FMA in
    float32 instead: ``rint(RN32(x * inv + zp))``.
    """
    inv = reciprocal_f32(scale)
    if isinstance(zp, Tensor) and zp.is_floating_point():
        return fused_round(x.to(torch.float32), inv, zp.to(torch.float32))
    return shift_round(x.to(_compute_dtype(x)), inv, zp)


def fake_quantize_mask(x: Tensor, scale: Number, zp: Number, quant_min: int, quant_max: int,
                       per_tensor: bool) -> Tensor:
    """Where the straight-through gradient passes: the grid value lies in ``[quant_min, quant_max]``.

    torch compares per tensor against the bounds converted to the compute dtype, per channel exactly.
    """
    q = fake_round(x, scale, zp)
    if per_tensor:
        return (q >= quant_min) & (q <= quant_max)
    q = q.to(torch.float64)
    return (q >= quant_min) & (q <= quant_max)


def fake_quantize(x: Tensor, scale: Number, zp: Number, quant_min: int, quant_max: int, per_tensor: bool) -> Tensor:
    """torch's fake quantization ``(clamp(round(x / scale) + zp) - zp) * scale`` in ``x``'s dtype.

    The grid value is clamped and ``- zp`` subtracted exactly; the product with the scale is float32 per tensor
    and float64 per channel, rounded once more to ``x``'s dtype (as torch's kernels do). NaN maps to
    ``quant_min``; +inf, or an ``x / scale`` beyond int64, saturates to ``quant_max`` (torch's per-channel kernel
    wraps such values to ``quant_min``).
    """
    q = fake_round(x, scale, zp).to(torch.float64)
    q = torch.nan_to_num_(q, nan=float(quant_min)).clamp_(quant_min, quant_max)
    diff = q - (zp.to(torch.float64) if isinstance(zp, Tensor) else float(zp))
    if per_tensor:
        out = diff.to(torch.float32) * (scale.to(torch.float32) if isinstance(scale, Tensor) else f32(scale))
    else:
        out = diff * (scale.to(torch.float64) if isinstance(scale, Tensor) else f32(scale))
    return out.to(x.dtype)
