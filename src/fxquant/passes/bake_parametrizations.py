"""bake_parametrizations: modules of a converted model lose their ``torch.nn.utils.parametrize`` parametrizations.

Before::  pos_conv_embed.conv = ParametrizedConv1d (weight = weight_norm(original0, original1), every call)
After::   pos_conv_embed.conv = Conv1d with ``weight`` the parametrization's value (computed once)

A parametrized module (weight norm in wav2vec2 / HuBERT, spectral norm, orthogonal) matches no backend pattern, so
it stays float in the converted model; torch refuses to pickle it ("Serialization of parametrized modules is only
supported through state_dict()") and fxquant.save cannot name its generated class, so the converted model could be
neither saved whole nor loaded safely. A converted model is for inference: the parametrization's value is what it
computes on every call, so a copy of the module holding that value computes the same (bit for bit). The user's
float model keeps its parametrized module.
"""
from __future__ import annotations

from torch import fx, nn
from torch.nn.utils import parametrize

from ..pipeline import Context, register_pass

__all__ = ["bake_parametrizations", "baked"]


def baked(mod: nn.Module) -> nn.Module:
    """A module of ``mod``'s original class holding each parametrized tensor's current value as a parameter; its
    other parameters, buffers and children are ``mod``'s own (shared, like every float module of a converted model).

    Not ``remove_parametrizations`` on a deepcopy: a copy shares the generated class, and removing the
    parametrization deletes the class's property, which breaks the original module too."""
    base = parametrize.type_before_parametrizations(mod)
    out = base.__new__(base)
    out.__dict__.update({k: (_without_parametrize_hooks(v) if isinstance(v, dict) else v)
                         for k, v in mod.__dict__.items()})
    out._modules = {k: v for k, v in mod._modules.items() if k != "parametrizations"}
    for name in list(mod.parametrizations.keys()):
        value = getattr(mod, name).detach().clone()
        out._parameters[name] = nn.Parameter(value, requires_grad=value.is_floating_point())
    return out


def _without_parametrize_hooks(table: dict) -> dict:
    """A copy of a module's dict attribute without the hooks torch's parametrizations registered (weight norm's
    state-dict compatibility hook: a local function, which would make the module unpicklable)."""
    def origin(hook: object) -> str:
        fn = getattr(hook, "hook", hook)  # load-state-dict hooks are wrapped
        return str(getattr(fn, "__module__", "") or "")
    return {k: v for k, v in table.items() if not origin(v).startswith("torch.nn.utils.parametriz")}


@register_pass("bake_parametrizations")
def bake_parametrizations(gm: nn.Module, ctx: Context) -> nn.Module:
    """Replace each parametrized module the graph calls with :func:`baked` of it (the containers above it belong to
    the GraphModule; a parametrized module inside a module kept whole is left alone, not to edit the user's)."""
    assert isinstance(gm, fx.GraphModule)
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if parametrize.is_parametrized(mod):
            parent_name, _, attr = str(node.target).rpartition(".")
            setattr(gm.get_submodule(parent_name), attr, baked(mod))
    return gm
