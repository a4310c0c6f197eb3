"""Small helpers shared by the passes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import fx, nn

__all__ = ["backend_config_of", "set_module", "get_state", "set_state", "PreparedState", "is_observer",
           "add_module_unique", "module_has_attr", "delete_unused_submodules"]


def backend_config_of(ctx: Any) -> Any:
    """The BackendConfig of this call (the native one when the user gave none)."""
    if ctx.backend_config is None:
        from ..backend_config import get_native_backend_config

        ctx.backend_config = get_native_backend_config()
    return ctx.backend_config


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """``root.<path> = module`` for a dotted path."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def add_module_unique(root: nn.Module, prefix: str, module: nn.Module, counter: dict[str, int]) -> str:
    """Register ``module`` under ``prefix<k>`` with the first free k (counter kept by the caller)."""
    k = counter.get(prefix, 0)
    while hasattr(root, f"{prefix}{k}"):
        k += 1
    counter[prefix] = k + 1
    name = f"{prefix}{k}"
    setattr(root, name, module)
    return name


def module_has_attr(module: nn.Module, name: str) -> bool:
    """``hasattr(module, name)`` without raising (and catching) an AttributeError in ``nn.Module.__getattr__`` when
    the name is missing, which costs ~10x the lookup."""
    return (name in module.__dict__ or name in module._parameters or name in module._buffers
            or name in module._modules or hasattr(type(module), name))


def is_observer(module: Any) -> bool:
    """True for fxquant observers and fake quants (duck-typed: anything with calculate_qparams and a dtype)."""
    return (isinstance(module, nn.Module) and module_has_attr(module, "calculate_qparams")
            and module_has_attr(module, "dtype"))


@dataclass
class PreparedState:
    """What prepare_fx leaves on the model for convert_fx (picklable plain data)."""

    qconfig_mapping: Any
    backend_config: Any
    is_qat: bool
    nodes: dict[str, Any] = field(default_factory=dict)  # node name -> NodeRecord
    weighted_modules: dict[str, Any] = field(default_factory=dict)  # module path -> QConfig of its pattern
    explain_rows: list[Any] = field(default_factory=list)
    prepare_custom_config: Any = None
    is_standalone: bool = False


_ATTR = "_fxquant_state"


def get_state(gm: nn.Module) -> Optional[PreparedState]:
    """The PreparedState of a prepared model (kept both as attribute, for pickle, and in meta, for deepcopy)."""
    state = getattr(gm, _ATTR, None)
    if state is None and isinstance(gm, fx.GraphModule):
        state = gm.meta.get(_ATTR)
    return state


def set_state(gm: fx.GraphModule, state: PreparedState) -> None:
    setattr(gm, _ATTR, state)
    gm.meta[_ATTR] = state


def delete_unused_submodules(gm: fx.GraphModule) -> None:
    """``gm.delete_all_unused_submodules()`` in linear time (torch's looks every module up in a list of all used
    names: quadratic in the number of modules). Used: the modules on the path of a call_module / get_attr target
    and every submodule of a called module; the others are deleted, parents first."""
    used: set[str] = set()
    modules: Optional[dict[str, nn.Module]] = None
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr") or not isinstance(node.target, str):
            continue
        parts = node.target.split(".")
        used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        if node.op == "call_module":
            if modules is None:
                modules = dict(gm.named_modules(remove_duplicate=False))
            called = modules.get(node.target)
            if called is not None:
                used.update(f"{node.target}.{name}" for name, _ in called.named_modules() if name)
    for name in [name for name, _ in gm.named_modules() if name and name not in used]:
        gm.delete_submodule(name)
