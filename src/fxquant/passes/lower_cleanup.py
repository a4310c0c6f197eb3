"""cleanup: after ``lower``, swap the quantize / dequantize operators that remain for fast modules and drop what
nothing reads any more.

Before::   q = fxquant.quantize_per_tensor(x, x_scale, x_zp, 0, 255, uint8)       (bit-exact, slow reference op)
           y = fxquant.dequantize_per_tensor(q2, s, zp, 0, 255, uint8)
           s, zp = getitem(choose_qparams(x, 0, 127, eps, uint8)); d = dequantize(quantize(x, s, zp), s, zp)
After::    q = self.x_quantize(x)              # fxquant.nn.quantized.Quantize (qparams as buffers)
           y = self.output_dequantize(q2)      # DeQuantize
           d = self.x_fake_quant(x)            # FakeQuantizeDynamic

Then dead nodes, unused submodules and root buffers / parameters that no node reads are removed. With
``keep_original_weights`` the float weight (and bias) of every lowered module is kept in
``model.original_weights_lookup[module name]`` (torch.ao's attribute) and as ``module.original_weight``.
"""
from __future__ import annotations

from typing import Any

from torch import fx, nn

from .. import nn as fnn
from ..pipeline import Context, register_pass
from .lower_build import Lowering
from .lower_match import attr_value, kind_of

__all__ = ["cleanup", "cleanup_graph_module", "ORIGINAL_WEIGHTS_LOOKUP"]

Q = fnn.quantized
ORIGINAL_WEIGHTS_LOOKUP = "original_weights_lookup"


def _static_module(low: Lowering, node: fx.Node, kind: str) -> nn.Module:
    scale, zp = attr_value(low.gm, node.args[1]), attr_value(low.gm, node.args[2])
    qmin, qmax, dtype = node.args[3:6]
    if kind == "dq":
        return Q.DeQuantize(scale, zp, dtype, qmin, qmax)
    # (no channels-last copy for convs: onednn's own reorder of uint8 input costs the same, measured at batch 16,
    # and nothing at batch 1)
    return Q.Quantize(scale, zp, dtype, qmin, qmax)


def _dynamic_module(low: Lowering, dq: fx.Node) -> Any:
    """FakeQuantizeDynamic for dequantize(quantize(x, getitem(cq, 0), getitem(cq, 1))) with cq affine per tensor."""
    q = dq.args[0]
    if kind_of(q, low.modules) != "q_dynamic" or not isinstance(q.args[1], fx.Node):
        return None
    chooser = q.args[1].args[0] if q.args[1].args else None
    if kind_of(chooser, low.modules) != "choose_qparams" or (len(chooser.args) > 5 and chooser.args[5]):
        return None
    x, qmin, qmax, _, dtype = chooser.args[:5]
    return (x, Q.FakeQuantizeDynamic(qmin, qmax, dtype)) if x is q.args[0] else None


def _swap_qdq(low: Lowering) -> None:
    for node in list(low.graph.nodes):
        if not node.users:
            continue
        kind = kind_of(node, low.modules)
        if kind in ("q", "dq") and not (isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"):
            mod = _static_module(low, node, kind)
            base = f"{node.args[0].name}_{'quantize' if kind == 'q' else 'dequantize'}"
            node.replace_all_uses_with(low.call_module(node, base, mod, (node.args[0],)))
        elif kind == "dq_dynamic":
            found = _dynamic_module(low, node)
            if found is not None:
                node.replace_all_uses_with(low.call_module(node, f"{found[0].name}_fake_quant", found[1],
                                                           (found[0],)))


def _drop_unread_attributes(gm: fx.GraphModule, low: Lowering) -> None:
    read = {str(n.target).split(".")[0] for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name in list(gm._buffers) + list(gm._parameters):
        if name not in read:  # (with keep_original_weights the lowered modules hold the float weights)
            delattr(gm, name)


def cleanup_graph_module(gm: fx.GraphModule, low: Lowering) -> fx.GraphModule:
    """Swap remaining q / dq ops for modules, remove dead code and unread state (see the module docstring)."""
    _swap_qdq(low)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    _drop_unread_attributes(gm, low)
    if low.keep_original_weights:
        setattr(gm, ORIGINAL_WEIGHTS_LOOKUP, dict(low.original_weights))
    gm.graph.lint()
    gm.recompile()
    return gm


@register_pass("cleanup")
def cleanup(gm: nn.Module, ctx: Context) -> nn.Module:
    """Run after ``lower`` (which leaves its record in ``gm.meta['fxquant_lowering']``)."""
    assert isinstance(gm, fx.GraphModule)
    low = gm.meta.pop("fxquant_lowering", None) or Lowering(gm, ctx.keep_original_weights)
    low.modules = dict(gm.named_modules(remove_duplicate=False))
    return cleanup_graph_module(gm, low)
