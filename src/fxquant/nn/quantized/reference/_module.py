"""The mixin every reference module uses to hold its quantized weights (see ``_weight.py`` for the numerics)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, TypeVar

import torch

from fxquant.nn.quantized.reference._weight import (
    WeightSpec,
    dequantize_weight,
    parse_weight_qparams,
    quantize_weight,
)

__all__ = ["ReferenceWeightMixin"]

_SUFFIXES = ("_int", "_scale", "_zero_point")
_M = TypeVar("_M", bound="ReferenceWeightMixin")
# (reference class, float class) -> the attributes the float class's __init__ sets (in_features, kernel_size, ...)
_CTOR_ATTRS: dict[tuple[type, type], tuple[str, ...]] = {}
_MODULE_ATTRS = frozenset(torch.nn.Module().__dict__)


class ReferenceWeightMixin:
    """Stores weights as ``<name>_int / <name>_scale / <name>_zero_point`` buffers plus a :class:`WeightSpec`.

    Put it first in the bases (``class Linear(ReferenceWeightMixin, nn.Linear)``) so its state-dict hooks and the
    ``weight`` property win over the float module's. The float module's ``weight`` parameter is removed; reading
    ``module.weight`` returns the dequantized weight (like ``get_weight()``), so code written for float modules
    that only reads the weight keeps working.
    """

    _weight_specs: dict[str, WeightSpec]

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def _new_like(cls: type[_M], float_module: torch.nn.Module, build: Callable[[], _M]) -> _M:
        """A reference module with ``float_module``'s geometry and no weight yet (``from_float`` attaches it).

        ``build()`` constructs one through the float class's ``__init__`` (on the meta device); that costs ~10x
        more than the quantization itself, so it runs once per class: later modules of the exact same float class
        get a bare ``nn.Module`` with the attributes that ``__init__`` set copied from ``float_module`` (lists and
        dicts copied) and no parameters, which is what ``build()`` leaves once the weight is attached.
        """
        key = (cls, type(float_module))
        names = _CTOR_ATTRS.get(key)
        if names is None or not all(name in float_module.__dict__ for name in names):
            ref = build()
            _CTOR_ATTRS[key] = tuple(n for n in ref.__dict__ if n in float_module.__dict__ and n not in _MODULE_ATTRS)
            return ref
        ref = cls.__new__(cls)
        torch.nn.Module.__init__(ref)  # type: ignore[arg-type]
        for name in names:
            value = float_module.__dict__[name]
            ref.__dict__[name] = type(value)(value) if isinstance(value, (list, dict)) else value
        return ref

    def _attach_weight(self, name: str, float_weight: torch.Tensor, qparams: Mapping[str, Any] | None,
                       keep_original: bool = False) -> None:
        """Quantize ``float_weight`` with ``qparams`` (torch.ao's dict) and store it as buffers ``<name>_*``."""
        module: torch.nn.Module = self  # type: ignore[assignment]
        spec, scale, zero_point = parse_weight_qparams(qparams, float_weight, f"{self._get_name()}.{name}")
        if "_weight_specs" not in module.__dict__:
            module._weight_specs = {}
        module._parameters.pop(name, None)
        q = quantize_weight(float_weight, spec, scale, zero_point)
        for suffix, value in zip(_SUFFIXES, (q, scale, zero_point)):
            module.register_buffer(name + suffix, value)
        module._weight_specs[name] = spec
        if keep_original:
            module.register_buffer("original_" + name, float_weight.detach().clone())

    def _dequantized(self, name: str) -> torch.Tensor:
        buffers = [getattr(self, name + suffix) for suffix in _SUFFIXES]
        return dequantize_weight(buffers[0], self._weight_specs[name], buffers[1], buffers[2])

    def reset_parameters(self) -> None:
        """No random init: a reference module's weights always come from a float module (``from_float``) or a
        state dict, and ``from_float`` builds the module on the meta device where init is pure overhead."""

    # ----------------------------------------------------------------------------------------- torch.ao API
    def get_weight(self) -> torch.Tensor:
        """The dequantized float weight the forward uses (torch.ao's quantize -> dequantize of the weight)."""
        return self._dequantized("weight")

    def get_quantized_weight(self) -> torch.Tensor:
        """The stored quantized weight values (a plain-dtype tensor, not a torch quantized tensor)."""
        return self.weight_int  # type: ignore[attr-defined,no-any-return]

    @property
    def weight(self) -> torch.Tensor:
        params = self.__dict__.get("_parameters", {})
        if "weight" in params:  # only while the float base class is being constructed
            return params["weight"]
        return self.get_weight()

    @property
    def weight_qscheme(self) -> torch.qscheme | None:
        return self._weight_specs["weight"].qscheme

    @property
    def weight_dtype(self) -> torch.dtype:
        return self._weight_specs["weight"].dtype

    @property
    def weight_axis(self) -> int:
        return self._weight_specs["weight"].axis

    @property
    def weight_quant_min(self) -> int | None:
        return self._weight_specs["weight"].quant_min

    @property
    def weight_quant_max(self) -> int | None:
        return self._weight_specs["weight"].quant_max

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        specs = ", ".join(f"{n}: {s.qscheme_name} {str(s.dtype).removeprefix('torch.')}"
                          for n, s in self._weight_specs.items())
        return f"{base}, {specs}" if base else specs

    # ----------------------------------------------------------------------------------------- state dict
    def get_extra_state(self) -> dict[str, Any]:
        return {"weight_specs": {name: spec.to_state() for name, spec in self._weight_specs.items()}}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, Mapping) or "weight_specs" not in state:
            raise ValueError(f"{self._get_name()}: unexpected _extra_state {state!r} in the state dict; "
                             f"expected one saved by an fxquant reference module")
        self._weight_specs = {name: WeightSpec.from_state(s) for name, s in state["weight_specs"].items()}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # quantized buffers may change shape / dtype (per tensor <-> per channel, int8 <-> uint8): adopt the saved ones
        module: torch.nn.Module = self  # type: ignore[assignment]
        for name in self._weight_specs:
            for suffix in _SUFFIXES:
                saved = state_dict.get(prefix + name + suffix)
                current = module._buffers.get(name + suffix)
                if isinstance(saved, torch.Tensor) and current is not None and (
                        saved.shape != current.shape or saved.dtype != current.dtype):
                    module._buffers[name + suffix] = torch.empty_like(saved, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]

    def _get_name(self) -> str:
        return f"Quantized{type(self).__name__}(Reference)"
