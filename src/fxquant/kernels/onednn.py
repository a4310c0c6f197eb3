"""onednn int8 kernels on plain tensors (uint8 activations, int8 prepacked weights, float scales).

All functions take and return plain ``torch.uint8 / int8 / float32`` tensors; the prepacked weight is an opaque
onednn tensor that callers cache and never save (rebuild it from the int8 weight with :func:`pack_linear` /
:func:`pack_conv`). Post-ops are fused: ``"none"``, ``"relu"``, ``"gelu"``/``"gelu_tanh"`` (linear), and the
binary ``"add"`` / ``"add_relu"`` that add a uint8 ``other`` tensor (its own scale / zero point) before the
output is quantized. ``other`` is copied first: onednn accumulates into it in place.
"""
from __future__ import annotations

import dataclasses

import torch

__all__ = ["ActQParams", "pack_linear", "pack_conv", "linear", "conv", "split_halves", "unary_with_clamp", "UNARY",
           "BINARY", "CONV_FUSED", "pack_identity_depthwise", "add"]

_OPS = torch.ops.onednn

# post-op name -> (onednn unary attr, algorithm)
UNARY: dict[str, tuple[str, str]] = {"none": ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"),
                                     "gelu_tanh": ("gelu", "tanh"), "hardswish": ("hardswish", ""),
                                     "silu": ("swish", "")}
# binary post-op name -> unary attr applied after the sum
BINARY: dict[str, str] = {"add": "none", "add_relu": "relu"}
# post-ops onednn fuses into a conv, by spatial rank (torch 2.13; others run unfused)
CONV_FUSED: dict[int, frozenset[str]] = {1: frozenset({"none", "relu"}),
                                         2: frozenset({"none", "relu", "add", "add_relu", "hardswish", "silu"}),
                                         3: frozenset({"none"})}


@dataclasses.dataclass(frozen=True)
class ActQParams:
    """Activation quantization parameters as Python numbers (onednn takes scalars)."""

    scale: float
    zero_point: int
    dtype: torch.dtype | None = None  # output dtype; None = uint8, torch.float32 = float output


def pack_linear(weight_int8: torch.Tensor) -> torch.Tensor:
    """Prepack an ``(N, K)`` int8 weight for :func:`linear`."""
    return _OPS.qlinear_prepack(weight_int8.contiguous(), None)


def pack_conv(weight_int8: torch.Tensor, weight_scale: torch.Tensor, x: ActQParams, stride: list[int],
              padding: list[int], dilation: list[int], groups: int) -> torch.Tensor:
    """Prepack an ``(Cout, Cin/groups, *k)`` int8 weight for :func:`conv`."""
    return _OPS.qconv_prepack(weight_int8.contiguous(), weight_scale, x.scale, x.zero_point, stride, padding,
                              dilation, groups, None)


def _out(out: ActQParams) -> tuple[float, int]:
    return (1.0, 0) if out.dtype in (torch.float32, torch.bfloat16) else (out.scale, out.zero_point)


def linear(qx: torch.Tensor, x: ActQParams, packed: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor,
           bias: torch.Tensor | None, out: ActQParams, post_op: str = "none",
           other: tuple[torch.Tensor, ActQParams] | None = None) -> torch.Tensor:
    """``quantize(post_op(dequant(qx) @ w.T + bias [+ dequant(other)]))`` for 2-d ``qx``."""
    out_scale, out_zp = _out(out)
    if post_op in BINARY:
        accum, oq = other  # type: ignore[misc]
        return _OPS.qlinear_pointwise.binary(qx, x.scale, x.zero_point, packed, w_scale, w_zp, accum.clone(), bias,
                                             out_scale, out_zp, out.dtype, oq.scale, oq.zero_point, "sum", 1.0,
                                             BINARY[post_op], [], "")
    attr, algo = UNARY[post_op]
    return _OPS.qlinear_pointwise(qx, x.scale, x.zero_point, packed, w_scale, w_zp, bias, out_scale, out_zp,
                                  out.dtype, attr, [], algo)


def conv(qx: torch.Tensor, x: ActQParams, packed: torch.Tensor, w_scale: torch.Tensor, w_zp: torch.Tensor,
         bias: torch.Tensor | None, geometry: tuple[list[int], list[int], list[int], int], out: ActQParams,
         post_op: str = "none", other: tuple[torch.Tensor, ActQParams] | None = None,
         clamp: tuple[int, int] | None = None) -> torch.Tensor:
    """Quantized convolution (1/2/3-d, channels-last output) with fused post-op; ``geometry`` =
    ``(stride, padding, dilation, groups)``; ``clamp``: the integer output's range when narrower than its dtype's
    (fused as a ``hardtanh`` where :func:`unary_with_clamp` can, else applied after)."""
    stride, padding, dilation, groups = geometry
    out_scale, out_zp = _out(out)
    if post_op in BINARY:
        accum, oq = other  # type: ignore[misc]
        accum = accum.contiguous(memory_format=torch.channels_last) if accum.dim() == 4 else accum.contiguous()
        y = _OPS.qconv2d_pointwise.binary(qx, x.scale, x.zero_point, packed, w_scale, w_zp, accum.clone(), bias,
                                          stride, padding, dilation, groups, out_scale, out_zp, out.dtype,
                                          oq.scale, oq.zero_point, "sum", 1.0, BINARY[post_op], [], None)
        return y if clamp is None else y.clamp_(*clamp)
    attr, scalars, algo, rest = unary_with_clamp(post_op, clamp, out_scale, out_zp)
    y = _OPS.qconv_pointwise(qx, x.scale, x.zero_point, packed, w_scale, w_zp, bias, stride, padding, dilation,
                             groups, out_scale, out_zp, out.dtype, attr, scalars, algo or None)
    return y if rest is None else y.clamp_(*rest)


def split_halves(qx: torch.Tensor, x: ActQParams) -> tuple[tuple[torch.Tensor, ActQParams],
                                                           tuple[torch.Tensor, ActQParams]]:
    """Write full-range uint8 ``qx`` as ``2 * (qx >> 1) + (qx & 1)`` so each half stays in 0..127.

    ``dequant(qx) = dequant_hi + dequant_lo`` with scales ``2s`` and ``s`` and zero points ``zp // 2`` and
    ``zp % 2``; each half runs exactly on CPUs without VNNI (see ``x86.py``).
    """
    hi = ActQParams(2.0 * x.scale, x.zero_point // 2)
    lo = ActQParams(x.scale, x.zero_point % 2)
    return (torch.bitwise_right_shift(qx, 1), hi), (torch.bitwise_and(qx, 1), lo)


def unary_with_clamp(post_op: str, clamp: tuple[int, int] | None, out_scale: float,
                     out_zero_point: int) -> tuple[str, list[float], str, tuple[int, int] | None]:
    """``(attr, scalars, algorithm, clamp left to do)`` for a unary post-op followed by a clamp of the integer output.

    A clamp to ``[lo, hi]`` after quantizing equals a ``hardtanh`` to ``[dequant(lo), dequant(hi)]`` before it
    (quantization is monotonic), so ``none`` / ``relu`` with a clamp become one fused ``hardtanh``.
    """
    attr, algo = UNARY[post_op]
    if clamp is None or post_op not in ("none", "relu"):
        return attr, [], algo, clamp
    lo, hi = ((v - out_zero_point) * out_scale for v in clamp)
    return "hardtanh", [max(lo, 0.0) if post_op == "relu" else lo, hi], "", None


def pack_identity_depthwise(channels: int, x: ActQParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed weight, weight scales, weight zero points)`` of a 1x1 depthwise conv with weights 1 on ``channels``:
    with onednn's binary ``sum`` post-op it computes ``quantize(dequantize(a) + dequantize(b))`` in one call."""
    w_scale = torch.ones(channels)
    packed = pack_conv(torch.ones(channels, 1, 1, 1, dtype=torch.int8), w_scale, x, [1, 1], [0, 0], [1, 1], channels)
    return packed, w_scale, torch.zeros(channels, dtype=torch.long)


def add(a: torch.Tensor, a_q: ActQParams, b: torch.Tensor, b_q: ActQParams, out: ActQParams, relu: bool,
        packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``quantize(dequantize(a) + dequantize(b))`` (+ relu) of two uint8 images of the same shape (4-d), as an
    identity depthwise conv of ``a`` accumulating into a copy of ``b`` (:func:`pack_identity_depthwise`). Exact:
    the weights are 1 (no saturation with any uint8 input) and onednn rounds half to even like the reference."""
    weight, w_scale, w_zp = packed
    accum = b.contiguous(memory_format=torch.channels_last)
    accum = accum.clone(memory_format=torch.channels_last) if accum is b else accum  # written in place
    c = a.shape[1]
    return _OPS.qconv2d_pointwise.binary(a, a_q.scale, a_q.zero_point, weight, w_scale, w_zp, accum, None, [1, 1],
                                         [0, 0], [1, 1], c, out.scale, out.zero_point, out.dtype, b_q.scale,
                                         b_q.zero_point, "sum", 1.0, "relu" if relu else "none", [], None)
