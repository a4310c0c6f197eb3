"""Lowering rules for normalizations, softmax and products of two activations (static quantization)::

    quantize(norm(dequantize(q)))                            -> QuantizedNorm(q)      LayerNorm / GroupNorm /
                                                                                      InstanceNorm, module or F.*
    quantize(softmax(c * dequantize(q) + d, dim))            -> QuantizedSoftmax(q)   (scalar chain: * / + -)
    quantize(softmax(c * matmul(dequantize(a), dequantize(b)) + d, dim))
                                                             -> QuantizedMatmul(a, b) with a softmax
    quantize(matmul|bmm(dequantize(a), dequantize(b)))       -> QuantizedMatmul(a, b)

They are anchored at the quantize of the op's output and tried before the element-wise rules. Each replaces the
dequantize / float op / quantize by one module on the integer tensors (see :mod:`fxquant.nn.quantized.normalization`
and :mod:`fxquant.nn.quantized.matmul` for the arithmetic and its exactness).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import nn as fnn
from ..kernels.uint8 import RANGES
from .lower_build import Lowering, Rule
from .lower_match import attr_value, kind_of
from .lower_ops import node_arg

__all__ = ["NORM_RULES", "NORM_PARSERS", "scalar_constant"]

Q = fnn.quantized
Match = dict[str, fx.Node]


# --------------------------------------------------------------------------------------------------- norms
@dataclasses.dataclass(frozen=True)
class NormSpec:
    """What :class:`fxquant.nn.quantized.QuantizedNorm` needs from one normalization node."""

    kind: str
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float
    normalized_shape: tuple[int, ...] = ()
    num_groups: int = 1
    no_batch_dim: Optional[int] = None


Parsed = Union[NormSpec, str]  # the spec, or why the node cannot be lowered


def _constant(low: Lowering, arg: Any, what: str) -> Union[Optional[torch.Tensor], str]:
    """A float parameter argument: None, or the tensor a get_attr reads; a reason string otherwise."""
    if arg is None:
        return None
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = attr_value(low.gm, arg)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach()
    return f"{what} is not a float constant"


def _functional_affine(low: Lowering, node: fx.Node, w_index: int, b_index: int) -> Union[tuple, str]:
    weight = _constant(low, node_arg(node, w_index, "weight"), "weight")
    bias = _constant(low, node_arg(node, b_index, "bias"), "bias")
    for value in (weight, bias):
        if isinstance(value, str):
            return value
    return weight, bias


def _module_affine(mod: nn.Module) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
    return (None if weight is None else weight.detach(), None if bias is None else bias.detach())


def _layer_norm_module(low: Lowering, node: fx.Node, mod: Any) -> Parsed:
    weight, bias = _module_affine(mod)
    return NormSpec("layer_norm", weight, bias, mod.eps, normalized_shape=tuple(mod.normalized_shape))


def _layer_norm_function(low: Lowering, node: fx.Node, mod: Any) -> Parsed:
    shape, eps = node_arg(node, 1, "normalized_shape"), node_arg(node, 4, "eps", 1e-5)
    shape = (shape,) if isinstance(shape, int) else shape
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) for d in shape) \
            or not isinstance(eps, (int, float)):
        return "normalized_shape / eps are not constants"
    affine = _functional_affine(low, node, 2, 3)
    return affine if isinstance(affine, str) else NormSpec("layer_norm", *affine, float(eps),
                                                           normalized_shape=tuple(shape))


def _group_norm_module(low: Lowering, node: fx.Node, mod: Any) -> Parsed:
    weight, bias = _module_affine(mod)
    return NormSpec("group_norm", weight, bias, mod.eps, num_groups=mod.num_groups)


def _group_norm_function(low: Lowering, node: fx.Node, mod: Any) -> Parsed:
    groups, eps = node_arg(node, 1, "num_groups"), node_arg(node, 4, "eps", 1e-5)
    if not isinstance(groups, int) or not isinstance(eps, (int, float)):
        return "num_groups / eps are not constants"
    affine = _functional_affine(low, node, 2, 3)
    return affine if isinstance(affine, str) else NormSpec("group_norm", *affine, float(eps), num_groups=groups)


def _instance_norm_module(low: Lowering, node: fx.Node, mod: Any) -> Parsed:
    if mod.track_running_stats and not mod.training:
        return "normalizes with its running statistics in eval mode (not by the input's own)"
    weight, bias = _module_affine(mod)
    return NormSpec("instance_norm", weight, bias, mod.eps, no_batch_dim=mod._get_no_batch_dim())


def _instance_norm_function(low: Lowering, node: fx.Node, mod: Any) -> Parsed:
    running = (node_arg(node, 1, "running_mean"), node_arg(node, 2, "running_var"))
    use_input_stats, eps = node_arg(node, 5, "use_input_stats", True), node_arg(node, 7, "eps", 1e-5)
    if any(r is not None for r in running) or use_input_stats is not True:
        return "uses (or updates) running statistics"
    if not isinstance(eps, (int, float)):
        return "eps is not a constant"
    affine = _functional_affine(low, node, 3, 4)
    return affine if isinstance(affine, str) else NormSpec("instance_norm", *affine, float(eps))


# op kind -> parser (lowering, node, module or None) -> NormSpec or the reason it does not apply
NORM_PARSERS: dict[Any, Callable[[Lowering, fx.Node, Any], Parsed]] = {
    nn.LayerNorm: _layer_norm_module, F.layer_norm: _layer_norm_function, torch.layer_norm: _layer_norm_function,
    nn.GroupNorm: _group_norm_module, F.group_norm: _group_norm_function, torch.group_norm: _group_norm_function,
    **{cls: _instance_norm_module for cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)},
    F.instance_norm: _instance_norm_function,
}


def _int_dtypes(low: Lowering, *nodes: fx.Node) -> str:
    dtypes = {low.qparams(n).dtype for n in nodes}
    return "" if dtypes <= set(RANGES) else f"activation dtypes {sorted(map(str, dtypes))}"


def _norm_match(node: fx.Node, low: Lowering) -> Optional[Match]:
    op = node.args[0]
    if kind_of(op, low.modules) not in NORM_PARSERS or len(op.users) != 1 or not op.args:
        return None
    dq = op.args[0]
    return {"out": node, "op": op, "dq_x": dq} if kind_of(dq, low.modules) == "dq" else None


def _norm_parse(low: Lowering, m: Match) -> Parsed:
    op = m["op"]
    return NORM_PARSERS[kind_of(op, low.modules)](low, op, low.module(op))


def _norm_when(low: Lowering, m: Match) -> str:
    spec = _norm_parse(low, m)
    return spec if isinstance(spec, str) else _int_dtypes(low, m["dq_x"], m["out"])


def _norm_replace(low: Lowering, m: Match) -> fx.Node:
    spec = _norm_parse(low, m)
    assert isinstance(spec, NormSpec)
    x, out = low.qparams(m["dq_x"]), low.qparams(m["out"])
    mod = Q.QuantizedNorm(spec.kind, x.scale, x.zero_point, out.scale, out.zero_point, spec.weight, spec.bias,
                          spec.eps, spec.normalized_shape, spec.num_groups, spec.no_batch_dim, out.dtype,
                          out.quant_min, out.quant_max)
    op = m["op"]
    return low.call_module(m["out"], str(op.target) if op.op == "call_module" else op.name, mod, (m["dq_x"].args[0],))


# --------------------------------------------------------------------------------------------------- softmax
_SOFTMAX = frozenset({F.softmax, torch.softmax, "softmax", nn.Softmax})
_MATMUL = frozenset({"matmul", torch.bmm, "bmm"})
_SCALAR_OPS = frozenset({"mul", "add", operator.sub, "sub", operator.truediv, "div", torch.div})


def scalar_constant(low: Lowering, arg: Any) -> Optional[float]:
    """``arg`` as a Python number when it is one (not a bool) or a get_attr of a 0-d float tensor, else None."""
    if isinstance(arg, fx.Node):
        if arg.op != "get_attr":
            return None
        value = attr_value(low.gm, arg)
        ok = isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()
        return float(value) if ok else None
    return float(arg) if isinstance(arg, (int, float)) and not isinstance(arg, bool) else None


def _scalar_step(low: Lowering, node: fx.Node) -> Optional[tuple[fx.Node, float]]:
    """``(tensor input, factor)`` when ``node`` is ``factor * input + constant`` with scalar constants."""
    kind = kind_of(node, low.modules)
    if kind not in _SCALAR_OPS or len(node.args) != 2 or node.kwargs or len(node.users) != 1:
        return None
    first, second = node.args
    first_is_tensor = isinstance(first, fx.Node) and scalar_constant(low, first) is None
    tensor, const = (first, scalar_constant(low, second)) if first_is_tensor else (second, scalar_constant(low, first))
    if const is None or not isinstance(tensor, fx.Node):
        return None
    if kind == "mul":
        return tensor, const
    if kind == "add":
        return tensor, 1.0
    if kind in (operator.sub, "sub"):
        return tensor, 1.0 if first_is_tensor else -1.0
    return (tensor, 1.0 / const) if first_is_tensor and const != 0 else None  # x / c


def _logits(low: Lowering, node: fx.Node) -> tuple[list[fx.Node], float, fx.Node]:
    """``(scalar ops, multiplier, source)``: ``node`` = multiplier * source + a constant through the ops."""
    chain, multiplier = [], 1.0
    while True:
        step = _scalar_step(low, node)
        if step is None:
            return chain, multiplier, node
        chain.append(node)
        node, factor = step
        multiplier *= factor


def _softmax_dim(low: Lowering, op: fx.Node) -> Union[int, str]:
    mod = low.module(op)
    if mod is not None:
        dim = mod.dim
    else:
        dim = node_arg(op, 1, "dim")
        dtype = node_arg(op, 3 if op.target is F.softmax else 2, "dtype")
        if dtype not in (None, torch.float32):
            return f"softmax computes in {dtype}"
    return dim if isinstance(dim, int) else "softmax dim is not a constant int"


def _softmax_match(node: fx.Node, low: Lowering) -> Optional[Match]:
    op = node.args[0]
    if kind_of(op, low.modules) not in _SOFTMAX or len(op.users) != 1 or not op.args:
        return None
    chain, _, src = _logits(low, op.args[0])
    m = {"out": node, "softmax": op, **{f"scalar{i}": n for i, n in enumerate(chain)}}
    if kind_of(src, low.modules) == "dq":
        return {**m, "dq_x": src}
    if kind_of(src, low.modules) in _MATMUL and len(src.users) == 1 and len(src.args) == 2 and not src.kwargs \
            and all(kind_of(a, low.modules) == "dq" for a in src.args):
        return {**m, "mm": src, "dq_a": src.args[0], "dq_b": src.args[1]}
    return None


def _softmax_when(low: Lowering, m: Match) -> str:
    dim = _softmax_dim(low, m["softmax"])
    if isinstance(dim, str):
        return dim
    return _int_dtypes(low, *(m[k] for k in ("dq_x", "dq_a", "dq_b", "out") if k in m))


def _softmax_replace(low: Lowering, m: Match) -> fx.Node:
    q, op = m["out"], m["softmax"]
    dim = _softmax_dim(low, op)
    assert isinstance(dim, int)
    _, multiplier, _ = _logits(low, op.args[0])
    out = low.qparams(q)
    name = str(op.target) if op.op == "call_module" else op.name
    if "dq_x" in m:
        x = low.qparams(m["dq_x"])
        mod = Q.QuantizedSoftmax(dim, x.scale * multiplier, out.scale, out.zero_point, out.dtype, out.quant_min,
                                 out.quant_max)
        return low.call_module(q, name, mod, (m["dq_x"].args[0],))
    return _matmul_call(low, m, softmax=(dim, multiplier))


# --------------------------------------------------------------------------------------------------- matmul
def _matmul_match(node: fx.Node, low: Lowering) -> Optional[Match]:
    mm = node.args[0]
    if kind_of(mm, low.modules) not in _MATMUL or len(mm.users) != 1 or len(mm.args) != 2 or mm.kwargs:
        return None
    a, b = mm.args
    if not (kind_of(a, low.modules) == kind_of(b, low.modules) == "dq"):
        return None
    return {"out": node, "mm": mm, "dq_a": a, "dq_b": b}


def _matmul_when(low: Lowering, m: Match) -> str:
    return _int_dtypes(low, m["dq_a"], m["dq_b"], m["out"])


def _matmul_call(low: Lowering, m: Match, softmax: Optional[tuple[int, float]] = None) -> fx.Node:
    a, b, out = (low.qparams(m[k]) for k in ("dq_a", "dq_b", "out"))
    dim, multiplier = softmax if softmax is not None else (None, 1.0)
    mod = Q.QuantizedMatmul((a.scale, a.zero_point), (b.scale, b.zero_point), (out.scale, out.zero_point),
                            out.dtype, out.quant_min, out.quant_max, softmax_dim=dim, logit_multiplier=multiplier)
    return low.call_module(m["out"], m["mm"].name, mod, (m["dq_a"].args[0], m["dq_b"].args[0]))


_Q = frozenset({"q"})
NORM_RULES: tuple[Rule, ...] = (
    Rule("norm", _Q, _norm_match, _norm_replace, _norm_when),
    Rule("softmax", _Q, _softmax_match, _softmax_replace, _softmax_when),
    Rule("matmul", _Q, _matmul_match, lambda low, m: _matmul_call(low, m), _matmul_when),
)
