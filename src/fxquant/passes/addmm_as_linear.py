"""addmm_as_linear: a matrix product with a constant weight written as ``torch.addmm`` becomes ``F.linear``.

Hugging Face's ``Conv1D`` (GPT-2, OpenAI GPT, Decision Transformer) computes ``torch.addmm(self.bias, x,
self.weight)`` with the weight stored ``(in, out)``. No backend pattern names ``addmm`` (torch.ao's neither), so
these layers -- all the attention and MLP projections of GPT-2 -- stayed float under every recipe. Here::

    addmm(b, x, W)          ->  linear(x, W.t(), b)       (b: 1-d constant, W: 2-d constant, beta = alpha = 1)

which the linear patterns quantize like any ``F.linear``; the conversion folds the quantized ``W.t()`` into an
int8 constant (``to_reference.constant_value``) and lowering builds the int8 / dynamic / weight-only linear.

Bit-identical in float: ``F.linear`` of a 2-d input with a bias calls ``addmm(b, x, W.t().t())``, the same
product on the same strides. Nodes whose qconfig is None are left as they are; the rewritten node keeps the
qconfig resolved for ``addmm`` (``QConfigMapping.set_object_type(torch.addmm, ...)`` still applies, at prepare and in
a convert-time mapping).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ..pipeline import Context, register_pass
from .assign_qconfig import QCONFIG_KEY
from .lower_match import attr_value

__all__ = ["addmm_as_linear", "REWRITTEN_FROM"]

REWRITTEN_FROM = "fxquant_rewritten_from"  # node.meta: the op the user's code called (torch.addmm)
_CARRIED_META = (QCONFIG_KEY, "fxquant_scope", "nn_module_stack", "stack_trace")


def _constant(gm: fx.GraphModule, node: Any, dims: int) -> bool:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    value = attr_value(gm, node)
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == dims


def _rewritable(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.addmm or len(node.args) != 3:
        return False
    if node.meta.get(QCONFIG_KEY) is None or any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
        return False
    if set(node.kwargs) - {"beta", "alpha"}:
        return False
    bias, _, weight = node.args
    return _constant(gm, bias, 1) and _constant(gm, weight, 2)


@register_pass("addmm_as_linear")
def addmm_as_linear(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """Rewrite ``addmm(b, x, W)`` of constants ``b`` / ``W`` as ``linear(x, W.t(), b)`` (see the module docstring)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if not _rewritable(gm, node):
            continue
        bias, x, weight = node.args
        with graph.inserting_before(node):
            transposed = graph.call_method("t", (weight,))
            linear = graph.call_function(F.linear, (x, transposed, bias))
        transposed.meta.update({k: node.meta[k] for k in _CARRIED_META if k in node.meta})
        linear.meta.update(node.meta)
        linear.meta[REWRITTEN_FROM] = torch.addmm
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
    return gm
