"""assign_qconfig: resolve the QConfigMapping for every call node (CONTRACT §2 precedence).

Writes ``node.meta["fxquant_qconfig"]`` (None = stays float) and sets ``module.qconfig`` on called modules, which
the QAT swap and the reference conversion read. Linear time: one cached resolver for the whole graph.
"""
from __future__ import annotations

from typing import Any

from torch import fx, nn

from ..pipeline import Context, register_pass
from ..qconfig_resolver import build_qconfig_resolver, with_fused_module_types

__all__ = ["assign_qconfig", "QCONFIG_KEY"]

QCONFIG_KEY = "fxquant_qconfig"


def _fused_types(modules: dict[str, nn.Module]) -> dict[type, list[type]]:
    """Fused containers found in the model (e.g. ConvReLU2d) -> classes of their parts."""
    out: dict[type, list[type]] = {}
    for m in modules.values():
        if type(m).__module__.startswith("fxquant.nn.intrinsic") and isinstance(m, nn.Sequential):
            out.setdefault(type(m), [type(c) for c in m])
    return out


def _resolve(node: fx.Node, resolver: Any, modules: dict[str, nn.Module]) -> Any:
    scope_path, scope_type = node.meta.get("fxquant_scope", ("", None))
    if node.op == "call_module":
        return resolver.for_module(str(node.target), type(modules[str(node.target)]))
    if node.op == "call_function":
        return resolver.for_function(scope_path, scope_type, node.target)
    if node.op == "call_method":
        return resolver.for_method(scope_path, scope_type, str(node.target))
    return None


@register_pass("assign_qconfig")
def assign_qconfig(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """Resolve each call node's qconfig; set ``qconfig`` on the modules the graph calls."""
    modules = ctx.modules(gm)
    mapping = with_fused_module_types(ctx.qconfig_mapping, _fused_types(modules))
    resolver = build_qconfig_resolver(mapping)
    for node in gm.graph.nodes:
        qconfig = _resolve(node, resolver, modules)
        node.meta[QCONFIG_KEY] = qconfig
        if node.op == "call_module" and qconfig is not None:
            modules[str(node.target)].qconfig = qconfig
    return gm
