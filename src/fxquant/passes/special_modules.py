"""special_modules: standalone submodules and custom modules (PrepareCustomConfig).

* A standalone submodule is prepared on its own (its own QConfigMapping / BackendConfig / custom config) and
  stays one ``call_module`` node of the parent; its boundary is float.
* A custom module class (``set_float_to_observed_mapping``) is swapped to its observed class; its input and output
  are observed like any quantized op, and convert swaps it to the quantized class of ConvertCustomConfig.

Nodes handled here are marked ``node.meta["fxquant_special"]`` so ``annotate`` leaves them alone.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx, nn

from ..annotation import NodeAnnotation, set_annotation
from ..pipeline import Context, register_pass
from .annotate import spec_of
from .assign_qconfig import QCONFIG_KEY
from .common import set_module

__all__ = ["special_modules"]


def _standalone_entry(cfg: Any, path: str, mod: nn.Module) -> Optional[Any]:
    names = getattr(cfg, "standalone_module_names", {}) or {}
    classes = getattr(cfg, "standalone_module_classes", {}) or {}
    if path in names:
        return names[path]
    return classes.get(type(mod))


def _observed_class(cfg: Any, mod: nn.Module) -> Optional[type]:
    for per_type in (getattr(cfg, "float_to_observed_mapping", {}) or {}).values():
        if type(mod) in per_type:
            return per_type[type(mod)]
    return None


def _capture_inputs(model: nn.Module, sub: nn.Module, example_inputs: tuple) -> tuple:
    """The inputs ``sub`` receives when ``model`` runs on ``example_inputs``."""
    seen: list[tuple] = []
    handle = sub.register_forward_pre_hook(lambda _m, args: seen.append(args))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"standalone module {type(sub).__name__} was not called when running example_inputs; "
                         "give its example inputs in set_standalone_module_name(...)")
    return seen[0]


def _prepare_standalone(gm: fx.GraphModule, node: fx.Node, mod: nn.Module, entry: Any, ctx: Context) -> None:
    from ..quantize_fx import _prepare

    def pick(attr: str, default: Any) -> Any:
        value = getattr(entry, attr, None) if not isinstance(entry, tuple) else None
        return default if value is None else value

    qmap = pick("qconfig_mapping", ctx.qconfig_mapping)
    example = pick("example_inputs", None)
    if example is None:
        example = _capture_inputs(gm, mod, ctx.example_inputs)
    prepared = _prepare(mod, qmap, example, pick("prepare_custom_config", None),
                        pick("backend_config", ctx.backend_config), ctx.is_qat, is_standalone=True)
    set_module(gm, str(node.target), prepared)
    set_annotation(node, NodeAnnotation(qconfig=node.meta.get(QCONFIG_KEY), standalone=True))


def _swap_custom(gm: fx.GraphModule, node: fx.Node, mod: nn.Module, observed_cls: type) -> None:
    qconfig = node.meta.get(QCONFIG_KEY)
    if qconfig is None:
        set_annotation(node, NodeAnnotation(reason="qconfig is None (custom module left in float)"))
        return
    mod.qconfig = qconfig
    set_module(gm, str(node.target), observed_cls.from_float(mod))
    act = spec_of(qconfig.activation)
    set_annotation(node, NodeAnnotation(qconfig=qconfig, input_act=act, output=act, extra={"custom": True}))


@register_pass("special_modules")
def special_modules(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """Prepare standalone submodules and swap custom modules to their observed classes."""
    cfg = ctx.prepare_custom_config
    if cfg is None:
        return gm
    modules = ctx.modules(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = modules[str(node.target)]
        entry = _standalone_entry(cfg, str(node.target), mod)
        observed_cls = _observed_class(cfg, mod)
        if entry is not None:
            node.meta["fxquant_special"] = "standalone"
            _prepare_standalone(gm, node, mod, entry, ctx)
        elif observed_cls is not None:
            node.meta["fxquant_special"] = "custom"
            _swap_custom(gm, node, mod, observed_cls)
    return gm
