"""Run-time (dynamic) activation quantization in Python numbers plus one or two aten ops.

``affine_qparams`` reproduces :func:`fxquant.qparams.compute_qparams` for one affine per-tensor range in float32
arithmetic (emulated exactly with Python floats: every float32 operation is a float64 operation rounded once), so a
lowered dynamic linear picks the reference graph's scale and zero point without a dozen tiny tensor ops.
"""
from __future__ import annotations

import struct

import torch

from .uint8 import ROUNDING_MAGIC

__all__ = ["affine_qparams", "fake_quantize", "quantize_to_float", "f32", "FUSED_MAX_NUMEL"]

_EPS32 = float(torch.finfo(torch.float32).eps)
# aten's fake_quantize_per_tensor_affine is one op but scalar code (~10 ns an element here): it beats the five
# vectorized ops of quantize_to_float up to a few thousand elements (42 vs 50 us at 4096, 181 vs 66 at 16384)
FUSED_MAX_NUMEL = 4096


def f32(value: float) -> float:
    """``value`` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", value))[0]  # type: ignore[no-any-return]


def affine_qparams(lo: float, hi: float, quant_min: int, quant_max: int) -> tuple[float, int]:
    """Affine ``(scale, zero_point)`` covering ``[lo, hi]`` (widened to include 0), as the observers compute it."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(f32(f32(hi - lo) / float(quant_max - quant_min)), _EPS32)
    zero_point = quant_min - round(f32(lo / scale))  # round half to even, like torch.round
    return scale, int(min(max(zero_point, quant_min), quant_max))


def fake_quantize(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """``(clamp(rint(x / scale + zp)) - zp) * scale`` in float: the fused aten op for small tensors, else five
    vectorized ops (:func:`quantize_to_float`, then ``* scale``), both rounding half to even like the reference."""
    if x.numel() <= FUSED_MAX_NUMEL:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)
    return quantize_to_float(x, scale, zero_point, quant_min, quant_max, shift=zero_point).mul_(scale)


def quantize_to_float(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
                      shift: int = 0) -> torch.Tensor:
    """The quantized integers of ``x`` minus ``shift``, held in a float32 tensor (rounding half to even: clamp,
    then ``+ 1.5 * 2**23`` rounds in the FPU and ``- (1.5 * 2**23 + shift)`` is exact)."""
    y = torch.add(_f32_tensor(zero_point), x, alpha=1.0 / scale).clamp_(quant_min, quant_max)
    return y.add_(ROUNDING_MAGIC).sub_(ROUNDING_MAGIC + shift)


def _f32_tensor(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)
