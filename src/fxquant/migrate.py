"""Turn torch.ao quantization config objects into fxquant's, by reading their attributes and class names.

:func:`from_torch_ao` accepts a torch.ao ``QConfig`` / ``QConfigDynamic``, ``QConfigMapping``, observer or fake-quant
class, ``Cls.with_args(...)`` constructor, ``PrepareCustomConfig`` / ``ConvertCustomConfig`` / ``FuseCustomConfig``,
``BackendConfig``, or a torch.ao module class (``torch.ao.nn.intrinsic.LinearReLU`` -> ``fxquant.nn.intrinsic.
LinearReLU``). This module never imports torch.ao: it recognises torch.ao objects by their ``__module__`` string.
fxquant objects and ``None`` pass through unchanged. Legacy dtypes become plain ones (``quint8 -> uint8``; packed
4/2-bit dtypes also get their ``quant_min``/``quant_max``).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from fxquant._dtypes import dtype_range, normalize_dtype

__all__ = ["from_torch_ao", "is_torch_ao_object"]

# torch.ao module prefix -> fxquant module holding the classes / functions of the same names (longest prefix wins)
_MODULE_MAP = (
    ("torch.ao.nn.intrinsic.qat", "fxquant.nn.intrinsic.qat"),
    ("torch.ao.nn.intrinsic", "fxquant.nn.intrinsic"),
    ("torch.ao.nn.qat", "fxquant.nn.qat"),
    ("torch.ao.nn.quantized.reference", "fxquant.nn.quantized.reference"),
    ("torch.ao.nn.quantized", "fxquant.nn.quantized"),
    ("torch.ao.quantization.observer", "fxquant.observer"),
    ("torch.ao.quantization.fake_quantize", "fxquant.fake_quantize"),
    ("torch.ao.quantization.fuser_method_mappings", "fxquant.fuser_method_mappings"),
    ("torch.ao.quantization.utils", "fxquant.backend_config"),  # MatchAllNode
)


def _module_of(obj: Any) -> str:
    if isinstance(obj, type) or callable(obj) and not isinstance(obj, torch.nn.Module):
        module = getattr(obj, "__module__", None)
        if isinstance(module, str):
            return module
    return type(obj).__module__ or ""


def is_torch_ao_object(obj: Any) -> bool:
    """True for classes, functions and objects defined under ``torch.ao``."""
    return _module_of(obj).startswith("torch.ao.")


def _name(obj: Any) -> str:
    return f"{_module_of(obj)}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _lookup(obj: Any) -> Any:
    """The fxquant class or function with the same name as torch.ao's ``obj``."""
    module = _module_of(obj)
    target = next((dst for src, dst in _MODULE_MAP if module == src or module.startswith(src + ".")), None)
    name = getattr(obj, "__name__", "")
    found = getattr(importlib.import_module(target), name, None) if target else None
    if found is None:
        raise TypeError(f"from_torch_ao: {_name(obj)} has no fxquant equivalent (looked in {target or 'nothing'}); "
                        "replace it with an fxquant class or your own")
    return found


# ------------------------------------------------------------------------------------------------ closures
class _Reversed:
    """Picklable ``_reverse2`` / ``_reverse3`` of torch.ao's fuser methods: call ``f`` with the modules reversed."""

    def __init__(self, fuser: Callable[..., Any], nested: bool) -> None:
        self.fuser, self.nested = fuser, nested

    def __call__(self, is_qat: bool, x: Any, rest: Any) -> Any:
        if self.nested:
            y, z = rest
            return self.fuser(is_qat, z, y, x)
        return self.fuser(is_qat, rest, x)


def _closure_value(fn: Any) -> Any:
    cells = getattr(fn, "__closure__", None) or ()
    if len(cells) != 1:
        raise TypeError(f"from_torch_ao: cannot read the closure of {_name(fn)}")
    return cells[0].cell_contents


def _sequential(fn: Any) -> Any:
    from fxquant.fuser_method_mappings import sequential_wrapper
    return sequential_wrapper(_convert_value(_closure_value(fn)))


# qualname of a torch.ao closure -> converter
_CLOSURES: dict[str, Callable[[Any], Any]] = {
    "_sequential_wrapper2.<locals>.fuser_method": _sequential,
    "_reverse2.<locals>.reversed": lambda fn: _Reversed(_convert_value(_closure_value(fn)), nested=False),
    "_reverse3.<locals>.reversed": lambda fn: _Reversed(_convert_value(_closure_value(fn)), nested=True),
}


# ------------------------------------------------------------------------------------------------ values
def _convert_dtype_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    dtype = kwargs.get("dtype")
    if not isinstance(dtype, torch.dtype) or normalize_dtype(dtype) == dtype:
        return kwargs
    out = dict(kwargs, dtype=normalize_dtype(dtype))
    plain = normalize_dtype(dtype)
    if dtype_range(dtype) != dtype_range(plain) and "quant_min" not in kwargs and "quant_max" not in kwargs:
        out["quant_min"], out["quant_max"] = dtype_range(dtype, bool(kwargs.get("reduce_range", False)))
    return out


def _partial_wrapper(obj: Any) -> Any:
    """torch.ao ``Cls.with_args(...)`` -> fxquant ``Cls.with_args(...)`` (with its callable args)."""
    from fxquant._partial import PartialConstructor
    partial = obj.p
    if partial.args:
        raise TypeError(f"from_torch_ao: {obj!r} fixes positional arguments, which fxquant constructors do not take")
    kwargs = {k: _convert_value(v) for k, v in _convert_dtype_kwargs(dict(partial.keywords)).items()}
    ctor = PartialConstructor(_convert_value(partial.func), kwargs)
    callables = dict(getattr(obj, "callable_args", {}) or {})
    return ctor.with_callable_args(**callables) if callables else ctor


def _convert_value(value: Any) -> Any:
    """Recursively convert a value found inside a torch.ao config (containers, dtypes, classes, functions)."""
    if isinstance(value, torch.dtype):
        return normalize_dtype(value)
    if isinstance(value, dict):
        return {_convert_value(k): _convert_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_convert_value(v) for v in value)
    if not is_torch_ao_object(value):
        return value
    converter = _CONVERTERS.get(type(value).__name__)
    if converter is not None:
        return converter(value)
    if isinstance(value, type) or callable(value) and not isinstance(value, torch.nn.Module):
        closure = _CLOSURES.get(getattr(value, "__qualname__", ""))
        return closure(value) if closure else _lookup(value)
    return value  # plain torch.ao data (DTypeWithConstraints, ObservationType, ...) that fxquant accepts as is


# ------------------------------------------------------------------------------------------------ config objects
def _qconfig(obj: Any) -> Any:
    from fxquant.qconfig import QConfig
    return QConfig(_convert_value(obj.activation), _convert_value(obj.weight))


def _qconfig_mapping(obj: Any) -> Any:
    from fxquant.qconfig_mapping import QConfigMapping
    out = QConfigMapping().set_global(_convert_value(obj.global_qconfig))
    for key, qconfig in obj.object_type_qconfigs.items():
        out.set_object_type(_convert_value(key), _convert_value(qconfig))
    for regex, qconfig in obj.module_name_regex_qconfigs.items():
        out.set_module_name_regex(regex, _convert_value(qconfig))
    for name, qconfig in obj.module_name_qconfigs.items():
        out.module_name_qconfigs[name] = _convert_value(qconfig)  # '' is legal (and inert) in torch.ao: no warning
    for (name, key, index), qconfig in obj.module_name_object_type_order_qconfigs.items():
        out.set_module_name_object_type_order(name, _convert_value(key), index, _convert_value(qconfig))
    return out


def _standalone(set_entry: Callable[..., Any], key: Any, entry: Any) -> None:
    set_entry(_convert_value(key), _convert_value(entry.qconfig_mapping), entry.example_inputs,
              _convert_value(entry.prepare_custom_config), _convert_value(entry.backend_config))


def _prepare_custom_config(obj: Any) -> Any:
    from fxquant.custom_config import PrepareCustomConfig, QuantType
    out = PrepareCustomConfig()
    for name, entry in obj.standalone_module_names.items():
        _standalone(out.set_standalone_module_name, name, entry)
    for cls, entry in obj.standalone_module_classes.items():
        _standalone(out.set_standalone_module_class, cls, entry)
    for quant_type, classes in obj.float_to_observed_mapping.items():
        for float_cls, observed_cls in classes.items():
            out.set_float_to_observed_mapping(_convert_value(float_cls), _convert_value(observed_cls),
                                              QuantType(int(quant_type)))
    return (out.set_non_traceable_module_names(obj.non_traceable_module_names)
            .set_non_traceable_module_classes([_convert_value(c) for c in obj.non_traceable_module_classes])
            .set_input_quantized_indexes(obj.input_quantized_indexes)
            .set_output_quantized_indexes(obj.output_quantized_indexes)
            .set_preserved_attributes(obj.preserved_attributes))


def _convert_custom_config(obj: Any) -> Any:
    from fxquant.custom_config import ConvertCustomConfig, QuantType
    out = ConvertCustomConfig()
    for quant_type, classes in obj.observed_to_quantized_mapping.items():
        for observed_cls, quantized_cls in classes.items():
            out.set_observed_to_quantized_mapping(_convert_value(observed_cls), _convert_value(quantized_cls),
                                                  QuantType(int(quant_type)))
    return out.set_preserved_attributes(obj.preserved_attributes)


def _fuse_custom_config(obj: Any) -> Any:
    from fxquant.custom_config import FuseCustomConfig
    return FuseCustomConfig().set_preserved_attributes(obj.preserved_attributes)


def _backend_config(obj: Any) -> Any:
    from fxquant.backend_config import BackendConfig
    d = obj.to_dict()
    configs = []
    for entry in d.get("configs", []):
        try:
            configs.append(_convert_value(entry))
        except TypeError as exc:
            raise TypeError(f"{exc} (pattern {entry.get('pattern', entry.get('pattern_complex_format'))!r} of "
                            f"torch.ao BackendConfig {d.get('name')!r}); for torch.ao's built-in backend configs "
                            "use fxquant.backend_config.get_<name>_backend_config() instead") from None
    return BackendConfig.from_dict({"name": d.get("name", ""), "configs": configs})


def _quant_type(obj: Any) -> Any:
    from fxquant.custom_config import QuantType
    return QuantType(int(obj))


# torch.ao class name -> converter
_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "QConfig": _qconfig, "QConfigDynamic": _qconfig, "QConfigMapping": _qconfig_mapping,
    "_PartialWrapper": _partial_wrapper, "PrepareCustomConfig": _prepare_custom_config,
    "ConvertCustomConfig": _convert_custom_config, "FuseCustomConfig": _fuse_custom_config,
    "BackendConfig": _backend_config, "QuantType": _quant_type,
}


def from_torch_ao(obj: Any) -> Any:
    """The fxquant equivalent of a torch.ao quantization config object (see the module docstring).

    ``None`` and fxquant objects are returned unchanged. Observer *instances*, dicts (use the fxquant class's
    ``from_dict``) and other objects raise ``TypeError`` saying what is accepted.
    """
    if obj is None or (_module_of(obj).startswith("fxquant.") and not isinstance(obj, torch.nn.Module)):
        return obj
    if isinstance(obj, torch.nn.Module):
        raise TypeError(f"from_torch_ao: got an instance of {_name(type(obj))}; pass its class or a "
                        "Cls.with_args(...) constructor (a QConfig holds constructors)")
    if isinstance(obj, dict):
        raise TypeError("from_torch_ao: got a dict; build the config with the fxquant class's from_dict "
                        "(e.g. QConfigMapping.from_dict(d)) after converting its values with from_torch_ao")
    if not is_torch_ao_object(obj):
        raise TypeError(f"from_torch_ao: {obj!r} ({type(obj).__name__}) is not a torch.ao quantization object")
    return _convert_value(obj)

