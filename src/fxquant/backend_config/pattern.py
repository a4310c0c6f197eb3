"""Op patterns as BackendConfig spells them, and the conversions between their two formats.

An *op* is a module class (``nn.Conv2d``), a function (``F.relu``, ``torch.add``, ``operator.add``) or a
method name string (``"relu"``). A pattern is

* the **simple format** (what users write): one op, or a 2- or 3-tuple of ops in forward order, e.g.
  ``(nn.Conv2d, nn.BatchNorm2d, nn.ReLU)`` for ``relu(bn(conv(x)))``;
* the **complex format** (torch.ao's legacy "reversed nested tuple"): ``(op, arg_pattern, ...)`` where the
  first element is the *last* op and the others are patterns for its arguments; :class:`MatchAllNode` matches
  any node. ``(nn.ReLU, (nn.BatchNorm2d, nn.Conv2d))`` is the complex form of the 3-tuple above.

::

    to_complex_format(nn.Linear)                 -> nn.Linear
    to_complex_format((nn.Linear, nn.ReLU))      -> (nn.ReLU, nn.Linear)
    to_complex_format((conv, bn, relu))          -> (relu, (bn, conv))
"""
from __future__ import annotations

import operator
from typing import Any, Union

import torch
import torch.nn.functional as F

__all__ = ["MatchAllNode", "Pattern", "is_op", "validate_pattern", "validate_complex_pattern",
           "to_complex_format", "op_name", "pattern_to_str", "picklable_pattern", "restore_pattern"]


class MatchAllNode:
    """Placeholder in a complex-format pattern that matches any node (e.g. the other input of an add)."""


Pattern = Union[type, Any, str, tuple]


def is_op(op: Any) -> bool:
    """True for a module class, a callable, a method name, or :class:`MatchAllNode`."""
    return isinstance(op, (type, str)) or callable(op)


def _check_op(op: Any, pattern: Any) -> None:
    if isinstance(op, str) and not op.isidentifier():
        raise ValueError(f"method name {op!r} in pattern {pattern!r} is not a valid identifier")
    if not is_op(op):
        raise ValueError(f"pattern element {op!r} in pattern {pattern!r} is not an op: expected a module "
                         f"class (nn.Conv2d), a function (F.relu, torch.add) or a method name ('relu')")


def validate_pattern(pattern: Any) -> Pattern:
    """Check a simple-format pattern (an op or a 2-/3-tuple of ops in forward order); return it."""
    if isinstance(pattern, list):
        raise ValueError(f"pattern {pattern!r} is a list; write it as a tuple of ops in forward order")
    if isinstance(pattern, tuple):
        if len(pattern) not in (2, 3):
            raise ValueError(f"pattern {pattern!r} has {len(pattern)} ops; simple patterns are one op or a "
                             f"2- or 3-tuple in forward order. Use _set_pattern_complex_format for others")
        for op in pattern:
            if isinstance(op, tuple) or op is MatchAllNode:
                raise ValueError(f"pattern {pattern!r} nests tuples or uses MatchAllNode; that is the "
                                 f"complex (reversed) format: use _set_pattern_complex_format")
            _check_op(op, pattern)
        return pattern
    if pattern is MatchAllNode:
        raise ValueError("MatchAllNode alone is not a pattern")
    _check_op(pattern, pattern)
    return pattern


def validate_complex_pattern(pattern: Any) -> Pattern:
    """Check a complex-format (reversed nested tuple) pattern; return it."""
    if isinstance(pattern, tuple):
        if not pattern:
            raise ValueError("empty tuple is not a pattern")
        head, *args = pattern
        if isinstance(head, tuple) or head is MatchAllNode:
            raise ValueError(f"complex pattern {pattern!r} must start with the op that produces the output, "
                             f"got {head!r}")
        _check_op(head, pattern)
        for arg in args:
            validate_complex_pattern(arg)
        return pattern
    if pattern is not MatchAllNode:
        _check_op(pattern, pattern)
    return pattern


def to_complex_format(pattern: Pattern) -> Pattern:
    """Convert a simple-format pattern (forward order) to the complex (reversed nested) format."""
    if not isinstance(pattern, tuple):
        return pattern
    if len(pattern) == 2:
        first, second = pattern
        return (second, first)
    if len(pattern) == 3:
        first, second, third = pattern
        return (third, (second, first))
    raise ValueError(f"expected an op or a 2- or 3-tuple of ops, got {pattern!r}")


# namespace label -> module object; searched in this order to name functions the way users write them
_NAMESPACES: tuple[tuple[str, Any], ...] = (("F", F), ("torch", torch), ("operator", operator),
                                            ("torch._C._nn", torch._C._nn))
_MODULE_LABELS = (("torch.nn.modules", "nn"), ("fxquant.nn.intrinsic.qat", "nniqat"),
                  ("fxquant.nn.intrinsic", "nni"), ("fxquant.nn.qat", "nnqat"),
                  ("fxquant.nn.quantized.reference", "nnqr"), ("torch.ao.nn.intrinsic.qat", "nniqat"),
                  ("torch.ao.nn.intrinsic", "nni"), ("torch.ao.nn.qat", "nnqat"),
                  ("torch.ao.nn.quantized.reference", "nnqr"))


def _function_label(op: Any) -> str:
    name = getattr(op, "__name__", None)
    for label, namespace in _NAMESPACES:
        if name is not None and getattr(namespace, name, None) is op:
            return f"{label}.{name}"
    module = getattr(op, "__module__", None) or "?"
    return f"{module}.{name or repr(op)}"


def op_name(op: Any) -> str:
    """Short readable name of an op: ``nn.Conv2d``, ``nni.ConvReLU2d``, ``F.relu``, ``torch.add``,
    ``operator.add``, ``'relu'`` (a method), ``MatchAllNode``."""
    if isinstance(op, str):
        return repr(op)
    if op is MatchAllNode:
        return "MatchAllNode"
    if isinstance(op, type):
        for prefix, label in _MODULE_LABELS:
            if op.__module__.startswith(prefix):
                return f"{label}.{op.__name__}"
        return f"{op.__module__}.{op.__qualname__}"
    return _function_label(op)


def pattern_to_str(pattern: Pattern) -> str:
    """Readable text of a pattern, e.g. ``(nn.Conv2d, nn.BatchNorm2d, nn.ReLU)``."""
    if isinstance(pattern, tuple):
        return "(" + ", ".join(pattern_to_str(p) for p in pattern) + ")"
    return op_name(pattern)


class _NamedFunction(tuple):
    """Pickle stand-in ``(namespace label, name)`` for functions pickle cannot name (``F.max_pool2d`` is a
    local closure made by torch's ``boolean_dispatch``)."""


def picklable_pattern(pattern: Pattern | None) -> Any:
    """``pattern`` with local-closure functions of F / torch replaced by :class:`_NamedFunction` markers."""
    if isinstance(pattern, tuple):
        return tuple(picklable_pattern(p) for p in pattern)
    if callable(pattern) and not isinstance(pattern, type) and "<locals>" in getattr(pattern, "__qualname__", ""):
        label, _, name = _function_label(pattern).rpartition(".")
        if getattr(dict(_NAMESPACES).get(label), name, None) is pattern:
            return _NamedFunction((label, name))
    return pattern


def restore_pattern(pattern: Any) -> Pattern | None:
    """Inverse of :func:`picklable_pattern`."""
    if isinstance(pattern, _NamedFunction):
        label, name = pattern
        return getattr(dict(_NAMESPACES)[label], name)
    if isinstance(pattern, tuple):
        return tuple(restore_pattern(p) for p in pattern)
    return pattern
