"""observe: insert observer (or fake-quant) nodes where the annotations say a value changes dtype.

Generic: knows no ops, only annotations. For a pattern's root node each float tensor input gets an observer when
the value it reads is not already observed with the wanted dtype; a pattern's last node gets an output observer.
Observer nodes are ``call_module`` nodes named ``activation_post_process_<k>``; values of one share group (see
``share``) use one observer object.

Before::  x -> conv -> relu -> out           After::  x -> app_0 -> conv(+relu fused) -> app_1 -> out
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import fx, nn

from .._dtypes import normalize_dtype

from ..annotation import NodeAnnotation, QSpec
from ..pipeline import Context, register_pass
from .annotate import is_float_tensor
from .common import add_module_unique, is_observer
from .share import UnionFind

__all__ = ["observe", "OBSERVER_PREFIX"]

OBSERVER_PREFIX = "activation_post_process_"


class _Inserter:
    """Creates observer nodes and modules; one module per (share group, observer class, dtype)."""

    def __init__(self, gm: fx.GraphModule, groups: Optional[UnionFind]):
        self.gm, self.groups = gm, groups or UnionFind()
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        self.group_module: dict[tuple[Any, Any, Any], nn.Module] = {}
        self.counter: dict[str, int] = {}

    def module_for(self, producer: fx.Node, spec: QSpec) -> nn.Module:
        key = (self.groups.find(producer), spec.obs_cls, spec.dtype)
        module = self.group_module.get(key)
        if module is None:
            module = self.group_module[key] = spec.ctor()
        return module

    def insert(self, value: fx.Node, module: nn.Module) -> fx.Node:
        name = add_module_unique(self.gm, OBSERVER_PREFIX, module, self.counter)
        self.modules[name] = module
        with self.gm.graph.inserting_after(value):
            return self.gm.graph.call_module(name, (value,))

    def observer_of(self, node: Any) -> Optional[nn.Module]:
        if isinstance(node, fx.Node) and node.op == "call_module":
            mod = self.modules.get(str(node.target))
            return mod if is_observer(mod) else None
        return None


def _spec_for_position(ann: NodeAnnotation, position: Union[int, str]) -> Optional[QSpec]:
    if position == ann.weight_index or position == "weight":
        return ann.weight
    if position == ann.bias_index or position == "bias":
        return None
    return ann.input_act


def _observe_arg(ins: _Inserter, node: fx.Node, arg: fx.Node, spec: QSpec) -> fx.Node:
    """The node that ``node`` should read instead of ``arg`` (an observer node, possibly new)."""
    obs = ins.observer_of(arg)
    if obs is not None and _dtype(obs) == spec.dtype:
        return arg
    for user in arg.users:
        mod = ins.observer_of(user)
        if user is not node and mod is not None and type(mod) is spec.obs_cls and _dtype(mod) == spec.dtype:
            return user
    producer = arg.args[0] if obs is not None else arg
    return ins.insert(arg, ins.module_for(producer, spec))


def _dtype(obs: nn.Module) -> Any:
    d = normalize_dtype(getattr(obs, "dtype", torch.float32))
    return torch.float32 if d == torch.float else d


def _observe_inputs(ins: _Inserter, node: fx.Node, ann: NodeAnnotation) -> None:
    if ann.reuse_input:
        return

    def visit(a: Any, position: Union[int, str]) -> Any:
        if isinstance(a, (list, tuple)):
            return type(a)(visit(x, position) for x in a)
        spec = _spec_for_position(ann, position)
        if not isinstance(a, fx.Node) or spec is None or not spec.quantized or not is_float_tensor(a):
            return a
        if spec.is_dynamic and position != 0:
            return a
        return _observe_arg(ins, node, a, spec)

    node.args = tuple(visit(a, i) for i, a in enumerate(node.args))
    node.kwargs = {k: visit(v, k) for k, v in node.kwargs.items()}


def _first_input(node: fx.Node) -> Optional[fx.Node]:
    for arg in node.args:
        if isinstance(arg, (list, tuple)):
            arg = arg[0] if arg else None
        if isinstance(arg, fx.Node):
            return arg
    return None


def _observe_output(ins: _Inserter, node: fx.Node, ann: NodeAnnotation) -> None:
    if not is_float_tensor(node):
        return
    if ann.share_io or ann.reuse_input:
        module = ins.observer_of(_first_input(node))
        if module is None:  # input stays float, so does the output
            return
    else:
        module = ins.module_for(node, ann.output)
    users = [u for u in node.users]
    obs_node = ins.insert(node, module)
    for user in users:
        user.replace_input_with(node, obs_node)


@register_pass("observe")
def observe(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    """Insert observers per the annotations (see module docstring)."""
    ins = _Inserter(gm, ctx.share_groups)
    for node in list(gm.graph.nodes):
        ann = node.meta.get("fxquant")
        if ann is None or ann.qconfig is None or ann.standalone:
            continue
        if ann.is_root:
            _observe_inputs(ins, node, ann)
        if ann.is_last and ann.output.quantized and not ann.output.is_dynamic:
            _observe_output(ins, node, ann)
    return gm

