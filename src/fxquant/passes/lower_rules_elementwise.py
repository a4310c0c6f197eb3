"""Lowering rules anchored at a quantize whose input is computed element-wise (or by pooling / cat) from
dequantized integer tensors; they are tried after the weighted rules::

    quantize(dequantize(q))                   -> q (same qparams), else LookupTable(q)
    quantize(f_n(...f_1(dequantize(q))))      -> LookupTable(q)   (UNARY_OPS; a clamp, or nothing, when it is one;
                                                                 other arguments: Python scalars or 0-d constants)
    quantize(cat([dequantize(q_i)], d))       -> cat([q_i requantized], d)
    quantize(avg_pool(dequantize(q)))         -> Requantize(avg_pool(q.float()))   (AFFINE_OPS; a global average
                                                 pool: Requantize(q, global_mean=True))
    quantize(relu?(add|mul(dequantize(a), dequantize(b)))) -> QuantizedBinary(a, b)

Lookup tables are computed with the reference operators themselves (dequantize every possible integer, run the
float ops, quantize), so they are bit-exact.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import nn as fnn
from ..kernels.uint8 import RANGES
from .lower_build import STANDS_FOR, Lowering, Rule
from .lower_match import Pat, QParams, attr_value, kind_of
from .lower_ops import AFFINE_OPS, UNARY_OPS, node_arg, pads_zero_points
from .lower_rules_norm import scalar_constant

__all__ = ["ELEMENTWISE_RULES", "lookup_table", "UNARY_CHAIN"]

UNARY_CHAIN = "fxquant_unary_chain"  # node.meta of a LookupTable call: (op kinds of the chain, output QParams)

Q = fnn.quantized
_BINARY = frozenset({"add", "mul"})


def _one_node_arg(node: fx.Node, low: Optional[Lowering] = None) -> Optional[fx.Node]:
    """The one node argument of ``node`` (with ``low``: not counting get_attr reads of 0-d float constants)."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))  # type: ignore[arg-type,func-returns-value]
    if low is not None:
        found = [n for n in found if scalar_constant(low, n) is None]
    return found[0] if len(found) == 1 else None


def _chain(node: fx.Node, low: Lowering) -> Optional[tuple[list[fx.Node], fx.Node]]:
    """``([f_1 .. f_n], dq)`` when ``node`` = f_n(...f_1(dq)) of single-use unary ops over a static dequantize."""
    chain: list[fx.Node] = []
    while kind_of(node, low.modules) != "dq":
        if kind_of(node, low.modules) not in UNARY_OPS or len(node.users) != 1:
            return None
        mod = low.module(node)
        arg = _one_node_arg(node, low)
        if arg is None or (mod is not None and mod.training):
            return None
        chain.append(node)
        node = arg
    return chain[::-1], node


def _evaluate(node: fx.Node, x: torch.Tensor, low: Lowering, src: fx.Node) -> torch.Tensor:
    """``node`` run with ``x`` for its input ``src`` (its other node arguments are constants: read them)."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs),  # type: ignore[misc]
                                   lambda n: x if n is src else attr_value(low.gm, n))
    if node.op == "call_module":
        return low.modules[str(node.target)](*args, **kwargs)  # type: ignore[no-any-return]
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)  # type: ignore[no-any-return]
    return node.target(*args, **kwargs)  # type: ignore[operator,no-any-return]


def lookup_table(low: Lowering, dq: fx.Node, chain: list[fx.Node], q: fx.Node) -> torch.Tensor:
    """``quantize(f_n(...f_1(dequantize(v))))`` for every integer ``v`` of ``dq``'s dtype (256 entries)."""
    lo, hi = RANGES[dq.args[5]]
    values = torch.arange(lo, hi + 1).to(dq.args[5])
    dq_args = [attr_value(low.gm, a) if isinstance(a, fx.Node) else a for a in dq.args[1:]]
    x = dq.target(values, *dq_args)
    with torch.no_grad():
        src = dq
        for node in chain:
            x, src = _evaluate(node, x, low, src), node
    q_args = [attr_value(low.gm, a) if isinstance(a, fx.Node) else a for a in q.args[1:]]
    return q.target(x.to(torch.float32), *q_args)


def _table_match(node: fx.Node, low: Lowering) -> Optional[dict[str, fx.Node]]:
    """The quantize and the chain's ops (so the report lists them), or only the quantize when there is no chain
    (the op keeps the reason an earlier rule gave)."""
    if not isinstance(node.args[0], fx.Node):
        return None
    found = _chain(node.args[0], low)
    return {"out": node, **({f"op{i}": n for i, n in enumerate(found[0])} if found else {})}


def _table_when(low: Lowering, m: dict[str, fx.Node]) -> str:
    found = _chain(m["out"].args[0], low)
    if found is None:
        return "not a chain of element-wise ops on one quantized tensor"
    in_dtype, out_dtype = found[1].args[5], m["out"].args[5]
    return "" if in_dtype in RANGES and out_dtype in RANGES else f"dtypes {in_dtype} -> {out_dtype}"


def _clamp_bounds(table: torch.Tensor, dtype: torch.dtype) -> Optional[tuple[int, int]]:
    """``(a, b)`` when ``table`` is ``clamp(v, a, b)`` of its own index values (identity: the dtype's range)."""
    lo, hi = RANGES[dtype]
    values = torch.arange(lo, hi + 1)
    a, b = int(table.min()), int(table.max())
    return (a, b) if table.dtype == dtype and torch.equal(table.long(), values.clamp(a, b)) else None


def _table_replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    q = m["out"]
    chain, dq = _chain(q.args[0], low)  # type: ignore[misc]
    table = lookup_table(low, dq, chain, q)
    x = dq.args[0]
    bounds = _clamp_bounds(table, dq.args[5])
    if bounds == RANGES[dq.args[5]]:
        return x  # type: ignore[return-value]
    if bounds is not None:
        return low.call(q, "call_function", torch.clamp, (x, *bounds))
    out = low.qparams(q)
    node = low.call_module(q, f"{(chain[-1] if chain else q).name}_table",
                           Q.LookupTable(table, _scalar_qparams(out)), (x,))
    node.meta[UNARY_CHAIN] = (tuple(kind_of(n, low.modules) for n in chain), out)  # for lower_rules_fold
    return node


def _requantized(low: Lowering, dq: fx.Node, q: fx.Node) -> fx.Node:
    """``dq``'s integer input expressed in ``q``'s qparams (itself when they agree)."""
    if low.qparams(dq).same_values(low.qparams(q)):
        return dq.args[0]  # type: ignore[return-value]
    table = lookup_table(low, dq, [], q)
    node = low.call_module(q, f"{dq.name}_requant", Q.LookupTable(table, _scalar_qparams(low.qparams(q))),
                           (dq.args[0],))
    node.meta[STANDS_FOR] = []  # the same value in other qparams: no float op of its own
    return node


def _scalar_qparams(qp: QParams) -> tuple[float, int]:
    return qp.scale, qp.zero_point


def _cat_match(node: fx.Node, low: Lowering) -> Optional[dict[str, fx.Node]]:
    inner = node.args[0]
    if kind_of(inner, low.modules) != "cat" or len(inner.users) != 1:
        return None
    tensors = inner.args[0] if inner.args else inner.kwargs.get("tensors")
    if not isinstance(tensors, (list, tuple)) or not all(kind_of(t, low.modules) == "dq" for t in tensors):
        return None
    return {"out": node, "cat": inner}


def _cat_replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    q, cat = m["out"], m["cat"]
    tensors = cat.args[0] if cat.args else cat.kwargs["tensors"]
    new_list = [_requantized(low, t, q) for t in tensors]
    rest = tuple(cat.args[1:])
    kwargs = {k: v for k, v in cat.kwargs.items() if k != "tensors"}
    return low.call(q, "call_function", torch.cat, (new_list,) + rest, kwargs)


def _affine_match(node: fx.Node, low: Lowering) -> Optional[dict[str, fx.Node]]:
    op = node.args[0]
    check = AFFINE_OPS.get(kind_of(op, low.modules))
    if check is None or len(op.users) != 1 or not op.args or kind_of(op.args[0], low.modules) != "dq":
        return None
    if not check(op, low.module(op)) or _one_node_arg(op) is None:
        return None
    return {"out": node, "op": op, "dq_x": op.args[0]}


def _global_average(op: fx.Node, low: Lowering) -> bool:
    """An adaptive average pool to one pixel: a mean over the spatial dims, done by the Requantize after it."""
    mod = low.module(op)
    size = getattr(mod, "output_size", None) if mod is not None else node_arg(op, 1, "output_size")
    if ((size,) if isinstance(size, int) else tuple(size or ())) not in ((1,), (1, 1)):
        return False
    return type(mod) is nn.AdaptiveAvgPool2d or op.target is F.adaptive_avg_pool2d


def _float_op(low: Lowering, q: fx.Node, op: fx.Node, x: fx.Node) -> fx.Node:
    """``op`` on the float values of integer ``x``, folding the cast into the op where one takes a dtype."""
    if kind_of(op, low.modules) in ("mean", torch.mean) and "dtype" not in op.kwargs and len(op.args) <= 3:
        return low.call(q, op.op, op.target, (x,) + tuple(op.args[1:]), {**op.kwargs, "dtype": torch.float32})
    xf = low.call(q, "call_method", "to", (x, torch.float32))
    return low.call(q, op.op, op.target, (xf,) + tuple(op.args[1:]), dict(op.kwargs))


def _affine_replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    q, op, dq = m["out"], m["op"], m["dq_x"]
    xq, out = low.qparams(dq), low.qparams(q)
    in_zp = xq.zero_point
    if _global_average(op, low):  # the module averages the integer image itself (one native pass where it can)
        mod = Q.Requantize(xq.scale, in_zp, out.scale, out.zero_point, out.dtype, out.quant_min, out.quant_max,
                           global_mean=True)
        return low.call_module(q, f"{op.name}_requant", mod, (dq.args[0],))
    if pads_zero_points(op, low.module(op)):  # padded zeros must be real zeros: pool q - zp (one op, to float)
        shifted = low.call(q, "call_function", torch.add, (dq.args[0], float(-in_zp)))
        y, in_zp = low.call(q, op.op, op.target, (shifted,) + tuple(op.args[1:]), dict(op.kwargs)), 0
    else:
        y = _float_op(low, q, op, dq.args[0])
    mod = Q.Requantize(xq.scale, in_zp, out.scale, out.zero_point, out.dtype, out.quant_min, out.quant_max)
    return low.call_module(q, f"{op.name}_requant", mod, (y,))


def _binary_when(low: Lowering, m: dict[str, fx.Node]) -> str:
    dtypes = {low.qparams(m[k]).dtype for k in ("dq_a", "dq_b", "out")}
    return "" if dtypes <= set(RANGES) and len(dtypes) == 1 else f"dtypes {sorted(map(str, dtypes))}"


def _binary_replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    a, b, out = (low.qparams(m[k]) for k in ("dq_a", "dq_b", "out"))
    op = kind_of(m["binary"], low.modules)
    mod = Q.QuantizedBinary(op, (a.scale, a.zero_point), (b.scale, b.zero_point), (out.scale, out.zero_point),
                            "relu" in m, out.dtype, out.quant_min, out.quant_max)
    return low.call_module(m["out"], m["binary"].name, mod, (m["dq_a"].args[0], m["dq_b"].args[0]))


_BIN = Pat(_BINARY, (Pat("dq", name="dq_a"), Pat("dq", name="dq_b")), name="binary", single_use=True)
_Q = frozenset({"q"})


def _pat(inner: Pat) -> Pat:
    return Pat("q", (inner,), name="out")


ELEMENTWISE_RULES: tuple[Rule, ...] = (
    Rule("binary_relu", _Q, _pat(Pat("relu", (_BIN,), name="relu", single_use=True)), _binary_replace, _binary_when),
    Rule("binary", _Q, _pat(_BIN), _binary_replace, _binary_when),
    Rule("cat", _Q, _cat_match, _cat_replace),
    Rule("affine_float", _Q, _affine_match, _affine_replace),
    Rule("lookup_table", _Q, _table_match, _table_replace, _table_when),
)
