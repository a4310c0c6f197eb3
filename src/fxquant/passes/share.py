"""share: group values that must carry the same qparams (union-find over edges).

An op that keeps its input's qparams (max pool, flatten, reshape, cat, ``x + 2.0``, ...) joins the group of each
float tensor it reads; ``observe`` then gives every group one observer object, however many observer nodes the
graph needs for it.

Before::  conv1 -> obs;  conv2 -> obs;  cat(conv1, conv2) -> obs      (three observer objects)
After::   the same nodes, one observer object for {conv1, conv2, cat}
"""
from __future__ import annotations

from typing import Any, Iterator

from torch import fx

from ..annotation import get_annotation
from ..pipeline import Context, register_pass
from .annotate import is_float_tensor

__all__ = ["share", "UnionFind", "tensor_inputs"]


class UnionFind:
    """Disjoint sets of hashable items with path halving."""

    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x: Any) -> Any:
        parent = self.parent
        parent.setdefault(x, x)
        while parent[x] is not x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: Any, b: Any) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[rb] = ra


def tensor_inputs(node: fx.Node) -> Iterator[fx.Node]:
    """The float tensor inputs of ``node``: positional args, one level into lists / tuples (``cat``)."""
    for arg in node.args:
        items = arg if isinstance(arg, (list, tuple)) else (arg,)
        for a in items:
            if isinstance(a, fx.Node) and is_float_tensor(a):
                yield a


def _shares(node: fx.Node) -> list[fx.Node]:
    """The inputs whose group ``node``'s output joins: all list elements of the first arg, else the first input."""
    first = node.args[0] if node.args else None
    if isinstance(first, (list, tuple)):
        return [a for a in first if isinstance(a, fx.Node) and is_float_tensor(a)]
    return next(iter([[a] for a in tensor_inputs(node)]), [])


@register_pass("share")
def share(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """Build ``ctx.share_groups`` (a UnionFind over nodes) from the annotations."""
    groups = UnionFind()
    for node in gm.graph.nodes:
        ann = get_annotation(node)
        if ann.qconfig is not None and (ann.share_io or ann.reuse_input) and ann.output.quantized:
            for inp in _shares(node):
                groups.union(inp, node)
    ctx.share_groups = groups
    return gm
