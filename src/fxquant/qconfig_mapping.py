"""``QConfigMapping``: which QConfig applies to which part of a model, and the default mappings.

The mapping API mirrors ``torch.ao.quantization.qconfig_mapping`` (same setters, attributes, dict keys). How a
mapping resolves to one qconfig per graph node lives in :mod:`fxquant.qconfig_resolver` (re-exported here as
:func:`resolve_qconfig`, :func:`build_qconfig_resolver`, :class:`QConfigResolver`).

``None`` as a qconfig means "leave this part of the model in float".
"""
from __future__ import annotations

import importlib
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union

import torch

from fxquant.qconfig_resolver import (QConfigResolver, build_qconfig_resolver, check_convert_qconfig_mapping,
                                      resolve_qconfig, with_fused_module_types, with_qat_module_types)

if TYPE_CHECKING:
    from fxquant.qconfig import QConfig

__all__ = ["QConfigMapping", "get_default_qconfig_mapping", "get_default_qat_qconfig_mapping", "resolve_qconfig",
           "build_qconfig_resolver", "QConfigResolver", "check_convert_qconfig_mapping", "with_fused_module_types",
           "with_qat_module_types", "ObjectType"]

ObjectType = Union[type, Callable[..., Any], str]
"""A module class, a function (``torch.add``, ``F.linear``) or a method name (``"reshape"``)."""

_GLOBAL_DICT_KEY = ""
_OBJECT_TYPE_DICT_KEY = "object_type"
_MODULE_NAME_REGEX_DICT_KEY = "module_name_regex"
_MODULE_NAME_DICT_KEY = "module_name"
_MODULE_NAME_OBJECT_TYPE_ORDER_DICT_KEY = "module_name_object_type_order"
_DICT_KEYS = (_GLOBAL_DICT_KEY, _OBJECT_TYPE_DICT_KEY, _MODULE_NAME_REGEX_DICT_KEY, _MODULE_NAME_DICT_KEY,
              _MODULE_NAME_OBJECT_TYPE_ORDER_DICT_KEY)

# attribute name -> dict key, in increasing match priority (also the repr order)
_STYLES = {
    "global_qconfig": _GLOBAL_DICT_KEY,
    "object_type_qconfigs": _OBJECT_TYPE_DICT_KEY,
    "module_name_regex_qconfigs": _MODULE_NAME_REGEX_DICT_KEY,
    "module_name_qconfigs": _MODULE_NAME_DICT_KEY,
    "module_name_object_type_order_qconfigs": _MODULE_NAME_OBJECT_TYPE_ORDER_DICT_KEY,
}


def _check_qconfig(qconfig: Any, where: str) -> None:
    """Accept ``None`` or a QConfig-like object; reject torch.ao objects and everything else, naming ``where``."""
    if qconfig is None:
        return
    origin = type(qconfig).__module__ or ""
    if origin.startswith("torch.ao"):
        raise TypeError(f"{where}: got a torch.ao {type(qconfig).__name__}; fxquant needs its own config objects. "
                        "Convert it with fxquant.migrate.from_torch_ao(qconfig), or build it from fxquant.qconfig.")
    if not (hasattr(qconfig, "activation") and hasattr(qconfig, "weight")):
        raise TypeError(f"{where}: expected a QConfig (with .activation and .weight) or None, "
                        f"got {type(qconfig).__name__}: {qconfig!r}")


def _check_object_type(object_type: Any, where: str) -> None:
    if isinstance(object_type, str) or callable(object_type):
        return
    raise TypeError(f"{where}: object type must be a module class, a function or a method name string, "
                    f"got {type(object_type).__name__}: {object_type!r}")


def _check_str(value: Any, what: str, where: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{where}: {what} must be a str, got {type(value).__name__}: {value!r}")


class QConfigMapping:
    """Mapping from parts of a model to QConfigs (mirrors ``torch.ao.quantization.QConfigMapping``).

    Entries, in increasing match priority:

    * ``set_global(qconfig)``: the default for everything.
    * ``set_object_type(t, qconfig)``: a module class (``nn.Linear``), a function (``F.linear``, ``torch.add``) or
      a method name (``"reshape"``). Exact type match, no subclass matching.
    * ``set_module_name_regex(regex, qconfig)``: modules whose qualified name ``re.match``-es the regex; the
      regexes are tried in registration order and the first match wins.
    * ``set_module_name(name, qconfig)``: the module with that qualified name *and everything inside it* (the
      nearest named ancestor wins).
    * ``set_module_name_object_type_order(name, t, index, qconfig)``: the ``index``-th call (0-based) of function
      or module class ``t`` made directly in module ``name``.

    Example::

        mapping = (QConfigMapping()
                   .set_global(default_qconfig)
                   .set_object_type(torch.nn.Linear, default_per_channel_qconfig)
                   .set_module_name_regex("blocks\\.[0-9]+\\.attn", None)
                   .set_module_name("head", None))

    Re-setting an existing key replaces its qconfig but keeps its original position (relevant for regexes).
    See :func:`fxquant.qconfig_resolver.resolve_qconfig` for the exact resolution rules.
    """

    def __init__(self) -> None:
        self.global_qconfig: QConfig | None = None
        self.object_type_qconfigs: OrderedDict[ObjectType, QConfig | None] = OrderedDict()
        self.module_name_regex_qconfigs: OrderedDict[str, QConfig | None] = OrderedDict()
        self.module_name_qconfigs: OrderedDict[str, QConfig | None] = OrderedDict()
        self.module_name_object_type_order_qconfigs: OrderedDict[tuple[str, ObjectType, int], QConfig | None] = (
            OrderedDict())

    def set_global(self, global_qconfig: QConfig | None) -> QConfigMapping:
        """Set the global (default) QConfig; ``None`` leaves everything not matched otherwise in float."""
        _check_qconfig(global_qconfig, "QConfigMapping.set_global")
        self.global_qconfig = global_qconfig
        return self

    def set_object_type(self, object_type: ObjectType, qconfig: QConfig | None) -> QConfigMapping:
        """Set the QConfig for a module class, a function, or a method name string."""
        where = f"QConfigMapping.set_object_type({object_type!r})"
        _check_object_type(object_type, where)
        _check_qconfig(qconfig, where)
        self.object_type_qconfigs[object_type] = qconfig
        return self

    def set_module_name_regex(self, module_name_regex: str, qconfig: QConfig | None) -> QConfigMapping:
        """Set the QConfig for modules whose qualified name ``re.match``-es ``module_name_regex``.

        Regexes are tried in the order they were first registered; register more specific ones first.
        """
        where = f"QConfigMapping.set_module_name_regex({module_name_regex!r})"
        _check_str(module_name_regex, "the regex", where)
        try:
            re.compile(module_name_regex)
        except re.error as exc:
            raise ValueError(f"{where}: not a valid regular expression: {exc}") from exc
        _check_qconfig(qconfig, where)
        self.module_name_regex_qconfigs[module_name_regex] = qconfig
        return self

    def set_module_name(self, module_name: str, qconfig: QConfig | None) -> QConfigMapping:
        """Set the QConfig for the module named ``module_name`` (e.g. ``"layer1.0.conv1"``) and its children."""
        where = f"QConfigMapping.set_module_name({module_name!r})"
        _check_str(module_name, "the module name", where)
        _check_qconfig(qconfig, where)
        if module_name == "":
            warnings.warn(f"{where}: the root module name '' is never matched (as in torch.ao); "
                          "use set_global(qconfig) to configure the whole model", UserWarning, stacklevel=2)
        self.module_name_qconfigs[module_name] = qconfig
        return self

    def set_module_name_object_type_order(self, module_name: str, object_type: Callable[..., Any], index: int,
                                          qconfig: QConfig | None) -> QConfigMapping:
        """Set the QConfig for the ``index``-th (0-based) call of ``object_type`` made directly in ``module_name``.

        ``object_type`` is a function (``F.linear``) or a module class. Method calls are not counted (as in
        torch.ao), so method name strings are rejected.
        """
        where = f"QConfigMapping.set_module_name_object_type_order({module_name!r}, {object_type!r}, {index!r})"
        _check_str(module_name, "the module name", where)
        if isinstance(object_type, str):
            raise ValueError(f"{where}: method calls are not counted by call order; use set_object_type("
                             f"{object_type!r}, qconfig) together with set_module_name instead")
        _check_object_type(object_type, where)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"{where}: index must be an int >= 0")
        _check_qconfig(qconfig, where)
        self.module_name_object_type_order_qconfigs[(module_name, object_type, index)] = qconfig
        return self

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for style in _STYLES:
            lines.append(f" {style}")
            entries = getattr(self, style)
            if isinstance(entries, OrderedDict):
                lines.extend(f"  {_key_repr(k)}: {v}" for k, v in entries.items())
            else:
                lines.append(f"  {entries}")
        return "\n".join(lines) + "\n)"

    def to_dict(self) -> dict[str, Any]:
        """Return torch.ao's legacy dict form: ``{"": global, "object_type": [(t, q)], "module_name_regex": [...],
        "module_name": [...], "module_name_object_type_order": [(name, t, index, q)]}``."""
        return {
            _GLOBAL_DICT_KEY: self.global_qconfig,
            _OBJECT_TYPE_DICT_KEY: list(self.object_type_qconfigs.items()),
            _MODULE_NAME_REGEX_DICT_KEY: list(self.module_name_regex_qconfigs.items()),
            _MODULE_NAME_DICT_KEY: list(self.module_name_qconfigs.items()),
            _MODULE_NAME_OBJECT_TYPE_ORDER_DICT_KEY: [(*k, v) for k, v in
                                                      self.module_name_object_type_order_qconfigs.items()],
        }

    @classmethod
    def from_dict(cls, qconfig_dict: dict[str, Any]) -> QConfigMapping:
        """Build a mapping from the legacy dict form (all keys optional; see :meth:`to_dict`).

        Unknown keys raise ``ValueError`` (torch.ao silently ignores them).
        """
        if not isinstance(qconfig_dict, dict):
            raise TypeError(f"QConfigMapping.from_dict: expected a dict, got {type(qconfig_dict).__name__}")
        unknown = [k for k in qconfig_dict if k not in _DICT_KEYS]
        if unknown:
            raise ValueError(f"QConfigMapping.from_dict: unknown key {unknown[0]!r}; valid keys are "
                             f"{', '.join(repr(k) for k in _DICT_KEYS)}")
        conf = cls()
        if _GLOBAL_DICT_KEY in qconfig_dict:
            conf.set_global(qconfig_dict[_GLOBAL_DICT_KEY])
        setters = ((_OBJECT_TYPE_DICT_KEY, conf.set_object_type, 2),
                   (_MODULE_NAME_REGEX_DICT_KEY, conf.set_module_name_regex, 2),
                   (_MODULE_NAME_DICT_KEY, conf.set_module_name, 2),
                   (_MODULE_NAME_OBJECT_TYPE_ORDER_DICT_KEY, conf.set_module_name_object_type_order, 4))
        for key, setter, arity in setters:
            for entry in qconfig_dict.get(key, []):
                if not isinstance(entry, (tuple, list)) or len(entry) != arity:
                    raise ValueError(f"QConfigMapping.from_dict: entries of {key!r} must be tuples of {arity} "
                                     f"items, got {entry!r}")
                setter(*entry)
        return conf

    def copy(self) -> QConfigMapping:
        """A shallow copy: new dicts, same QConfig objects."""
        new = type(self)()
        new.global_qconfig = self.global_qconfig
        for style in list(_STYLES)[1:]:
            setattr(new, style, OrderedDict(getattr(self, style)))
        return new


def _key_repr(key: Any) -> str:
    if isinstance(key, tuple):
        return "(" + ", ".join(_key_repr(k) for k in key) + ")"
    if isinstance(key, type) or callable(key):
        module = getattr(key, "__module__", None)
        name = getattr(key, "__qualname__", None) or getattr(key, "__name__", None)
        # builtins such as F.linear report module torch._C._nn: name them by their public namespace
        public = next((ns for ns, obj in (("torch.nn.functional", torch.nn.functional), ("torch", torch))
                       if name and getattr(obj, name, None) is key), None)
        if name:
            return f"{public or module}.{name}" if (public or module) else name
    return repr(key)


# ------------------------------------------------------------------------------------------------ default mappings

_SUPPORTED_BACKENDS = ("x86", "fbgemm", "qnnpack", "onednn")


def _fixed_qparams_ops() -> tuple[tuple[ObjectType, str], ...]:
    """(op, range) for ops with fixed output qparams, in torch.ao's order; range '0to1' or 'neg1to1'."""
    fn = torch.nn.functional
    return ((torch.nn.Hardsigmoid, "0to1"), (fn.hardsigmoid, "0to1"), ("hardsigmoid", "0to1"),
            ("hardsigmoid_", "0to1"), (torch.nn.Sigmoid, "0to1"), (torch.sigmoid, "0to1"), ("sigmoid", "0to1"),
            ("sigmoid_", "0to1"), (torch.nn.Softmax, "0to1"), (torch.nn.Tanh, "neg1to1"), (torch.tanh, "neg1to1"),
            ("tanh", "neg1to1"), ("tanh_", "neg1to1"))


def _default_mapping(is_qat: bool, backend: str, version: int) -> QConfigMapping:
    from fxquant import observer as obs
    from fxquant import qconfig as qc

    qconfig = qc.get_default_qat_qconfig(backend, version) if is_qat else qc.get_default_qconfig(backend, version)
    fq: Any = importlib.import_module("fxquant.fake_quantize") if is_qat else None
    default_weight = fq.default_weight_fake_quant if is_qat else obs.default_weight_observer
    # x86/fbgemm have no per-channel ConvTranspose kernels: per-tensor weights there
    transpose = qc.QConfig(qconfig.activation, default_weight) if backend in ("x86", "fbgemm") else qconfig
    layernorm = qc.QConfig(qconfig.activation, obs.default_placeholder_observer)  # float weights
    fn, nn = torch.nn.functional, torch.nn
    mapping = QConfigMapping().set_global(qconfig).set_object_type("reshape", qc.default_reuse_input_qconfig)
    for op in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, fn.conv_transpose1d, fn.conv_transpose2d,
               fn.conv_transpose3d):
        mapping.set_object_type(op, transpose)
    mapping.set_object_type(fn.layer_norm, layernorm).set_object_type(nn.LayerNorm, layernorm)
    mapping.set_object_type(nn.PReLU, qc.default_quint8_weight_qconfig)
    observers = {"0to1": obs.default_fixed_qparams_range_0to1_observer,
                 "neg1to1": obs.default_fixed_qparams_range_neg1to1_observer}
    fixed = {name: qc.QConfig(fq.FixedQParamsFakeQuantize.with_args(observer=o) if is_qat else o, default_weight)
             for name, o in observers.items()}
    for op, value_range in _fixed_qparams_ops():
        mapping.set_object_type(op, fixed[value_range])
    return mapping


def get_default_qconfig_mapping(backend: str = "x86", version: int = 0) -> QConfigMapping:
    """The default post-training QConfigMapping for ``backend`` ("x86", "fbgemm", "qnnpack" or "onednn").

    Global: :func:`fxquant.qconfig.get_default_qconfig`; plus torch.ao's special entries: ``"reshape"`` reuses
    its input's qparams; ConvTranspose gets per-tensor weights on x86/fbgemm; LayerNorm keeps float weights; PReLU
    gets uint8 affine weights; sigmoid / hardsigmoid / softmax get fixed qparams (1/256, 0) and tanh (2/256, 128).
    """
    return _default_mapping(False, backend, version)


def get_default_qat_qconfig_mapping(backend: str = "x86", version: int = 1) -> QConfigMapping:
    """The default quantization-aware-training QConfigMapping for ``backend`` (see
    :func:`get_default_qconfig_mapping`; fake quants instead of observers)."""
    return _default_mapping(True, backend, version)


def _with_default_qconfig(mapping: QConfigMapping, qconfig: QConfig) -> QConfigMapping:
    fixed_ops = {op for op, _ in _fixed_qparams_ops()}
    mapping.set_global(qconfig)
    for object_type in list(mapping.object_type_qconfigs):
        if object_type not in fixed_ops:
            mapping.set_object_type(object_type, qconfig)
    return mapping


def _get_symmetric_qnnpack_qconfig_mapping() -> QConfigMapping:
    """qnnpack defaults with :data:`fxquant.qconfig.default_symmetric_qnnpack_qconfig` everywhere but the
    fixed-qparams ops."""
    from fxquant.qconfig import default_symmetric_qnnpack_qconfig
    return _with_default_qconfig(get_default_qconfig_mapping("qnnpack"), default_symmetric_qnnpack_qconfig)


def _get_symmetric_qnnpack_qat_qconfig_mapping() -> QConfigMapping:
    """QAT variant of :func:`_get_symmetric_qnnpack_qconfig_mapping`."""
    from fxquant.qconfig import default_symmetric_qnnpack_qat_qconfig
    return _with_default_qconfig(get_default_qat_qconfig_mapping("qnnpack"), default_symmetric_qnnpack_qat_qconfig)
