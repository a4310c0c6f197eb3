"""Lowered LSTM / GRU with int8 weights and a float recurrence (weight-only recipes, and dynamic ones that
:class:`fxquant.nn.quantized.DynamicLSTM` does not take: ``proj_size``, per-token or non-uint8 activations).

These compute what the reference module computes — the recurrence in float on dequantized weights — with the
dequantized weights cached (rebuilt after ``load_state_dict`` / copy / pickling), so they equal the reference bit for
bit and run at float speed while the state dict keeps the int8 weights. (A per-tensor uint8 dynamic recipe lowers
to :mod:`fxquant.nn.quantized.rnn_dynamic` instead: torch.ao's converted numerics, int8 products.)::

    lowered = LSTM.from_reference(ref_lstm)     # ref_lstm: fxquant.nn.quantized.reference.LSTM
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fxquant.nn.quantized import reference as ref

__all__ = ["LSTM", "GRU"]


class WeightCache:
    """Caches ``get_flat_weights()`` (the dequantized weights) of a reference RNN in eager mode; a loaded state
    dict, a copy or a pickle starts without it (also the cache of the modules' other kernel data)."""

    _kernel_cache: dict[Any, Any]

    def get_flat_weights(self) -> list[torch.Tensor | None]:
        if torch.compiler.is_compiling():
            return super().get_flat_weights()  # type: ignore[misc,no-any-return]
        cache = self.__dict__.setdefault("_kernel_cache", {})
        if "flat" not in cache:
            cache["flat"] = [None if w is None else w.detach() for w in super().get_flat_weights()]  # type: ignore
        return cache["flat"]  # type: ignore[no-any-return]

    def _cached(self, key: Any, build: Callable[[], Any]) -> Any:
        """``build()`` once per key until the cache is dropped (load / copy / pickle)."""
        cache = self.__dict__.setdefault("_kernel_cache", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def _load_from_state_dict(self, *args: Any) -> None:
        self.__dict__["_kernel_cache"] = {}
        super()._load_from_state_dict(*args)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_kernel_cache"] = {}
        return state


class _CachedWeightsMixin(WeightCache):
    """The float-recurrence lowered modules: a reference RNN's state with the weight cache."""

    @classmethod
    def from_reference(cls, module: Any) -> Any:
        """A lowered module sharing ``module``'s buffers and parameters (the reference module is consumed)."""
        expected = next(c for c in cls.__mro__ if c in (ref.LSTM, ref.GRU))
        if not isinstance(module, expected):
            raise TypeError(f"{cls.__name__}.from_reference expects {expected.__name__}, got {type(module).__name__}")
        lowered = cls.__new__(cls)
        lowered.__dict__.update(module.__dict__)
        lowered.__dict__["_kernel_cache"] = {}
        return lowered

    def _get_name(self) -> str:
        return f"Quantized{type(self).__name__}(WeightOnly)"


class LSTM(_CachedWeightsMixin, ref.LSTM):
    """LSTM with int8 weights and a cached float copy for the recurrence."""


class GRU(_CachedWeightsMixin, ref.GRU):
    """GRU with int8 weights and a cached float copy for the recurrence."""
