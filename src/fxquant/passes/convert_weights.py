"""Weight qparams at convert time: one torch.ao-style dict per quantized weight.

torch.ao builds a fresh weight observer (``qconfig.weight()``) for every weighted module, lets it observe the
weight and asks for its qparams. Building the observer module costs more than the observation, so for the built-in
min / max observers :class:`WeightQParams` builds one observer per ``qconfig.weight`` constructor and asks it for
the qparams of each weight without changing it (``_qparams_of``: the result a fresh copy would give). Other
observers, constructors with arguments evaluated per construction, and weights the shortcut declines (non-finite
values, other devices) take torch.ao's path.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .._dtypes import is_float_qdtype, normalize_dtype
from .._observer_base import MinMaxObserver, MovingAverageMinMaxObserver
from .._per_channel_observer import MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver

__all__ = ["weight_qparams_of", "WeightQParams"]

_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)
# observers whose one observation of a weight is the same min / max (the moving averages start from the first one)
_REUSABLE = (MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver,
             MovingAveragePerChannelMinMaxObserver)


def weight_qparams_of(obs: nn.Module, qparams: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict[str, Any]:
    """torch.ao-style weight qparams dict from an observer / fake quant that has seen the weight (or from ``obs``'s
    settings and ``qparams`` when given)."""
    dtype = normalize_dtype(obs.dtype)
    qscheme = getattr(obs, "qscheme", torch.per_tensor_affine)
    if is_float_qdtype(dtype) and type(obs).__name__ == "PlaceholderObserver":  # fp16 weights: a cast, no qparams
        return {"qscheme": None, "dtype": dtype}
    scale, zero_point = obs.calculate_qparams() if qparams is None else qparams
    out = {"qscheme": qscheme, "dtype": dtype, "scale": scale, "zero_point": zero_point}
    if qscheme in _PER_CHANNEL:
        out["axis"] = obs.ch_axis
    out["quant_min"], out["quant_max"] = getattr(obs, "quant_min", None), getattr(obs, "quant_max", None)
    return out


class WeightQParams:
    """Weight qparams for the weights of one convert call: ``wq(qconfig.weight, weight) -> dict``."""

    def __init__(self) -> None:
        # id(constructor) -> (constructor, kept alive so the id stays its own; reusable observer or None)
        self._observers: dict[int, tuple[Callable[[], nn.Module], Optional[nn.Module]]] = {}

    def _reusable(self, make: Callable[[], nn.Module]) -> Optional[nn.Module]:
        found = self._observers.get(id(make))
        if found is None:
            obs = None
            if not getattr(make, "callable_args", None):  # arguments evaluated per construction: build each time
                obs = make()
                obs = obs if type(obs) in _REUSABLE else None
            found = self._observers[id(make)] = (make, obs)
        return found[1]

    def __call__(self, make: Callable[[], nn.Module], weight: torch.Tensor) -> dict[str, Any]:
        obs = self._reusable(make)
        if obs is not None:
            qparams = obs._qparams_of(weight)  # type: ignore[operator]
            if qparams is not None:
                return weight_qparams_of(obs, qparams)
        obs = make()
        obs(weight.detach())
        return weight_qparams_of(obs)
