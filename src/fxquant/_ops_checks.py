"""Argument checks of the :mod:`fxquant.ops` operators: ValueError naming the operator, the value and the fix.

Checks that need no tensor data (dtypes, ranges, shapes) also run inside the fake (meta) kernels, so
``torch.export`` reports bad arguments too; checks of qparam values (scale > 0, zero point in range) read the data
and run in the real kernels only.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

from ._dtypes import QUANT_INT_DTYPES

__all__ = ["INT_QDTYPES", "FLOAT_QDTYPES", "QUANTIZE_INPUT_DTYPES", "check_qdtype", "check_input_dtype",
           "check_dequant_input", "check_out_dtype", "check_fake_quant_range", "check_one_element", "channel_axis",
           "check_channel_qparams", "check_token_qparams", "scalar_scale", "scalar_zero_point", "check_scales",
           "check_zero_points"]

INT_QDTYPES: dict[torch.dtype, tuple[int, int]] = dict(QUANT_INT_DTYPES)
FLOAT_QDTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
QUANTIZE_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_qdtype(op: str, dtype: torch.dtype, quant_min: int, quant_max: int) -> bool:
    """Validate the target dtype and quant range; return True for an integer dtype, False for a float one."""
    if dtype in INT_QDTYPES:
        lo, hi = INT_QDTYPES[dtype]
        if not lo <= quant_min <= quant_max <= hi:
            raise ValueError(f"{op}: quantization range [quant_min={quant_min}, quant_max={quant_max}] does not fit "
                             f"dtype {dtype} ([{lo}, {hi}]) or is empty; pass quant_min <= quant_max inside it")
        return True
    if dtype in FLOAT_QDTYPES:
        if quant_min > quant_max:
            raise ValueError(f"{op}: quant_min={quant_min} exceeds quant_max={quant_max}")
        return False
    raise ValueError(f"{op}: dtype {dtype} is not supported; expected one of "
                     f"{_names(list(INT_QDTYPES) + list(FLOAT_QDTYPES))} (the legacy quint8 / qint8 / qint32 "
                     f"dtypes are accepted by the fxquant.ops wrappers, or map them with fxquant._dtypes.normalize_dtype)")


def check_input_dtype(op: str, x: Tensor, allowed: Sequence[torch.dtype] = QUANTIZE_INPUT_DTYPES) -> None:
    """The float input of a quantize / fake-quantize / choose-qparams op."""
    if x.dtype not in allowed:
        raise ValueError(f"{op}: input has dtype {x.dtype}; expected one of {_names(allowed)} (convert it with "
                         f".float() first)")


def check_dequant_input(op: str, q: Tensor, dtype: torch.dtype) -> None:
    """A dequantize op's input must already have the quantized dtype it names."""
    if q.dtype != dtype:
        raise ValueError(f"{op}: input has dtype {q.dtype} but dtype={dtype} was given; pass the tensor the "
                         f"matching quantize op returned")


def check_out_dtype(op: str, out_dtype: torch.dtype) -> None:
    """``out_dtype`` of a dequantize op must be a floating dtype."""
    if out_dtype not in _FLOATING:
        raise ValueError(f"{op}: out_dtype={out_dtype} is not a floating dtype; use one of {_names(_FLOATING)}")


def check_fake_quant_range(op: str, x: Tensor, quant_min: int, quant_max: int) -> None:
    """Fake quantization: a floating input and a non-empty integer range."""
    check_input_dtype(op, x, _FLOATING)
    if quant_min > quant_max:
        raise ValueError(f"{op}: quant_min={quant_min} exceeds quant_max={quant_max}")


def check_one_element(op: str, name: str, value: Tensor) -> None:
    """Per-tensor qparams hold exactly one value."""
    if value.numel() != 1:
        raise ValueError(f"{op}: {name} must hold one value for per-tensor quantization, got shape "
                         f"{tuple(value.shape)}; use the per_channel / per_token op for several")


def channel_axis(op: str, x: Tensor, axis: int) -> int:
    """``axis`` normalised to ``[0, x.dim())``."""
    if not -x.dim() <= axis < max(x.dim(), 1):
        raise ValueError(f"{op}: axis={axis} is out of range for an input with {x.dim()} dimensions")
    return axis % max(x.dim(), 1)


def check_channel_qparams(op: str, x: Tensor, scales: Tensor, zero_points: Tensor, axis: int) -> int:
    """Per-channel qparams: 1-D, one value per slice along ``axis``; returns the normalised axis."""
    axis = channel_axis(op, x, axis)
    channels = x.shape[axis] if x.dim() else 1
    for name, value in (("scales", scales), ("zero_points", zero_points)):
        if value.dim() != 1 or value.numel() != channels:
            raise ValueError(f"{op}: {name} has shape {tuple(value.shape)} but the input has {channels} channels "
                             f"along axis {axis}; pass a 1-D tensor of {channels} values")
    return axis


def check_token_qparams(op: str, x: Tensor, scales: Tensor, zero_points: Tensor) -> None:
    """Per-token qparams: one value per row of the last dimension (shape ``x.shape[:-1] + (1,)``)."""
    tokens = math.prod(x.shape[:-1])
    for name, value in (("scales", scales), ("zero_points", zero_points)):
        if value.numel() != tokens:
            raise ValueError(f"{op}: {name} has {value.numel()} values but the input {tuple(x.shape)} has {tokens} "
                             f"tokens; pass shape {tuple(x.shape[:-1]) + (1,)}")


ScaleLike = Union[Tensor, float]


def scalar_scale(op: str, scale: ScaleLike) -> float:
    """The one per-tensor scale as a Python float, checked finite and > 0."""
    value = float(scale.item()) if isinstance(scale, Tensor) else float(scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{op}: scale={value} must be a finite number > 0; an observer that saw no data or a "
                         f"constant input gives this, calibrate it with real data")
    return value


def scalar_zero_point(op: str, zero_point: Union[Tensor, int], quant_min: int, quant_max: int,
                      check_range: bool) -> int:
    """The one per-tensor zero point as a Python int, checked integral and (``check_range``) inside the range."""
    if isinstance(zero_point, Tensor):
        if zero_point.is_floating_point() or zero_point.is_complex():
            raise ValueError(f"{op}: zero_point has dtype {zero_point.dtype}; per-tensor zero points are integers "
                             f"(pass .round().to(torch.int64))")
        zero_point = zero_point.item()
    value = int(zero_point)
    if check_range and not quant_min <= value <= quant_max:
        raise ValueError(f"{op}: zero_point={value} lies outside [quant_min={quant_min}, quant_max={quant_max}]")
    return value


def check_scales(op: str, scales: Tensor) -> None:
    """Several scales: floating, all finite and > 0 (the first bad one is named)."""
    if not scales.is_floating_point():
        raise ValueError(f"{op}: scales have dtype {scales.dtype}; pass float32 scales")
    if scales.numel() == 0:
        return
    bad = ~(torch.isfinite(scales) & (scales > 0))
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise ValueError(f"{op}: scales[{i}]={scales.reshape(-1)[i].item()} must be a finite number > 0; "
                         f"calibrate the observer with data that covers every channel")


def check_zero_points(op: str, zero_points: Tensor, quant_min: int, quant_max: int, allow_float: bool) -> None:
    """Several zero points: integers inside the range, or (``allow_float``) any finite float (float qparams)."""
    if zero_points.is_floating_point():
        if not allow_float:
            raise ValueError(f"{op}: zero_points have dtype {zero_points.dtype}; pass integer zero points")
        if zero_points.numel() and not bool(torch.isfinite(zero_points).all()):
            raise ValueError(f"{op}: float zero_points must be finite, got {zero_points.tolist()}")
        return
    if zero_points.numel() == 0:
        return
    lo, hi = torch.aminmax(zero_points.reshape(-1))
    if int(lo) < quant_min or int(hi) > quant_max:
        raise ValueError(f"{op}: zero_points span [{int(lo)}, {int(hi)}], outside [quant_min={quant_min}, "
                         f"quant_max={quant_max}]")
