"""One closed vocabulary of op keys, normalised once.

torch.fx spells the same operation in several ways: ``nn.ReLU`` (call_module), ``F.relu`` / ``torch.relu``
(call_function), ``x.relu()`` (call_method), plus in-place forms. Every pass that needs to know "which op is this"
asks :func:`op_key`, so no other table lists an op more than once.

Stateless spellings of one op collapse to a string key (``"relu"``). Anything not in the table — in particular
modules with weights, whose module form and functional form are quantized differently — keys to itself (the module
class, the function object or the method name), so matching stays exact for them.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

__all__ = ["op_key", "node_key", "ALIASES"]

OpKey = Any  # str | type | Callable

# canonical key -> spellings (module classes, functions, method names). Only stateless ops whose spellings compute
# exactly the same thing belong here.
ALIASES: dict[str, tuple[Any, ...]] = {
    "relu": (nn.ReLU, F.relu, torch.relu, torch.relu_, F.relu_, "relu", "relu_"),
    "relu6": (nn.ReLU6, F.relu6),
    "add": (operator.add, torch.add, operator.iadd, "add", "add_"),
    "mul": (operator.mul, torch.mul, operator.imul, "mul", "mul_"),
    "sigmoid": (nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid", "sigmoid_"),
    "tanh": (nn.Tanh, torch.tanh, F.tanh, "tanh", "tanh_"),
    "hardsigmoid": (nn.Hardsigmoid, F.hardsigmoid, "hardsigmoid", "hardsigmoid_"),
    "matmul": (torch.matmul, operator.matmul, "matmul"),
    "flatten": (nn.Flatten, torch.flatten, "flatten"),
    "cat": (torch.cat, torch.concat, torch.concatenate),
}

_KEY_OF: dict[Any, str] = {}
for _key, _spellings in ALIASES.items():
    for _s in _spellings:
        _KEY_OF[_s] = _key


def op_key(target: Any) -> OpKey:
    """The canonical key of a pattern element or node target (a module class, a function or a method name)."""
    try:
        return _KEY_OF.get(target, target)
    except TypeError:  # unhashable target
        return target


def node_key(node: Node, modules: dict[str, nn.Module]) -> OpKey | None:
    """The canonical key of what ``node`` computes, or None for placeholders, get_attr and output."""
    if node.op == "call_module":
        return op_key(type(modules[str(node.target)]))
    if node.op in ("call_function", "call_method"):
        return op_key(node.target)
    return None
