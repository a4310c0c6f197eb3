"""GraphModules in the JSON model description: the graph as a node list, the module as its attributes.

    {"graph_module": "ResNet",                        the class name torch.fx shows
     "graph": [{"op": "placeholder", "name": "x", "target": "x", "args": [], "kwargs": {"$": "dict", "v": []}},
               {"op": "call_module", "name": "conv1", "target": "conv1", "args": [{"$": "node", "v": "x"}], ...},
               {"op": "call_function", "name": "flatten", "target": {"$": "ref", "v": "torch.flatten"}, ...},
               ...],
     "state": {... the module's __dict__: _modules, _buffers, _parameters, training, fxquant's prepared state ...},
     "meta": {... the meta keys fxquant keeps ...}}

torch.fx turns a graph into Python source and runs it, so every name that reaches that source is checked first:
node names and method names must be identifiers, module paths dotted identifiers, and function targets go
through the allow-list. Nothing from the file is ever ``exec``-ed as written.
"""
from __future__ import annotations

import keyword
import re
from typing import Any

import torch
from torch import fx

from ._codec import Decoder, Encoder, FormatError

__all__ = ["encode_graph_module", "decode_graph_module"]

_OPS = ("placeholder", "get_attr", "call_function", "call_module", "call_method", "output")
_PATH = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_PLACEHOLDER = re.compile(r"^\*{0,2}[A-Za-z_][A-Za-z0-9_]*$")
_SKIPPED_ATTRS = frozenset({"_graph", "_code", "_lineno_map", "_prologue_start", "_tracer_cls", "_tracer_extras",
                            "meta", "_replace_hooks", "_create_node_hooks", "_erase_node_hooks", "_deepcopy_hooks",
                            "shape_env", "_in_spec", "_out_spec"})
_KEPT_META = ("_fxquant_state",)
_ARG_TAGS = frozenset({"tuple", "dict", "odict", "slice", "ellipsis", "node", "ref", "dtype", "device", "size",
                       "memory_format", "layout", "qscheme", "float", "complex", "set", "frozenset"})


def _check_args(tree: Any, where: str) -> None:
    """Graph arguments become Python source: only literals, containers, nodes, torch singletons and refs."""
    if isinstance(tree, list):
        for x in tree:
            _check_args(x, where)
    elif isinstance(tree, dict):
        if tree.get("$") not in _ARG_TAGS:
            raise FormatError(f"{where}: a graph argument of kind {tree.get('$')!r} cannot be saved or loaded "
                              f"(only literals, tensors' dtypes/devices, nodes and functions can)")
        for key in ("v",):
            if isinstance(tree.get(key), list):
                _check_args(tree[key], where)


def _encode_node(enc: Encoder, node: fx.Node, where: str) -> dict[str, Any]:
    at = f"{where}.graph node {node.name!r}"
    if node.op == "call_function":
        target: Any = enc.enc(node.target, at)
    else:
        target = str(node.target)
    out = {"op": node.op, "name": node.name, "target": target, "args": enc.enc(list(node.args), at),
           "kwargs": enc.enc(dict(node.kwargs), at)}
    _check_args(out["args"], at)
    _check_args(out["kwargs"], at)
    return out


def encode_graph_module(enc: Encoder, gm: fx.GraphModule, where: str) -> dict[str, Any]:
    """The object-table entry of a GraphModule (see the module docstring)."""
    codegen = getattr(gm.graph, "_codegen", None)
    if codegen is not None and type(codegen) is not fx.graph.CodeGen:
        raise FormatError(f"cannot save {where}: its graph uses {type(codegen).__name__} code generation "
                          f"(pytree inputs / outputs); only plain torch.fx graphs can be saved")
    state = {k: v for k, v in gm.__dict__.items() if k not in _SKIPPED_ATTRS}
    meta = {k: gm.meta[k] for k in _KEPT_META if k in getattr(gm, "meta", {})}
    return {"graph_module": type(gm).__name__,
            "graph": [_encode_node(enc, n, where) for n in gm.graph.nodes],
            "state": enc.enc(state, where),
            "meta": enc.enc(meta, f"{where}.meta")}


def _check_target(op: str, target: Any, name: str) -> None:
    if op == "call_function":
        return
    if not isinstance(target, str):
        raise FormatError(f"node {name!r}: target must be a string, got {type(target).__name__}")
    if op == "placeholder" and not _PLACEHOLDER.match(target):
        raise FormatError(f"node {name!r}: bad placeholder name {target!r}")
    if op in ("get_attr", "call_module") and (not _PATH.match(target) or "__" in target):
        raise FormatError(f"node {name!r}: bad attribute path {target!r}")
    if op == "call_method" and (not target.isidentifier() or target.startswith("__")):
        raise FormatError(f"node {name!r}: bad method name {target!r}")


def _check_getattr(target: Any, args: tuple, name: str) -> None:
    if target is getattr and (len(args) < 2 or not isinstance(args[1], str) or args[1].startswith("__")):
        raise FormatError(f"node {name!r}: getattr of {args[1:2]!r} is not allowed in a saved graph")


def _decode_graph(dec: Decoder, nodes: list[dict[str, Any]]) -> fx.Graph:
    graph = fx.Graph()
    dec.nodes = {}
    for item in nodes:
        op, name = item["op"], item["name"]
        if op not in _OPS:
            raise FormatError(f"node {name!r}: unknown op {op!r}")
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise FormatError(f"bad node name {name!r}")
        target = dec.dec(item["target"]) if op == "call_function" else item["target"]
        _check_target(op, target, name)
        if op == "call_function" and not callable(target):
            raise FormatError(f"node {name!r}: target is not callable")
        args, kwargs = tuple(dec.dec(item["args"])), dec.dec(item["kwargs"])
        _check_getattr(target, args, name)
        if op == "output":
            node = graph.output(args[0])
        else:
            node = graph.create_node(op, target, args, kwargs, name=name)
        if op != "output" and node.name != name:
            raise FormatError(f"node name {name!r} is used twice in the saved graph")
        dec.nodes[name] = node
    dec.nodes = {}
    return graph


def decode_graph_module(dec: Decoder, entry: dict[str, Any], index: int) -> fx.GraphModule:
    """Rebuild a GraphModule from its entry: attributes first, then the graph (which recompiles its code)."""
    class_name = entry["graph_module"]
    if not isinstance(class_name, str) or not class_name.isidentifier():
        raise FormatError(f"bad GraphModule class name {class_name!r}")
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph(), class_name=class_name)
    dec.memo(index, gm)
    state = dec.dec(entry["state"])
    if not isinstance(state, dict) or any(not isinstance(k, str) or k in _SKIPPED_ATTRS for k in state):
        raise FormatError("malformed GraphModule state")
    gm.__dict__.update(state)
    gm.meta.update(dec.dec(entry["meta"]))
    for key in _KEPT_META:
        if key in gm.meta:
            setattr(gm, key, gm.meta[key])
    gm.graph = _decode_graph(dec, entry["graph"])
    return gm
