"""verify_*: cheap executable invariants of each stage (on in tests, cheap enough to stay on always)."""
from __future__ import annotations

from torch import fx

from ..annotation import get_annotation
from ..pipeline import Context, register_pass
from .common import is_observer

__all__ = ["verify_prepared", "verify_reference", "VerificationError"]


class VerificationError(AssertionError):
    """A pass broke a stage invariant (a bug in fxquant: please report it with the model)."""


def _observer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    mods = dict(gm.named_modules(remove_duplicate=False))
    return [n for n in gm.graph.nodes if n.op == "call_module" and is_observer(mods.get(str(n.target)))]


@register_pass("verify_prepared")
def verify_prepared(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """Observers take one input; no observer sits inside a matched pattern; the graph lints."""
    gm.graph.lint()
    for obs in _observer_nodes(gm):
        if len(obs.args) != 1 or obs.kwargs:
            raise VerificationError(f"observer node {obs.name} must take exactly one input, has {obs.args}")
        src = obs.args[0]
        ann = get_annotation(src) if isinstance(src, fx.Node) else None
        if ann is not None and ann.matched and not ann.is_last and any(u in ann.matched for u in obs.users):
            raise VerificationError(f"observer {obs.name} was inserted inside the fused pattern of {src.name}")
    return gm


@register_pass("verify_reference")
def verify_reference(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """No observer or fake quant is left in a converted model; the graph lints."""
    gm.graph.lint()
    left = _observer_nodes(gm)
    if left:
        raise VerificationError(f"observers left after conversion: {[n.name for n in left]}")
    for name, mod in gm.named_modules():
        if is_observer(mod) and name:
            raise VerificationError(f"observer module {name} left after conversion")
    return gm


