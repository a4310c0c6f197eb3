"""lower: rewrite a reference (quantize / dequantize) graph into int8 kernels on plain integer tensors.

Rules are data (:class:`~fxquant.passes.lower_build.Rule`: name, pattern, replacement, condition) and one loop
applies them. Two rule sets run in turn:

1. normalize, in graph order: drop eval-mode identities, turn functional conv / linear with quantized constant
   weights into reference modules, and sink each dequantize below the ops that only move integers
   (``lower_rules_ops``);
2. lower, from the outputs back (so the largest pattern, e.g. conv + add + relu, is seen before its parts):
   weighted ops into lowered modules (``lower_rules``), normalizations / softmax / matmul of two activations
   (``lower_rules_norm``), then the element-wise rules (``lower_rules_elementwise``);
3. fold, in graph order: clamps of a conv's integer output into the conv (``lower_rules_fold``).

Before (ResNet basic block, reference)::

    x_dq = dequantize(x_q); c = conv2(x_dq); c_q = quantize(c); s = add(dequantize(c_q), dequantize(skip_q))
    out_q = quantize(relu(s))
After::

    c_q = conv2(x_q)                    # fxquant.nn.quantized.Conv2d: exact integer output (rounded, clamped)
    out_q = add_relu(c_q, skip_q)       # QuantizedBinary: onednn identity depthwise conv + sum, or aten ops

(Fusing the add into the conv as onednn's binary post-op skips ``c_q``'s clamp: see
``lower_rules.FUSE_ADD_ACROSS_QUANTIZE``, off by default.)

Whatever matches no rule stays as it was (dequantize -> float op -> quantize: correct, and listed by
:func:`~fxquant.passes.lower_build.lowering_report` with the reason). The ``cleanup`` pass then swaps the remaining
quantize / dequantize operators for fast modules.
"""
from __future__ import annotations

from typing import Any, Optional

from torch import fx, nn

from ..pipeline import Context, register_pass
from .lower_build import REPORT_ATTR, LoweredNode, Lowering, Rule, lowering_records
from .lower_match import Pat, kind_of, match
from .lower_rules import WEIGHTED_RULES, CannotLower
from .lower_rules_batchnorm import BATCHNORM_RULES
from .lower_rules_elementwise import ELEMENTWISE_RULES
from .lower_rules_fold import FOLD_RULES
from .lower_rules_norm import NORM_RULES
from .lower_rules_ops import NORMALIZE_RULES

__all__ = ["lower", "verify_lowered", "RULE_SETS", "lower_graph_module"]

# (rule set, visit order)
RULE_SETS: tuple[tuple[tuple[Rule, ...], str], ...] = (
    (NORMALIZE_RULES, "forward"),
    (WEIGHTED_RULES + NORM_RULES + BATCHNORM_RULES + ELEMENTWISE_RULES, "backward"),
    (FOLD_RULES, "forward"),
)
_QDQ = frozenset({"q", "dq", "q_dynamic", "dq_dynamic", "dq_weight", "choose_qparams"})


def _by_root(rules: tuple[Rule, ...]) -> dict[Any, list[Rule]]:
    table: dict[Any, list[Rule]] = {}
    for rule in rules:
        for kind in rule.root:
            table.setdefault(kind, []).append(rule)
    return table


def _try(rule: Rule, node: fx.Node, low: Lowering, reasons: dict[str, str]) -> Optional[fx.Node]:
    m = match(rule.pattern, node, low.modules) if isinstance(rule.pattern, Pat) else rule.pattern(node, low)
    if m is None:
        return None
    reason = rule.when(low, m)
    if not reason:
        try:
            new = rule.replace(low, m)
        except CannotLower as err:
            reason = str(err)
        else:
            ops = [n for n in m.values() if kind_of(n, low.modules) not in _QDQ]
            return low.replace(node, new, rule.name, ops)
    for n in m.values():
        if kind_of(n, low.modules) not in _QDQ:
            reasons[n.name] = f"{rule.name}: {reason}"
    return None


def _apply(low: Lowering, rules: tuple[Rule, ...], order: str, reasons: dict[str, str]) -> None:
    table = _by_root(rules)
    nodes = list(low.graph.nodes)
    for node in (reversed(nodes) if order == "backward" else nodes):
        if node._erased or node.op in ("placeholder", "output", "get_attr") or not node.users:
            continue
        for rule in (*table.get(kind_of(node, low.modules), ()), *table.get("*", ())):  # "*": any node
            if _try(rule, node, low, reasons) is not None:
                break


def _record_rest(low: Lowering, reasons: dict[str, str]) -> None:
    """Every call node that is still a float op next to quantized values: reference form, with the reason."""
    for node in low.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or node.name in low.records \
                or node in low.created:
            continue
        kind = kind_of(node, low.modules)
        if kind in _QDQ or not node.users:
            continue
        quantized_in = any(kind_of(a, low.modules) == "dq" for a in node.all_input_nodes)
        quantized_out = any(kind_of(u, low.modules) == "q" for u in node.users)
        if not (quantized_in or quantized_out):
            continue
        if isinstance(low.module(node), fx.GraphModule):
            low.keep(node, "standalone module: lowered on its own, float at its boundary")
        else:
            low.keep(node, reasons.get(node.name, f"no lowering rule for {getattr(kind, '__name__', kind)}"))


def lower_graph_module(gm: fx.GraphModule, keep_original_weights: bool = False) -> Lowering:
    """Apply every rule set to ``gm`` (and to standalone submodules, recursively); returns the record."""
    for child in gm.children():
        if isinstance(child, fx.GraphModule):
            _finish(child, lower_graph_module(child, keep_original_weights))
    low = Lowering(gm, keep_original_weights)
    reasons: dict[str, str] = {}
    for rules, order in RULE_SETS:
        _apply(low, rules, order, reasons)
    _record_rest(low, reasons)
    gm.graph.eliminate_dead_code()
    return low


def _finish(gm: fx.GraphModule, low: Lowering) -> None:
    from .lower_cleanup import cleanup_graph_module

    cleanup_graph_module(gm, low)


@register_pass("lower")
def lower(gm: nn.Module, ctx: Context) -> nn.Module:
    """Lower a reference GraphModule to int8 kernels (see the module docstring); the record is kept on ``gm``."""
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"lower expects the GraphModule made by to_reference, got {type(gm).__name__}")
    low = lower_graph_module(gm, ctx.keep_original_weights)
    gm.meta["fxquant_lowering"] = low
    rows = list(low.records.values())
    setattr(gm, REPORT_ATTR, rows)  # attribute: survives pickling; meta: survives deepcopy
    gm.meta[REPORT_ATTR] = rows
    return gm  # pipeline.run regenerates the code once, after cleanup


@register_pass("verify_lowered")
def verify_lowered(gm: nn.Module, ctx: Context) -> nn.Module:
    """The graph lints; every reference conv / linear left is recorded with the reason it stayed."""
    from .verify import VerificationError

    assert isinstance(gm, fx.GraphModule)
    gm.graph.lint()
    modules = dict(gm.named_modules(remove_duplicate=False))
    rows: dict[str, LoweredNode] = {r.node: r for r in lowering_records(gm)}
    for node in gm.graph.nodes:
        if kind_of(node, modules) == "weighted" and node.name not in rows:
            raise VerificationError(f"reference module {node.target} ({type(modules[str(node.target)]).__name__}) "
                                    f"was neither lowered nor recorded as staying in reference form")
    return gm
