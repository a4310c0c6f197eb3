"""fuse: replace op sequences that the backend fuses (conv-bn-relu, linear-relu, ...) by one fused module.

Before::  conv = self.conv(x); bn = self.bn(conv); relu = F.relu(bn)
After::   conv = self.conv(x)        # self.conv is now e.g. nn.intrinsic.ConvReLU2d (BN folded for post-training)

The fused module is made by the pattern's ``fuser_method(is_qat, *modules)`` and installed under the first
module's name. Functional activations inside a pattern are given to the fuser as their module form.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from torch import fx, nn

from ..backend_config import MatchAllNode
from ..backend_config.utils import complex_format_fuser_method
from ..pipeline import Context, register_pass
from ..vocab import op_key
from .common import backend_config_of, set_module
from .match import Match, PatternIndex, find_matches

__all__ = ["fuse"]

# functional / method spellings of activations -> module to hand to a fuser method
_AS_MODULE: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6}


def _modules_for(structure: Any, modules: dict[str, nn.Module], training: bool) -> Any:
    """The matched structure with each node replaced by what a fuser method takes (torch.ao's convention)."""
    if isinstance(structure, tuple):
        return tuple(_modules_for(s, modules, training) for s in structure)
    node = structure
    if node.op == "call_module":
        return modules[str(node.target)]
    if node.op in ("call_function", "call_method"):
        cls = _AS_MODULE.get(op_key(node.target))
        return cls().train(training) if cls is not None else node.target
    return MatchAllNode


def _fuse_one(gm: fx.GraphModule, m: Match, modules: dict[str, nn.Module], is_qat: bool,
              calls: Counter[str]) -> None:
    root = m.root
    if root.op != "call_module":
        raise ValueError(f"fuse: the fusion pattern matched at node '{m.last.name}' must start with a module, but "
                         f"its root '{root.name}' is {root.op} {root.target}")
    training = modules[str(root.target)].training
    fuser = complex_format_fuser_method(m.config)
    fused = fuser(is_qat, *_modules_for(m.structure, modules, training))
    extra_getter = getattr(m.config, "_extra_inputs_getter", None)
    extra = list(extra_getter(m.structure)) if extra_getter is not None else []
    set_module(gm, str(root.target), fused)
    modules[str(root.target)] = fused
    root.args = tuple(root.args) + tuple(extra)
    if m.last is not root:
        m.last.prepend(root)  # extra inputs may be defined after the root: the fused node takes the last's place
        m.last.replace_all_uses_with(root)
    for n in reversed(m.nodes):
        if n is not root and not n.users:
            gm.graph.erase_node(n)
            if n.op == "call_module":
                calls[str(n.target)] -= 1
                if not calls[str(n.target)]:
                    _delete_module(gm, str(n.target))


def _delete_module(gm: fx.GraphModule, path: str) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    delattr(parent, name)


@register_pass("fuse")
def fuse(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """Fuse every match of a backend pattern that has a fuser method."""
    backend = backend_config_of(ctx)
    configs = [c for c in backend.configs if getattr(c, "fuser_method", None) is not None]
    modules = ctx.modules(gm)
    matches = find_matches(gm.graph, PatternIndex(configs), modules)
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    done: set[int] = set()
    for m in list(matches.values()):
        if id(m) in done:
            continue
        done.add(id(m))
        _fuse_one(gm, m, modules, ctx.is_qat, calls)
    return gm
