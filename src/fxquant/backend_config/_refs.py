"""Lazy references to classes and functions in other fxquant modules (fused, QAT and reference modules,
fuser methods), and the small callables the built-in configs use (fusers, root-node / extra-input getters).

Built-in backend configs name classes as ``Ref("nni.ConvReLU2d")``; they are resolved each time a config
is built, so the backend_config package imports without its neighbours and picks them up once they exist.
A reference that cannot be resolved is recorded; :func:`missing_references` lists them.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Ref", "resolve", "missing_references", "SequentialFuser", "ComplexFormatFuser", "NestedItemGetter"]

_NAMESPACES = {
    "nni": "fxquant.nn.intrinsic",
    "nniqat": "fxquant.nn.intrinsic.qat",
    "nnqat": "fxquant.nn.qat",
    "nnqr": "fxquant.nn.quantized.reference",
    "fuser": "fxquant.fuser_method_mappings",
}
_MISSING: set[str] = set()


@dataclass(frozen=True)
class Ref:
    """``"<namespace>.<name>"`` with namespace one of nni, nniqat, nnqat, nnqr, fuser."""

    spec: str

    def __post_init__(self) -> None:
        namespace, _, name = self.spec.partition(".")
        if namespace not in _NAMESPACES or not name:
            raise ValueError(f"bad reference {self.spec!r}: expected '<namespace>.<name>' with namespace in "
                             f"{sorted(_NAMESPACES)}")


def _import(module_name: str) -> Any | None:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:  # only "this module does not exist yet"; real errors propagate
        if err.name is not None and module_name.startswith(err.name):
            return None
        raise


def resolve(value: Any) -> Any:
    """``value`` itself, or for a :class:`Ref` the object it names (None if it does not exist)."""
    if not isinstance(value, Ref):
        return value
    namespace, _, name = value.spec.partition(".")
    module = _import(_NAMESPACES[namespace])
    obj = getattr(module, name, None) if module is not None else None
    if obj is None:
        _MISSING.add(f"{_NAMESPACES[namespace]}.{name}")
    else:
        _MISSING.discard(f"{_NAMESPACES[namespace]}.{name}")
    return obj


def missing_references() -> list[str]:
    """Fully qualified names the built-in configs refer to that do not exist (yet), after building all
    built-in backend configs once. Patterns needing a missing fused / QAT class are left out of the
    configs; a missing reference module or QAT module leaves that field None."""
    from .builtin import ALL_BACKENDS

    for getter in ALL_BACKENDS.values():
        getter()
    return sorted(_MISSING)


def _item(nested: Any, path: tuple[int, ...]) -> Any:
    for index in path:
        nested = nested[index]
    return nested


@dataclass(frozen=True)
class SequentialFuser:
    """Fuser method ``(is_qat, *modules) -> fused_module(*modules)`` (torch.ao's ``_sequential_wrapper2``);
    a class so that configs stay picklable and tests can see which fused module it builds."""

    fused_module: type

    def __call__(self, is_qat: bool, *modules: Any) -> Any:
        fuser_methods = importlib.import_module(_NAMESPACES["fuser"])
        return fuser_methods.sequential_wrapper(self.fused_module)(is_qat, *modules)


@dataclass(frozen=True)
class ComplexFormatFuser:
    """Adapts a forward-order fuser ``f(is_qat, conv, bn, add, relu)`` to a complex-format pattern: the
    matched modules arrive nested like the pattern and ``paths`` says where each forward argument sits."""

    fuser: Callable
    paths: tuple[tuple[int, ...], ...]

    def __call__(self, is_qat: bool, *items: Any) -> Any:
        return self.fuser(is_qat, *(_item(items, path) for path in self.paths))


@dataclass(frozen=True)
class NestedItemGetter:
    """Picks nodes out of a matched complex-format node pattern: the root node (``as_list=False``, one path)
    or the extra inputs (``as_list=True``)."""

    paths: tuple[tuple[int, ...], ...]
    as_list: bool = False

    def __call__(self, node_pattern: Any) -> Any:
        items = [_item(node_pattern, path) for path in self.paths]
        return items if self.as_list else items[0]
