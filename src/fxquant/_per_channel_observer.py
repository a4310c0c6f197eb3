"""Per-channel min / max observers (re-exported by :mod:`fxquant.observer`)."""
from __future__ import annotations

from typing import Any

import torch

from fxquant._observer_base import _EPS, UniformQuantizationObserverBase
from fxquant.qparams import is_per_channel

__all__ = ["PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver"]


class PerChannelMinMaxObserver(UniformQuantizationObserverBase):
    """Running min / max per slice along ``ch_axis``; one scale / zero point per channel.

    Args:
        ch_axis: the channel dimension (0 for conv / linear weights).
        dtype, qscheme, reduce_range, quant_min, quant_max, factory_kwargs, eps: see
            :class:`~fxquant.observer.UniformQuantizationObserverBase`; ``qscheme`` must be per channel
            (default ``per_channel_affine``).
        is_dynamic: not supported (ValueError).

    Buffers ``min_val`` / ``max_val`` start empty and take shape ``(C,)`` on the first batch; later batches must
    have the same number of channels. Channels in which every value is NaN / inf keep (+inf, -inf) and get
    scale 1.0 / zero point 0.
    """

    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, ch_axis: int = 0, dtype: torch.dtype = torch.uint8,
                 qscheme: torch.qscheme = torch.per_channel_affine, reduce_range: bool = False,
                 quant_min: int | None = None, quant_max: int | None = None,
                 factory_kwargs: dict[str, Any] | None = None, eps: float = _EPS, is_dynamic: bool = False) -> None:
        name = type(self).__name__
        if not is_per_channel(qscheme):
            raise ValueError(f"{name} needs a per-channel qscheme (per_channel_affine, per_channel_symmetric or "
                             f"per_channel_affine_float_qparams), got {qscheme}; use MinMaxObserver per tensor")
        if is_dynamic:
            raise ValueError(f"{name} does not support dynamic quantization (is_dynamic=True)")
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, factory_kwargs, eps, is_dynamic)
        self.ch_axis = ch_axis
        kw = torch.nn.factory_kwargs(factory_kwargs)
        self.register_buffer("min_val", torch.tensor([], **kw))
        self.register_buffer("max_val", torch.tensor([], **kw))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a (channels, everything else) float matrix."""
        if x.dim() == 0 or not -x.dim() <= self.ch_axis < x.dim():
            raise ValueError(f"{type(self).__name__}: ch_axis={self.ch_axis} is out of range for an input of "
                             f"shape {tuple(x.shape)}")
        rows = torch.movedim(x, self.ch_axis, 0).to(self.min_val.dtype)
        return rows.reshape(rows.shape[0], -1)  # (a 1-d input, e.g. a norm's weight: one value per channel)

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        """Update the per-channel running range with the finite values of ``x_orig``; return it unchanged."""
        if x_orig.numel() == 0:
            return x_orig
        lo, hi = self._aminmax_rows(self._rows(x_orig.detach()))
        if self.min_val.numel() == 0:
            new_lo, new_hi = lo, hi
        elif self.min_val.shape != lo.shape:
            raise ValueError(f"{type(self).__name__}: input has {lo.numel()} channels along ch_axis="
                             f"{self.ch_axis} but earlier inputs had {self.min_val.numel()}")
        else:
            new_lo, new_hi = self._merge(lo, hi)
        self.min_val.resize_(new_lo.shape).copy_(new_lo)
        self.max_val.resize_(new_hi.shape).copy_(new_hi)
        return x_orig

    def _merge(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.min(lo, self.min_val), torch.max(hi, self.max_val)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel scales and zero points, shape ``(C,)``."""
        return self._calculate_qparams(self.min_val, self.max_val)

    def _fresh_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.aminmax(self._rows(x.detach()), dim=1)

    def extra_repr(self) -> str:
        return f"min_val={self.min_val}, max_val={self.max_val}"

    def reset_min_max_vals(self) -> None:
        """Forget the observed ranges (the buffers become empty again)."""
        self.min_val = torch.empty(0, device=self.min_val.device)
        self.max_val = torch.empty(0, device=self.max_val.device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        version = local_metadata.get("version")
        for name in ("min_val", "max_val"):
            key, legacy = prefix + name, prefix + name + "s"  # min_vals / max_vals before version 3
            if version is not None and version < 3 and legacy in state_dict and key not in state_dict:
                state_dict[key] = state_dict.pop(legacy)
            if key in state_dict:
                getattr(self, name).resize_(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class MovingAveragePerChannelMinMaxObserver(PerChannelMinMaxObserver):
    """Per-channel moving average of min / max (``m += averaging_constant * (min(x) - m)``, first batch direct).

    Args: ``averaging_constant`` (default 0.01) followed by those of :class:`PerChannelMinMaxObserver`.
    """

    def __init__(self, averaging_constant: float = 0.01, ch_axis: int = 0, dtype: torch.dtype = torch.uint8,
                 qscheme: torch.qscheme = torch.per_channel_affine, reduce_range: bool = False,
                 quant_min: int | None = None, quant_max: int | None = None, eps: float = _EPS,
                 is_dynamic: bool = False, factory_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(ch_axis, dtype, qscheme, reduce_range, quant_min, quant_max, factory_kwargs, eps,
                         is_dynamic)
        self.averaging_constant = averaging_constant

    def _merge(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.averaging_constant
        new_min, new_max = _average(self.min_val, lo, c), _average(self.max_val, hi, c)
        return torch.minimum(new_min, new_max), new_max  # (ordered up to rounding: see the per-tensor observer)


def _average(old: torch.Tensor, new: torch.Tensor, c: float) -> torch.Tensor:
    """``old + c * (new - old)``; where either side never saw data (+-inf) the other one is kept."""
    mixed = old + c * (new - old)
    return torch.where(~torch.isfinite(old), new, torch.where(~torch.isfinite(new), old, mixed))
