"""Plain dtypes used by fxquant, and the mapping from torch's deprecated quantized dtypes.

fxquant never creates ``torch.quint8 / qint8 / qint32`` tensors, but users migrating from torch.ao write
``MinMaxObserver.with_args(dtype=torch.quint8)``. :func:`normalize_dtype` turns such legacy dtypes into the plain
dtype that stores the same integers (``quint8 -> uint8``, ``qint8 -> int8``, ``qint32 -> int32``), looked up by
name so this module never touches the deprecated attributes.
"""
from __future__ import annotations

import torch

__all__ = ["normalize_dtype", "dtype_range", "is_integer_qdtype", "is_float_qdtype", "QUANT_INT_DTYPES",
           "QUANT_FLOAT_DTYPES"]

# name of a legacy quantized dtype -> (plain storage dtype, quant_min, quant_max)
_LEGACY = {
    "torch.quint8": (torch.uint8, 0, 255),
    "torch.qint8": (torch.int8, -128, 127),
    "torch.qint32": (torch.int32, -(2**31), 2**31 - 1),
    "torch.quint4x2": (torch.uint8, 0, 15),
    "torch.quint2x4": (torch.uint8, 0, 3),
}

QUANT_INT_DTYPES: dict[torch.dtype, tuple[int, int]] = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.int16: (-(2**15), 2**15 - 1),
    torch.int32: (-(2**31), 2**31 - 1),
}
QUANT_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float32)


def normalize_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """Return the plain dtype for ``dtype``; legacy quantized dtypes map to their integer storage dtype."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"expected a torch.dtype, got {dtype!r}")
    legacy = _LEGACY.get(str(dtype))
    return legacy[0] if legacy else dtype


def dtype_range(dtype: torch.dtype, reduce_range: bool = False) -> tuple[int, int]:
    """Default (quant_min, quant_max) of an integer quantized dtype (legacy names accepted).

    ``reduce_range`` drops one bit, as torch.ao does for x86 activations (0..127 / -64..63).
    """
    legacy = _LEGACY.get(str(dtype))
    if legacy is not None:
        qmin, qmax = legacy[1], legacy[2]
    elif dtype in QUANT_INT_DTYPES:
        qmin, qmax = QUANT_INT_DTYPES[dtype]
    else:
        raise ValueError(f"{dtype} is not an integer quantized dtype; expected one of "
                         f"uint8, int8, int16, int32 (or torch.quint8/qint8/qint32)")
    if reduce_range:
        qmin, qmax = (qmin // 2, qmax // 2) if qmin < 0 else (0, qmax // 2)
    return qmin, qmax


def is_integer_qdtype(dtype: torch.dtype | None) -> bool:
    """True for the integer dtypes fxquant quantizes to (plain or legacy)."""
    return dtype is not None and (str(dtype) in _LEGACY or dtype in QUANT_INT_DTYPES)


def is_float_qdtype(dtype: torch.dtype | None) -> bool:
    """True for float storage dtypes used as a 'quantized' target (fp16, bf16, fp8)."""
    return dtype in QUANT_FLOAT_DTYPES and dtype != torch.float32
