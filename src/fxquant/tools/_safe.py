"""The allow-list of classes and functions a saved fxquant model may refer to (see :mod:`fxquant.tools.serialize`).

A saved model names classes (module types, observers, config objects) and functions (graph targets, fuser methods,
pattern entries) by their import path, e.g. ``"torch.nn.modules.conv.Conv2d"``. Loading resolves a name only when

* it is one of fxquant's classes or functions (but not its command line or file tools),
* it is a ``torch.nn`` class, a ``torch.nn.functional`` function, a torch operator (``torch.add``, ``torch.ops.aten.*``,
  ``torch.ops.fxquant.*``), a ``torch.Tensor`` method, an ``operator`` / ``math`` function or a few builtins, or
* the user registered it in this process with :func:`register_safe` (their own module classes, wrapped functions).

Resolution re-checks the object it found (its own module and name must spell the reference), so a name cannot
reach ``os.system`` through some module's attributes. Modules are imported only for torch / fxquant names.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

import torch

__all__ = ["register_safe", "unregister_safe", "ref_of", "resolve_ref", "is_safe", "UnsafeReferenceError"]

T = TypeVar("T")

_REGISTRY: dict[str, Any] = {}

_CLASS_PREFIXES = ("torch.nn.", "fxquant.")
_FUNCTION_PREFIXES = ("torch.nn.functional.", "torch.functional.", "fxquant.")
_DENIED_PREFIXES = ("fxquant.tools.", "fxquant.cli.", "fxquant.__main__.")
_TORCH_BUILTIN_MODULES = ("torch", "torch._C._nn", "torch._C._VariableFunctions", "torch._C._special",
                          "torch._C._linalg", "torch._C._fft", "torch.special", "torch.linalg", "torch.fft")
_DENIED_TORCH_NAMES = frozenset({"from_file", "load", "save"})
_OP_NAMESPACES = frozenset({"aten", "fxquant", "onednn", "prims"})
_SAFE_BUILTINS = frozenset({"getattr", "len", "abs", "min", "max", "round", "int", "float", "bool", "tuple", "list",
                            "sum", "range", "slice", "divmod", "pow"})
_SAFE_FUNCTIONS = frozenset({"torch._assert", "torch.fx._symbolic_trace._assert_is_none"})
_SAFE_CLASSES = frozenset({"collections.OrderedDict", "functools.partial", "builtins.object",
                           "torch.fx.graph_module.GraphModule"})
_IMPORTABLE_ROOTS = frozenset({"torch", "fxquant", "operator", "_operator", "math", "builtins", "collections",
                               "functools", "copyreg"})


class UnsafeReferenceError(ValueError):
    """A class or function is not on the allow-list for safe loading."""


def _qualname(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", "")
    if module == "_operator":
        module = "operator"
    return f"{module}.{name}"


def register_safe(obj: T) -> T:
    """Allow saved models to refer to ``obj`` (a module class, or a function used in a graph); returns ``obj``.

    Call it (or use it as a decorator) in the process that saves *and* in the one that loads, after importing
    ``obj``: loading never imports user code, it only finds what was registered::

        @fxquant.tools.serialize.register_safe
        class MyBlock(nn.Module): ...
    """
    if not (isinstance(obj, type) or callable(obj)):
        raise TypeError(f"register_safe() takes a class or function, got {type(obj).__name__}")
    name = _qualname(obj)
    if "<locals>" in name or "<lambda>" in name:
        raise UnsafeReferenceError(f"{name} is a local class / function or lambda and cannot be saved by name; "
                                   f"define it at module level")
    _REGISTRY[name] = obj
    return obj


def unregister_safe(obj: Any) -> None:
    """Undo :func:`register_safe` (tests use it)."""
    _REGISTRY.pop(_qualname(obj), None)


def _is_op(obj: Any) -> bool:
    return isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


def _op_ref(obj: Any) -> str:
    if isinstance(obj, torch._ops.OpOverload):
        return f"torch.ops.{obj.namespace}.{obj._overloadpacket.__name__}.{obj._overloadname}"
    return f"torch.ops.{obj._qualified_op_name.replace('::', '.')}"


def _builtin_name_ok(ref: str) -> bool:
    module, _, name = ref.rpartition(".")
    return module in _TORCH_BUILTIN_MODULES and name not in _DENIED_TORCH_NAMES


def is_safe(obj: Any, ref: str) -> bool:
    """True when ``obj`` (spelled ``ref``) may be referred to by a saved model."""
    if ref in _REGISTRY and _REGISTRY[ref] is obj:
        return True
    if any(ref.startswith(p) for p in _DENIED_PREFIXES) and not isinstance(obj, type):
        return False
    if isinstance(obj, type):
        return ref.startswith(_CLASS_PREFIXES) or ref in _SAFE_CLASSES
    if _is_op(obj):
        return ref.split(".")[2] in _OP_NAMESPACES
    if type(obj).__name__ == "method_descriptor":
        return getattr(obj, "__objclass__", None) is torch._C.TensorBase and not obj.__name__.startswith("__")
    if type(obj).__name__ == "builtin_function_or_method":
        if ref.startswith("builtins."):
            return ref.removeprefix("builtins.") in _SAFE_BUILTINS
        if ref.startswith(("operator.", "math.")):
            return True
        return _builtin_name_ok(ref)
    return ref.startswith(_FUNCTION_PREFIXES) or ref.startswith(("operator.", "math.")) or ref in _SAFE_FUNCTIONS


def _torch_builtin_ref(obj: Any) -> str | None:
    """``torch.flatten`` has ``__qualname__`` ``_VariableFunctionsClass.flatten``: spell it by ``__name__``."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__name__", None)
    if module and name:
        if module == "_operator":
            module = "operator"
        try:
            if getattr(importlib.import_module(module), name) is obj:
                return f"{module}.{name}"
        except (ImportError, AttributeError):
            return None
    return None


def _spell(obj: Any) -> str:
    """The canonical reference of ``obj`` (its own module and name), whether or not it is allowed."""
    if _is_op(obj):
        return _op_ref(obj)
    if type(obj).__name__ == "method_descriptor" and getattr(obj, "__objclass__", None) is torch._C.TensorBase:
        return f"torch.Tensor.{obj.__name__}"
    ref = _qualname(obj)
    if _REGISTRY.get(ref) is not obj and _resolve_plain(ref) is not obj:
        ref = _torch_builtin_ref(obj) or ref
    return ref


def ref_of(obj: Any, where: str = "") -> str:
    """The reference saved for ``obj``; raises :class:`UnsafeReferenceError` (naming ``where``) when not allowed."""
    ref = _spell(obj)
    if is_safe(obj, ref) and (_REGISTRY.get(ref) is obj or _resolve_plain(ref) is obj):
        return ref
    kind = "class" if isinstance(obj, type) else "function"
    at = f" (at {where})" if where else ""
    if "<locals>" in ref or "<lambda>" in ref:
        raise UnsafeReferenceError(f"cannot save the local {kind} or lambda {ref}{at}: a safe file names classes and "
                                   f"functions by import path; define it at module level and register it with "
                                   f"fxquant.tools.serialize.register_safe(...)")
    raise UnsafeReferenceError(f"cannot save a reference to the {kind} {ref}{at}: it is not on fxquant's allow-list "
                               f"for safe loading. If you trust it, call fxquant.tools.serialize.register_safe("
                               f"{ref.rpartition('.')[2]}) before save() and again before load()")


def _resolve_plain(ref: str) -> Any:
    """Import-and-getattr for torch / fxquant / stdlib names only; None when it does not resolve."""
    if ref.startswith("torch.ops."):
        parts = ref.split(".")[2:]
        obj: Any = torch.ops
        try:
            for part in parts:
                obj = getattr(obj, part)
        except (AttributeError, RuntimeError):
            return None
        return obj
    parts = ref.split(".")
    if parts[0] not in _IMPORTABLE_ROOTS or any(p.startswith("__") and p != "__main__" for p in parts):
        return None
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ImportError:
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def resolve_ref(ref: str, where: str = "") -> Any:
    """The class or function a saved reference names, when it is allowed; else :class:`UnsafeReferenceError`."""
    if not isinstance(ref, str):
        raise UnsafeReferenceError(f"bad reference {ref!r}{' at ' + where if where else ''}")
    obj = _REGISTRY.get(ref)
    if obj is None:
        obj = _resolve_plain(ref)
    if obj is not None and is_safe(obj, ref) and _spell(obj) == ref:
        return obj
    at = f" (at {where})" if where else ""
    if obj is None and ref.split(".")[0] not in _IMPORTABLE_ROOTS:
        raise UnsafeReferenceError(f"the file refers to {ref}{at}, which is not registered in this process. If you "
                                   f"trust the file, import it and call fxquant.tools.serialize.register_safe("
                                   f"{ref.rpartition('.')[2]}) before load()")
    raise UnsafeReferenceError(f"the file refers to {ref}{at}, which is not on fxquant's allow-list for safe "
                               f"loading; refusing to load it")


def callable_ref_ok(obj: Callable[..., Any]) -> bool:
    """True for a callable that can be saved by reference."""
    try:
        ref_of(obj)
    except UnsafeReferenceError:
        return False
    return True

