"""quantized_inputs / quantized_outputs / quantized_io_attach: the integer boundary of a converted model whose
PrepareCustomConfig declares quantized inputs / outputs (see ``quantized_io`` for the prepared side).

* ``quantized_inputs`` (before ``to_reference``): the observer of a quantized input becomes a dtype check and a
  dequantize with the input's qparams, kept as buffers of the ``fxquant_boundaries`` submodule::

      Before::  x -> app_0 -> conv         After::  x -> check_quantized_input -> dequantize(scale, zp) -> conv

  A standalone submodule with quantized inputs gets the parent's quantize with the child's own buffers (the same
  qparams) in front of its call.
* ``quantized_outputs`` (after ``to_reference``): the graph returns the quantize node at each declared output leaf
  instead of its dequantize, and that quantize reads the holder's buffers; the parent of a standalone submodule with
  quantized outputs dequantizes them with the child's buffers.
* ``quantized_io_attach`` (end of convert_fx): lowering keeps only what its graph reads, so it puts the holder
  submodules back.
"""
from __future__ import annotations

import operator
from typing import Any, Iterator

import torch
from torch import fx, nn

from .. import ops as _registers_ops  # noqa: F401  (registers torch.ops.fxquant)
from .._dtypes import dtype_range
from ..boundaries import BOUNDARIES_ATTR, QuantizedBoundaries, check_quantized_input
from ..pipeline import Context, register_pass
from .common import get_state
from .quantized_io import (boundary_observer, check_static_integer, declared_indexes, input_placeholders,
                           output_leaves)

__all__ = ["quantized_inputs", "quantized_outputs", "quantized_io_attach"]

_OPS = torch.ops.fxquant
_META = "fxquant_boundaries"  # gm.meta: the holder, so passes that delete unread submodules cannot lose it


class QuantizedIOError(ValueError):
    """A declared quantized input / output cannot be converted as declared."""


def _standalone_calls(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, fx.GraphModule]]:
    children = {name: m for name, m in gm.named_modules(remove_duplicate=False)
                if name and isinstance(m, fx.GraphModule)
                and (_META in m.meta or getattr(get_state(m), "is_standalone", False))}
    if not children:
        return
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target) in children:
            yield node, children[str(node.target)]


def _attr(gm: fx.GraphModule, target: str) -> fx.Node:
    return gm.graph.get_attr(target)


def _qparam_nodes(gm: fx.GraphModule, prefix: str) -> tuple[fx.Node, fx.Node]:
    base = f"{BOUNDARIES_ATTR}.{prefix}"
    return _attr(gm, f"{base}_scale"), _attr(gm, f"{base}_zero_point")


def _child_qparam_nodes(gm: fx.GraphModule, call: fx.Node, child: fx.GraphModule, prefix: str) -> tuple[fx.Node,
                                                                                                        fx.Node]:
    """get_attr nodes of parent buffers that *are* the standalone child's boundary buffers (the same tensors: the
    child's own holder may be dropped as unread while the child is lowered, before the parent)."""
    holder = child.meta[_META]
    nodes = []
    for suffix in ("scale", "zero_point"):
        name = f"{str(call.target).replace('.', '_')}_{prefix}_{suffix}"
        if not hasattr(gm, name):
            gm.register_buffer(name, getattr(holder, f"{prefix}_{suffix}"))
        nodes.append(_attr(gm, name))
    return nodes[0], nodes[1]


def _dequantize_input(gm: fx.GraphModule, holder: QuantizedBoundaries, i: int, ph: fx.Node,
                      modules: dict[str, nn.Module]) -> None:
    obs_node = next((u for u in ph.users if boundary_observer(u, modules) is not None), None)
    if obs_node is None:
        raise QuantizedIOError(f"quantized input {i} ({ph.name!r}) has no observer in the prepared model; prepare it "
                               f"again with this fxquant version")
    obs = boundary_observer(obs_node, modules)
    dtype = check_static_integer(obs, f"input {i} ({ph.name!r})")
    qmin, qmax = dtype_range(dtype)
    scale, zero_point = obs.calculate_qparams()
    prefix = holder.add("input", i, ph.name, scale, zero_point, dtype, qmin, qmax)
    g = gm.graph
    with g.inserting_before(obs_node):
        checked = g.call_function(check_quantized_input, (ph, dtype, i, ph.name))
        scale_node, zp_node = _qparam_nodes(gm, prefix)
        dq = g.call_function(_OPS.dequantize_per_tensor.default, (checked, scale_node, zp_node, qmin, qmax, dtype))
    obs_node.replace_all_uses_with(dq)
    g.erase_node(obs_node)
    for user in list(ph.users):
        if user is not checked:
            user.replace_input_with(ph, dq)


def _feed_standalone(gm: fx.GraphModule, node: fx.Node, child: fx.GraphModule) -> None:
    """Quantize the args of a standalone call at the child's quantized input indexes, with the child's qparams."""
    holder = child.meta[_META]
    for i, (prefix, name, dtype, qmin, qmax, _) in holder.inputs.items():
        if i >= len(node.args) or not isinstance(node.args[i], fx.Node):
            raise QuantizedIOError(f"standalone module {node.target}: its input {i} ({name!r}) is quantized, but "
                                   f"the call {node.name} does not pass a tensor at position {i}")
        with gm.graph.inserting_before(node):
            scale_node, zp_node = _child_qparam_nodes(gm, node, child, prefix)
            q = gm.graph.call_function(_OPS.quantize_per_tensor.default,
                                       (node.args[i], scale_node, zp_node, qmin, qmax, dtype))
        node.update_arg(i, q)


@register_pass("quantized_inputs")
def quantized_inputs(gm: nn.Module, ctx: Context) -> nn.Module:
    """Turn quantized inputs' observers into check + dequantize (see the module docstring)."""
    state = get_state(gm)
    if state is None or not isinstance(gm, fx.GraphModule):
        return gm  # to_reference says what is wrong
    done: set[int] = set()
    for node, child in list(_standalone_calls(gm)):
        if id(child) not in done:
            done.add(id(child))
            quantized_inputs(child, ctx)
        if _META in child.meta:
            _feed_standalone(gm, node, child)
    inputs, outputs = declared_indexes(state.prepare_custom_config)
    if not inputs and not outputs:
        return gm
    holder = QuantizedBoundaries()
    gm.meta[_META] = holder
    setattr(gm, BOUNDARIES_ATTR, holder)
    modules = dict(gm.named_modules(remove_duplicate=False))
    for i, ph in input_placeholders(gm, inputs).items():
        _dequantize_input(gm, holder, i, ph, modules)
    return gm


def _attr_value(gm: fx.GraphModule, node: Any) -> Any:
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _replace_at(value: Any, path: tuple, new: fx.Node) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {k: _replace_at(v, rest, new) if k == head else v for k, v in value.items()}
    return type(value)(_replace_at(v, rest, new) if i == head else v for i, v in enumerate(value))


def _return_integer(gm: fx.GraphModule, holder: QuantizedBoundaries, key: Any, path: tuple, leaf: fx.Node,
                    done: dict[fx.Node, tuple]) -> None:
    """Return the quantize node under ``leaf`` (a dequantize) at ``path``; it reads the holder's buffers."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    if leaf in done:  # the same value returned twice
        holder.outputs[key] = done[leaf][:5] + (path,)
        output.args = (_replace_at(output.args[0], path, leaf.args[0]),)
        return
    if not (leaf.op == "call_function" and leaf.target is _OPS.dequantize_per_tensor.default):
        info = leaf.meta.get("fxquant_value")
        if info is not None and not info.is_tensor:
            return
        raise QuantizedIOError(f"output {key!r} is declared quantized, but convert left {leaf.name!r} in float (a "
                               f"convert-time qconfig_mapping with None for it?); keep it quantized or remove the "
                               f"index from output_quantized_indexes")
    q, scale_node, zp_node, qmin, qmax, dtype = leaf.args[:6]
    name = q.args[0].name if isinstance(q, fx.Node) and q.args and isinstance(q.args[0], fx.Node) else q.name
    prefix = holder.add("output", key, name, _attr_value(gm, scale_node), _attr_value(gm, zp_node), dtype, qmin, qmax,
                        path)
    if q.op == "call_function" and q.target is _OPS.quantize_per_tensor.default:
        with gm.graph.inserting_before(q):
            new_scale, new_zp = _qparam_nodes(gm, prefix)
        q.update_arg(1, new_scale)
        q.update_arg(2, new_zp)
    done[leaf] = holder.outputs[key]
    output.args = (_replace_at(output.args[0], path, q),)


def _dequantize_uses(gm: fx.GraphModule, node: fx.Node, path: tuple, call: fx.Node, child: fx.GraphModule,
                     entry: tuple) -> None:
    """Dequantize (with the child's buffers) every use of the standalone output element at ``path``."""
    prefix, name, dtype, qmin, qmax, _ = entry
    if not path:
        users = list(node.users)
        with gm.graph.inserting_before(node.next):
            scale_node, zp_node = _child_qparam_nodes(gm, call, child, prefix)
            dq = gm.graph.call_function(_OPS.dequantize_per_tensor.default, (node, scale_node, zp_node, qmin, qmax,
                                                                              dtype))
        for user in users:
            user.replace_input_with(node, dq)
        return
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem and user.args[0] is node:
            if user.args[1] == path[0]:
                _dequantize_uses(gm, user, path[1:], call, child, entry)
        else:
            raise NotImplementedError(
                f"standalone module {call.target} returns the quantized value {name!r} inside its output, and "
                f"{user.name} takes that output whole; only element access (out[i]) of a standalone module's "
                f"output is supported with output_quantized_indexes. Index the output before using it")


@register_pass("quantized_outputs")
def quantized_outputs(gm: nn.Module, ctx: Context) -> nn.Module:
    """Return integers at the declared output leaves; dequantize standalone children's quantized outputs."""
    if not isinstance(gm, fx.GraphModule):
        return gm
    done: set[int] = set()
    for call, child in list(_standalone_calls(gm)):
        holder = child.meta.get(_META)
        if holder is None:
            continue
        if id(child) not in done:
            done.add(id(child))
            quantized_outputs(child, ctx)
        for entry in holder.outputs.values():
            _dequantize_uses(gm, call, entry[5], call, child, entry)
    holder = gm.meta.get(_META)
    if holder is None:
        return gm
    _, outputs = declared_indexes(get_state(gm).prepare_custom_config)
    done: dict[fx.Node, tuple] = {}
    for key, path, leaf in output_leaves(gm, outputs):
        _return_integer(gm, holder, key, path, leaf, done)
    for dq in done:  # a dequantize only the output read is dead now (with its qparams reads)
        if not dq.users:
            args = [a for a in dq.args if isinstance(a, fx.Node) and a.op == "get_attr"]
            gm.graph.erase_node(dq)
            for a in args:
                if not a.users:
                    gm.graph.erase_node(a)
    setattr(gm, BOUNDARIES_ATTR, holder)
    return gm


@register_pass("quantized_io_attach")
def quantized_io_attach(gm: nn.Module, ctx: Context) -> nn.Module:
    """Put back the ``fxquant_boundaries`` holders that lowering's cleanup removed as unread."""
    for mod in gm.modules():
        holder = mod.meta.get(_META) if isinstance(mod, fx.GraphModule) else None
        if holder is not None and getattr(mod, BOUNDARIES_ATTR, None) is not holder:
            setattr(mod, BOUNDARIES_ATTR, holder)
    return gm
