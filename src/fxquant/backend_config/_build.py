"""Turn the row tables of :mod:`._sections` into BackendPatternConfigs."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ._refs import ComplexFormatFuser, NestedItemGetter, Ref, SequentialFuser, resolve
from ._sections import SECTIONS, Namespace, Row
from .backend_config import BackendConfig
from .dtype_config import DTypeConfig, DTypeWithConstraints, ObservationType
from .pattern_config import BackendPatternConfig

__all__ = ["build_backend_config", "with_fixed_qparams"]

_OBSERVATION = {"diff": ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT,
                "share": ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT,
                "none": ObservationType.INPUT_OUTPUT_NOT_OBSERVED}
_BINARY_NUM_TENSOR_ARGS = {0: ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT,
                           1: ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT,
                           2: ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT}
_MODULE_FIELDS = {"root": "set_root_module", "qat": "set_qat_module", "ref": "set_reference_quantized_module"}
_MISSING = object()


def _fill(value: Any, ns: Namespace) -> Any:
    """Replace ``"$name"`` placeholders (also inside tuples) and resolve references; ``_MISSING`` if any
    referenced object does not exist."""
    if isinstance(value, tuple):
        items = tuple(_fill(v, ns) for v in value)
        return _MISSING if _MISSING in items else items
    if isinstance(value, str) and value.startswith("$"):
        value = ns[value[1:]]
    if isinstance(value, Ref):
        value = resolve(value)
        return _MISSING if value is None else value
    return value


def with_fixed_qparams(dtype_configs: Sequence[DTypeConfig], constraints: DTypeWithConstraints
                       ) -> list[DTypeConfig]:
    """Copies of ``dtype_configs`` whose input / output activations of ``constraints.dtype`` get its quant
    range and exact scale / zero point (other dtypes are left alone)."""
    out = []
    for dc in dtype_configs:
        specs = {}
        for key in ("input_dtype", "output_dtype"):
            spec: DTypeWithConstraints = getattr(dc, f"{key}_with_constraints")
            if spec.dtype == constraints.dtype:
                if spec.scale_min_lower_bound is not None or spec.scale_max_upper_bound is not None:
                    raise ValueError(f"a scale bound cannot apply to a fixed-qparams op: {dc}")
                spec = dataclasses.replace(
                    spec, quant_min_lower_bound=constraints.quant_min_lower_bound,
                    quant_max_upper_bound=constraints.quant_max_upper_bound,
                    scale_exact_match=constraints.scale_exact_match,
                    zero_point_exact_match=constraints.zero_point_exact_match)
            specs[key] = spec
        out.append(DTypeConfig(specs["input_dtype"], specs["output_dtype"], dc.weight_dtype_with_constraints,
                               dc.bias_dtype, dc.is_dynamic))
    return out


def _fuser(spec: Any, fused: type | None, ns: Namespace) -> Any:
    if spec == "seq":
        return SequentialFuser(fused) if fused is not None else _MISSING
    if isinstance(spec, tuple):  # (forward-order fuser, where each of its modules sits in the complex pattern)
        fuser, paths = spec
        fuser = _fill(fuser, ns)
        return _MISSING if fuser is _MISSING else ComplexFormatFuser(fuser, paths)
    return _fill(spec, ns)


def _config_for_row(r: Row, ns: Namespace, dtype_configs: Sequence[DTypeConfig]) -> BackendPatternConfig | None:
    """The config for one row, or None when the pattern, fused module or fuser does not exist (yet)."""
    pattern = _fill(r["pattern"], ns)
    fused = _fill(r["fused"], ns) if "fused" in r else None
    fuser = _fuser(r["fuser"], fused, ns) if "fuser" in r else None
    if _MISSING in (pattern, fused, fuser):
        return None
    conf = BackendPatternConfig()
    if r.get("complex"):
        conf._set_pattern_complex_format(pattern)
    else:
        conf.set_pattern(pattern)
    conf.set_observation_type(_OBSERVATION[r.get("obs", "diff")])
    conf.set_dtype_configs(with_fixed_qparams(dtype_configs, r["fixed"]) if "fixed" in r else dtype_configs)
    for key, setter in _MODULE_FIELDS.items():
        value = _fill(r.get(key), ns)
        getattr(conf, setter)(None if value is _MISSING else value)
    conf.set_fused_module(fused).set_fuser_method(fuser)
    conf._set_input_type_to_index(r.get("itoi"))
    conf._set_num_tensor_args_to_observation_type(_BINARY_NUM_TENSOR_ARGS if r.get("ntat") else None)
    if "root_getter" in r:
        conf._set_root_node_getter(NestedItemGetter(r["root_getter"]))
        conf._set_extra_inputs_getter(NestedItemGetter(r["extra_getter"], as_list=True))
    return conf


def build_backend_config(name: str, sections: Sequence[tuple[str, Sequence[DTypeConfig]]]) -> BackendConfig:
    """A BackendConfig named ``name`` from ``(section name, dtype configs)`` pairs, in order."""
    backend_config = BackendConfig(name)
    for section, dtype_configs in sections:
        if section not in SECTIONS:
            raise KeyError(f"unknown section {section!r}; known: {sorted(SECTIONS)}")
        for rows, ns in SECTIONS[section]:
            configs = (_config_for_row(r, ns, dtype_configs) for r in rows)
            backend_config.set_backend_pattern_configs(c for c in configs if c is not None)
    return backend_config
