"""Adds qparams buffers and quantize / dequantize nodes to a graph module during conversion, cheaply.

Conversion builds a few nodes and buffers per observer, so torch.fx's per-call overheads add up on deep models:
``Graph.call_function`` scans every argument for symbolic sizes (a third of the cost of a node), ``Graph.get_attr``
re-walks the module path to check the attribute exists, and ``hasattr(gm, name)`` on a missing name raises and
catches an AttributeError inside ``nn.Module.__getattr__``. :class:`GraphBuilder` skips what it knows: its
arguments are nodes and plain constants, the buffers it reads were just registered.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import fx, nn

from .common import module_has_attr

__all__ = ["GraphBuilder", "node_name"]

_UPPER_AFTER_LOWER = re.compile(r"(?<=[a-z])([A-Z])")


def node_name(target: Callable[..., Any]) -> str:
    """The name torch.fx gives a ``call_function`` node of ``target`` before making it unique (its ``__name__`` in
    snake case; ``Graph.create_node`` then replaces the dots of ``quantize_per_tensor.default``)."""
    return _UPPER_AFTER_LOWER.sub(r"_\1", target.__name__).lower()


class GraphBuilder:
    """Adds buffers and nodes to ``gm`` (at the graph's current insertion point)."""

    def __init__(self, gm: fx.GraphModule, backend_name: str = ""):
        self.gm, self.backend_name = gm, backend_name
        self.buffers: dict[tuple[int, str], str] = {}
        self.attr_nodes: dict[str, fx.Node] = {}
        self._names: dict[Any, str] = {}

    def buffer(self, base: str, value: torch.Tensor) -> str:
        """Register ``value`` as a buffer of ``gm`` under ``base`` (``base_<k>`` when taken); returns the name."""
        name, k = base, 0
        while module_has_attr(self.gm, name):
            k += 1
            name = f"{base}_{k}"
        self.gm.register_buffer(name, value)
        return name

    def get_attr(self, name: str) -> fx.Node:
        """One get_attr node per buffer, created at its first use (graph order keeps it before later uses)."""
        node = self.attr_nodes.get(name)
        if node is None:
            node = self.attr_nodes[name] = self.gm.graph.create_node("get_attr", name)
        return node

    def call(self, target: Callable[..., Any], args: tuple[Any, ...]) -> fx.Node:
        """``graph.call_function(target, args)`` for args made of nodes and plain constants (no symbolic sizes):
        the node is created without args and gets them afterwards, which skips torch's scan of every argument."""
        name = self._names.get(target)
        if name is None:
            name = self._names[target] = node_name(target)
        node = self.gm.graph.create_node("call_function", target, name=name)
        node.args = args
        return node

    def qparams(self, obs: nn.Module, base: str) -> tuple[str, str]:
        """Buffer names of ``obs``'s scale and zero point (shared by all nodes of one observer object)."""
        key = (id(obs), "qp")
        if key not in self.buffers:
            scale, zp = obs.calculate_qparams()
            s_name = self.buffer(f"{base}_scale", torch.as_tensor(scale, dtype=torch.float32).detach().clone())
            z_name = self.buffer(f"{base}_zero_point", torch.as_tensor(zp).detach().clone())
            self.buffers[key] = s_name
            self.buffers[(id(obs), "zp")] = z_name
        return self.buffers[key], self.buffers[(id(obs), "zp")]
