"""Observers that compute nothing from data (re-exported by :mod:`fxquant.observer`)."""
from __future__ import annotations

import math
import warnings

import torch

from fxquant._observer_base import _EPS, ObserverBase
from fxquant.qparams import SUPPORTED_QSCHEMES, check_qrange_fits_dtype, is_per_tensor

__all__ = ["FixedQParamsObserver", "PlaceholderObserver", "RecordingObserver", "NoopObserver",
           "ReuseInputObserver"]


def _no_qparams(obs: ObserverBase) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError(f"{type(obs).__name__} has no quantization parameters; calculate_qparams should not be "
                       f"called on it (it only carries dtype / is_dynamic to convert)")


class FixedQParamsObserver(ObserverBase):
    """Observer with fixed scale / zero point (sigmoid, tanh, ...): forward is the identity.

    Args:
        scale: the fixed scale (> 0); zero_point: the fixed zero point (inside [quant_min, quant_max]).
        dtype, qscheme, quant_min, quant_max: default uint8, per_tensor_affine, 0, 255.
        is_dynamic: not supported (ValueError).

    Buffers: ``scale`` (float32, shape (1,)) and ``zero_point`` (int32, shape (1,)), dtypes as torch.ao.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype = torch.uint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, quant_min: int = 0, quant_max: int = 255,
                 is_dynamic: bool = False) -> None:
        if is_dynamic:
            raise ValueError("FixedQParamsObserver does not support dynamic quantization (is_dynamic=True)")
        super().__init__(dtype=dtype, is_dynamic=False)
        if not is_per_tensor(qscheme):
            raise ValueError(f"FixedQParamsObserver supports per-tensor qschemes only, got {qscheme}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"FixedQParamsObserver: scale must be a positive finite number, got {scale}")
        if quant_min >= quant_max:
            raise ValueError(f"FixedQParamsObserver: quant_min={quant_min} must be below quant_max={quant_max}")
        check_qrange_fits_dtype(quant_min, quant_max, dtype)
        if not quant_min <= zero_point <= quant_max:
            raise ValueError(f"FixedQParamsObserver: zero_point={zero_point} is outside "
                             f"[quant_min={quant_min}, quant_max={quant_max}]")
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)
        self.qscheme = qscheme
        self.register_buffer("scale", torch.tensor([scale], dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor([zero_point], dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity."""
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed ``(scale, zero_point)`` buffers."""
        return self.scale, self.zero_point


class PlaceholderObserver(ObserverBase):
    """Carries a dtype (float16, or an int dtype for dynamic quantization) to convert; observes nothing.

    Args:
        dtype: target dtype (default float32); custom_op_name: kept as ``custom_op``;
        compute_dtype: deprecated, any value means ``is_dynamic=True`` (with a warning);
        quant_min, quant_max, qscheme (default per_tensor_affine), eps (default float32 epsilon): passed on
        to convert for dynamic quantization; is_dynamic: dynamic quantization.
    """

    def __init__(self, dtype: torch.dtype = torch.float32, custom_op_name: str = "",
                 compute_dtype: torch.dtype | None = None, quant_min: int | None = None,
                 quant_max: int | None = None, qscheme: torch.qscheme | None = None, eps: float | None = None,
                 is_dynamic: bool = False) -> None:
        if compute_dtype is not None:
            warnings.warn("PlaceholderObserver: compute_dtype is deprecated, use is_dynamic=True instead",
                          DeprecationWarning, stacklevel=2)
            is_dynamic = True
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        qscheme = torch.per_tensor_affine if qscheme is None else qscheme
        if qscheme not in SUPPORTED_QSCHEMES:
            raise ValueError(f"PlaceholderObserver: unsupported qscheme {qscheme}")
        if quant_min is not None and quant_max is not None:
            check_qrange_fits_dtype(quant_min, quant_max, dtype)
        self.qscheme = qscheme
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.eps = _EPS if eps is None else eps
        self.custom_op = custom_op_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity."""
        return x

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, is_dynamic={self.is_dynamic}"

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Always raises: a placeholder has no qparams."""
        return _no_qparams(self)


class RecordingObserver(ObserverBase):
    """Debug observer that keeps a copy of every tensor it sees in ``tensor_val``."""

    def __init__(self, dtype: torch.dtype = torch.uint8) -> None:
        super().__init__(dtype=dtype, is_dynamic=False)
        self.tensor_val: list[torch.Tensor | None] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record a clone of ``x``; return ``x``."""
        self.tensor_val.append(x.clone())
        return x

    def get_tensor_value(self) -> list[torch.Tensor | None]:
        """The recorded tensors, in order."""
        return self.tensor_val

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Always raises: a recording observer has no qparams."""
        return _no_qparams(self)


class NoopObserver(ObserverBase):
    """Carries a dtype (default float16) to convert and does nothing else."""

    def __init__(self, dtype: torch.dtype = torch.float16, custom_op_name: str = "") -> None:
        super().__init__(dtype=dtype, is_dynamic=False)
        self.custom_op = custom_op_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity."""
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Always raises: a no-op observer has no qparams."""
        return _no_qparams(self)


class ReuseInputObserver(ObserverBase):
    """Marks an op (e.g. ``reshape``) whose output reuses its input's observer; prepare inserts none of its own."""

    def __init__(self) -> None:
        super().__init__(dtype=torch.uint8, is_dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity."""
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Always raises: the reused observer holds the qparams."""
        return _no_qparams(self)
