"""Portable kernels: the reference math (dequantize -> float op -> quantize) in plain aten ops, for any device.

These are always correct, export cleanly (``torch.export`` sees only aten ops on plain tensors) and are the
fallback of every lowered module. Quantization rounds half to even: ``clamp(rint(y * (1 / scale) + zp))``.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["OutSpec", "dequantize", "quantize", "UNARY_POST_OPS", "BINARY_POST_OPS", "finish"]


@dataclasses.dataclass(frozen=True)
class OutSpec:
    """Where a float result goes: a plain integer dtype with its range, or a float dtype (then no quantization)."""

    dtype: torch.dtype
    quant_min: int = 0
    quant_max: int = 255

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32 (scale / zero point broadcast, e.g. per row)."""
    return (q.to(torch.float32) - zero_point) * scale


def quantize(y: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, out: OutSpec) -> torch.Tensor:
    """``clamp(rint(y / scale + zero_point), quant_min, quant_max)`` stored as ``out.dtype``."""
    q = torch.round(y * torch.reciprocal(scale) + zero_point)
    return q.clamp_(out.quant_min, out.quant_max).to(out.dtype)


UNARY_POST_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda y: y,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "hardswish": F.hardswish,
    "silu": F.silu,
}
# binary post-op -> unary post-op applied after adding the other operand
BINARY_POST_OPS: dict[str, str] = {"add": "none", "add_relu": "relu"}


def finish(y: torch.Tensor, post_op: str, out: OutSpec, out_scale: torch.Tensor, out_zero_point: torch.Tensor,
           other: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Apply ``post_op`` to the float result ``y`` (adding ``dequantize(*other)`` for binary ones) and quantize."""
    if post_op in BINARY_POST_OPS:
        if other is None:
            raise ValueError(f"post_op {post_op!r} needs the other operand: call forward(x, other)")
        y = y + dequantize(*other)
        post_op = BINARY_POST_OPS[post_op]
    y = UNARY_POST_OPS[post_op](y)
    return y.to(out.dtype) if out.is_float else quantize(y, out_scale, out_zero_point, out)
