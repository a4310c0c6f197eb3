"""Observer / fake-quant *constructors*: a class with some keyword arguments fixed (``Cls.with_args(...)``).

A QConfig holds constructors, never instances, because every observed tensor needs its own observer object.
:class:`PartialConstructor` plays the role of torch.ao's ``_PartialWrapper``: calling it builds a new instance,
``with_args`` / ``with_callable_args`` chain (the last setting of a name wins), its repr reads like the code that
made it, and two constructors with the same class and arguments compare equal (so qconfigs can be compared).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

__all__ = ["PartialConstructor", "with_args", "with_callable_args", "is_observer_constructor"]


class PartialConstructor:
    """``func`` with fixed keyword arguments plus arguments evaluated at each construction.

    Attributes:
        p: a :class:`functools.partial` of ``func`` with the fixed keywords (the attribute torch.ao code reads).
        callable_args: name -> zero-argument callable, called on every construction (e.g. a fresh tensor).
    """

    def __init__(self, func: Callable[..., Any], keywords: dict[str, Any] | None = None,
                 callable_args: dict[str, Callable[[], Any]] | None = None) -> None:
        if not callable(func):
            raise TypeError(f"PartialConstructor needs a class or callable, got {func!r}")
        self.p = functools.partial(func, **(keywords or {}))
        self.callable_args: dict[str, Callable[[], Any]] = dict(callable_args or {})

    @property
    def func(self) -> Callable[..., Any]:
        """The class (or callable) this constructor builds."""
        return self.p.func

    @property
    def keywords(self) -> dict[str, Any]:
        """The fixed keyword arguments (a copy)."""
        return dict(self.p.keywords)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Build a new instance; explicit ``kwargs`` override both fixed and callable arguments."""
        lazy = {name: make() for name, make in self.callable_args.items() if name not in kwargs}
        return self.p(*args, **{**lazy, **kwargs})

    def with_args(self, **kwargs: Any) -> "PartialConstructor":
        """A new constructor with ``kwargs`` fixed on top of this one's."""
        callables = {k: v for k, v in self.callable_args.items() if k not in kwargs}
        return PartialConstructor(self.func, {**self.p.keywords, **kwargs}, callables)

    def with_callable_args(self, **kwargs: Callable[[], Any]) -> "PartialConstructor":
        """A new constructor whose ``kwargs`` are called at every construction."""
        for name, make in kwargs.items():
            if not callable(make):
                raise TypeError(f"with_callable_args({name}=...) needs a zero-argument callable, got {make!r}")
        fixed = {k: v for k, v in self.p.keywords.items() if k not in kwargs}
        return PartialConstructor(self.func, fixed, {**self.callable_args, **kwargs})

    def _key(self) -> tuple[Any, ...]:
        return (self.func, tuple(sorted(self.p.keywords.items(), key=lambda kv: kv[0])),
                tuple(sorted(self.callable_args.items(), key=lambda kv: kv[0])))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PartialConstructor):
            return NotImplemented
        try:
            return bool(self._key() == other._key())
        except RuntimeError:  # tensors among the arguments: compare by identity
            return self is other

    def __hash__(self) -> int:
        try:
            return hash(self._key())
        except TypeError:
            return hash(self.func)

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", repr(self.func))
        text = name
        if self.p.keywords:
            text += ".with_args(" + ", ".join(f"{k}={v!r}" for k, v in self.p.keywords.items()) + ")"
        if self.callable_args:
            text += ".with_callable_args(" + ", ".join(f"{k}={v!r}" for k, v in self.callable_args.items()) + ")"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (PartialConstructor, (self.func, dict(self.p.keywords), dict(self.callable_args)))


def with_args(cls_or_self: Callable[..., Any], **kwargs: Any) -> PartialConstructor:
    """``Cls.with_args(a=1)``: a constructor building ``Cls(a=1)`` afresh on every call."""
    if isinstance(cls_or_self, PartialConstructor):
        return cls_or_self.with_args(**kwargs)
    return PartialConstructor(cls_or_self, kwargs)


def with_callable_args(cls_or_self: Callable[..., Any], **kwargs: Callable[[], Any]) -> PartialConstructor:
    """``Cls.with_callable_args(a=f)``: a constructor building ``Cls(a=f())``, calling ``f`` each time."""
    if isinstance(cls_or_self, PartialConstructor):
        return cls_or_self.with_callable_args(**kwargs)
    return PartialConstructor(cls_or_self).with_callable_args(**kwargs)


def is_observer_constructor(obj: object) -> bool:
    """True for something a QConfig may hold: a module *class* or a ``with_args`` constructor.

    Module instances (an observer object rather than a way to make one) and other values give False.
    torch.ao's own ``_PartialWrapper`` objects (anything with a ``functools.partial`` in ``.p``) count too,
    so configs written against torch.ao can be inspected before migration.
    """
    if isinstance(obj, PartialConstructor):
        return True
    if isinstance(obj, type):
        return issubclass(obj, torch.nn.Module)
    partial = getattr(obj, "p", None)
    return isinstance(partial, functools.partial) and not isinstance(obj, torch.nn.Module)
