"""BackendPatternConfig: how one op pattern is observed, fused, swapped for QAT and for reference modules."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .dtype_config import DTypeConfig, ObservationType
from .pattern import (Pattern, pattern_to_str, picklable_pattern, restore_pattern, to_complex_format,
                      validate_complex_pattern, validate_pattern)

__all__ = ["BackendPatternConfig"]


def _check_module_class(value: Any, what: str) -> type[torch.nn.Module] | None:
    if value is not None and not (isinstance(value, type) and issubclass(value, torch.nn.Module)):
        raise TypeError(f"{what} must be a torch.nn.Module subclass (the class, not an instance) or None, "
                        f"got {value!r}")
    return value


def _check_callable(value: Any, what: str) -> Callable | None:
    if value is not None and not callable(value):
        raise TypeError(f"{what} must be callable or None, got {value!r}")
    return value


def _coerce_dtype_config(value: Any, index: int) -> DTypeConfig:
    if isinstance(value, DTypeConfig):
        return value
    if isinstance(value, Mapping):
        return DTypeConfig.from_dict(value)
    if all(hasattr(value, f"{k}_dtype_with_constraints") for k in ("input", "output", "weight")):
        return DTypeConfig(value.input_dtype_with_constraints, value.output_dtype_with_constraints,  # torch.ao's
                           value.weight_dtype_with_constraints, value.bias_dtype, value.is_dynamic)
    raise TypeError(f"dtype_configs[{index}] must be a DTypeConfig or a dict (see DTypeConfig.from_dict), "
                    f"got {value!r}")


class BackendPatternConfig:
    """Quantization behaviour of one op pattern on a backend (chainable setters, as in torch.ao).

    Example::

        BackendPatternConfig((nn.Conv2d, nn.ReLU)) \\
            .add_dtype_config(DTypeConfig(torch.uint8, torch.uint8, torch.int8, torch.float)) \\
            .set_fused_module(fxquant.nn.intrinsic.ConvReLU2d) \\
            .set_fuser_method(fuse_conv_relu)          # fuse_conv_relu(is_qat, conv, relu) -> module

    The pattern is given in forward order (see :mod:`fxquant.backend_config.pattern`); the legacy reversed
    nested format goes through :meth:`_set_pattern_complex_format`.
    """

    def __init__(self, pattern: Pattern | None = None) -> None:
        self.pattern: Pattern | None = None
        self.observation_type = ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT
        self.dtype_configs: list[DTypeConfig] = []
        self.root_module: type[torch.nn.Module] | None = None
        self.qat_module: type[torch.nn.Module] | None = None
        self.reference_quantized_module: type[torch.nn.Module] | None = None
        self.fused_module: type[torch.nn.Module] | None = None
        self.fuser_method: Callable | None = None
        self._root_node_getter: Callable | None = None
        self._extra_inputs_getter: Callable | None = None
        self._num_tensor_args_to_observation_type: dict[int, ObservationType] = {}
        self._input_type_to_index: dict[str, int] = {}
        self._input_output_observed: bool | None = None
        self._overwrite_output_fake_quantize: Callable | None = None
        self._overwrite_output_observer: Callable | None = None
        self._pattern_complex_format: Pattern | None = None
        if pattern is not None:
            self.set_pattern(pattern)

    def __repr__(self) -> str:
        shown = {k: v for k, v in vars(self).items() if v not in (None, [], {})}
        return f"BackendPatternConfig({shown})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(vars(self))
        for key in ("pattern", "_pattern_complex_format"):
            state[key] = picklable_pattern(state[key])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key in ("pattern", "_pattern_complex_format"):
            state[key] = restore_pattern(state[key])
        vars(self).update(state)

    # -- the pattern ------------------------------------------------------------------------------------
    def set_pattern(self, pattern: Pattern) -> BackendPatternConfig:
        """Set the pattern: an op or a 2-/3-tuple of ops in forward order, e.g. ``(nn.Linear, nn.ReLU)``."""
        if self._pattern_complex_format is not None:
            raise ValueError(f"this config already has complex-format pattern "
                             f"{pattern_to_str(self._pattern_complex_format)}; set only one of the two")
        self.pattern = validate_pattern(pattern)
        return self

    def _set_pattern_complex_format(self, pattern: Pattern) -> BackendPatternConfig:
        """Set the pattern in torch.ao's reversed nested tuple format, e.g.
        ``(torch.add, nn.Conv2d, MatchAllNode)`` for ``add(conv(x), y)``."""
        if self.pattern is not None:
            raise ValueError(f"this config already has pattern {pattern_to_str(self.pattern)}; "
                             f"set only one of pattern / pattern_complex_format")
        self._pattern_complex_format = validate_complex_pattern(pattern)
        return self

    @property
    def complex_format_pattern(self) -> Pattern:
        """The pattern in the reversed nested format (the key a BackendConfig stores it under)."""
        if self._pattern_complex_format is not None:
            return self._pattern_complex_format
        if self.pattern is None:
            raise ValueError("BackendPatternConfig has no pattern: call set_pattern(...) or "
                             "_set_pattern_complex_format(...) first")
        return to_complex_format(self.pattern)

    # -- observation and dtypes ---------------------------------------------------------------------------
    def set_observation_type(self, observation_type: ObservationType) -> BackendPatternConfig:
        """How observers are placed: see :class:`ObservationType` (default: different input/output observers)."""
        self.observation_type = ObservationType.coerce(observation_type)
        return self

    def add_dtype_config(self, dtype_config: DTypeConfig) -> BackendPatternConfig:
        """Add one supported :class:`DTypeConfig`."""
        self.dtype_configs.append(_coerce_dtype_config(dtype_config, len(self.dtype_configs)))
        return self

    def set_dtype_configs(self, dtype_configs: Iterable[DTypeConfig]) -> BackendPatternConfig:
        """Replace the supported :class:`DTypeConfig` list (tried in order; the first match wins)."""
        if isinstance(dtype_configs, (DTypeConfig, Mapping)):
            raise TypeError("set_dtype_configs expects a list of DTypeConfig; use add_dtype_config for one")
        self.dtype_configs = [_coerce_dtype_config(c, i) for i, c in enumerate(dtype_configs)]
        return self

    # -- module swaps -------------------------------------------------------------------------------------
    def set_root_module(self, root_module: type[torch.nn.Module] | None) -> BackendPatternConfig:
        """The float module at the root of the pattern (e.g. ``nn.Linear`` for ``LinearReLU``); swapped for
        :meth:`set_reference_quantized_module` at convert."""
        self.root_module = _check_module_class(root_module, "root_module")
        return self

    def set_qat_module(self, qat_module: type[torch.nn.Module] | None) -> BackendPatternConfig:
        """The QAT module class that replaces the pattern's module in prepare_qat_fx."""
        self.qat_module = _check_module_class(qat_module, "qat_module")
        return self

    def set_reference_quantized_module(self, reference_quantized_module: type[torch.nn.Module] | None
                                       ) -> BackendPatternConfig:
        """The reference quantized module class for this pattern's root module."""
        self.reference_quantized_module = _check_module_class(reference_quantized_module,
                                                              "reference_quantized_module")
        return self

    def set_fused_module(self, fused_module: type[torch.nn.Module] | None) -> BackendPatternConfig:
        """The fused module class the fuser method produces."""
        self.fused_module = _check_module_class(fused_module, "fused_module")
        return self

    def set_fuser_method(self, fuser_method: Callable | None) -> BackendPatternConfig:
        """``fuser_method(is_qat, *modules)`` returns the fused module; modules come in the pattern's order
        (forward order for a simple pattern, the complex format's nesting otherwise)."""
        self.fuser_method = _check_callable(fuser_method, "fuser_method")
        return self

    # -- internal / legacy settings -----------------------------------------------------------------------
    def _set_root_node_getter(self, root_node_getter: Callable | None) -> BackendPatternConfig:
        self._root_node_getter = _check_callable(root_node_getter, "root_node_getter")
        return self

    def _set_extra_inputs_getter(self, extra_inputs_getter: Callable | None) -> BackendPatternConfig:
        self._extra_inputs_getter = _check_callable(extra_inputs_getter, "extra_inputs_getter")
        return self

    def _set_num_tensor_args_to_observation_type(self, mapping: Mapping[int, ObservationType] | None
                                                 ) -> BackendPatternConfig:
        mapping = mapping or {}
        for key in mapping:
            if not isinstance(key, int) or isinstance(key, bool) or key < 0:
                raise TypeError(f"num_tensor_args_to_observation_type keys must be ints >= 0, got {key!r}")
        self._num_tensor_args_to_observation_type = {k: ObservationType.coerce(v) for k, v in mapping.items()}
        return self

    def _set_input_type_to_index(self, input_type_to_index: Mapping[str, int] | None) -> BackendPatternConfig:
        mapping = dict(input_type_to_index or {})
        for key, index in mapping.items():
            if not isinstance(key, str) or not isinstance(index, int) or isinstance(index, bool):
                raise TypeError(f"input_type_to_index maps an input name ('weight', 'bias') to an argument "
                                f"index, got {key!r}: {index!r}")
        self._input_type_to_index = mapping
        return self

    def _set_input_output_observed(self, input_output_observed: bool | None) -> BackendPatternConfig:
        if input_output_observed is not None and not isinstance(input_output_observed, bool):
            raise TypeError(f"input_output_observed must be a bool or None, got {input_output_observed!r}")
        self._input_output_observed = input_output_observed
        return self

    def _set_overwrite_output_fake_quantize(self, fake_quantize: Callable | None) -> BackendPatternConfig:
        self._overwrite_output_fake_quantize = _check_callable(fake_quantize, "overwrite_output_fake_quantize")
        return self

    def _set_overwrite_output_observer(self, observer: Callable | None) -> BackendPatternConfig:
        self._overwrite_output_observer = _check_callable(observer, "overwrite_output_observer")
        return self

    # -- dict form ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, backend_pattern_config_dict: Mapping[str, Any]) -> BackendPatternConfig:
        """Build from the dict form (keys as in torch.ao: ``pattern``, ``observation_type``,
        ``dtype_configs``, ``root_module``, ``qat_module``, ``reference_quantized_module_for_root``,
        ``fused_module``, ``fuser_method``, ``pattern_complex_format``, ...). Unknown keys are an error."""
        if not isinstance(backend_pattern_config_dict, Mapping):
            raise TypeError(f"BackendPatternConfig.from_dict expects a dict, got {backend_pattern_config_dict!r}")
        unknown = set(backend_pattern_config_dict) - set(_DICT_FIELDS) - set(_DICT_ALIASES)
        if unknown:
            raise ValueError(f"unknown BackendPatternConfig keys {sorted(unknown)}; valid keys: "
                             f"{list(_DICT_FIELDS)}")
        conf = cls()
        for key, value in backend_pattern_config_dict.items():
            _attr, setter = _DICT_FIELDS[_DICT_ALIASES.get(key, key)]
            getattr(conf, setter)(value)
        return conf

    def to_dict(self) -> dict[str, Any]:
        """The dict form read by :meth:`from_dict`; unset entries are left out."""
        out: dict[str, Any] = {"observation_type": self.observation_type,
                               "dtype_configs": [c.to_dict() for c in self.dtype_configs]}
        for key, (attr, _setter) in _DICT_FIELDS.items():
            value = getattr(self, attr)
            if key not in out and value is not None and value != {}:
                out[key] = value
        return out


# dict key -> (attribute, setter); order = to_dict order
_DICT_FIELDS: dict[str, tuple[str, str]] = {
    "pattern": ("pattern", "set_pattern"),
    "observation_type": ("observation_type", "set_observation_type"),
    "dtype_configs": ("dtype_configs", "set_dtype_configs"),
    "root_module": ("root_module", "set_root_module"),
    "qat_module": ("qat_module", "set_qat_module"),
    "reference_quantized_module_for_root": ("reference_quantized_module", "set_reference_quantized_module"),
    "fused_module": ("fused_module", "set_fused_module"),
    "fuser_method": ("fuser_method", "set_fuser_method"),
    "root_node_getter": ("_root_node_getter", "_set_root_node_getter"),
    "extra_inputs_getter": ("_extra_inputs_getter", "_set_extra_inputs_getter"),
    "num_tensor_args_to_observation_type": ("_num_tensor_args_to_observation_type",
                                            "_set_num_tensor_args_to_observation_type"),
    "input_type_to_index": ("_input_type_to_index", "_set_input_type_to_index"),
    "input_output_observed": ("_input_output_observed", "_set_input_output_observed"),
    "overwrite_output_fake_quantize": ("_overwrite_output_fake_quantize", "_set_overwrite_output_fake_quantize"),
    "overwrite_output_observer": ("_overwrite_output_observer", "_set_overwrite_output_observer"),
    "pattern_complex_format": ("_pattern_complex_format", "_set_pattern_complex_format"),
}
# torch.ao's docstring spells this key without "_for_root"; accept both
_DICT_ALIASES = {"reference_quantized_module": "reference_quantized_module_for_root"}
