"""The state one lowering run shares between its rules: graph edits, module registration, the record of what
was lowered (read back with :func:`lowering_report`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from .lower_match import OBSERVED_RANGE, QParams, qparams_of

__all__ = ["Lowering", "LoweredNode", "Rule", "lowering_report", "lowering_records", "REPORT_ATTR", "STANDS_FOR"]

REPORT_ATTR = "_fxquant_lowering"  # attribute of the lowered GraphModule: list[LoweredNode]
STANDS_FOR = "fxquant_stands_for"  # node.meta of a node a rule made: names of the float ops it runs, in order


@dataclasses.dataclass(frozen=True)
class LoweredNode:
    """One op of the reference graph and what became of it.

    ``rule``: the lowering rule that replaced it (``"reference"`` when it stayed dequantize -> float op ->
    quantize); ``kernel``: the lowered module / op that runs it now; ``reason``: why a rule did not apply.
    """

    node: str
    op: str
    rule: str
    kernel: str
    reason: str = ""

    @property
    def lowered(self) -> bool:
        return self.rule != "reference"


def lowering_records(model: nn.Module, default: Any = ()) -> Any:
    """The lowering records of a converted model (attribute, or ``meta`` after ``copy.deepcopy``)."""
    rows = getattr(model, REPORT_ATTR, None)
    if rows is None and isinstance(model, fx.GraphModule):
        rows = model.meta.get(REPORT_ATTR)
    return default if rows is None else rows


def lowering_report(model: nn.Module) -> list[LoweredNode]:
    """What :func:`fxquant.convert_fx` lowered and what stayed in reference form, node by node."""
    rows = lowering_records(model, None)
    if rows is None:
        raise ValueError(f"lowering_report() needs a model returned by fxquant.convert_fx, got {type(model).__name__}")
    return list(rows)


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[str(node.target)]).__name__
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


class Lowering:
    """Graph editing helpers for the lowering rules of one GraphModule."""

    def __init__(self, gm: fx.GraphModule, keep_original_weights: bool = False) -> None:
        self.gm, self.graph = gm, gm.graph
        self.modules: dict[str, nn.Module] = dict(gm.named_modules(remove_duplicate=False))
        self.keep_original_weights = keep_original_weights
        self.records: dict[str, LoweredNode] = {}
        self._qparams: dict[fx.Node, QParams] = {}
        self.original_weights: dict[str, list[Optional[torch.Tensor]]] = {}
        self.created: set[fx.Node] = set()  # nodes the rules made (never matched as reference ops)
        self._calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self._calls[str(node.target)] = self._calls.get(str(node.target), 0) + 1
        self._replaced: dict[str, str] = {}  # module path replaced in place -> the replaced module's class name

    # ------------------------------------------------------------------------------------------ reading
    def qparams(self, node: fx.Node) -> QParams:
        if node not in self._qparams:
            self._qparams[node] = qparams_of(node, self.gm)
        return self._qparams[node]

    def input_range(self, dq: fx.Node) -> tuple[int, int]:
        """Range the integer values entering dequantize ``dq`` are known to stay in (the producer's observer)."""
        src = dq.args[0]
        observed = src.meta.get(OBSERVED_RANGE) if isinstance(src, fx.Node) else None
        qp = self.qparams(dq)
        return observed if observed is not None else (qp.quant_min, qp.quant_max)

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        return self.modules.get(str(node.target)) if node.op == "call_module" else None

    # ------------------------------------------------------------------------------------------ building
    def add_module(self, base: str, mod: nn.Module) -> str:
        """Register ``mod`` on the root under a free name derived from ``base``; a module the graph calls once
        (the reference module being lowered) is replaced in place, so lowered models keep the float model's names."""
        if base in self.modules and self._calls.get(base, 0) == 1 and base not in self._replaced:
            self._replaced[base] = type(self.modules[base]).__name__
            parent, _, leaf = base.rpartition(".")
            setattr(self.gm.get_submodule(parent) if parent else self.gm, leaf, mod)
            self.modules[base] = mod
            return base
        stem = base.replace(".", "_") or "lowered"
        name, k = stem, 0
        while hasattr(self.gm, name) or name in self.modules:
            k += 1
            name = f"{stem}_{k}"
        self.gm.add_module(name, mod)
        self.modules[name] = mod
        return name

    def call_module(self, anchor: fx.Node, base: str, mod: nn.Module, args: tuple) -> fx.Node:
        """A new call of ``mod`` inserted before ``anchor``."""
        name = self.add_module(base, mod)
        return self.call(anchor, "call_module", name, args)

    def call(self, anchor: fx.Node, op: str, target: Any, args: tuple, kwargs: Optional[dict] = None) -> fx.Node:
        with self.graph.inserting_before(anchor):
            node = self.graph.create_node(op, target, args, kwargs or {})
        self.created.add(node)
        return node

    def replace(self, old: fx.Node, new: fx.Node, rule: str, ops: list[fx.Node], kernel: str = "") -> fx.Node:
        """Route ``old``'s users to ``new``; record ``ops`` (the float ops it replaces) as lowered by ``rule``."""
        if OBSERVED_RANGE in old.meta and OBSERVED_RANGE not in new.meta:
            new.meta[OBSERVED_RANGE] = old.meta[OBSERVED_RANGE]
        old.replace_all_uses_with(new)
        if not kernel and new not in self.created:  # an existing value takes over: nothing runs
            kernel = "none (the input passes through)"
        kernel = kernel or (type(self.module(new)).__name__ if new.op == "call_module" else _op_name(new, {}))
        names: list[str] = []
        for op in ops:
            if op not in self.created:
                self.records[op.name] = LoweredNode(op.name, self._op_name(op), rule, kernel)
                names.append(op.name)
            else:  # folding what an earlier rule made (a table into a conv): its float ops now run in ``new``
                for name in op.meta.get(STANDS_FOR, ()):
                    self.records[name] = dataclasses.replace(self.records[name], rule=rule, kernel=kernel)
                    names.append(name)
        if new in self.created or new.op == "call_module":  # (read by tools.compare to find the float values)
            known = new.meta.setdefault(STANDS_FOR, [])
            known.extend(n for n in names if n not in known)
        self.erase_dead(old)
        return new

    def erase_dead(self, node: fx.Node) -> None:
        """Erase ``node`` if nothing reads it, then its inputs that became unread (work linear in what is erased)."""
        work = [node]
        while work:
            n = work.pop()
            if n._erased or n.users or n.op in ("placeholder", "output") or n.is_impure():
                continue
            inputs = n.all_input_nodes
            self.graph.erase_node(n)
            work.extend(inputs)

    def _op_name(self, op: fx.Node) -> str:
        """The name of the float op ``op`` ran (its module's class before a lowered module took its place)."""
        replaced = self._replaced.get(str(op.target)) if op.op == "call_module" else None
        return replaced or _op_name(op, self.modules)

    def keep(self, node: fx.Node, reason: str) -> None:
        """Record that ``node`` stays in reference form, and why."""
        if node.name not in self.records:
            self.records[node.name] = LoweredNode(node.name, _op_name(node, self.modules), "reference",
                                                  "dequantize -> float op -> quantize", reason)

    def keep_original(self, name: str, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
        if self.keep_original_weights and weight is not None:
            self.original_weights[name] = [weight, bias]




@dataclasses.dataclass(frozen=True)
class Rule:
    """A lowering rule: ``(name, pattern, replacement, condition)``.

    ``pattern`` is a :class:`~fxquant.passes.lower_match.Pat` rooted at the anchor node (bound as ``"out"``), or
    a function ``(node, lowering) -> Match | None`` for shapes a tree cannot say (lists, chains); ``root`` names
    the anchor kinds the rule is tried on (``"*"``: every node, after the rules for its own kind).
    ``when(lowering, match)`` returns why the rule does not apply ("" when
    it does); ``replace(lowering, match)`` builds the new node that takes over the anchor's users.
    """

    name: str
    root: frozenset
    pattern: Any
    replace: Callable[[Lowering, dict[str, fx.Node]], fx.Node]
    when: Callable[[Lowering, dict[str, fx.Node]], str] = lambda low, m: ""
