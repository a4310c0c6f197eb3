"""Kernels of the ``torch.ops.fxquant`` operators: real (checked, bit-exact) and fake (shapes only).

Registered by :mod:`fxquant.ops`; the numerics live in :mod:`fxquant._quant_math`, the argument checks in
:mod:`fxquant._ops_checks`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import _ops_checks as chk
from . import _quant_math as qm
from .qparams import compute_qparams

__all__ = ["KERNELS", "FAKE_QUANT_MASKS"]

Scale = Union[Tensor, float]
ZeroPoint = Union[Tensor, int]
_F32 = torch.float32


def _per_tensor_qparams(op: str, scale: Scale, zero_point: ZeroPoint, qmin: int, qmax: int,
                        check_zp_range: bool) -> tuple[float, int]:
    if isinstance(scale, Tensor):
        chk.check_one_element(op, "scale", scale)
    if isinstance(zero_point, Tensor):
        chk.check_one_element(op, "zero_point", zero_point)
    return chk.scalar_scale(op, scale), chk.scalar_zero_point(op, zero_point, qmin, qmax, check_zp_range)


def quantize_per_tensor(input: Tensor, scale: Scale, zero_point: ZeroPoint, quant_min: int, quant_max: int,
                        dtype: torch.dtype) -> Tensor:
    op = "fxquant.quantize_per_tensor"
    is_int = chk.check_qdtype(op, dtype, quant_min, quant_max)
    chk.check_input_dtype(op, input)
    s, z = _per_tensor_qparams(op, scale, zero_point, quant_min, quant_max, is_int)
    if not is_int:
        return qm.quantize_float(input, s, quant_min, quant_max, dtype)
    inv = qm.reciprocal_f32(s)
    if dtype == torch.int32:  # torch's int32 kernel rounds the product and the sum separately; NaN -> minimum
        return qm.to_integer(qm.split_round(input, inv, z), quant_min, quant_max, quant_min, dtype)
    return qm.to_integer(qm.fused_round(input, inv, z), quant_min, quant_max, quant_max, dtype)


def dequantize_per_tensor(input: Tensor, scale: Scale, zero_point: ZeroPoint, quant_min: int, quant_max: int,
                          dtype: torch.dtype, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    op = "fxquant.dequantize_per_tensor"
    is_int = chk.check_qdtype(op, dtype, quant_min, quant_max)
    chk.check_dequant_input(op, input, dtype)
    out_dtype = out_dtype or _F32
    chk.check_out_dtype(op, out_dtype)
    s, z = _per_tensor_qparams(op, scale, zero_point, quant_min, quant_max, is_int)
    out = qm.dequantize_int(input, s, z, dtype == torch.int32) if is_int else qm.dequantize_float(input, s)
    return out.to(out_dtype)


def _group_shape(op: str, x: Tensor, scales: Tensor, zero_points: Tensor, axis: Optional[int]) -> list[int]:
    """Broadcast shape of per-channel (``axis``) or per-token (``axis=None``) qparams over ``x`` (checked)."""
    if x.dim() == 0:
        raise ValueError(f"{op}: the input is a 0-dim tensor; per-channel / per-token quantization needs a dimension")
    if axis is None:
        chk.check_token_qparams(op, x, scales, zero_points)
        return list(x.shape[:-1]) + [1]
    axis = chk.check_channel_qparams(op, x, scales, zero_points, axis)
    return [-1 if d == axis else 1 for d in range(x.dim())]


def _grouped_qparams(op: str, x: Tensor, scales: Tensor, zero_points: Tensor, axis: Optional[int], qmin: int,
                     qmax: int, is_int: bool) -> tuple[Tensor, Tensor]:
    shape = _group_shape(op, x, scales, zero_points, axis)
    chk.check_scales(op, scales)
    if is_int:  # float targets ignore the zero point
        chk.check_zero_points(op, zero_points, qmin, qmax, allow_float=True)
    return scales.reshape(shape), zero_points.reshape(shape)


def _quantize_grouped(op: str, input: Tensor, scales: Tensor, zero_points: Tensor, axis: Optional[int],
                      quant_min: int, quant_max: int, dtype: torch.dtype) -> Tensor:
    is_int = chk.check_qdtype(op, dtype, quant_min, quant_max)
    chk.check_input_dtype(op, input)
    s, z = _grouped_qparams(op, input, scales, zero_points, axis, quant_min, quant_max, is_int)
    if not is_int:
        return qm.quantize_float(input, s, quant_min, quant_max, dtype)
    # torch's per-channel kernel turns NaN into 0 (int32: the minimum); 0 is clamped into narrower ranges
    nan_fill = quant_min if dtype == torch.int32 else min(max(0, quant_min), quant_max)
    return qm.to_integer(qm.split_round(input, qm.reciprocal_f32(s), z), quant_min, quant_max, nan_fill, dtype)


def _dequantize_grouped(op: str, input: Tensor, scales: Tensor, zero_points: Tensor, axis: Optional[int],
                        quant_min: int, quant_max: int, dtype: torch.dtype,
                        out_dtype: Optional[torch.dtype]) -> Tensor:
    is_int = chk.check_qdtype(op, dtype, quant_min, quant_max)
    chk.check_dequant_input(op, input, dtype)
    out_dtype = out_dtype or _F32
    chk.check_out_dtype(op, out_dtype)
    s, z = _grouped_qparams(op, input, scales, zero_points, axis, quant_min, quant_max, is_int)
    out = qm.dequantize_int(input, s, z, subtract_in_int=False) if is_int else qm.dequantize_float(input, s)
    return out.to(out_dtype)


def quantize_per_channel(input: Tensor, scales: Tensor, zero_points: Tensor, axis: int, quant_min: int,
                         quant_max: int, dtype: torch.dtype) -> Tensor:
    return _quantize_grouped("fxquant.quantize_per_channel", input, scales, zero_points, axis, quant_min,
                             quant_max, dtype)


def dequantize_per_channel(input: Tensor, scales: Tensor, zero_points: Tensor, axis: int, quant_min: int,
                           quant_max: int, dtype: torch.dtype, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    return _dequantize_grouped("fxquant.dequantize_per_channel", input, scales, zero_points, axis, quant_min,
                               quant_max, dtype, out_dtype)


def quantize_per_token(input: Tensor, scales: Tensor, zero_points: Tensor, quant_min: int, quant_max: int,
                       dtype: torch.dtype) -> Tensor:
    return _quantize_grouped("fxquant.quantize_per_token", input, scales, zero_points, None, quant_min, quant_max,
                             dtype)


def dequantize_per_token(input: Tensor, scales: Tensor, zero_points: Tensor, quant_min: int, quant_max: int,
                         dtype: torch.dtype, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    return _dequantize_grouped("fxquant.dequantize_per_token", input, scales, zero_points, None, quant_min,
                               quant_max, dtype, out_dtype)


def _choose(op: str, input: Tensor, quant_min: int, quant_max: int, eps: float, dtype: torch.dtype,
            symmetric: bool, per_token: bool) -> tuple[Tensor, Tensor]:
    chk.check_qdtype(op, dtype, quant_min, quant_max)
    chk.check_input_dtype(op, input)
    if input.numel() == 0 or (per_token and input.dim() == 0):
        raise ValueError(f"{op}: cannot choose qparams for an input of shape {tuple(input.shape)} (no values "
                         f"{'per token' if per_token else ''}); pass a non-empty tensor")
    values = input.detach().to(_F32)  # dynamic qparams carry no gradient
    if per_token:
        min_val, max_val = torch.aminmax(values, dim=-1, keepdim=True)
    else:
        min_val, max_val = torch.aminmax(values)
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    try:
        return compute_qparams(min_val, max_val, quant_min, quant_max, qscheme, dtype, eps)
    except ValueError as err:
        raise ValueError(f"{op}: {err}") from None


def choose_qparams_per_tensor(input: Tensor, quant_min: int, quant_max: int, eps: float, dtype: torch.dtype,
                              symmetric: bool = False) -> tuple[Tensor, Tensor]:
    return _choose("fxquant.choose_qparams_per_tensor", input, quant_min, quant_max, eps, dtype, symmetric, False)


def choose_qparams_per_token(input: Tensor, quant_min: int, quant_max: int, eps: float, dtype: torch.dtype,
                             symmetric: bool = False) -> tuple[Tensor, Tensor]:
    return _choose("fxquant.choose_qparams_per_token", input, quant_min, quant_max, eps, dtype, symmetric, True)


def fake_quantize_per_tensor(input: Tensor, scale: Scale, zero_point: ZeroPoint, quant_min: int,
                             quant_max: int) -> Tensor:
    op = "fxquant.fake_quantize_per_tensor"
    chk.check_fake_quant_range(op, input, quant_min, quant_max)
    s, z = _per_tensor_qparams(op, scale, zero_point, quant_min, quant_max, True)
    return qm.fake_quantize(input, s, z, quant_min, quant_max, per_tensor=True)


def fake_quantize_per_channel(input: Tensor, scales: Tensor, zero_points: Tensor, axis: int, quant_min: int,
                              quant_max: int) -> Tensor:
    op = "fxquant.fake_quantize_per_channel"
    chk.check_fake_quant_range(op, input, quant_min, quant_max)
    s, z = _grouped_qparams(op, input, scales, zero_points, axis, quant_min, quant_max, True)
    if z.is_floating_point() and input.dtype == torch.float64:
        raise ValueError(f"{op}: float zero points need a float32 / float16 / bfloat16 input, got float64 "
                         f"(torch rounds such inputs through float32); convert the input with .float()")
    return qm.fake_quantize(input, s, z, quant_min, quant_max, per_tensor=False)


def _mask_per_tensor(input: Tensor, scale: Scale, zero_point: ZeroPoint, quant_min: int, quant_max: int) -> Tensor:
    s = float(scale.item()) if isinstance(scale, Tensor) else scale
    z = int(zero_point.item()) if isinstance(zero_point, Tensor) else zero_point
    return qm.fake_quantize_mask(input, s, z, quant_min, quant_max, per_tensor=True)


def _mask_per_channel(input: Tensor, scales: Tensor, zero_points: Tensor, axis: int, quant_min: int,
                      quant_max: int) -> Tensor:
    shape = _group_shape("fxquant.fake_quantize_per_channel", input, scales, zero_points, axis)
    return qm.fake_quantize_mask(input, scales.reshape(shape), zero_points.reshape(shape), quant_min, quant_max,
                                 per_tensor=False)


# fake-quant operator -> where its straight-through gradient passes (called with the operator's arguments)
FAKE_QUANT_MASKS = {"fake_quantize_per_tensor": _mask_per_tensor, "fake_quantize_per_channel": _mask_per_channel}


# --------------------------------------------------------------------------------------------------------------
# fake kernels: shapes and dtypes only, plus the checks that need no data
# --------------------------------------------------------------------------------------------------------------

def _fq(op: str, input: Tensor, quant_min: int, quant_max: int, dtype: torch.dtype) -> Tensor:
    chk.check_qdtype(op, dtype, quant_min, quant_max)
    chk.check_input_dtype(op, input)
    return torch.empty_like(input, dtype=dtype)


def _fdq(op: str, input: Tensor, quant_min: int, quant_max: int, dtype: torch.dtype,
         out_dtype: Optional[torch.dtype]) -> Tensor:
    chk.check_qdtype(op, dtype, quant_min, quant_max)
    chk.check_dequant_input(op, input, dtype)
    chk.check_out_dtype(op, out_dtype or _F32)
    return torch.empty_like(input, dtype=out_dtype or _F32)


def _fake_quantize_per_tensor(input: Tensor, scale: Scale, zero_point: ZeroPoint, quant_min: int, quant_max: int,
                              dtype: torch.dtype) -> Tensor:
    return _fq("fxquant.quantize_per_tensor", input, quant_min, quant_max, dtype)


def _fake_dequantize_per_tensor(input: Tensor, scale: Scale, zero_point: ZeroPoint, quant_min: int, quant_max: int,
                                dtype: torch.dtype, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    return _fdq("fxquant.dequantize_per_tensor", input, quant_min, quant_max, dtype, out_dtype)


def _fake_quantize_per_channel(input: Tensor, scales: Tensor, zero_points: Tensor, axis: int, quant_min: int,
                               quant_max: int, dtype: torch.dtype) -> Tensor:
    _group_shape("fxquant.quantize_per_channel", input, scales, zero_points, axis)
    return _fq("fxquant.quantize_per_channel", input, quant_min, quant_max, dtype)


def _fake_dequantize_per_channel(input: Tensor, scales: Tensor, zero_points: Tensor, axis: int, quant_min: int,
                                 quant_max: int, dtype: torch.dtype,
                                 out_dtype: Optional[torch.dtype] = None) -> Tensor:
    _group_shape("fxquant.dequantize_per_channel", input, scales, zero_points, axis)
    return _fdq("fxquant.dequantize_per_channel", input, quant_min, quant_max, dtype, out_dtype)


def _fake_quantize_per_token(input: Tensor, scales: Tensor, zero_points: Tensor, quant_min: int, quant_max: int,
                             dtype: torch.dtype) -> Tensor:
    _group_shape("fxquant.quantize_per_token", input, scales, zero_points, None)
    return _fq("fxquant.quantize_per_token", input, quant_min, quant_max, dtype)


def _fake_dequantize_per_token(input: Tensor, scales: Tensor, zero_points: Tensor, quant_min: int, quant_max: int,
                               dtype: torch.dtype, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    _group_shape("fxquant.dequantize_per_token", input, scales, zero_points, None)
    return _fdq("fxquant.dequantize_per_token", input, quant_min, quant_max, dtype, out_dtype)


def _fake_choose_per_tensor(input: Tensor, quant_min: int, quant_max: int, eps: float, dtype: torch.dtype,
                            symmetric: bool = False) -> tuple[Tensor, Tensor]:
    chk.check_qdtype("fxquant.choose_qparams_per_tensor", dtype, quant_min, quant_max)
    return input.new_empty((), dtype=_F32), input.new_empty((), dtype=torch.int64)


def _fake_choose_per_token(input: Tensor, quant_min: int, quant_max: int, eps: float, dtype: torch.dtype,
                           symmetric: bool = False) -> tuple[Tensor, Tensor]:
    chk.check_qdtype("fxquant.choose_qparams_per_token", dtype, quant_min, quant_max)
    shape = tuple(input.shape[:-1]) + (1,)
    return input.new_empty(shape, dtype=_F32), input.new_empty(shape, dtype=torch.int64)


def _fake_fake_quantize_per_tensor(input: Tensor, scale: Scale, zero_point: ZeroPoint, quant_min: int,
                                   quant_max: int) -> Tensor:
    chk.check_fake_quant_range("fxquant.fake_quantize_per_tensor", input, quant_min, quant_max)
    return torch.empty_like(input)


def _fake_fake_quantize_per_channel(input: Tensor, scales: Tensor, zero_points: Tensor, axis: int, quant_min: int,
                                    quant_max: int) -> Tensor:
    chk.check_fake_quant_range("fxquant.fake_quantize_per_channel", input, quant_min, quant_max)
    _group_shape("fxquant.fake_quantize_per_channel", input, scales, zero_points, axis)
    return torch.empty_like(input)


# operator (overload) name -> (real kernel, fake kernel)
KERNELS = {
    "quantize_per_tensor": (quantize_per_tensor, _fake_quantize_per_tensor),
    "quantize_per_tensor.scalar": (quantize_per_tensor, _fake_quantize_per_tensor),
    "dequantize_per_tensor": (dequantize_per_tensor, _fake_dequantize_per_tensor),
    "dequantize_per_tensor.scalar": (dequantize_per_tensor, _fake_dequantize_per_tensor),
    "quantize_per_channel": (quantize_per_channel, _fake_quantize_per_channel),
    "dequantize_per_channel": (dequantize_per_channel, _fake_dequantize_per_channel),
    "quantize_per_token": (quantize_per_token, _fake_quantize_per_token),
    "dequantize_per_token": (dequantize_per_token, _fake_dequantize_per_token),
    "choose_qparams_per_tensor": (choose_qparams_per_tensor, _fake_choose_per_tensor),
    "choose_qparams_per_token": (choose_qparams_per_token, _fake_choose_per_token),
    "fake_quantize_per_tensor": (fake_quantize_per_tensor, _fake_fake_quantize_per_tensor),
    "fake_quantize_per_tensor.scalar": (fake_quantize_per_tensor, _fake_fake_quantize_per_tensor),
    "fake_quantize_per_channel": (fake_quantize_per_channel, _fake_fake_quantize_per_channel),
}
