"""record_state: leave on the prepared model what convert needs, as plain picklable data.

Annotations live in ``node.meta``, which pickling drops; convert must work on a prepared model that was saved and
loaded, so this pass copies the decisions it needs into a :class:`~fxquant.passes.common.PreparedState`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from ..annotation import get_annotation
from ..pipeline import Context, register_pass
from .annotate import spec_of
from .addmm_as_linear import REWRITTEN_FROM
from .assign_qconfig import QCONFIG_KEY
from .common import PreparedState, backend_config_of, set_state

__all__ = ["record_state", "WeightedEntry", "NodeRecord"]


@dataclass(frozen=True)
class WeightedEntry:
    """A weighted module to swap at convert: the node calling it, its qconfig, its reference class."""

    node_name: str
    qconfig: Any
    reference_cls: Any


@dataclass(frozen=True)
class NodeRecord:
    """Enough about a call node to resolve a convert-time QConfigMapping for it again."""

    op: str
    target: Any  # module class for call_module, else the function / method name
    path: str  # module path for call_module, else the scope path
    scope_type: Any
    qconfig: Any
    reason: str


def _plain_type(cls: Any) -> Any:
    """``cls`` itself, or for the class torch.nn.utils.parametrize generates over a parametrized module (not
    importable, so not picklable) the module's own class."""
    if isinstance(cls, type) and cls.__module__ == "torch.nn.utils.parametrize" and \
            cls.__name__.startswith("Parametrized") and cls.__bases__:
        return cls.__bases__[0]
    return cls


def _record(node: fx.Node, modules: dict[str, Any]) -> NodeRecord:
    scope_path, scope_type = node.meta.get("fxquant_scope", ("", None))
    scope_type = _plain_type(scope_type)
    ann = get_annotation(node)
    if node.op == "call_module":
        return NodeRecord(node.op, _plain_type(type(modules[str(node.target)])), str(node.target), scope_type,
                          node.meta.get(QCONFIG_KEY), ann.reason)
    target = node.meta.get(REWRITTEN_FROM, node.target)  # a convert-time QConfigMapping names the user's op
    return NodeRecord(node.op, target, scope_path, scope_type, node.meta.get(QCONFIG_KEY), ann.reason)


def reference_module_map(backend: Any) -> dict[type, type]:
    """Float weighted module class (``nn.Conv2d``) -> its reference quantized class, from the backend's configs."""
    return {c.root_module: c.reference_quantized_module for c in backend.configs
            if c.root_module is not None and c.reference_quantized_module is not None}


def _reference_class(mod: nn.Module, config: Any, ref_map: dict[type, type]) -> Any:
    """The reference class for a matched module: by its config's root module (QAT / fused configs name it), else
    by the class of the module or of a fused container's first part."""
    root = getattr(config, "root_module", None)
    if root is None:
        root = type(mod[0]) if isinstance(mod, nn.Sequential) and len(mod) > 0 else type(mod)
    return ref_map.get(root)


@register_pass("record_state")
def record_state(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """Store a PreparedState on ``gm`` (attribute and meta)."""
    modules = ctx.modules(gm)
    state = PreparedState(qconfig_mapping=ctx.qconfig_mapping, backend_config=backend_config_of(ctx),
                          is_qat=ctx.is_qat, prepare_custom_config=ctx.prepare_custom_config,
                          is_standalone=ctx.is_standalone)
    ref_map = reference_module_map(state.backend_config)
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or "fxquant" not in node.meta:
            continue
        state.nodes[node.name] = _record(node, modules)
        ann = get_annotation(node)
        if node.op == "call_module" and ann.is_root and ann.qconfig is not None and not ann.reason \
                and spec_of(ann.qconfig.weight).quantized:  # a float weight (Identity, float32) needs no swap
            ref = _reference_class(modules[str(node.target)], ann.config, ref_map)
            if ref is not None:
                state.weighted_modules[str(node.target)] = WeightedEntry(node.name, ann.qconfig, ref)
    set_state(gm, state)
    return gm
