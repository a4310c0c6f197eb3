"""to_reference: turn an observed model into a reference quantized model (quantize / dequantize around float ops).

Before::  x -> app_0 -> conv -> app_1 -> out                    (observers hold statistics)
After::   x -> quantize -> dequantize -> ref_conv -> quantize -> dequantize -> out

* every observer becomes ``torch.ops.fxquant.quantize_* -> dequantize_*`` with its qparams stored as buffers of the
  model; a dynamic observer becomes ``choose_qparams -> quantize -> dequantize`` at run time; an observer of a
  constant (a functional op's weight) is folded: the int weight is stored, only the dequantize stays;
* each quantized weighted module becomes its reference module (int weight + qparams, float compute); QAT modules
  keep the qparams they trained with;
* standalone submodules are converted recursively.
"""
from __future__ import annotations

import copy
import math
import operator
import warnings
from typing import Any, Optional

import torch
from torch import fx, nn

from .. import ops as _registers_ops  # noqa: F401  (registers torch.ops.fxquant)
from .._dtypes import dtype_range, is_float_qdtype, normalize_dtype
from ..distributed import warn_if_unsynced
from ..pipeline import Context, register_pass
from .common import delete_unused_submodules, get_state, is_observer, set_module
from .convert_builder import GraphBuilder
from .convert_weights import WeightQParams, weight_qparams_of

__all__ = ["to_reference", "weight_qparams_of", "ConvertError", "OBSERVED_RANGE", "constant_value"]

OBSERVED_RANGE = "fxquant_observed_range"  # node.meta key on quantize nodes: (quant_min, quant_max) of the observer

ops = torch.ops.fxquant
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)


class ConvertError(ValueError):
    """convert_fx was given something it cannot convert."""


def _is_per_channel(obs: nn.Module) -> bool:
    return getattr(obs, "qscheme", None) in _PER_CHANNEL


def _static(b: GraphBuilder, node: fx.Node, obs: nn.Module, dtype: torch.dtype) -> fx.Node:
    src = node.args[0]
    qmin, qmax = dtype_range(dtype)
    s_name, z_name = b.qparams(obs, src.name)
    per_channel = _is_per_channel(obs)
    constant = constant_value(b.gm, src)
    if constant is not None:  # a constant (weight, or a view of one): quantize now, keep only the dequantize
        value, root = constant
        scale, zp = getattr(b.gm, s_name), getattr(b.gm, z_name)
        q = (ops.quantize_per_channel(value.detach(), scale, zp, obs.ch_axis, qmin, qmax, dtype) if per_channel
             else ops.quantize_per_tensor(value.detach(), scale, zp, qmin, qmax, dtype))
        src = b.get_attr(b.buffer(f"{str(root.target).replace('.', '_')}_int", q.contiguous()))
        return _dequant(b, src, s_name, z_name, qmin, qmax, dtype, obs if per_channel else None)
    if per_channel:
        qnode = b.call(ops.quantize_per_channel.default, (
            src, b.get_attr(s_name), b.get_attr(z_name), obs.ch_axis, qmin, qmax, dtype))
    else:
        qnode = b.call(ops.quantize_per_tensor.default, (
            src, b.get_attr(s_name), b.get_attr(z_name), qmin, qmax, dtype))
    # The q op clamps to the dtype's range (torch.ao's reference numerics); lowering may use the observer's
    # narrower range (x86 reduce_range: 0..127), which kernels without VNNI need to stay exact.
    qnode.meta[OBSERVED_RANGE] = (getattr(obs, "quant_min", qmin), getattr(obs, "quant_max", qmax))
    return _dequant(b, qnode, s_name, z_name, qmin, qmax, dtype, obs if per_channel else None)


# ops that only re-view a tensor: a chain of them over a get_attr is a constant the conversion may evaluate
_VIEW_METHODS = frozenset({"t", "transpose", "permute", "contiguous", "reshape", "view", "flatten", "squeeze",
                           "unsqueeze", "detach"})
_VIEW_FUNCTIONS = frozenset({torch.t, torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.squeeze,
                             torch.unsqueeze, torch.Tensor.t, torch.Tensor.transpose, torch.Tensor.permute})


def constant_value(gm: fx.GraphModule, node: Any) -> Optional[tuple[torch.Tensor, fx.Node]]:
    """``(value, get_attr node)`` when ``node`` reads a tensor attribute, directly or through view ops with
    constant arguments (``self.weight.t()``: Hugging Face's ``Conv1D`` rewritten as ``F.linear``), else None."""
    chain = []
    while isinstance(node, fx.Node) and node.op != "get_attr":
        view = (node.op == "call_method" and node.target in _VIEW_METHODS) or \
            (node.op == "call_function" and node.target in _VIEW_FUNCTIONS)
        rest = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, fx.Node)]
        if not view or rest or not node.args:
            return None
        chain.append(node)
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return None
    value = _fetch_attr(gm, str(node.target))
    if not isinstance(value, torch.Tensor):
        return None
    for step in reversed(chain):
        fn = getattr(torch.Tensor, step.target) if step.op == "call_method" else step.target
        value = fn(value, *step.args[1:], **step.kwargs)
    return value, node


def _fetch_attr(root: nn.Module, target: str) -> torch.Tensor:
    """The value a ``get_attr`` node reads (dotted path)."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _dequant(b: GraphBuilder, q: fx.Node, s_name: str, z_name: str, qmin: int, qmax: int, dtype: torch.dtype,
             per_channel_obs: Optional[nn.Module]) -> fx.Node:
    if per_channel_obs is not None:
        return b.call(ops.dequantize_per_channel.default, (
            q, b.get_attr(s_name), b.get_attr(z_name), per_channel_obs.ch_axis, qmin, qmax, dtype))
    return b.call(ops.dequantize_per_tensor.default, (
        q, b.get_attr(s_name), b.get_attr(z_name), qmin, qmax, dtype))


# Backends whose dynamic int8 kernels take 7-bit activations: torch.ao's reference conversion reduces the range of
# every dynamically quantized activation on the x86 / fbgemm engines, whatever the observer says.
_DYNAMIC_REDUCE_RANGE_BACKENDS = ("native", "x86", "fbgemm")


def _dynamic(b: GraphBuilder, node: fx.Node, obs: nn.Module, dtype: torch.dtype) -> fx.Node:
    src = node.args[0]
    qmin, qmax = getattr(obs, "quant_min", None), getattr(obs, "quant_max", None)
    if qmin is None or qmax is None:
        qmin, qmax = dtype_range(dtype)
    if b.backend_name in _DYNAMIC_REDUCE_RANGE_BACKENDS and (qmin, qmax) == dtype_range(dtype):
        qmin, qmax = dtype_range(dtype, reduce_range=True)
    eps = float(getattr(obs, "eps", torch.finfo(torch.float32).eps))
    symmetric = getattr(obs, "qscheme", None) in (torch.per_tensor_symmetric, torch.per_channel_symmetric)
    qp = b.call(ops.choose_qparams_per_tensor.default, (src, qmin, qmax, eps, dtype, symmetric))
    scale = b.call(operator.getitem, (qp, 0))
    zp = b.call(operator.getitem, (qp, 1))
    full_min, full_max = dtype_range(dtype)
    q = b.call(ops.quantize_per_tensor.default, (src, scale, zp, full_min, full_max, dtype))
    return b.call(ops.dequantize_per_tensor.default, (q, scale, zp, full_min, full_max, dtype))


def _float_cast(b: GraphBuilder, node: fx.Node, obs: nn.Module, dtype: torch.dtype) -> fx.Node:
    g = b.gm.graph
    return g.call_method("to", (g.call_method("to", (node.args[0], dtype)), torch.float32))


def _replace_observer(b: GraphBuilder, node: fx.Node, obs: nn.Module, float_nodes: set[str]) -> None:
    src = node.args[0]
    dtype = normalize_dtype(getattr(obs, "dtype", torch.float32))
    consumers_float = bool(float_nodes) and all(u.op != "output" and u.name in float_nodes for u in node.users)
    keep_float = dtype in (torch.float32, torch.float, None) or src.name in float_nodes or consumers_float
    with b.gm.graph.inserting_before(node.next):
        if keep_float:
            new = src
        elif is_float_qdtype(dtype):
            new = _float_cast(b, node, obs, dtype)
        elif getattr(obs, "is_dynamic", False):
            new = _dynamic(b, node, obs, dtype)
        else:
            new = _static(b, node, obs, dtype)
    node.replace_all_uses_with(new)
    b.gm.graph.erase_node(node)


def _weighted_part(mod: nn.Module) -> tuple[nn.Module, Optional[int]]:
    """The module holding the weight: a fused container's first child, else the module itself."""
    if isinstance(mod, nn.Sequential) and len(mod) > 0 and hasattr(mod[0], "weight"):
        return mod[0], 0
    return mod, None


def _rnn_weight_names(mod: nn.Module) -> list[str]:
    return [n for n in getattr(mod, "_flat_weights_names", []) if n.startswith("weight")]


def _observe_weights(part: nn.Module, qconfig: Any, wq: WeightQParams) -> dict[str, Any]:
    """Weight qparams as a fresh weight observer gives them: one dict, or {name: dict} for RNNs (one per weight)."""
    if hasattr(part, "weight") and isinstance(part.weight, torch.Tensor):
        return wq(qconfig.weight, part.weight)
    return {name: wq(qconfig.weight, getattr(part, name)) for name in _rnn_weight_names(part)}


def _has_statistics(fake_quant: nn.Module) -> bool:
    """False for a fake quant whose observer never saw data (``min_val`` still empty or infinite)."""
    if isinstance(getattr(fake_quant, "scale", None), nn.Parameter):
        return True  # learned qparams (LearnableFakeQuantize): the parameters are the statistics
    min_val = getattr(getattr(fake_quant, "activation_post_process", None), "min_val", None)
    if not isinstance(min_val, torch.Tensor):
        return True  # no min / max statistics to inspect (learnable scales, custom fake quants): trust it
    return min_val.numel() > 0 and bool(torch.isfinite(min_val).all())


def _qat_weight_qparams(fake_quant: nn.Module, float_weight: torch.Tensor) -> dict[str, Any]:
    """The weight qparams a QAT module trained with. A QAT model converted without any training step has a
    weight fake quant that never ran: a copy of it (observer on) observes the float (BN-folded) weight, as
    torch.ao's convert does, so the scales fit the weight instead of defaulting to 1.0."""
    if not _has_statistics(fake_quant):
        fake_quant = copy.deepcopy(fake_quant)
        if hasattr(fake_quant, "enable_observer"):
            fake_quant.enable_observer()
        with torch.no_grad():
            fake_quant(float_weight.detach())
    return weight_qparams_of(fake_quant)


def _to_reference_module(mod: nn.Module, entry: Any, keep_original: bool, wq: WeightQParams) -> nn.Module:
    """Float / fused / QAT module -> the same structure with its weighted part replaced by the reference module.

    A QAT module keeps the weight qparams of its ``weight_fake_quant`` (those training used, bit for bit; unlike
    torch.ao, which runs the fake quant once more on the folded weight at convert)."""
    qat_fq = getattr(mod, "weight_fake_quant", None)
    if qat_fq is not None and hasattr(mod, "to_float"):
        mod = mod.to_float()
        part, index = _weighted_part(mod)
        weight_qparams = _qat_weight_qparams(qat_fq, part.weight)
    else:
        part, index = _weighted_part(mod)
        weight_qparams = _observe_weights(part, entry.qconfig, wq)
    ref = entry.reference_cls.from_float(part, weight_qparams)
    if keep_original:
        ref.original_weight = part.weight if hasattr(part, "weight") else {
            n: getattr(part, n) for n in _rnn_weight_names(part)}
    if index is None:
        return ref
    mod[index] = ref
    return mod


def _swap_weighted(gm: fx.GraphModule, state: Any, float_nodes: set[str], keep_original: bool) -> None:
    wq = WeightQParams()
    for path, entry in state.weighted_modules.items():
        mod = gm.get_submodule(path)
        if entry.node_name in float_nodes or entry.reference_cls is None:
            if hasattr(mod, "weight_fake_quant") and hasattr(mod, "to_float"):  # a QAT module left in float
                set_module(gm, path, mod.to_float())
            continue
        set_module(gm, path, _to_reference_module(mod, entry, keep_original, wq))


def _unfinished_observers(observers: list[nn.Module]) -> list[str]:
    out = []
    for name, obs in observers:
        min_val = getattr(obs, "min_val", None)
        if isinstance(min_val, torch.Tensor) and min_val.numel() == 1 and min_val.device.type == "cpu":
            if math.isinf(min_val.item()):  # one value: no tensor op
                out.append(name)
        elif isinstance(min_val, torch.Tensor) and min_val.numel() > 0 and torch.isinf(min_val).all():
            out.append(name)
        elif isinstance(min_val, torch.Tensor) and min_val.numel() == 0 and hasattr(obs, "ch_axis"):
            out.append(name)
    return out


# an observed range this wide holds sentinels (an attention mask of torch.finfo(float32).min), not data
SENTINEL_RANGE = 1e30


def _sentinel_ranges(nodes: list[fx.Node], modules: dict[str, nn.Module]) -> list[str]:
    """The values (with their module scope) whose observer saw a magnitude beyond :data:`SENTINEL_RANGE`."""
    out = []
    for node in nodes:
        obs = modules[str(node.target)]
        obs = getattr(obs, "activation_post_process", obs)
        lo, hi = getattr(obs, "min_val", None), getattr(obs, "max_val", None)
        if not (isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor) and lo.numel() == 1 == hi.numel()):
            continue
        if max(abs(float(lo)), abs(float(hi))) > SENTINEL_RANGE and not math.isinf(float(lo)):
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else node
            scope = src.meta.get("fxquant_scope", ("", None))[0]
            out.append(f"{src.name}" + (f" (in {scope})" if scope else ""))
    return out


def _replace_all_observers(gm: fx.GraphModule, float_nodes: set[str], backend_name: str) -> None:
    b = GraphBuilder(gm, backend_name)
    modules = dict(gm.named_modules(remove_duplicate=False))
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and is_observer(modules.get(str(n.target)))]
    pairs = [(str(n.target), modules[str(n.target)]) for n in nodes]
    empty = _unfinished_observers(pairs)
    if empty:
        warnings.warn(f"fxquant convert: {len(empty)} observer(s) saw no data, their qparams default to scale 1.0, "
                      f"zero point 0: {', '.join(empty)}. Run calibration data through the prepared model first.",
                      stacklevel=4)
    huge = _sentinel_ranges(nodes, modules)
    if huge:
        warnings.warn(f"fxquant convert: {len(huge)} value(s) were observed beyond +-{SENTINEL_RANGE:g}, sentinels "
                      f"such as an additive attention mask of torch.finfo(float32).min: their scale is so large that "
                      f"every ordinary value quantizes to the zero point (attention logits + mask: uniform "
                      f"attention). Keep the op that makes them in float (its qconfig None; fxquant.explain(prepared) "
                      f"lists each op with its module): {', '.join(huge[:8])}{' ...' if len(huge) > 8 else ''}",
                      stacklevel=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-observer "no data" warnings are summarised above
        for node in nodes:
            _replace_observer(b, node, modules[str(node.target)], float_nodes)
    for name, _ in pairs:
        if hasattr(gm, name):
            delattr(gm, name)


def _swap_custom_modules(gm: fx.GraphModule, convert_custom_config: Any) -> None:
    """Observed custom modules -> their quantized classes (ConvertCustomConfig.set_observed_to_quantized_mapping)."""
    mapping: dict[type, type] = {}
    for per_type in (getattr(convert_custom_config, "observed_to_quantized_mapping", {}) or {}).values():
        mapping.update(per_type)
    if not mapping:
        return
    for node in gm.graph.nodes:
        if node.op == "call_module":
            quantized_cls = mapping.get(type(gm.get_submodule(str(node.target))))
            if quantized_cls is not None:
                set_module(gm, str(node.target), quantized_cls.from_observed(gm.get_submodule(str(node.target))))


def _remove_qconfig(gm: nn.Module) -> None:
    for mod in gm.modules():
        if "qconfig" in mod.__dict__:
            del mod.qconfig


@register_pass("to_reference")
def to_reference(gm: nn.Module, ctx: Context) -> fx.GraphModule:
    """Convert a prepared GraphModule to its reference quantized form (see module docstring)."""
    state = get_state(gm)
    if state is None or not isinstance(gm, fx.GraphModule):
        raise ConvertError(f"convert_fx expects the model returned by prepare_fx / prepare_qat_fx, got "
                           f"{type(gm).__name__} without fxquant's prepare state; call prepare_fx first "
                           "(a torch.ao-prepared model must be prepared again with fxquant)")
    from .convert_mapping import float_nodes_for

    if not getattr(state, "is_standalone", False):
        # Multi-rank jobs: a local check (no collective, so converting on rank 0 alone cannot hang) that the
        # statistics were synced across ranks since they last changed; see fxquant.distributed.
        warn_if_unsynced(gm)
    float_nodes = float_nodes_for(state, ctx.convert_qconfig_mapping)
    for path, sub in list(gm.named_children()):
        if get_state(sub) is not None and getattr(get_state(sub), "is_standalone", False):
            set_module(gm, path, to_reference(sub, Context(remove_qconfig=ctx.remove_qconfig)))
    _swap_weighted(gm, state, float_nodes, ctx.keep_original_weights)
    _swap_custom_modules(gm, ctx.convert_custom_config)
    _replace_all_observers(gm, float_nodes, getattr(state.backend_config, "name", ""))
    if ctx.remove_qconfig:
        _remove_qconfig(gm)
    delete_unused_submodules(gm)
    return gm
