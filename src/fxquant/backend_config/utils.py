"""Lookups over a BackendConfig that graph passes need (torch.ao's ``backend_config.utils``), keyed by
complex-format pattern, plus the fuser method adapted to the complex format."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .backend_config import BackendConfig
from .dtype_config import DTypeConfig
from .pattern import Pattern
from .pattern_config import BackendPatternConfig

__all__ = ["get_pattern_to_dtype_configs", "get_qat_module_classes", "get_fused_module_classes",
           "get_pattern_to_input_type_to_index", "get_root_module_to_quantized_reference_module",
           "get_fuser_method_mapping", "get_module_to_qat_module", "get_fusion_pattern_to_root_node_getter",
           "get_fusion_pattern_to_extra_inputs_getter", "complex_format_fuser_method"]


def _by_pattern(backend_config: BackendConfig, attr: str) -> dict[Pattern, Any]:
    items = backend_config.complex_format_to_config.items()
    return {p: getattr(c, attr) for p, c in items if getattr(c, attr) not in (None, {})}


def get_pattern_to_dtype_configs(backend_config: BackendConfig) -> dict[Pattern, list[DTypeConfig]]:
    """Complex-format pattern -> its DTypeConfigs (every pattern)."""
    return {p: c.dtype_configs for p, c in backend_config.complex_format_to_config.items()}


def get_pattern_to_input_type_to_index(backend_config: BackendConfig) -> dict[Pattern, dict[str, int]]:
    """Complex-format pattern -> ``{"weight": i, "bias": j}`` (every pattern; empty when unset)."""
    return {p: c._input_type_to_index for p, c in backend_config.complex_format_to_config.items()}


def get_qat_module_classes(backend_config: BackendConfig) -> tuple[type, ...]:
    """The distinct QAT module classes the config names."""
    return tuple(dict.fromkeys(c.qat_module for c in backend_config.configs if c.qat_module is not None))


def get_fused_module_classes(backend_config: BackendConfig) -> tuple[type, ...]:
    """The distinct fused module classes the config names."""
    return tuple(dict.fromkeys(c.fused_module for c in backend_config.configs if c.fused_module is not None))


def get_root_module_to_quantized_reference_module(backend_config: BackendConfig
                                                  ) -> dict[type[torch.nn.Module], type[torch.nn.Module]]:
    """Float root module class -> reference quantized module class (configs that set both)."""
    return {c.root_module: c.reference_quantized_module for c in backend_config.configs
            if c.root_module is not None and c.reference_quantized_module is not None}


def get_module_to_qat_module(backend_config: BackendConfig) -> dict[Pattern, type[torch.nn.Module]]:
    """Complex-format pattern -> QAT module class."""
    return _by_pattern(backend_config, "qat_module")


def get_fusion_pattern_to_root_node_getter(backend_config: BackendConfig) -> dict[Pattern, Callable]:
    """Complex-format pattern -> root node getter (only patterns that set one)."""
    return _by_pattern(backend_config, "_root_node_getter")


def get_fusion_pattern_to_extra_inputs_getter(backend_config: BackendConfig) -> dict[Pattern, Callable]:
    """Complex-format pattern -> extra inputs getter (only patterns that set one)."""
    return _by_pattern(backend_config, "_extra_inputs_getter")


def complex_format_fuser_method(config: BackendPatternConfig) -> Callable:
    """``config.fuser_method`` taking its modules nested like the complex-format pattern:
    ``f(is_qat, relu, (bn, conv))`` for the simple pattern ``(conv, bn, relu)``."""
    fuser = config.fuser_method
    if fuser is None:
        raise ValueError(f"{config!r} has no fuser method")
    if config._pattern_complex_format is not None or not isinstance(config.pattern, tuple):
        return fuser
    if len(config.pattern) == 2:
        return lambda is_qat, second, first: fuser(is_qat, first, second)
    return lambda is_qat, third, rest: fuser(is_qat, rest[1], rest[0], third)


def get_fuser_method_mapping(backend_config: BackendConfig) -> dict[Pattern, Callable]:
    """Complex-format pattern -> fuser method taking complex-format arguments (see
    :func:`complex_format_fuser_method`)."""
    return {p: complex_format_fuser_method(c) for p, c in backend_config.complex_format_to_config.items()
            if c.fuser_method is not None}
