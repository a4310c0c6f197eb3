"""A JSON-tree codec for the objects inside a model: pickle's object model, with an allow-list instead of imports.

Values become JSON: ``None``/bool/int/str/finite float stay themselves, lists stay lists, everything else is a tagged
dict ``{"$": tag, ...}``::

    (1, 2)                  {"$": "tuple", "v": [1, 2]}
    {"a": 1}                {"$": "dict", "v": [["a", 1]]}
    torch.float32           {"$": "dtype", "v": "float32"}
    a tensor                {"$": "t", "i": 3}                 index into the tensor list (saved with torch.save)
    nn.Conv2d (the class)   {"$": "ref", "v": "torch.nn.modules.conv.Conv2d"}   (checked by ``_safe``)
    an object / a module    {"$": "obj", "i": 7}                index into the object table (shared objects stay shared)

An object-table entry is what ``__reduce_ex__`` says, restricted: ``{"cls": ref, "new": args}`` (``cls.__new__``) or
``{"cls": ref, "call": args}`` (the allowed class called), plus ``"state"`` (``__setstate__`` or ``__dict__``) and
``"list"`` / ``"dict"`` items. Decoding only ever calls allowed classes. GraphModules and graph nodes are delegated
to ``_graph_codec``.
"""
from __future__ import annotations

import copyreg
import enum
import math
import sys
import types
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from torch import fx
from torch.fx.immutable_collections import immutable_dict, immutable_list

from ._safe import UnsafeReferenceError, _is_op, ref_of, resolve_ref

__all__ = ["Encoder", "Decoder", "FormatError", "UnresolvedClass"]


class FormatError(ValueError):
    """The file's description of the model is malformed (corrupt, or not written by fxquant)."""


_FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType,
                   types.WrapperDescriptorType)
_TORCH_SINGLETONS: dict[str, type] = {"dtype": torch.dtype, "qscheme": torch.qscheme,
                                      "memory_format": torch.memory_format, "layout": torch.layout}


def _child(where: str, key: Any) -> str:
    if isinstance(key, str) and key in ("_modules", "_parameters", "_buffers"):
        return where
    return f"{where}.{key}" if isinstance(key, str) else f"{where}[{key!r}]"


def _singleton(tag: str, value: Any) -> dict[str, Any]:
    return {"$": tag, "v": str(value).removeprefix("torch.")}


class UnresolvedClass:
    """Stands for a user class that a saved model names as data only (e.g. the module type a function was called
    in), when that class is not imported in the loading process."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<unresolved class {self.name}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnresolvedClass) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


def _class_name(cls: type) -> dict[str, Any]:
    """A class kept as data: allowed ones by reference, others by name (never imported or called on load)."""
    try:
        return {"$": "ref", "v": ref_of(cls)}
    except UnsafeReferenceError:
        return {"$": "cname", "v": [cls.__module__, cls.__qualname__]}


def _find_class(d: "Decoder", v: dict[str, Any]) -> Any:
    """The class a ``cname`` names if its module is already imported (looked up, not imported); else a stand-in."""
    module_name, qualname = str(v["v"][0]), str(v["v"][1])
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        if obj is None or part.startswith("__"):
            obj = None
            break
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else UnresolvedClass(f"{module_name}.{qualname}")


class Encoder:
    """Turns values into JSON trees; collects tensors and objects into tables."""

    def __init__(self, graph_module_hook: Optional[Callable[["Encoder", fx.GraphModule, str], dict]] = None,
                 name_only: Callable[[str], bool] = lambda where: False):
        self._name_only = name_only
        self.tensors: list[torch.Tensor] = []
        self.objects: list[Optional[dict[str, Any]]] = []
        self._tensor_ids: dict[int, int] = {}
        self._object_ids: dict[int, int] = {}
        self._alive: list[Any] = []  # keeps encoded objects alive so that ids stay unique
        self._graph_module_hook = graph_module_hook

    # ------------------------------------------------------------------------------------------------ values
    def enc(self, v: Any, where: str) -> Any:
        """The JSON tree of ``v``; ``where`` names it in error messages (e.g. ``model.fc._buffers['scale']``)."""
        t = type(v)
        if v is None or t in (bool, str, int):
            return v
        if t is float:
            return v if math.isfinite(v) else {"$": "float", "v": repr(v)}
        if t is list or t is immutable_list:  # torch.fx stores node arguments as immutable lists / dicts
            return [self.enc(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if t is tuple:
            return {"$": "tuple", "v": [self.enc(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if t in (dict, OrderedDict, immutable_dict):
            items = [[self.enc(k, where), self.enc(x, _child(where, k))] for k, x in v.items()]
            return {"$": "odict" if t is OrderedDict else "dict", "v": items}
        if t in (set, frozenset):
            return {"$": t.__name__, "v": [self.enc(x, where) for x in v]}
        if isinstance(v, torch.Tensor):
            return self._tensor(v, where)
        return self._other(v, t, where)

    def _other(self, v: Any, t: type, where: str) -> Any:
        for tag, cls in _TORCH_SINGLETONS.items():
            if t is cls:
                return _singleton(tag, v)
        if t is torch.device:
            return {"$": "device", "v": str(v)}
        if t is torch.Size:
            return {"$": "size", "v": list(v)}
        if t is slice:
            return {"$": "slice", "v": [self.enc(x, where) for x in (v.start, v.stop, v.step)]}
        if v is Ellipsis:
            return {"$": "ellipsis"}
        if t is complex:
            return {"$": "complex", "v": [v.real, v.imag]}
        if isinstance(v, fx.Node):
            return {"$": "node", "v": v.name}
        if isinstance(v, enum.Enum):
            return {"$": "enum", "cls": ref_of(t, where), "v": v.name}
        if isinstance(v, type) and issubclass(v, fx.GraphModule):  # torch.fx makes one class per instance
            return {"$": "ref", "v": "torch.fx.graph_module.GraphModule"}
        if isinstance(v, type) and self._name_only(where):
            return _class_name(v)
        if isinstance(v, type) or isinstance(v, _FUNCTION_TYPES) or _is_op(v):
            return {"$": "ref", "v": ref_of(v, where)}
        if isinstance(v, types.MethodType):
            return {"$": "method", "self": self.enc(v.__self__, where), "name": v.__func__.__name__}
        return self._object(v, where)

    def _tensor(self, v: torch.Tensor, where: str) -> dict[str, Any]:
        if type(v) not in (torch.Tensor, torch.nn.Parameter):
            raise UnsafeReferenceError(f"cannot save {where}: a tensor subclass ({type(v).__name__}); convert it to a "
                                       f"plain tensor first")
        key = id(v)
        if key not in self._tensor_ids:
            self._tensor_ids[key] = len(self.tensors)
            self.tensors.append(v.detach())
            self._alive.append(v)
        out: dict[str, Any] = {"$": "p" if isinstance(v, torch.nn.Parameter) else "t", "i": self._tensor_ids[key]}
        if v.requires_grad:
            out["g"] = True
        return out

    # ------------------------------------------------------------------------------------------------ objects
    def _object(self, v: Any, where: str) -> dict[str, Any]:
        key = id(v)
        if key in self._object_ids:
            return {"$": "obj", "i": self._object_ids[key]}
        index = len(self.objects)
        self._object_ids[key] = index
        self._alive.append(v)
        self.objects.append(None)
        if isinstance(v, fx.GraphModule) and self._graph_module_hook is not None:
            self.objects[index] = self._graph_module_hook(self, v, where)
        else:
            self.objects[index] = self._reduce(v, where)
        return {"$": "obj", "i": index}

    def _reduce(self, v: Any, where: str) -> dict[str, Any]:
        cls_ref = ref_of(type(v), where)  # the object's own class must be allowed
        try:
            rv = v.__reduce_ex__(4)
        except Exception as exc:  # noqa: BLE001 - anything the object raises means "cannot be saved"
            raise UnsafeReferenceError(f"cannot save {where} ({cls_ref}): {exc}") from exc
        if isinstance(rv, str):
            return {"global": ref_of(v, where)}
        func, args, state, listitems, dictitems = (tuple(rv) + (None,) * 5)[:5]
        if func is copyreg.__newobj__:
            entry: dict[str, Any] = {"cls": ref_of(args[0], where), "new": self.enc(list(args[1:]), where)}
        elif func is copyreg.__newobj_ex__:
            entry = {"cls": ref_of(args[0], where), "new": self.enc(list(args[1]), where),
                     "kw": self.enc(dict(args[2]), where)}
        elif func is copyreg._reconstructor and args[1] is object and args[2] is None:
            entry = {"cls": ref_of(args[0], where), "new": []}
        elif isinstance(func, type):
            entry = {"cls": ref_of(func, where), "call": self.enc(list(args), where)}
        else:
            raise UnsafeReferenceError(f"cannot save {where} ({cls_ref}): it pickles through {func!r}, which a safe "
                                       f"file cannot call; register a class with a plain __reduce__ instead")
        if state is not None:
            entry["state"] = self.enc(state, where)
        if listitems is not None:
            entry["list"] = self.enc(list(listitems), where)
        if dictitems is not None:
            entry["dict"] = self.enc([list(kv) for kv in dictitems], where)
        return entry


class Decoder:
    """Turns JSON trees back into values; builds objects from the table on first use."""

    def __init__(self, tensors: list[torch.Tensor], objects: list[dict[str, Any]],
                 graph_module_hook: Optional[Callable[["Decoder", dict, int], Any]] = None):
        self.tensors = tensors
        self.objects = objects
        self.nodes: dict[str, fx.Node] = {}  # set by the graph decoder while it builds a graph
        self._built: dict[int, Any] = {}
        self._params: dict[int, torch.nn.Parameter] = {}
        self._graph_module_hook = graph_module_hook

    def dec(self, v: Any) -> Any:
        """The value a JSON tree stands for; :class:`FormatError` for anything malformed."""
        if v is None or isinstance(v, (bool, str, int, float)):
            return v
        if isinstance(v, list):
            return [self.dec(x) for x in v]
        if not isinstance(v, dict) or not isinstance(v.get("$"), str):
            raise FormatError(f"unexpected value {str(v)[:80]!r} in the model description")
        handler = _DECODERS.get(v["$"])
        if handler is None:
            raise FormatError(f"unknown tag {v['$']!r} in the model description")
        try:
            return handler(self, v)
        except (KeyError, IndexError, TypeError) as exc:
            raise FormatError(f"malformed {v['$']!r} entry in the model description: {exc}") from exc

    def memo(self, index: int, obj: Any) -> None:
        """Record a built object before its state is decoded (so cycles resolve)."""
        self._built[index] = obj

    def tensor(self, v: dict[str, Any]) -> torch.Tensor:
        """Tensor ``i`` of the table (one Parameter object per index, so tied weights stay tied)."""
        t = self.tensors[v["i"]]
        if v["$"] == "p":
            if v["i"] not in self._params:
                self._params[v["i"]] = torch.nn.Parameter(t, requires_grad=bool(v.get("g", False)))
            return self._params[v["i"]]
        return t.requires_grad_(True) if v.get("g") and t.is_floating_point() else t

    def obj(self, index: int) -> Any:
        """Object ``index`` of the table, built on first use."""
        if index in self._built:
            return self._built[index]
        entry = self.objects[index]
        if "graph_module" in entry and self._graph_module_hook is not None:
            return self._graph_module_hook(self, entry, index)
        if "global" in entry:
            obj = resolve_ref(entry["global"])
            self.memo(index, obj)
            return obj
        return self._build(index, entry)

    def _build(self, index: int, entry: dict[str, Any]) -> Any:
        cls = resolve_ref(entry["cls"])
        if not isinstance(cls, type) or issubclass(cls, fx.GraphModule):
            raise FormatError(f"object {index}: {entry['cls']} is not a class that can be built from its state")
        if "call" in entry:
            obj = cls(*self.dec(entry["call"]))
        else:
            obj = cls.__new__(cls, *self.dec(entry["new"]), **self.dec(entry.get("kw", {"$": "dict", "v": []})))
        self.memo(index, obj)
        if "state" in entry:
            _set_state(obj, self.dec(entry["state"]))
        for item in self.dec(entry.get("list", [])):
            obj.append(item)
        for key, item in self.dec(entry.get("dict", [])):
            obj[key] = item
        return obj


def _set_state(obj: Any, state: Any) -> None:
    setstate = getattr(obj, "__setstate__", None)
    if setstate is not None:
        setstate(state)
        return
    slots = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slots = state
    if state:
        obj.__dict__.update(state)
    for name, value in (slots or {}).items():
        setattr(obj, name, value)


def _torch_singleton(tag: str) -> Callable[[Decoder, dict], Any]:
    def decode(d: Decoder, v: dict[str, Any]) -> Any:
        value = getattr(torch, v["v"], None)
        if not isinstance(value, _TORCH_SINGLETONS[tag]):
            raise FormatError(f"unknown torch {tag} {v['v']!r}")
        return value
    return decode


def _enum(d: Decoder, v: dict[str, Any]) -> Any:
    cls = resolve_ref(v["cls"])
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
        raise FormatError(f"{v['cls']} is not an enum")
    return cls[v["v"]]


def _method(d: Decoder, v: dict[str, Any]) -> Any:
    name = v["name"]
    if not isinstance(name, str) or name.startswith("__"):
        raise FormatError(f"bad method name {name!r}")
    return getattr(d.dec(v["self"]), name)


def _node(d: Decoder, v: dict[str, Any]) -> fx.Node:
    if v["v"] not in d.nodes:
        raise FormatError(f"node {v['v']!r} is used before it is defined")
    return d.nodes[v["v"]]


_DECODERS: dict[str, Callable[[Decoder, dict], Any]] = {
    "float": lambda d, v: float(v["v"]) if v["v"] in ("nan", "inf", "-inf") else _bad(v),
    "tuple": lambda d, v: tuple(d.dec(x) for x in v["v"]),
    "dict": lambda d, v: {d.dec(k): d.dec(x) for k, x in v["v"]},
    "odict": lambda d, v: OrderedDict((d.dec(k), d.dec(x)) for k, x in v["v"]),
    "set": lambda d, v: {d.dec(x) for x in v["v"]},
    "frozenset": lambda d, v: frozenset(d.dec(x) for x in v["v"]),
    "t": Decoder.tensor,
    "p": Decoder.tensor,
    "device": lambda d, v: torch.device(v["v"]),
    "size": lambda d, v: torch.Size(int(x) for x in v["v"]),
    "slice": lambda d, v: slice(*(d.dec(x) for x in v["v"])),
    "ellipsis": lambda d, v: Ellipsis,
    "complex": lambda d, v: complex(float(v["v"][0]), float(v["v"][1])),
    "node": _node,
    "enum": _enum,
    "ref": lambda d, v: resolve_ref(v["v"]),
    "cname": _find_class,
    "method": _method,
    "obj": lambda d, v: d.obj(int(v["i"])),
    **{tag: _torch_singleton(tag) for tag in _TORCH_SINGLETONS},
}


def _bad(v: Any) -> Any:
    raise FormatError(f"malformed value {v!r}")
