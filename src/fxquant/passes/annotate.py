"""annotate: decide, node by node, what is quantized how — the only pass that reads the BackendConfig's dtypes.

For every match of a backend pattern whose qconfig satisfies one of the pattern's dtype configs, each node of the
match gets a :class:`~fxquant.annotation.NodeAnnotation` saying how its activation inputs, weight and output are
quantized. Everything else gets a float annotation with a reason, which ``fxquant.explain`` shows.

Before::  conv(x) -> relu -> flatten        After (annotations)::
                                             conv: in=uint8 out=uint8 (pattern (ReLU, Conv2d)... root)
                                             flatten: share input qparams
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx, nn

from .._dtypes import normalize_dtype
from ..annotation import FLOAT, NodeAnnotation, QSpec, set_annotation
from ..backend_config import ObservationType
from ..backend_config.matching import find_dtype_config
from ..pipeline import Context, register_pass
from .assign_qconfig import QCONFIG_KEY
from .common import backend_config_of
from ..vocab import node_key, op_key
from .match import Match, PatternIndex, find_matches

__all__ = ["annotate", "spec_of"]

_SPEC_CACHE: dict[int, tuple[Any, QSpec]] = {}


def spec_of(ctor: Any) -> QSpec:
    """The QSpec of an observer / fake-quant constructor (instantiated once per constructor to read dtype)."""
    if ctor is None:
        return FLOAT
    hit = _SPEC_CACHE.get(id(ctor))
    if hit is not None and hit[0] is ctor:
        return hit[1]
    obs = ctor()
    dtype = normalize_dtype(getattr(obs, "dtype", torch.float32)) or torch.float32
    if dtype == torch.float:
        dtype = torch.float32
    spec = QSpec(ctor, dtype, bool(getattr(obs, "is_dynamic", False)), type(obs), _blends(obs))
    _SPEC_CACHE[id(ctor)] = (ctor, spec)
    return spec


def _blends(obs: Any) -> bool:
    """Whether calling ``obs`` on two tensors gives something other than the union of their ranges: moving
    averages (QAT's default fake quants) and learnable scales."""
    inner = getattr(obs, "activation_post_process", None)
    return hasattr(obs, "averaging_constant") or hasattr(inner, "averaging_constant") or \
        any(p.requires_grad for p in obs.parameters())


def is_float_tensor(node: Any) -> bool:
    """True when ``node`` produced a floating-point tensor (unknown values count as float tensors)."""
    if not isinstance(node, fx.Node):
        return False
    info = node.meta.get("fxquant_value")
    if info is None:
        return not (node.op == "call_method" and node.target in ("size", "dim")) and \
            not (node.op == "call_function" and node.target is getattr)
    return info.is_tensor and info.is_float


def _observation_type(cfg: Any, root: fx.Node, act: QSpec) -> ObservationType:
    table = getattr(cfg, "_num_tensor_args_to_observation_type", None) or {}
    if table:
        n = sum(1 for a in root.args if is_float_tensor(a))
        if n in table:
            kind = table[n]
            # `x + 1.0`, `x * 0.125`: the backend shares one observer between x and the result (torch.ao's tables
            # do); a union-of-ranges observer then covers both, but a moving average alternates between the two
            # ranges and converges to a blend that clamps each of them (Gemma's RMSNorm `1.0 + weight` in QAT:
            # output ~0). Those get an observer of their own.
            if n == 1 and kind == ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT and act.blends:
                return ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT
            return kind
    return cfg.observation_type


def _roles(index: dict[str, int], root: fx.Node) -> tuple[str, ...]:
    """Which parts of a dtype config to check: weight/bias only for functional ops with weight arguments."""
    has_weight = root.op == "call_function" and "weight" in index
    return ("input", "output", "weight", "bias") if has_weight else ("input", "output")


def weight_indexes(configs: list[Any]) -> dict[Any, dict[str, int]]:
    """op key -> {"weight": i, "bias": j} of single-op patterns (a fused pattern uses its root op's entry)."""
    out: dict[Any, dict[str, int]] = {}
    for cfg in configs:
        index = getattr(cfg, "_input_type_to_index", None)
        if index and not isinstance(cfg.pattern, tuple) and cfg.pattern is not None:
            out.setdefault(op_key(cfg.pattern), dict(index))
    return out


def _float(reason: str, qconfig: Any = None, m: Optional[Match] = None) -> NodeAnnotation:
    return NodeAnnotation(qconfig=qconfig, pattern=m.pattern if m else None, matched=m.nodes if m else (),
                          reason=reason)


def _decide(qconfig: Any, config: Any, is_qat: bool, roles: tuple[str, ...], cache: dict[Any, Any]) -> Any:
    """find_dtype_config, memoised per (qconfig, pattern config, roles): it instantiates observers, and a model
    repeats the same few decisions thousands of times."""
    key = (id(qconfig), id(config), roles)
    hit = cache.get(key)
    if hit is None or hit[0] is not qconfig:
        hit = cache[key] = (qconfig, find_dtype_config(qconfig, config.dtype_configs, is_qat, roles=roles,
                                                       warn=True))
    return hit[1]


def _annotate_match(m: Match, ctx: Context, index: dict[str, int], cache: dict[Any, Any]) -> None:
    qconfig = m.last.meta.get(QCONFIG_KEY)
    if qconfig is None:
        reason = "qconfig is None (the QConfigMapping leaves it in float)"
        for n in m.nodes:
            set_annotation(n, _float(reason, None, m))
        return
    dc, reasons = _decide(qconfig, m.config, ctx.is_qat, _roles(index, m.root), cache)
    if dc is None:
        reason = "the backend does not support this qconfig here: " + "; ".join(reasons)
        for n in m.nodes:
            set_annotation(n, _float(reason, qconfig, m))
        return
    act = spec_of(qconfig.activation)
    obs_type = _observation_type(m.config, m.root, act)
    observed = obs_type != ObservationType.INPUT_OUTPUT_NOT_OBSERVED
    for n in m.nodes:
        out_spec = act if (observed and not act.is_dynamic and is_float_tensor(n)) else FLOAT
        set_annotation(n, NodeAnnotation(
            qconfig=qconfig, pattern=m.pattern, config=m.config, matched=m.nodes, is_root=n is m.root, is_last=n is m.last,
            input_act=act if observed else FLOAT, weight=spec_of(qconfig.weight) if index.get("weight") is not None
            else FLOAT, output=out_spec, weight_index=index.get("weight"), bias_index=index.get("bias"),
            share_io=obs_type == ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT,
            reuse_input=_is_reuse_input(qconfig)))


def _is_reuse_input(qconfig: Any) -> bool:
    act = qconfig.activation
    cls = getattr(act, "p", None)
    cls = getattr(cls, "func", cls) or act
    return getattr(cls, "__name__", "") == "ReuseInputObserver" or type(act).__name__ == "ReuseInputObserver"


def _unmatched_reason(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.meta.get(QCONFIG_KEY) is None:
        return "qconfig is None (the QConfigMapping leaves it in float)"
    what = type(modules[str(node.target)]).__name__ if node.op == "call_module" else getattr(
        node.target, "__name__", str(node.target))
    reason = f"the backend has no pattern for {what}"
    mod = modules.get(str(node.target)) if node.op == "call_module" else None
    inner = sorted({type(m).__name__ for m in mod.modules() if m is not mod and isinstance(m, _WEIGHTED_INSIDE)}) \
        if mod is not None else []
    if inner:  # a torch.nn container kept whole (nn.MultiheadAttention, ...): say what stays float and how
        reason += (f"; it runs whole, so its {', '.join(inner)} layers stay float too (torch.fx keeps torch.nn "
                   f"modules as leaves, as torch.ao does); to quantize them, build the block from its layers in a "
                   f"module of your own")
    return reason


_WEIGHTED_INSIDE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@register_pass("annotate")
def annotate(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """Match backend patterns and write a NodeAnnotation on every call node."""
    backend = backend_config_of(ctx)
    modules = ctx.modules(gm)
    skip = {n for n in gm.graph.nodes if n.meta.get("fxquant_special")}
    matches = find_matches(gm.graph, PatternIndex(backend.configs), modules, skip)
    indexes = weight_indexes(backend.configs)
    cache: dict[Any, Any] = {}
    seen: set[int] = set()
    for m in matches.values():
        if id(m) not in seen:
            seen.add(id(m))
            index = indexes.get(node_key(m.root, modules), {}) if m.root.op == "call_function" else {}
            _annotate_match(m, ctx, index, cache)
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method") and node not in matches \
                and "fxquant_special" not in node.meta:
            set_annotation(node, _float(_unmatched_reason(node, modules), node.meta.get(QCONFIG_KEY)))
    return gm
