"""Scale / zero point from an observed range: the one place in fxquant that holds the formula.

Everything is evaluated in float32 with the same sequence of torch operations that torch.ao's observers use, so
the results are bit-identical (CONTRACT.md §3)::

    min' = min(min_val, 0);  max' = max(max_val, 0)
    symmetric:  scale = max(-min', max') / ((qmax - qmin) / 2);  scale = max(scale, eps)
                zero_point = 0 (128 for uint8, the rounded-down midpoint for a user-given uint8 range, 2**15 for uint16)
    affine:     scale = max((max' - min') / (qmax - qmin), eps)
                zero_point = clamp(qmin - round_half_even(min' / scale), qmin, qmax)
    float qparams (per_channel_affine_float_qparams, embeddings):
                scale = (max_val - min_val) / (qmax - qmin), replaced by 1.0 where it is not above eps
                zero_point = -min_val / scale   (a float)

Where torch.ao silently computes something wrong fxquant raises instead: zero points are computed in int64
(torch.ao overflows int32 for 32-bit affine ranges), and a range so wide that the scale overflows float32 is an
error rather than an infinite scale.

The module also resolves and validates quantization ranges (:func:`resolve_qrange`).
"""
from __future__ import annotations

from typing import Callable

import torch

from fxquant._dtypes import dtype_range, normalize_dtype
from fxquant._qparams_fast import per_channel_qparams, per_tensor_qparams

__all__ = ["compute_qparams", "compute_qparams_fast", "resolve_qrange", "validate_qmin_qmax", "check_qrange_fits_dtype",
           "default_qrange", "is_per_tensor", "is_per_channel", "is_symmetric", "is_float_qparams", "symmetric_zero_point",
           "PER_TENSOR_SCHEMES", "PER_CHANNEL_SCHEMES", "SUPPORTED_QSCHEMES"]

PER_TENSOR_SCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric)
PER_CHANNEL_SCHEMES = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)
SUPPORTED_QSCHEMES = PER_TENSOR_SCHEMES + PER_CHANNEL_SCHEMES
_SYMMETRIC_SCHEMES = (torch.per_tensor_symmetric, torch.per_channel_symmetric)

# Plain integer dtypes fxquant quantizes to and their full range (uint16 is here because torch.ao accepts it).
_INT_RANGES: dict[torch.dtype, tuple[int, int]] = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
    torch.uint16: (0, 2**16 - 1),
}
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_per_tensor(qscheme: torch.qscheme) -> bool:
    """True for ``per_tensor_affine`` and ``per_tensor_symmetric``."""
    return qscheme in PER_TENSOR_SCHEMES


def is_per_channel(qscheme: torch.qscheme) -> bool:
    """True for the three per-channel schemes (affine, symmetric, affine_float_qparams)."""
    return qscheme in PER_CHANNEL_SCHEMES


def is_symmetric(qscheme: torch.qscheme) -> bool:
    """True for ``per_tensor_symmetric`` and ``per_channel_symmetric``."""
    return qscheme in _SYMMETRIC_SCHEMES


def is_float_qparams(qscheme: torch.qscheme) -> bool:
    """True for ``per_channel_affine_float_qparams`` (float zero point, used for embeddings)."""
    return qscheme == torch.per_channel_affine_float_qparams


def _storage_range(dtype: torch.dtype) -> tuple[int, int] | None:
    """Representable integer range of ``dtype`` (legacy names accepted); fp8: its finite range; else None."""
    plain = normalize_dtype(dtype)
    if str(dtype) != str(plain):
        return dtype_range(dtype)
    if plain in _INT_RANGES:
        return _INT_RANGES[plain]
    if plain in _FLOAT8:
        info = torch.finfo(plain)
        return int(info.min), int(info.max)
    return None


def default_qrange(dtype: torch.dtype, reduce_range: bool = False) -> tuple[int, int]:
    """torch.ao's default (quant_min, quant_max) for ``dtype``; ``reduce_range`` drops a bit for int8 / uint8.

    fp8 dtypes get their finite range (torch.ao uses 0..15 there, which makes no sense for a float format).
    """
    full = _storage_range(dtype)
    if full is None:
        raise ValueError(f"dtype {dtype} has no quantization range; expected one of int8, uint8, int16, int32, "
                         f"uint16, float8_e4m3fn, float8_e5m2 (or the legacy quint8 / qint8 / qint32 / quint4x2)")
    if reduce_range and normalize_dtype(dtype) in (torch.int8, torch.uint8) and full[1] - full[0] == 255:
        return (-64, 63) if full[0] < 0 else (0, 127)
    return full


def validate_qmin_qmax(quant_min: int, quant_max: int) -> None:
    """Check a user-given range: it must contain 0 and ``quant_min < quant_max`` (ValueError naming the values)."""
    if not quant_min <= 0 <= quant_max:
        raise ValueError(f"quantization range [quant_min={quant_min}, quant_max={quant_max}] must include 0; "
                         f"pick quant_min <= 0 <= quant_max")
    if quant_min >= quant_max:
        raise ValueError(f"quant_min={quant_min} must be strictly less than quant_max={quant_max}")


def check_qrange_fits_dtype(quant_min: int, quant_max: int, dtype: torch.dtype) -> None:
    """Raise ValueError when [quant_min, quant_max] does not fit in ``dtype`` (e.g. -200..100 for int8)."""
    full = _storage_range(dtype)
    if full is not None and not full[0] <= quant_min <= quant_max <= full[1]:
        raise ValueError(f"quantization range [quant_min={quant_min}, quant_max={quant_max}] is too wide for "
                         f"dtype {dtype}, which holds [{full[0]}, {full[1]}]; narrow the range or use a wider dtype")


def resolve_qrange(dtype: torch.dtype, quant_min: int | None, quant_max: int | None,
                   reduce_range: bool = False) -> tuple[int, int]:
    """The (quant_min, quant_max) an observer uses, exactly as torch.ao derives it.

    With both bounds given the range is validated and, if ``reduce_range``, halved (``qmin // 2, qmax // 2``, as
    torch.ao does); otherwise the dtype's default range is used. Giving only one bound is an error.
    """
    if (quant_min is None) != (quant_max is None):
        raise ValueError(f"give both quant_min and quant_max or neither (got quant_min={quant_min}, "
                         f"quant_max={quant_max})")
    if quant_min is None or quant_max is None:
        return default_qrange(dtype, reduce_range)
    quant_min, quant_max = int(quant_min), int(quant_max)
    validate_qmin_qmax(quant_min, quant_max)
    check_qrange_fits_dtype(quant_min, quant_max, dtype)
    if reduce_range:
        return quant_min // 2, quant_max // 2
    return quant_min, quant_max


def symmetric_zero_point(dtype: torch.dtype, quant_min: int, quant_max: int, customized_range: bool) -> int:
    """Zero point of symmetric quantization: 0 for signed dtypes, 128 (or the midpoint of a user range) for uint8."""
    plain = normalize_dtype(dtype)
    if plain == torch.uint8:
        zp = (quant_min + quant_max) // 2 if customized_range else 128
    elif plain == torch.uint16:
        zp = 2**15
    else:
        zp = 0
    if not quant_min <= zp <= quant_max:
        raise ValueError(f"symmetric {dtype} quantization puts the zero point at {zp}, outside "
                         f"[quant_min={quant_min}, quant_max={quant_max}] (reduce_range with a symmetric unsigned "
                         f"dtype); give quant_min/quant_max explicitly or use a signed dtype")
    return zp


def _symmetric(min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int, eps: torch.Tensor,
               dtype: torch.dtype, customized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    min_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_pos = torch.max(max_val, torch.zeros_like(max_val))
    amax = torch.max(-min_neg, max_pos)
    scale = torch.max(amax / (float(qmax - qmin) / 2), eps)
    zp = symmetric_zero_point(dtype, qmin, qmax, customized)
    return scale, torch.full(scale.shape, zp, dtype=torch.int64, device=scale.device)


def _affine(min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int, eps: torch.Tensor,
            dtype: torch.dtype, customized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    min_neg = torch.min(min_val, torch.zeros_like(min_val))
    max_pos = torch.max(max_val, torch.zeros_like(max_val))
    scale = torch.max((max_pos - min_neg) / float(qmax - qmin), eps)
    offset = torch.round(min_neg / scale).to(torch.int64)
    return scale, torch.clamp(qmin - offset, qmin, qmax)


def _float_qparams(min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int, eps: torch.Tensor,
                   dtype: torch.dtype, customized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (max_val - min_val) / float(qmax - qmin)
    scale = torch.where(scale > eps, scale, torch.ones_like(scale))
    return scale, (-min_val) / scale


_Formula = Callable[[torch.Tensor, torch.Tensor, int, int, torch.Tensor, torch.dtype, bool],
                    tuple[torch.Tensor, torch.Tensor]]
_FORMULAS: dict[torch.qscheme, _Formula] = {
    torch.per_tensor_affine: _affine,
    torch.per_channel_affine: _affine,
    torch.per_tensor_symmetric: _symmetric,
    torch.per_channel_symmetric: _symmetric,
    torch.per_channel_affine_float_qparams: _float_qparams,
}


def _check_min_max(min_val: torch.Tensor, max_val: torch.Tensor) -> None:
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val has shape {tuple(min_val.shape)} but max_val has shape {tuple(max_val.shape)}")
    if not bool(torch.isfinite(min_val).all() & torch.isfinite(max_val).all()):
        raise ValueError(f"min_val={min_val.tolist()} / max_val={max_val.tolist()} are not all finite; an observer "
                         f"that saw no (finite) data has no range: run calibration data through it first")
    if bool((min_val > max_val).any()):
        raise ValueError(f"min_val={min_val.tolist()} must not exceed max_val={max_val.tolist()}")


def compute_qparams(min_val: torch.Tensor, max_val: torch.Tensor, quant_min: int, quant_max: int,
                    qscheme: torch.qscheme, dtype: torch.dtype, eps: torch.Tensor | float,
                    *, customized_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for the observed range ``[min_val, max_val]``, bit-identical to torch.ao.

    Args:
        min_val, max_val: float32 tensors of one shape (0-dim per tensor, ``(C,)`` per channel), finite,
            ``min_val <= max_val``.
        quant_min, quant_max: the integer range (see :func:`resolve_qrange`).
        qscheme: one of the per-tensor / per-channel affine / symmetric schemes or
            ``per_channel_affine_float_qparams``.
        dtype: the quantized dtype (plain or legacy); decides the symmetric zero point (128 for uint8).
        eps: lower bound of the scale (float32).
        customized_range: the user gave quant_min/quant_max; torch.ao then uses the rounded-down midpoint
            ``(quant_min + quant_max) // 2`` instead of 128 as the symmetric uint8 zero point.

    Returns:
        ``(scale, zero_point)`` with the shape of ``min_val``: float32 scale; int64 zero point (float32 for
        ``per_channel_affine_float_qparams``).

    Raises:
        ValueError: unknown qscheme, bad range, non-finite or inverted min/max, or a scale that overflows float32.
    """
    formula = _FORMULAS.get(qscheme)
    if formula is None:
        raise ValueError(f"unsupported qscheme {qscheme}; expected one of {list(SUPPORTED_QSCHEMES)}")
    if quant_min >= quant_max:
        raise ValueError(f"quant_min={quant_min} must be strictly less than quant_max={quant_max}")
    fast = compute_qparams_fast(min_val, max_val, int(quant_min), int(quant_max), qscheme, dtype, eps, customized_range)
    if fast is not None:
        return fast
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32, device=min_val.device)
    _check_min_max(min_val, max_val)
    eps_t = torch.as_tensor(eps, dtype=torch.float32, device=min_val.device).reshape(())
    scale, zero_point = formula(min_val, max_val, int(quant_min), int(quant_max), eps_t, dtype, customized_range)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"range [{min_val.tolist()}, {max_val.tolist()}] is too wide: its scale overflows "
                         f"float32 (quant_min={quant_min}, quant_max={quant_max})")
    return scale, zero_point



def _cpu_scalar(value: object) -> bool:
    return isinstance(value, float) or (isinstance(value, torch.Tensor) and value.numel() == 1
                                        and value.device.type == "cpu" and value.is_floating_point())


def _cpu_float32(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype == torch.float32


def compute_qparams_fast(min_val: torch.Tensor | float, max_val: torch.Tensor | float, quant_min: int,
                         quant_max: int, qscheme: torch.qscheme, dtype: torch.dtype, eps: torch.Tensor | float,
                         customized: bool, flat: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`compute_qparams` without tensor ops on the CPU (``_qparams_fast``: same bits, several times faster):
    Python floats for one affine / symmetric range, numpy float32 for per-channel ranges; None where the tensor path
    must run (other devices and dtypes, non-finite or inverted ranges and other errors, unusual values). Arguments
    as for :func:`compute_qparams`, already validated (known qscheme, ``quant_min < quant_max``); ``flat``: a single
    range gives shape ``(1,)`` results whatever the shape of ``min_val``."""
    if not _cpu_scalar(eps):
        return None
    try:
        zp_sym = symmetric_zero_point(dtype, quant_min, quant_max, customized) if is_symmetric(qscheme) else None
    except ValueError:
        return None
    if qscheme != torch.per_channel_affine_float_qparams and _cpu_scalar(min_val) and _cpu_scalar(max_val):
        shape = min_val.shape if isinstance(min_val, torch.Tensor) else torch.Size(())
        if isinstance(max_val, torch.Tensor) and max_val.shape != shape:
            return None
        one = per_tensor_qparams(float(min_val), float(max_val), quant_min, quant_max, qscheme, float(eps), zp_sym)
        if one is None:
            return None
        if flat or len(shape) == 1:
            return torch.tensor([one[0]], dtype=torch.float32), torch.tensor([one[1]], dtype=torch.int64)
        return (torch.tensor(one[0], dtype=torch.float32).reshape(shape),
                torch.tensor(one[1], dtype=torch.int64).reshape(shape))
    if not (_cpu_float32(min_val) and _cpu_float32(max_val)) or min_val.shape != max_val.shape:  # type: ignore
        return None
    return per_channel_qparams(min_val, max_val, quant_min, quant_max, qscheme, float(eps),  # type: ignore[arg-type]
                               zp_sym)
