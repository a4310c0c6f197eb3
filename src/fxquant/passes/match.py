"""Pattern matching of backend patterns against the graph (shared by ``fuse`` and ``annotate``).

Patterns use torch.ao's reversed nested format: ``op`` or ``(op, arg0_pattern, arg1_pattern, ...)`` where each
argument pattern must match the node's positional argument of the same index, and nodes matched as arguments
must have exactly one user (they disappear into the pattern). Elements compare through :func:`fxquant.vocab.op_key`,
so ``nn.ReLU``, ``F.relu`` and ``x.relu()`` are one op.

Matching walks the graph once from the end; candidate patterns are indexed by the key of their last op and tried
longest first, so the cost is linear in graph size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from torch import fx, nn

from ..vocab import node_key, op_key

__all__ = ["Match", "to_complex_format", "pattern_size", "PatternIndex", "find_matches", "is_match_all",
           "default_root"]


def is_match_all(el: Any) -> bool:
    return isinstance(el, type) and el.__name__ == "MatchAllNode"


def to_complex_format(config: Any) -> Any:
    """A BackendPatternConfig's pattern in reversed nested format (forward (a, b, c) -> (c, (b, a)))."""
    return config.complex_format_pattern


def pattern_size(pattern: Any) -> int:
    """Number of entries of a nested pattern (longer patterns are tried first)."""
    return sum(pattern_size(p) for p in pattern) if isinstance(pattern, tuple) else 1


@dataclass
class Match:
    """One matched pattern.

    ``nodes``: the matched op nodes in forward order; ``structure``: the nodes nested like the complex-format
    pattern (``(relu, (bn, conv))``; a MatchAllNode position holds the argument it matched), the form torch.ao's
    root-node / extra-input getters and complex-format fuser methods take; ``root``: the input node (its inputs
    are observed); ``last``: the output node.
    """

    config: Any
    pattern: Any
    nodes: tuple[fx.Node, ...]
    structure: Any
    root: fx.Node
    last: fx.Node


def _match(node: Any, pattern: Any, modules: dict[str, nn.Module], inner: bool, out: list[fx.Node]) -> Any:
    """The matched structure, or None. Matched op nodes are appended to ``out`` in forward order."""
    head, arg_patterns = (pattern[0], pattern[1:]) if isinstance(pattern, tuple) else (pattern, ())
    if is_match_all(head):
        return node
    if not isinstance(node, fx.Node) or (inner and len(node.users) > 1):
        return None
    key = node_key(node, modules)
    if key is None or key != op_key(head):
        return None
    if arg_patterns and len(arg_patterns) != len(node.args):
        return None
    subs = []
    for arg, sub in zip(node.args, arg_patterns):
        matched = _match(arg, sub, modules, True, out)
        if matched is None:
            return None
        subs.append(matched)
    out.append(node)
    return (node, *subs) if isinstance(pattern, tuple) else node


def default_root(structure: Any) -> fx.Node:
    """torch.ao's default root node: follow the last element of the nested structure down to a node."""
    while isinstance(structure, tuple):
        structure = structure[-1]
    return structure


class PatternIndex:
    """Backend pattern configs indexed by the key of their outermost (last) op, longest patterns first."""

    def __init__(self, configs: Iterable[Any]):
        self.by_key: dict[Any, list[tuple[Any, Any]]] = {}
        self.wildcard: list[tuple[Any, Any]] = []
        entries = [(to_complex_format(c), c) for c in configs]
        entries.sort(key=lambda e: -pattern_size(e[0]) if isinstance(e[0], tuple) else -1)
        seen: set[Any] = set()
        for pattern, cfg in entries:
            head = pattern[0] if isinstance(pattern, tuple) else pattern
            norm = _normalise(pattern)
            if norm in seen:  # another spelling of an already indexed pattern
                continue
            seen.add(norm)
            if is_match_all(head):
                self.wildcard.append((pattern, cfg))
            else:
                self.by_key.setdefault(op_key(head), []).append((pattern, cfg))

    def candidates(self, key: Any) -> list[tuple[Any, Any]]:
        return self.by_key.get(key, []) + self.wildcard


def _normalise(pattern: Any) -> Any:
    if isinstance(pattern, tuple):
        return tuple(_normalise(p) for p in pattern)
    return op_key(pattern)


def find_matches(graph: fx.Graph, index: PatternIndex, modules: dict[str, nn.Module],
                 skip: Optional[set[fx.Node]] = None) -> dict[fx.Node, Match]:
    """Match every node at most once, walking from the graph's end; returns node -> its Match."""
    result: dict[fx.Node, Match] = {}
    skip = skip or set()
    for node in reversed(graph.nodes):
        if node in result or node in skip or node.op not in ("call_module", "call_function", "call_method"):
            continue
        for pattern, cfg in index.candidates(node_key(node, modules)):
            nodes: list[fx.Node] = []
            structure = _match(node, pattern, modules, False, nodes)
            if structure is not None and not any(n in result or n in skip for n in nodes):
                getter = getattr(cfg, "_root_node_getter", None) or default_root
                m = Match(cfg, pattern, tuple(nodes), structure, getter(structure), node)
                for n in nodes:
                    result[n] = m
                break
    return result
