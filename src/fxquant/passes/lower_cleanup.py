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
from ..kernels import uint8
from ..pipeline import Context, register_pass
from .common import delete_unused_submodules
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
    # Read only by 2-d convs: quantize straight into the channels-last layout their int8 kernels read (the native
    # pass does both at once; FBGEMM's plan would copy a contiguous uint8 image, ~0.1 ms for 3x224x224 -- 3% of
    # mobilenet_v3_small at batch 1).
    return Q.Quantize(scale, zp, dtype, qmin, qmax, channels_last=_read_by_convs_only(low, node))


def _read_by_convs_only(low: Lowering, node: fx.Node) -> bool:
    return bool(node.users) and all(
        user.op == "call_module" and type(low.gm.get_submodule(str(user.target))) is Q.Conv2d for user in node.users)


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


def _upsamples(node: fx.Node) -> bool:
    """A nearest-neighbour integer resize that only enlarges (scale factors >= 1): it copies values, so an
    element-wise table commutes with it and is cheaper on its smaller input."""
    if not (node.op == "call_function" and node.target is uint8.interpolate):
        return False
    args = list(node.args) + [None] * 6
    size, scale, mode = (node.kwargs.get(k, args[i]) for i, k in ((1, "size"), (2, "scale_factor"), (3, "mode")))
    scales = scale if isinstance(scale, (tuple, list)) else (scale,)
    return str(mode or "nearest").startswith("nearest") and size is None and \
        all(isinstance(f, (int, float)) and f >= 1 for f in scales)


def _table_of(low: Lowering, node: Any) -> Any:
    mod = low.modules.get(str(node.target)) if isinstance(node, fx.Node) and node.op == "call_module" else None
    return mod if isinstance(mod, Q.LookupTable) else None


def _compose_tables(low: Lowering) -> None:
    """``second(first(q))`` -> one table ``second[first]`` where ``first`` has no other reader (exact: it is the
    same integer function)."""
    for node in list(low.graph.nodes):
        second, first_node = _table_of(low, node), node.args[0] if node.args else None
        first = _table_of(low, first_node)
        if second is None or first is None or len(first_node.users) != 1:
            continue
        combined = uint8.lookup(first.table, second.table)
        out = getattr(second, "output_scale", None), getattr(second, "output_zero_point", None)
        qparams = None if out[0] is None or out[1] is None else (float(out[0]), int(out[1]))
        with low.graph.inserting_before(node):
            new = low.call_module(node, str(node.target), Q.LookupTable(combined, qparams), (first_node.args[0],))
        node.replace_all_uses_with(new)
        low.graph.erase_node(node)
        low.graph.erase_node(first_node)


def _sink_tables(low: Lowering) -> None:
    """``table(upsample(q))`` -> ``upsample(table(q))`` where the upsample has no other reader."""
    for node in list(low.graph.nodes):
        if node.op != "call_module" or not isinstance(low.modules.get(str(node.target)), Q.LookupTable):
            continue
        up = node.args[0]
        if not (isinstance(up, fx.Node) and _upsamples(up) and len(up.users) == 1 and isinstance(up.args[0], fx.Node)):
            continue
        with low.graph.inserting_before(up):
            early = low.graph.call_module(str(node.target), (up.args[0],))
        early.meta.update(node.meta)
        up.args = (early,) + tuple(up.args[1:])
        node.replace_all_uses_with(up)
        low.graph.erase_node(node)


def _drop_unread_attributes(gm: fx.GraphModule, low: Lowering) -> None:
    read = {str(n.target).split(".")[0] for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name in list(gm._buffers) + list(gm._parameters):
        if name not in read:  # (with keep_original_weights the lowered modules hold the float weights)
            delattr(gm, name)


def cleanup_graph_module(gm: fx.GraphModule, low: Lowering, recompile: bool = True) -> fx.GraphModule:
    """Swap remaining q / dq ops for modules, remove dead code and unread state (see the module docstring); then
    regenerate the code unless ``recompile`` is False (the pass: ``pipeline.run`` does it once per stage)."""
    _swap_qdq(low)
    _sink_tables(low)
    _compose_tables(low)
    gm.graph.eliminate_dead_code()
    delete_unused_submodules(gm)  # torch's delete_all_unused_submodules is quadratic in the module count
    _drop_unread_attributes(gm, low)
    if low.keep_original_weights:
        setattr(gm, ORIGINAL_WEIGHTS_LOOKUP, dict(low.original_weights))
    gm.graph.lint()
    if recompile:
        gm.recompile()
    return gm


@register_pass("cleanup")
def cleanup(gm: nn.Module, ctx: Context) -> nn.Module:
    """Run after ``lower`` (which leaves its record in ``gm.meta['fxquant_lowering']``)."""
    assert isinstance(gm, fx.GraphModule)
    low = gm.meta.pop("fxquant_lowering", None) or Lowering(gm, ctx.keep_original_weights)
    low.modules = dict(gm.named_modules(remove_duplicate=False))
    return cleanup_graph_module(gm, low, recompile=False)
