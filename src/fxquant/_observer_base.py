"""Base classes of fxquant's observers and the per-tensor min / max observers (re-exported by
:mod:`fxquant.observer`, which documents the differences from torch.ao)."""
from __future__ import annotations

import warnings
from abc import ABCMeta, abstractmethod
from typing import Any

import torch

from fxquant._dtypes import normalize_dtype
from fxquant._partial import with_args, with_callable_args
from fxquant.qparams import (SUPPORTED_QSCHEMES, compute_qparams, compute_qparams_fast, is_float_qparams,
                             is_per_tensor, is_symmetric, resolve_qrange, symmetric_zero_point)

__all__ = ["ObserverBase", "UniformQuantizationObserverBase", "MinMaxObserver", "MovingAverageMinMaxObserver"]

_EPS = torch.finfo(torch.float32).eps
_ALLOWED_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.uint16,
                   torch.float8_e4m3fn, torch.float8_e5m2)


class ObserverBase(torch.nn.Module, metaclass=ABCMeta):
    """Base of all observers: ``forward`` records statistics and returns its input unchanged,
    ``calculate_qparams`` turns them into ``(scale, zero_point)``.

    Args:
        dtype: the quantized dtype (plain; legacy quint8 etc. are normalised).
        is_dynamic: the observer stands for dynamic quantization (qparams chosen at run time).
    """

    def __init__(self, dtype: torch.dtype, is_dynamic: bool = False) -> None:
        super().__init__()
        self.dtype = normalize_dtype(dtype)
        self.is_dynamic = bool(is_dynamic)

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe ``x`` and return it unchanged."""

    @abstractmethod
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point from what was observed."""

    with_args = classmethod(with_args)
    with_callable_args = classmethod(with_callable_args)


class _NonFiniteFilter:
    """Mixin: drop NaN / +-inf from observed data, warning once per observer."""

    _warned_nonfinite = False

    def _warn_nonfinite(self) -> None:
        if not getattr(self, "_warned_nonfinite", False):
            warnings.warn(f"{type(self).__name__}: NaN or infinite values in the observed tensor are ignored "
                          f"(warned once per observer)", RuntimeWarning, stacklevel=5)
            self._warned_nonfinite = True

    def _finite(self, x: torch.Tensor) -> torch.Tensor:
        self._warn_nonfinite()
        return x[torch.isfinite(x)]

    def _finite_data(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(finite values of x, their min, their max)``; ``x`` itself when all are finite; None if none are."""
        lo, hi = torch.aminmax(x)
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return x, lo, hi
        x = self._finite(x)
        return (x, *torch.aminmax(x)) if x.numel() else None

    def _aminmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """min and max of the finite values of ``x``; None when it has none."""
        found = self._finite_data(x)
        return None if found is None else (found[1], found[2])

    def _aminmax_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row min / max of the finite values; a row without any gives (+inf, -inf)."""
        lo, hi = torch.aminmax(rows, dim=1)
        if bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            return lo, hi
        self._warn_nonfinite()
        ok = torch.isfinite(rows)
        return (torch.where(ok, rows, float("inf")).amin(dim=1),
                torch.where(ok, rows, float("-inf")).amax(dim=1))


class UniformQuantizationObserverBase(_NonFiniteFilter, ObserverBase):
    """Common base of observers that compute scale / zero point from a min / max range.

    Args:
        dtype: quantized dtype: int8 / uint8 / int16 / int32 / uint16 / fp8 (or legacy names). Default uint8.
        qscheme: ``torch.per_tensor_affine`` (default), ``per_tensor_symmetric``, ``per_channel_affine``,
            ``per_channel_symmetric`` or ``per_channel_affine_float_qparams``.
        reduce_range: drop one bit of an 8-bit range (x86 activations).
        quant_min, quant_max: custom integer range (both or neither); must contain 0 and fit the dtype.
        factory_kwargs: ``device`` / ``dtype`` for the buffers.
        eps: smallest scale (float32 machine epsilon by default).
        is_dynamic: see :class:`ObserverBase`.
    """

    _version = 3
    eps: torch.Tensor

    def __init__(self, dtype: torch.dtype = torch.uint8, qscheme: torch.qscheme = torch.per_tensor_affine,
                 reduce_range: bool = False, quant_min: int | None = None, quant_max: int | None = None,
                 factory_kwargs: dict[str, Any] | None = None, eps: float = _EPS, is_dynamic: bool = False) -> None:
        super().__init__(dtype=dtype, is_dynamic=is_dynamic)
        name = type(self).__name__
        if self.dtype not in _ALLOWED_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} is not supported; use one of {list(_ALLOWED_DTYPES)}")
        if qscheme not in SUPPORTED_QSCHEMES:
            raise ValueError(f"{name}: qscheme {qscheme} is not supported; use one of {list(SUPPORTED_QSCHEMES)}")
        self.qscheme = qscheme
        self.reduce_range = bool(reduce_range)
        self.has_customized_qrange = quant_min is not None and quant_max is not None
        self.quant_min, self.quant_max = resolve_qrange(dtype, quant_min, quant_max, self.reduce_range)
        if is_symmetric(qscheme):  # fail now, not at convert, if the zero point would fall outside the range
            symmetric_zero_point(self.dtype, self.quant_min, self.quant_max, self.has_customized_qrange)
        self.register_buffer("eps", torch.tensor([eps], **torch.nn.factory_kwargs(factory_kwargs)))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        if local_metadata.get("version", None) in (None, 1) and prefix + "eps" not in state_dict:
            state_dict[prefix + "eps"] = torch.tensor([_EPS])  # eps became a buffer in version 2
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _default_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        warnings.warn(f"{type(self).__name__}: calculate_qparams called before the observer saw any data; "
                      f"returning scale 1.0 and zero point 0 (run calibration data through it first)",
                      stacklevel=3)
        device = self.eps.device
        zp_dtype = torch.float32 if is_float_qparams(self.qscheme) else torch.int64
        return torch.tensor([1.0], device=device), torch.tensor([0], dtype=zp_dtype, device=device)

    def _fresh_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (min, max) a fresh copy of this observer would record from ``x`` alone; None: not known here."""
        return None

    def _qparams_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What a fresh copy of this observer returns from ``calculate_qparams`` after observing only ``x``, without
        building that copy or changing this observer (convert asks it for every weight). None where that needs the
        full path (empty or non-finite data, other devices, observers without :meth:`_fresh_range`): observe a
        fresh copy then."""
        found = self._fresh_range(x) if x.numel() else None
        if found is None:
            return None
        lo, hi = found
        return compute_qparams_fast(lo, hi, self.quant_min, self.quant_max, self.qscheme, self.dtype, self.eps,
                                    self.has_customized_qrange, flat=lo.dim() == 0)

    def _calculate_qparams(self, min_val: torch.Tensor, max_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale / zero point for [min_val, max_val] (per tensor: shape ``(1,)``; per channel: ``(C,)``).

        Per-channel entries that never saw a finite value get scale 1.0 / zero point 0 (with a warning).
        """
        if min_val.numel() > 0:  # the common case (finite ranges on the CPU) without tensor ops
            fast = compute_qparams_fast(min_val, max_val, self.quant_min, self.quant_max, self.qscheme, self.dtype,
                                        self.eps, self.has_customized_qrange, flat=True)
            if fast is not None:
                return fast
        if min_val.numel() == 0 or (min_val.dim() == 0 and bool(min_val == float("inf"))
                                    and bool(max_val == float("-inf"))):
            return self._default_qparams()
        empty = (min_val == float("inf")) & (max_val == float("-inf"))
        has_empty = min_val.dim() > 0 and bool(empty.any())
        if has_empty:
            warnings.warn(f"{type(self).__name__}: channels {empty.nonzero().flatten().tolist()} saw no finite "
                          f"data; they get scale 1.0 and zero point 0", stacklevel=3)
            min_val, max_val = min_val.masked_fill(empty, 0.0), max_val.masked_fill(empty, 0.0)
        scale, zero_point = compute_qparams(min_val, max_val, self.quant_min, self.quant_max, self.qscheme,
                                            self.dtype, self.eps, customized_range=self.has_customized_qrange)
        if has_empty:
            scale, zero_point = scale.masked_fill(empty, 1.0), zero_point.masked_fill(empty, 0)
        return scale.reshape(-1) if scale.dim() == 0 else scale, \
            zero_point.reshape(-1) if zero_point.dim() == 0 else zero_point

    def reset_min_max_vals(self) -> None:
        """Forget the observed range."""
        raise NotImplementedError(f"{type(self).__name__} cannot reset its min/max values")


class MinMaxObserver(UniformQuantizationObserverBase):
    """Per-tensor observer of the running minimum and maximum.

    ``min_val = min(min_val, min(x))``, ``max_val = max(max_val, max(x))``; scale / zero point as in
    :func:`fxquant.qparams.compute_qparams`. Only per-tensor qschemes. Buffers: ``eps``, ``min_val``, ``max_val``.
    """

    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, dtype: torch.dtype = torch.uint8, qscheme: torch.qscheme = torch.per_tensor_affine,
                 reduce_range: bool = False, quant_min: int | None = None, quant_max: int | None = None,
                 factory_kwargs: dict[str, Any] | None = None, eps: float = _EPS, is_dynamic: bool = False) -> None:
        if not is_per_tensor(qscheme):
            raise ValueError(f"{type(self).__name__} supports per_tensor_affine and per_tensor_symmetric, got "
                             f"{qscheme}; use PerChannelMinMaxObserver for per-channel schemes")
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, factory_kwargs, eps, is_dynamic)
        kw = torch.nn.factory_kwargs(factory_kwargs)
        self.register_buffer("min_val", torch.tensor(float("inf"), **kw))
        self.register_buffer("max_val", torch.tensor(float("-inf"), **kw))

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """Update the running min / max with the finite values of ``x_orig``; return it unchanged."""
        if x_orig.numel() == 0:
            return x_orig
        found = self._aminmax(x_orig.detach().to(self.min_val.dtype))
        if found is not None:
            self._update(*found)
        return x_orig

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.min_val.copy_(torch.min(lo, self.min_val))
        self.max_val.copy_(torch.max(hi, self.max_val))

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point (shape ``(1,)``) of the observed range."""
        return self._calculate_qparams(self.min_val, self.max_val)

    def _fresh_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.aminmax(x.detach().to(self.min_val.dtype))

    def extra_repr(self) -> str:
        return f"min_val={self.min_val}, max_val={self.max_val}"

    def reset_min_max_vals(self) -> None:
        """Forget the observed range."""
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Per-tensor observer of the moving average of min / max: ``m += averaging_constant * (min(x) - m)``.

    The first batch sets the range directly. Only per-tensor qschemes; ``is_dynamic`` needs averaging_constant 1.
    """

    def __init__(self, averaging_constant: float = 0.01, dtype: torch.dtype = torch.uint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, reduce_range: bool = False,
                 quant_min: int | None = None, quant_max: int | None = None, eps: float = _EPS,
                 is_dynamic: bool = False, factory_kwargs: dict[str, Any] | None = None) -> None:
        if is_dynamic and averaging_constant != 1:
            raise ValueError(f"MovingAverageMinMaxObserver: dynamic quantization needs averaging_constant=1, "
                             f"got {averaging_constant}")
        self.averaging_constant = averaging_constant
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, factory_kwargs, eps, is_dynamic)

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if bool(self.min_val == float("inf")) and bool(self.max_val == float("-inf")):
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            return
        c = self.averaging_constant
        new_min, new_max = self.min_val + c * (lo - self.min_val), self.max_val + c * (hi - self.max_val)
        # averages of lo <= hi stay ordered up to float rounding (one ulp over on constant data, where torch.ao's
        # calculate_qparams then fails an assertion): keep min <= max
        self.min_val.copy_(torch.minimum(new_min, new_max))
        self.max_val.copy_(new_max)
