"""Resolve a :class:`~fxquant.qconfig_mapping.QConfigMapping` to the qconfig of one graph node, as torch.ao does.

Precedence (lowest first; the highest matching entry wins; an entry whose value is ``None`` is a match meaning
"leave in float"):

Module ``P`` of class ``T`` (a ``call_module`` node; also ``get_attr`` of a parameter of ``P``):

    1. global
    2. object_type ``T`` (exact class, no subclass matching)
    3. module_name_regex: the first registered regex that ``re.match``-es ``P``
    4. module_name ``P``, else of its nearest named ancestor (``"a.b"`` covers ``"a.b.c.d"``)
    5. module_name_object_type_order ``(parent of P, T, i)``: ``P`` is the i-th ``T`` called in its parent

Function ``f`` (or method name ``"m"``) called in the forward of module ``S`` (path ``S``, class ``ST``):

    1. global
    2. object_type ``f``
    3. object_type ``ST``  (not for ``S == ""``: torch.ao's tracer gives the root module no type)
    4. module_name_regex on ``S``  (the regex sees ``S``'s path, never the function)
    5. module_name ``S`` or its nearest named ancestor
    6. module_name_object_type_order ``(S, f, i)``: the i-th call of ``f`` in ``S`` (functions only; torch.ao
       does not count method calls)

Quirks kept from torch.ao (``torch/ao/quantization/fx/qconfig_mapping_utils.py``): ``S``'s own type / regex / name
entries override a function's object_type entry (``set_module_name("blk", None)`` keeps ``F.linear`` inside
``blk`` in float even with ``set_object_type(F.linear, q)``); a module_name entry of an ancestor beats the
module's own object_type and regex entries; ``set_module_name("")`` never matches; a regex may match the root
path ``""`` and then applies to every function called in the root ``forward``.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fxquant.qconfig import QConfig
    from fxquant.qconfig_mapping import ObjectType, QConfigMapping

__all__ = ["resolve_qconfig", "build_qconfig_resolver", "QConfigResolver", "check_convert_qconfig_mapping",
           "with_fused_module_types", "with_qat_module_types"]

_MISSING: Any = object()
_ATTRS = ("global_qconfig", "object_type_qconfigs", "module_name_regex_qconfigs", "module_name_qconfigs",
          "module_name_object_type_order_qconfigs")


def _is_module_class(object_type: Any) -> bool:
    return isinstance(object_type, type) and issubclass(object_type, torch.nn.Module)


def _check_mapping(mapping: Any) -> None:
    if isinstance(mapping, dict):
        raise TypeError("expected a QConfigMapping, got a dict; convert it with QConfigMapping.from_dict(d)")
    missing = [a for a in _ATTRS if not hasattr(mapping, a)]
    if missing:
        raise TypeError(f"expected a QConfigMapping, got {type(mapping).__name__} (no attribute {missing[0]!r})")


class QConfigResolver:
    """Resolves many nodes against one mapping, caching the per-path regex / module-name lookups.

    Built by :func:`build_qconfig_resolver`. It works on a snapshot of the mapping taken at construction (later
    edits of the mapping are not seen). Cost: one regex / ancestor scan per distinct module path, then O(1) per
    node, so resolving every node of a model is linear in its size.

    ``__call__`` is the raw query (see :func:`resolve_qconfig`). The ``for_*`` methods apply torch.ao's rules for
    one graph node, counting call order themselves: call them once per node, in graph order, with a fresh
    resolver per graph.
    """

    def __init__(self, mapping: QConfigMapping) -> None:
        _check_mapping(mapping)
        self._global = mapping.global_qconfig
        self._types = dict(mapping.object_type_qconfigs)
        self._regexes = [(re.compile(p), q) for p, q in mapping.module_name_regex_qconfigs.items()]
        self._names = dict(mapping.module_name_qconfigs)
        self._orders = dict(mapping.module_name_object_type_order_qconfigs)
        self._path_cache: dict[str, Any] = {}
        self._counts: dict[tuple[str, Any], int] = {}

    def _path_entry(self, path: str) -> Any:
        """module_name entry of ``path`` or its nearest named ancestor, else its first matching regex."""
        if path in self._path_cache:
            return self._path_cache[path]
        entry, name = _MISSING, path
        while name and entry is _MISSING:
            entry = self._names.get(name, _MISSING)
            name = name.rpartition(".")[0]
        if entry is _MISSING:
            entry = next((q for regex, q in self._regexes if regex.match(path)), _MISSING)
        self._path_cache[path] = entry
        return entry

    def __call__(self, module_path: str, object_type: ObjectType,
                 parent_path_and_type_index: tuple[str, Any, int] | None = None,
                 scope_type: type | None = None) -> QConfig | None:
        """Resolve one query; arguments as in :func:`resolve_qconfig`."""
        if not isinstance(module_path, str):
            raise TypeError(f"module_path must be a str (the qualified module name, '' for the root), "
                            f"got {module_path!r}")
        if object_type is None:
            raise TypeError(f"object_type of the node in {module_path!r} is None; pass the module class, "
                            "the function or the method name")
        if parent_path_and_type_index is not None:
            found = self._orders.get(tuple(parent_path_and_type_index), _MISSING)
            if found is not _MISSING:
                return found
        found = self._path_entry(module_path)
        if found is _MISSING and module_path and scope_type is not None and not _is_module_class(object_type):
            found = self._types.get(scope_type, _MISSING)
        if found is _MISSING:
            found = self._types.get(object_type, _MISSING)
        return self._global if found is _MISSING else found

    def _next_index(self, scope_path: str, object_type: Any) -> int:
        key = (scope_path, object_type)
        index = self._counts.get(key, 0)
        self._counts[key] = index + 1
        return index

    def for_module(self, module_path: str, module_type: type) -> QConfig | None:
        """``call_module`` node calling module ``module_path``; counted among ``module_type`` calls in its parent."""
        parent = module_path.rpartition(".")[0]
        index = self._next_index(parent, module_type)
        return self(module_path, module_type, (parent, module_type, index))

    def for_function(self, scope_path: str, scope_type: type | None, function: Any) -> QConfig | None:
        """``call_function`` node calling ``function`` in the forward of module ``scope_path``."""
        index = self._next_index(scope_path, function)
        return self(scope_path, function, (scope_path, function, index), scope_type)

    def for_method(self, scope_path: str, scope_type: type | None, method_name: str) -> QConfig | None:
        """``call_method`` node (``x.method_name(...)``) in the forward of module ``scope_path``; not counted."""
        return self(scope_path, method_name, None, scope_type)

    def for_attribute(self, owner_path: str, owner_type: type) -> QConfig | None:
        """``get_attr`` node reading a parameter/buffer of module ``owner_path`` (module rules, no order)."""
        return self(owner_path, owner_type)

    def cache_info(self) -> dict[str, int]:
        """``{"paths": distinct module paths scanned for regex / module_name entries}``."""
        return {"paths": len(self._path_cache)}


def build_qconfig_resolver(mapping: QConfigMapping) -> QConfigResolver:
    """A caching :class:`QConfigResolver` for resolving every node of a model against ``mapping``."""
    return QConfigResolver(mapping)


def resolve_qconfig(mapping: QConfigMapping, module_path: str, object_type: ObjectType,
                    parent_path_and_type_index: tuple[str, Any, int] | None = None,
                    scope_type: type | None = None) -> QConfig | None:
    """The qconfig of one node (``None`` = leave in float); precedence in this module's docstring.

    * A module: ``module_path`` is its qualified name, ``object_type`` its class, ``parent_path_and_type_index``
      ``(parent path, class, i)`` if it is the i-th call of that class in its parent.
    * A function or method call inside module ``S``: ``module_path`` is ``S``'s path, ``object_type`` the
      function or method name, ``parent_path_and_type_index`` ``(S, function, i)`` for the i-th call of the
      function in ``S`` (pass ``None`` for methods, as torch.ao does), and ``scope_type`` ``S``'s class.

    Pure: reads ``mapping`` only. For many nodes use :func:`build_qconfig_resolver`.
    """
    return QConfigResolver(mapping)(module_path, object_type, parent_path_and_type_index, scope_type)


def with_fused_module_types(mapping: QConfigMapping, fused_types: Mapping[type, Sequence[type]]) -> QConfigMapping:
    """A copy of ``mapping`` where each fused module class gets the object_type qconfig of its parts.

    ``fused_types`` maps a fused class found in the model (``LinearReLU``) to the classes of its children in
    order (``[nn.Linear, nn.ReLU]``). As in torch.ao, parts with different object_type qconfigs raise
    ``LookupError`` and the first part's qconfig is used. Better than torch.ao: an explicit entry for the fused
    class itself is kept, and an explicit ``None`` for the first part propagates (torch.ao drops it and
    quantizes the fused module with the global qconfig).
    """
    from fxquant.qconfig import qconfig_equals
    new = mapping.copy()
    types = mapping.object_type_qconfigs
    for fused, parts in fused_types.items():
        if not parts or fused in types:
            continue
        values = [types.get(p) for p in parts]
        for part, value in zip(parts[1:], values[1:]):
            if not qconfig_equals(value, values[0]):
                raise LookupError(f"fused module {fused.__name__}: its parts need the same object_type qconfig, but "
                                  f"{parts[0].__name__} has {values[0]} and {part.__name__} has {value}; set the "
                                  f"same qconfig for both, or set_object_type({fused.__name__}, qconfig)")
        if parts[0] in types:
            new.object_type_qconfigs[fused] = values[0]
    return new


def with_qat_module_types(mapping: QConfigMapping, float_to_qat: Mapping[type, type]) -> QConfigMapping:
    """A copy of ``mapping`` where each QAT class gets the object_type entry of its float class
    (``nn.Linear`` entry -> ``fxquant.nn.qat.Linear``), unless the QAT class has its own entry."""
    new = mapping.copy()
    for float_cls, qconfig in mapping.object_type_qconfigs.items():
        qat_cls = float_to_qat.get(float_cls) if isinstance(float_cls, type) else None
        if qat_cls is not None and qat_cls not in mapping.object_type_qconfigs:
            new.object_type_qconfigs[qat_cls] = qconfig
    return new


def check_convert_qconfig_mapping(prepare_mapping: QConfigMapping, convert_mapping: QConfigMapping) -> None:
    """Check a ``convert_fx(..., qconfig_mapping=...)`` mapping against the one used at prepare time.

    The global qconfigs must be equal; every object_type / module_name / module_name_regex key of the prepare
    mapping must be present with an equal qconfig or ``None`` (skip quantizing those nodes). Raises ValueError.
    """
    from fxquant.qconfig import qconfig_equals
    _check_mapping(convert_mapping)
    if not qconfig_equals(prepare_mapping.global_qconfig, convert_mapping.global_qconfig):
        raise ValueError(f"convert qconfig_mapping: the global qconfig {convert_mapping.global_qconfig} differs from "
                         f"the prepare-time one {prepare_mapping.global_qconfig}; they must be equal")
    for attr, key in (("object_type_qconfigs", "object_type"), ("module_name_qconfigs", "module_name"),
                      ("module_name_regex_qconfigs", "module_name_regex")):
        prepared, converted = getattr(prepare_mapping, attr), getattr(convert_mapping, attr)
        for name, qconfig in prepared.items():
            if name not in converted:
                raise ValueError(f"convert qconfig_mapping: missing {key} entry {name!r} that the prepare-time "
                                 "mapping has; add it with the same qconfig, or None to leave it in float")
            if converted[name] is not None and not qconfig_equals(qconfig, converted[name]):
                raise ValueError(f"convert qconfig_mapping: {key} entry {name!r} is {converted[name]} but was "
                                 f"{qconfig} at prepare time; use the same qconfig, or None to leave it in float")
