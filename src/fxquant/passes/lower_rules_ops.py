"""Lowering rules for the ops between the weighted ones: they run on the integer tensors.

Normalizing rules (visited in graph order, anchored at the op)::

    dropout(x) / identity(x)                      -> x
    F.conv2d(dequantize(x), dequantize(w_int), b) -> ref_conv(dequantize(x))         (then a weighted rule applies)
    shape_op(dequantize(q))                       -> dequantize(shape_op(q))         (INTEGER_OPS: exact)
    q_chunks = chunk(dequantize(q)); q_chunks[i]  -> dequantize(chunk(q)[i])
    size(dequantize(q))                           -> size(q)
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.quantized import reference as ref
from .lower_build import Lowering, Rule
from .lower_match import Pat, attr_value, kind_of
from .lower_ops import (IDENTITY_FUNCTIONS_BY_NAME, IDENTITY_OPS, INTEGER_KERNELS, INTEGER_OPS, RENAMED_METHODS,
                        SHAPE_QUERIES, qualified_name)
from .to_reference import constant_value

__all__ = ["NORMALIZE_RULES", "FLOAT_NAME"]

FLOAT_NAME = "fxquant_float_name"  # node.meta of an integer op sunk below a dequantize: the float op's node name

_OPS = torch.ops.fxquant
_INT_ARITH = frozenset({"size", "numel", "dim", operator.getitem, operator.floordiv, "add", "mul", operator.sub,
                        getattr})


def _first_dq(node: fx.Node, low: Lowering) -> Optional[fx.Node]:
    first = node.args[0] if node.args else None
    return first if kind_of(first, low.modules) == "dq" else None


def _int_valued(arg: Any, low: Lowering, depth: int = 0) -> bool:
    """True for arguments that are Python values or nodes computing ints from shapes (size(), getitem, //)."""
    if not isinstance(arg, fx.Node):
        return True
    if depth > 6 or kind_of(arg, low.modules) not in _INT_ARITH:
        return False
    if kind_of(arg, low.modules) in SHAPE_QUERIES or arg.target is getattr:
        return True
    return all(_int_valued(a, low, depth + 1) for a in arg.args)


def _module_of(node: fx.Node, low: Lowering) -> Optional[nn.Module]:
    return low.module(node)


# --------------------------------------------------------------------------------------------------- normalizing
def _identity_when(low: Lowering, m: dict[str, fx.Node]) -> str:
    node = m["out"]
    check = IDENTITY_OPS[kind_of(node, low.modules)]
    return "" if node.args and check(node, _module_of(node, low)) else "not an identity in this mode"


def _named_identity_match(node: fx.Node, low: Lowering) -> Optional[dict[str, fx.Node]]:
    check = IDENTITY_FUNCTIONS_BY_NAME.get(qualified_name(node.target)) if node.op == "call_function" else None
    return {"out": node} if check is not None and node.args and check(node, None) else None


def _sink_when(low: Lowering, m: dict[str, fx.Node]) -> str:
    node = m["out"]
    check, _ = INTEGER_OPS[kind_of(node, low.modules)]
    if _first_dq(node, low) is None:
        return "input is not a static dequantize"
    if not check(node, _module_of(node, low)):
        return "this variant changes values (not an exact integer op)"
    found: list[fx.Node] = []
    fx.node.map_arg((node.args[1:], node.kwargs), lambda n: found.append(n))  # type: ignore[arg-type,func-returns-value]
    return "" if all(_int_valued(n, low) for n in found) else "takes another tensor"


def _sink_replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    node = m["out"]
    dq = _first_dq(node, low)
    assert dq is not None
    kind = kind_of(node, low.modules)
    op, target, args = node.op, node.target, tuple(node.args[1:])
    if op == "call_method":
        target = RENAMED_METHODS.get(target, target)
    if kind in INTEGER_KERNELS:  # an integer-safe spelling of the op
        target, module_args = INTEGER_KERNELS[kind]
        op, args = "call_function", (module_args(low.module(node)) if module_args else args)
    new = low.call(node, op, target, (dq.args[0],) + args, dict(node.kwargs))
    new.meta[FLOAT_NAME] = node.meta.get(FLOAT_NAME, node.name)  # (for tools.compare: the same value in float)
    _, several = INTEGER_OPS[kind]
    if not several:
        return low.call(node, "call_function", dq.target, (new,) + tuple(dq.args[1:]))
    for user in list(node.users):
        if not (user.op == "call_function" and user.target is operator.getitem):
            raise AssertionError(f"{node.name}: a multi-output op used other than through getitem")
        item = low.call(user, "call_function", operator.getitem, (new,) + tuple(user.args[1:]))
        user.replace_all_uses_with(low.call(user, "call_function", dq.target, (item,) + tuple(dq.args[1:])))
    return new


# tensor attributes a dequantize does not change (dtype does: it stays on the dequantized value)
_SAME_ATTRIBUTES = frozenset({"shape", "ndim", "device", "is_cuda", "is_cpu"})


def _attribute_match(node: fx.Node, low: Lowering) -> Optional[dict[str, fx.Node]]:
    """``getattr(dequantize(q), "shape")`` (``x.shape`` in the model): read it from ``q``, so the dequantize is not
    computed only for its shape."""
    if node.op != "call_function" or node.target is not getattr or len(node.args) != 2:
        return None
    src, attr = node.args
    ok = attr in _SAME_ATTRIBUTES and kind_of(src, low.modules) == "dq"
    return {"out": node, "dq": src} if ok else None  # type: ignore[dict-item]


def _attribute_replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    return low.call(m["out"], "call_function", getattr, (m["dq"].args[0], m["out"].args[1]))


def _query_replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    node = m["out"]
    return low.call(node, node.op, node.target, (node.args[0].args[0],) + tuple(node.args[1:]), dict(node.kwargs))


_CONV_FIELDS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_FUNCTIONAL: dict[Any, tuple[type, type, tuple[str, ...]]] = {
    F.conv1d: (nn.Conv1d, ref.Conv1d, _CONV_FIELDS), F.conv2d: (nn.Conv2d, ref.Conv2d, _CONV_FIELDS),
    F.conv3d: (nn.Conv3d, ref.Conv3d, _CONV_FIELDS), F.linear: (nn.Linear, ref.Linear, ("input", "weight", "bias")),
}
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _functional_args(node: fx.Node) -> dict[str, Any]:
    names = _FUNCTIONAL[node.target][2]
    args = {**{k: v for k, v in _CONV_DEFAULTS.items() if k in names}, **dict(zip(names, node.args)),
            **node.kwargs}
    return args


def _functional_when(low: Lowering, m: dict[str, fx.Node]) -> str:
    args = _functional_args(m["out"])
    w, b = args.get("weight"), args.get("bias")
    kind = kind_of(args.get("input"), low.modules)
    if kind != "dq" and not (m["out"].target is F.linear and kind != "q"):  # linear: dynamic / weight-only rules too
        return "input is not statically quantized"
    int_weight = isinstance(w, fx.Node) and w.target in (_OPS.dequantize_per_channel.default,
                                                          _OPS.dequantize_per_tensor.default) \
        and isinstance(w.args[0], fx.Node) and w.args[0].op == "get_attr"
    if not int_weight and (m["out"].target is not F.linear or _float16_weight(low, w) is None):
        return "weight is not a quantized constant"
    return "" if b is None or (isinstance(b, fx.Node) and b.op == "get_attr") else "bias is not a constant"


def _float16_weight(low: Lowering, w: Any) -> Optional[torch.Tensor]:
    """The float value of a float16 weight cast: ``w.to(float16).to(float32)`` of a constant (float16 recipes)."""
    casts = []
    while isinstance(w, fx.Node) and w.op == "call_method" and w.target == "to" and len(w.args) == 2 \
            and not w.kwargs and len(casts) < 2:
        casts.append(w.args[1])
        w = w.args[0]
    if casts != [torch.float32, torch.float16]:
        return None
    found = constant_value(low.gm, w)
    return None if found is None else found[0].detach().to(torch.float16).to(torch.float32)


def _functional_replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    node = m["out"]
    args = _functional_args(node)
    float_cls, ref_cls, _ = _FUNCTIONAL[node.target]
    w = args["weight"]
    half = _float16_weight(low, w) if node.target is F.linear else None
    if half is not None:  # float16 weight-only: the reference module casts the weight as the graph did
        float_mod = nn.Linear(half.shape[1], half.shape[0], args["bias"] is not None)
        with torch.no_grad():
            float_mod.weight.copy_(half)
            if args["bias"] is not None:
                float_mod.bias.copy_(attr_value(low.gm, args["bias"]))
        mod = ref_cls.from_float(float_mod, {"qscheme": None, "dtype": torch.float16})
        return low.call_module(node, f"{node.name}", mod, (args["input"],))
    w_int, scale, zp = (attr_value(low.gm, a) for a in w.args[:3])
    per_channel = w.target == _OPS.dequantize_per_channel.default
    qmin, qmax, dtype = w.args[-3:]
    weight = w.target(w_int, scale, zp, *w.args[3:])
    bias = None if args["bias"] is None else attr_value(low.gm, args["bias"]).detach()
    if float_cls is nn.Linear:
        float_mod = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
    else:
        float_mod = float_cls(weight.shape[1] * args["groups"], weight.shape[0], tuple(weight.shape[2:]),
                              args["stride"], args["padding"], args["dilation"], args["groups"], bias is not None)
    with torch.no_grad():
        float_mod.weight.copy_(weight)
        if bias is not None:
            float_mod.bias.copy_(bias)
    qscheme = torch.per_channel_affine if per_channel else torch.per_tensor_affine
    qparams = {"qscheme": qscheme, "dtype": dtype, "scale": scale, "zero_point": zp, "quant_min": qmin,
               "quant_max": qmax, **({"axis": w.args[3]} if per_channel else {})}
    mod = ref_cls.from_float(float_mod, qparams)
    original = str(w.args[0].target).removesuffix("_int")
    if low.keep_original_weights and hasattr(low.gm, original):
        mod.original_weight = nn.Parameter(getattr(low.gm, original).detach(), requires_grad=False)
    return low.call_module(node, f"{node.name}", mod, (args["input"],))


def _roots(keys: Any) -> frozenset:
    return frozenset(keys)


NORMALIZE_RULES: tuple[Rule, ...] = (
    Rule("drop_identity", _roots(IDENTITY_OPS), Pat("*", name="out"), lambda low, m: m["out"].args[0],
         _identity_when),
    Rule("drop_identity", frozenset({"*"}), _named_identity_match, lambda low, m: m["out"].args[0]),
    Rule("functional_to_module", _roots(_FUNCTIONAL), Pat("*", name="out"), _functional_replace, _functional_when),
    Rule("integer_op", _roots(INTEGER_OPS), Pat("*", name="out"), _sink_replace, _sink_when),
    Rule("shape_query", _roots(SHAPE_QUERIES), Pat("*", (Pat("dq"),), name="out"), _query_replace),
    Rule("shape_attribute", frozenset({getattr}), _attribute_match, _attribute_replace),
)
