"""Custom configurations for prepare_fx / convert_fx / fuse_fx (mirrors ``torch.ao.quantization.fx.custom_config``).

Same classes, attributes, chainable setters and legacy dict keys as torch.ao. Differences, on purpose: setters check
their arguments (names, classes, indexes) and raise naming the bad value; ``from_dict`` rejects unknown keys.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from fxquant.backend_config import BackendConfig
    from fxquant.qconfig_mapping import QConfigMapping

__all__ = ["QuantType", "quant_type_to_str", "quant_type_from_str", "StandaloneModuleConfigEntry",
           "PrepareCustomConfig", "ConvertCustomConfig", "FuseCustomConfig"]

STANDALONE_MODULE_NAME_DICT_KEY = "standalone_module_name"
STANDALONE_MODULE_CLASS_DICT_KEY = "standalone_module_class"
FLOAT_TO_OBSERVED_DICT_KEY = "float_to_observed_custom_module_class"
OBSERVED_TO_QUANTIZED_DICT_KEY = "observed_to_quantized_custom_module_class"
NON_TRACEABLE_MODULE_NAME_DICT_KEY = "non_traceable_module_name"
NON_TRACEABLE_MODULE_CLASS_DICT_KEY = "non_traceable_module_class"
INPUT_QUANTIZED_INDEXES_DICT_KEY = "input_quantized_idxs"
OUTPUT_QUANTIZED_INDEXES_DICT_KEY = "output_quantized_idxs"
PRESERVED_ATTRIBUTES_DICT_KEY = "preserved_attributes"


class QuantType(enum.IntEnum):
    """Kind of quantization (same members and values as ``torch.ao.quantization.quant_type.QuantType``)."""

    DYNAMIC = 0
    STATIC = 1
    QAT = 2
    WEIGHT_ONLY = 3


_QUANT_TYPE_NAMES = {QuantType.STATIC: "static", QuantType.DYNAMIC: "dynamic", QuantType.QAT: "qat",
                     QuantType.WEIGHT_ONLY: "weight_only"}


def quant_type_to_str(quant_type: QuantType) -> str:
    """``QuantType.STATIC -> "static"`` (the strings of the legacy dict form)."""
    return _QUANT_TYPE_NAMES[QuantType(quant_type)]


def quant_type_from_str(name: str) -> QuantType:
    """``"static" -> QuantType.STATIC``; unknown names raise ValueError listing the valid ones."""
    for quant_type, text in _QUANT_TYPE_NAMES.items():
        if name == text:
            return quant_type
    raise ValueError(f"unknown quant type {name!r}; expected one of {sorted(_QUANT_TYPE_NAMES.values())}")


def _as_quant_type(value: Any, where: str) -> QuantType:
    if isinstance(value, str):
        return quant_type_from_str(value)
    try:
        return QuantType(value)
    except ValueError:
        raise ValueError(f"{where}: quant_type must be a QuantType or one of "
                         f"{sorted(_QUANT_TYPE_NAMES.values())}, got {value!r}") from None


def _list_of(values: Any, check: Callable[[Any], bool], what: str, where: str) -> list[Any]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{where}: expected a list of {what}, got {values!r}")
    out = list(values)
    bad = [v for v in out if not check(v)]
    if bad:
        raise TypeError(f"{where}: expected a list of {what}, but {bad[0]!r} is not one")
    return out


def _is_class(v: Any) -> bool:
    return isinstance(v, type)


def _is_index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_class(cls: Any, method: str | None, where: str) -> None:
    if not isinstance(cls, type):
        raise TypeError(f"{where}: expected a class, got {cls!r}")
    if method is not None and not callable(getattr(cls, method, None)):
        raise TypeError(f"{where}: {cls.__name__} needs a classmethod {method}()")


def _check_keys(config_dict: Any, valid: tuple[str, ...], owner: str) -> None:
    if not isinstance(config_dict, dict):
        raise TypeError(f"{owner}.from_dict: expected a dict, got {type(config_dict).__name__}")
    for key in config_dict:
        if key not in valid:
            raise ValueError(f"{owner}.from_dict: unknown key {key!r}; valid keys are {', '.join(map(repr, valid))}")


def _convert(obj: Any, cls_path: tuple[str, str], where: str) -> Any:
    """``None`` / an instance of the named class pass through; a dict goes through ``Class.from_dict``."""
    import importlib
    cls = getattr(importlib.import_module(cls_path[0]), cls_path[1])
    if obj is None or isinstance(obj, cls):
        return obj
    if isinstance(obj, dict):
        return cls.from_dict(obj)
    hint = ("; convert torch.ao configs with fxquant.migrate.from_torch_ao(obj)"
            if (type(obj).__module__ or "").startswith("torch.ao") else "")
    raise TypeError(f"{where}: expected an fxquant {cls.__name__}, a dict or None, got "
                    f"{type(obj).__module__}.{type(obj).__name__}{hint}")


_MAPPING = ("fxquant.qconfig_mapping", "QConfigMapping")
_BACKEND = ("fxquant.backend_config", "BackendConfig")
_PREPARE = (__name__, "PrepareCustomConfig")


@dataclass
class StandaloneModuleConfigEntry:
    """How to prepare one standalone module; ``None`` fields fall back to the parent's (an empty
    PrepareCustomConfig for ``prepare_custom_config``)."""

    qconfig_mapping: QConfigMapping | None
    example_inputs: tuple[Any, ...]
    prepare_custom_config: PrepareCustomConfig | None
    backend_config: BackendConfig | None


def _entry(where: str, qconfig_mapping: Any, example_inputs: Any, prepare_custom_config: Any,
           backend_config: Any) -> StandaloneModuleConfigEntry:
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"{where}: example_inputs must be a tuple of the module's positional inputs, e.g. (x,); "
                        f"got {type(example_inputs).__name__}")
    return StandaloneModuleConfigEntry(_convert(qconfig_mapping, _MAPPING, where), example_inputs,
                                       _convert(prepare_custom_config, _PREPARE, where),
                                       _convert(backend_config, _BACKEND, where))


def _nonempty_repr(obj: Any) -> str:
    return f"{type(obj).__name__}({ {k: v for k, v in vars(obj).items() if len(v) > 0} })"


def _mapping_to_dict(nested: dict[QuantType, dict[type, type]]) -> dict[str, dict[type, type]]:
    return {quant_type_to_str(qt): dict(inner) for qt, inner in nested.items()}


class PrepareCustomConfig:
    """Custom configuration for ``prepare_fx`` / ``prepare_qat_fx``.

    Example::

        PrepareCustomConfig() \\
            .set_standalone_module_name("module1", qconfig_mapping, (x,), None, None) \\
            .set_float_to_observed_mapping(FloatCustomModule, ObservedCustomModule) \\
            .set_non_traceable_module_names(["module2"]) \\
            .set_input_quantized_indexes([0]).set_output_quantized_indexes([0]) \\
            .set_preserved_attributes(["attr1"])
    """

    _DICT_KEYS = (STANDALONE_MODULE_NAME_DICT_KEY, STANDALONE_MODULE_CLASS_DICT_KEY, FLOAT_TO_OBSERVED_DICT_KEY,
                  NON_TRACEABLE_MODULE_NAME_DICT_KEY, NON_TRACEABLE_MODULE_CLASS_DICT_KEY,
                  INPUT_QUANTIZED_INDEXES_DICT_KEY, OUTPUT_QUANTIZED_INDEXES_DICT_KEY, PRESERVED_ATTRIBUTES_DICT_KEY)

    def __init__(self) -> None:
        self.standalone_module_names: dict[str, StandaloneModuleConfigEntry] = {}
        self.standalone_module_classes: dict[type, StandaloneModuleConfigEntry] = {}
        self.float_to_observed_mapping: dict[QuantType, dict[type, type]] = {}
        self.non_traceable_module_names: list[str] = []
        self.non_traceable_module_classes: list[type] = []
        self.input_quantized_indexes: list[int] = []
        self.output_quantized_indexes: list[int] = []
        self.preserved_attributes: list[str] = []

    def __repr__(self) -> str:
        return _nonempty_repr(self)

    def set_standalone_module_name(self, module_name: str, qconfig_mapping: QConfigMapping | None,
                                   example_inputs: tuple[Any, ...], prepare_custom_config: PrepareCustomConfig | None,
                                   backend_config: BackendConfig | None) -> PrepareCustomConfig:
        """Prepare the submodule ``module_name`` as a standalone module (``None`` = use the parent's config)."""
        where = f"PrepareCustomConfig.set_standalone_module_name({module_name!r})"
        if not isinstance(module_name, str) or not module_name:
            raise TypeError(f"{where}: module_name must be a non-empty qualified module name")
        self.standalone_module_names[module_name] = _entry(where, qconfig_mapping, example_inputs,
                                                           prepare_custom_config, backend_config)
        return self

    def set_standalone_module_class(self, module_class: type, qconfig_mapping: QConfigMapping | None,
                                    example_inputs: tuple[Any, ...], prepare_custom_config: PrepareCustomConfig | None,
                                    backend_config: BackendConfig | None) -> PrepareCustomConfig:
        """Prepare every submodule of class ``module_class`` as a standalone module."""
        where = f"PrepareCustomConfig.set_standalone_module_class({module_class!r})"
        _check_class(module_class, None, where)
        self.standalone_module_classes[module_class] = _entry(where, qconfig_mapping, example_inputs,
                                                              prepare_custom_config, backend_config)
        return self

    def set_float_to_observed_mapping(self, float_class: type, observed_class: type,
                                      quant_type: QuantType | str = QuantType.STATIC) -> PrepareCustomConfig:
        """Swap custom float module ``float_class`` for ``observed_class.from_float(module)`` at prepare time.

        Only static quantization is supported (as in torch.ao).
        """
        where = f"PrepareCustomConfig.set_float_to_observed_mapping({getattr(float_class, '__name__', float_class)})"
        if _as_quant_type(quant_type, where) != QuantType.STATIC:
            raise ValueError(f"{where}: only static quantization is supported for custom modules, "
                             f"got quant_type={quant_type!r}")
        _check_class(float_class, None, where)
        _check_class(observed_class, "from_float", where)
        self.float_to_observed_mapping.setdefault(QuantType.STATIC, {})[float_class] = observed_class
        return self

    def set_non_traceable_module_names(self, module_names: list[str]) -> PrepareCustomConfig:
        """Submodules (by qualified name) that symbolic tracing must treat as leaves."""
        self.non_traceable_module_names = _list_of(module_names, lambda v: isinstance(v, str), "module names",
                                                   "PrepareCustomConfig.set_non_traceable_module_names")
        return self

    def set_non_traceable_module_classes(self, module_classes: list[type]) -> PrepareCustomConfig:
        """Module classes that symbolic tracing must treat as leaves."""
        self.non_traceable_module_classes = _list_of(module_classes, _is_class, "classes",
                                                     "PrepareCustomConfig.set_non_traceable_module_classes")
        return self

    def set_input_quantized_indexes(self, indexes: list[int]) -> PrepareCustomConfig:
        """Indexes of graph inputs that arrive already quantized (others are float)."""
        self.input_quantized_indexes = _list_of(indexes, _is_index, "indexes (ints >= 0)",
                                                "PrepareCustomConfig.set_input_quantized_indexes")
        return self

    def set_output_quantized_indexes(self, indexes: list[int]) -> PrepareCustomConfig:
        """Indexes of graph outputs that should stay quantized (others are returned as float)."""
        self.output_quantized_indexes = _list_of(indexes, _is_index, "indexes (ints >= 0)",
                                                 "PrepareCustomConfig.set_output_quantized_indexes")
        return self

    def set_preserved_attributes(self, attributes: list[str]) -> PrepareCustomConfig:
        """Attributes copied onto the GraphModule even when ``forward`` does not use them."""
        self.preserved_attributes = _list_of(attributes, lambda v: isinstance(v, str), "attribute names",
                                             "PrepareCustomConfig.set_preserved_attributes")
        return self

    @classmethod
    def from_dict(cls, prepare_custom_config_dict: dict[str, Any]) -> PrepareCustomConfig:
        """Build from torch.ao's legacy dict (keys as in :meth:`to_dict`; standalone entries are 5-tuples
        ``(name or class, qconfig mapping or dict, example_inputs, prepare custom config or dict, backend
        config or dict)``)."""
        d = prepare_custom_config_dict
        _check_keys(d, cls._DICT_KEYS, cls.__name__)
        conf = cls()
        for key, setter in ((STANDALONE_MODULE_NAME_DICT_KEY, conf.set_standalone_module_name),
                            (STANDALONE_MODULE_CLASS_DICT_KEY, conf.set_standalone_module_class)):
            for entry in d.get(key, []):
                if not isinstance(entry, (tuple, list)) or len(entry) != 5:
                    raise ValueError(f"PrepareCustomConfig.from_dict: entries of {key!r} must be 5-tuples, "
                                     f"got {entry!r}")
                setter(*entry)
        for name, inner in d.get(FLOAT_TO_OBSERVED_DICT_KEY, {}).items():
            for float_class, observed_class in inner.items():
                conf.set_float_to_observed_mapping(float_class, observed_class, quant_type_from_str(name))
        conf.set_non_traceable_module_names(d.get(NON_TRACEABLE_MODULE_NAME_DICT_KEY, []))
        conf.set_non_traceable_module_classes(d.get(NON_TRACEABLE_MODULE_CLASS_DICT_KEY, []))
        conf.set_input_quantized_indexes(d.get(INPUT_QUANTIZED_INDEXES_DICT_KEY, []))
        conf.set_output_quantized_indexes(d.get(OUTPUT_QUANTIZED_INDEXES_DICT_KEY, []))
        conf.set_preserved_attributes(d.get(PRESERVED_ATTRIBUTES_DICT_KEY, []))
        return conf

    def to_dict(self) -> dict[str, Any]:
        """torch.ao's legacy dict form; empty settings are left out."""
        def row(key: Any, e: StandaloneModuleConfigEntry) -> tuple[Any, ...]:
            return (key, e.qconfig_mapping.to_dict() if e.qconfig_mapping else None, e.example_inputs,
                    e.prepare_custom_config.to_dict() if e.prepare_custom_config else None, e.backend_config)

        d: dict[str, Any] = {
            STANDALONE_MODULE_NAME_DICT_KEY: [row(k, e) for k, e in self.standalone_module_names.items()],
            STANDALONE_MODULE_CLASS_DICT_KEY: [row(k, e) for k, e in self.standalone_module_classes.items()],
            FLOAT_TO_OBSERVED_DICT_KEY: _mapping_to_dict(self.float_to_observed_mapping),
            NON_TRACEABLE_MODULE_NAME_DICT_KEY: self.non_traceable_module_names,
            NON_TRACEABLE_MODULE_CLASS_DICT_KEY: self.non_traceable_module_classes,
            INPUT_QUANTIZED_INDEXES_DICT_KEY: self.input_quantized_indexes,
            OUTPUT_QUANTIZED_INDEXES_DICT_KEY: self.output_quantized_indexes,
            PRESERVED_ATTRIBUTES_DICT_KEY: self.preserved_attributes,
        }
        return {k: v for k, v in d.items() if len(v) > 0}


class ConvertCustomConfig:
    """Custom configuration for ``convert_fx``.

    Example::

        ConvertCustomConfig() \\
            .set_observed_to_quantized_mapping(ObservedCustomModule, QuantizedCustomModule) \\
            .set_preserved_attributes(["attr1"])
    """

    _DICT_KEYS = (OBSERVED_TO_QUANTIZED_DICT_KEY, PRESERVED_ATTRIBUTES_DICT_KEY)

    def __init__(self) -> None:
        self.observed_to_quantized_mapping: dict[QuantType, dict[type, type]] = {}
        self.preserved_attributes: list[str] = []

    def __repr__(self) -> str:
        return _nonempty_repr(self)

    def set_observed_to_quantized_mapping(self, observed_class: type, quantized_class: type,
                                          quant_type: QuantType | str = QuantType.STATIC) -> ConvertCustomConfig:
        """Swap ``observed_class`` modules for ``quantized_class.from_observed(module)`` at convert time."""
        where = ("ConvertCustomConfig.set_observed_to_quantized_mapping("
                 f"{getattr(observed_class, '__name__', observed_class)})")
        quant_type = _as_quant_type(quant_type, where)
        _check_class(observed_class, None, where)
        _check_class(quantized_class, "from_observed", where)
        self.observed_to_quantized_mapping.setdefault(quant_type, {})[observed_class] = quantized_class
        return self

    def set_preserved_attributes(self, attributes: list[str]) -> ConvertCustomConfig:
        """Attributes copied onto the converted GraphModule even when ``forward`` does not use them."""
        self.preserved_attributes = _list_of(attributes, lambda v: isinstance(v, str), "attribute names",
                                             "ConvertCustomConfig.set_preserved_attributes")
        return self

    @classmethod
    def from_dict(cls, convert_custom_config_dict: dict[str, Any]) -> ConvertCustomConfig:
        """Build from torch.ao's legacy dict (``{"observed_to_quantized_custom_module_class": {"static": {Obs:
        Quant}}, "preserved_attributes": [...]}``)."""
        d = convert_custom_config_dict
        _check_keys(d, cls._DICT_KEYS, cls.__name__)
        conf = cls()
        for name, inner in d.get(OBSERVED_TO_QUANTIZED_DICT_KEY, {}).items():
            for observed_class, quantized_class in inner.items():
                conf.set_observed_to_quantized_mapping(observed_class, quantized_class, quant_type_from_str(name))
        return conf.set_preserved_attributes(d.get(PRESERVED_ATTRIBUTES_DICT_KEY, []))

    def to_dict(self) -> dict[str, Any]:
        """torch.ao's legacy dict form; empty settings are left out."""
        d = {OBSERVED_TO_QUANTIZED_DICT_KEY: _mapping_to_dict(self.observed_to_quantized_mapping),
             PRESERVED_ATTRIBUTES_DICT_KEY: self.preserved_attributes}
        return {k: v for k, v in d.items() if len(v) > 0}


class FuseCustomConfig:
    """Custom configuration for ``fuse_fx``: ``FuseCustomConfig().set_preserved_attributes(["attr1"])``."""

    _DICT_KEYS = (PRESERVED_ATTRIBUTES_DICT_KEY,)

    def __init__(self) -> None:
        self.preserved_attributes: list[str] = []

    def __repr__(self) -> str:
        return _nonempty_repr(self)

    def set_preserved_attributes(self, attributes: list[str]) -> FuseCustomConfig:
        """Attributes copied onto the fused GraphModule even when ``forward`` does not use them."""
        self.preserved_attributes = _list_of(attributes, lambda v: isinstance(v, str), "attribute names",
                                             "FuseCustomConfig.set_preserved_attributes")
        return self

    @classmethod
    def from_dict(cls, fuse_custom_config_dict: dict[str, Any]) -> FuseCustomConfig:
        """Build from torch.ao's legacy dict (``{"preserved_attributes": [...]}``)."""
        _check_keys(fuse_custom_config_dict, cls._DICT_KEYS, cls.__name__)
        return cls().set_preserved_attributes(fuse_custom_config_dict.get(PRESERVED_ATTRIBUTES_DICT_KEY, []))

    def to_dict(self) -> dict[str, Any]:
        """torch.ao's legacy dict form; empty settings are left out."""
        return {PRESERVED_ATTRIBUTES_DICT_KEY: self.preserved_attributes} if self.preserved_attributes else {}
