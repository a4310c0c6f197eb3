"""Per-layer comparison support for *lowered* models (``convert_fx`` output running int8 kernels).

In a lowered graph integers flow between kernels and one node can stand for several float ops::

    reference:  conv2 -> q -> dq -> add(., skip) -> relu -> q -> dq        (float nodes conv2, add, relu)
    lowered:    layer1_0_conv2_1 = layer1_0_conv2(x_q, skip_q)              (Conv2d, post_op add_relu)

So, for each lowered node this module finds

* the float node whose value it produces: by name (the node, or its module path, or its name without torch.fx's
  ``_1`` suffix), then forward over the ops fused into it (``post_op`` / ``relu``); a candidate is accepted only
  when the lowering record (``_fxquant_lowering``) says that every one of those float ops went into a kernel of
  this node's type, so an unsure match gives no row rather than a wrong one;
* its output qparams (module ``output_*`` / ``out_*`` / ``scale`` buffers; ops that only move integers inherit
  their input's), to dequantize its integer output;
* a "shadow" run: the node on the float model's inputs, quantized with the qparams its producers use, against the
  float ops it replaces run on the same (dequantized) inputs: the error the layer adds by itself.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import fx, nn

from ..ops import quantize_per_tensor
from ..passes.lower_build import STANDS_FOR, lowering_records
from ..passes.lower_rules_ops import FLOAT_NAME
from . import _capture

__all__ = ["LoweredView", "is_lowered"]

_ATTR_PAIRS = (("output_scale", "output_zero_point"), ("out_scale", "out_zero_point"), ("scale", "zero_point"))
QInfo = tuple[torch.Tensor, torch.Tensor, int, int, torch.dtype]


_ELEMENTWISE = frozenset({"Quantize", "DeQuantize", "Requantize", "QuantizedBinary", "LookupTable"})


def is_lowered(gm: fx.GraphModule) -> bool:
    """True for a model that went through convert_fx's lowering: it carries the lowering record, or (the record
    does not survive ``copy.deepcopy``) it holds lowered modules."""
    if lowering_records(gm, None) is not None:
        return True
    return any(callable(getattr(m, "float_weight", None)) or type(m).__name__ in _ELEMENTWISE for m in gm.modules())


def _weighted_float(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        part = mod[0] if isinstance(mod, nn.Sequential) and len(mod) else mod
        return isinstance(getattr(part, "weight", None), torch.Tensor)
    return node.op == "call_function" and any(k in _kernel_name(node, modules) for k in ("conv", "linear"))


def _kernel_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[str(node.target)]).__name__
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    return re.sub(r"[^a-z]", "", _kernel_name(node, modules).lower())


def _range_of(mod: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    spec = getattr(mod, "output_spec", None)
    for owner in (spec, mod):
        lo, hi = getattr(owner, "quant_min", None), getattr(owner, "quant_max", None)
        if isinstance(lo, int) and isinstance(hi, int):
            return lo, hi
    info = torch.iinfo(dtype)
    return info.min, info.max


def _module_qinfo(mod: nn.Module, value: torch.Tensor) -> Optional[QInfo]:
    for s_name, z_name in _ATTR_PAIRS:
        scale, zp = getattr(mod, s_name, None), getattr(mod, z_name, None)
        if isinstance(scale, torch.Tensor) and isinstance(zp, torch.Tensor) and scale.numel() == 1:
            return (scale, zp, *_range_of(mod, value.dtype), value.dtype)
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not value.is_floating_point() and value.dtype != torch.bool


class LoweredView:
    """Lowered nodes seen as float values, matched to the float model's nodes."""

    def __init__(self, f_gm: fx.GraphModule, q_gm: fx.GraphModule, q_env: dict[str, Any]) -> None:
        self.f_gm = f_gm
        self.f_nodes = {n.name: n for n in f_gm.graph.nodes}
        self.f_modules = dict(f_gm.named_modules(remove_duplicate=False))
        self.q_gm, self.q_env = q_gm, q_env
        self.modules = dict(q_gm.named_modules(remove_duplicate=False))
        self.records = {r.node: r for r in lowering_records(q_gm)}
        self.modules_by_kernel = {type(m).__name__: callable(getattr(m, "float_weight", None))
                                  for m in self.modules.values()}
        self.qinfo: dict[str, QInfo] = {}
        for node in q_gm.graph.nodes:
            info = self._qinfo(node)
            if info is not None:
                self.qinfo[node.name] = info

    def _qinfo(self, node: fx.Node) -> Optional[QInfo]:
        value = self.q_env.get(node.name)
        if not _is_int(value):
            return None
        if node.op == "call_module":
            return _module_qinfo(self.modules[str(node.target)], value)
        for arg in node.all_input_nodes:  # ops that only move integers keep their input's qparams
            if arg.name in self.qinfo:
                return self.qinfo[arg.name]
        return None

    def as_float(self, node: fx.Node, value: Any = None) -> Any:
        """``node``'s value (or ``value``) as float: dequantized with its qparams when it is an integer tensor."""
        value = self.q_env[node.name] if value is None else value
        if not _is_int(value):
            return value
        info = self.qinfo.get(node.name)
        if info is None:
            return None
        scale, zp = info[0], info[1]
        return (value.to(torch.float32) - zp.to(torch.float32)) * scale

    # ------------------------------------------------------------------------------------------ matching
    def _candidates(self, node: fx.Node) -> list[str]:
        names = list(node.meta.get(STANDS_FOR, ())) + [node.name, re.sub(r"_\d+$", "", node.name)]
        if node.op == "call_module":  # a lowered module is named after the float op it replaces: that name first
            names.insert(0, str(node.target).replace(".", "_"))
        return list(dict.fromkeys(n for n in names if n in self.f_nodes))

    def _post_ops(self, node: fx.Node, first: fx.Node) -> list[str]:
        mod = self.modules.get(str(node.target)) if node.op == "call_module" else None
        post = str(getattr(mod, "post_op", "none") or "none")
        ops = [] if post == "none" else [p for p in post.split("_") if p != "tanh"]
        if getattr(mod, "relu", False) is True:
            ops.append("relu")
        fused = self.f_modules.get(str(first.target)) if first.op == "call_module" else None
        inside = [type(c).__name__.lower() for c in fused.children()] if isinstance(fused, nn.Sequential) else []
        return [p for p in ops if not any(name.startswith(p) for name in inside[1:])]

    def _recorded(self, f_node: fx.Node, kernel: str, first: bool) -> bool:
        """The lowering record lists ``f_node`` as run by a ``kernel``. Without a record (lost by deepcopy) only
        weighted kernels are matched: to a float op that has a weight (and fused ops by kind)."""
        if not self.records:
            lowered = self.modules_by_kernel.get(kernel, False)
            return not first or (lowered and _weighted_float(f_node, self.f_modules))
        rec = self.records.get(f_node.name)
        return rec is not None and rec.rule != "reference" and rec.kernel == kernel

    def match(self, node: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
        """(first float node, float node whose value ``node`` produces), or None when unsure."""
        if node.op not in ("call_module", "call_function", "call_method"):
            return None
        kernel = _kernel_name(node, self.modules)
        for name in self._candidates(node):
            first = self.f_nodes[name]
            if not self._recorded(first, kernel, True):
                if name == node.name and not _is_int(self.q_env.get(node.name)):
                    return first, first  # an op left in float form, under its own name
                continue
            last: Optional[fx.Node] = first
            for op in self._post_ops(node, first):
                users = list(last.users) if last is not None else []
                nxt = users[0] if len(users) == 1 else None
                last = nxt if nxt is not None and _kind(nxt, self.f_modules).startswith(op) and \
                    self._recorded(nxt, kernel, False) else None
            if last is not None:
                return first, last
        return None

    # ------------------------------------------------------------------------------------------ shadow
    def _float_source(self, arg: fx.Node, f_env: dict[str, Any]) -> Optional[fx.Node]:
        """The float node holding the exact value of ``arg``: its match, or (for ops that only move integers, which
        the lowering record does not list) a float node of the same name stem, kind and shape."""
        pair = self.match(arg)
        if pair is not None:
            return pair[1]
        float_name = arg.meta.get(FLOAT_NAME)  # an integer op the lowering moved: the float op it stands for
        if float_name in f_env and float_name in self.f_nodes:
            return self.f_nodes[float_name]
        inputs = arg.all_input_nodes
        if arg.op == "call_module" and len(inputs) == 1 and _is_int(self.q_env.get(arg.name)) and \
                not _is_int(self.q_env.get(inputs[0].name)):
            return self._float_source(inputs[0], f_env)  # a Quantize module after a float value
        if arg.meta.get(STANDS_FOR, None) == [] and len(inputs) == 1 and _is_int(self.q_env.get(inputs[0].name)):
            return self._float_source(inputs[0], f_env)  # a requantization: its input's value in other qparams
        src = _capture.source_of(arg)
        if src.name in f_env and src.op != "get_attr":
            return src
        value = self.q_env[arg.name]
        for name in self._candidates(arg):
            f_node = self.f_nodes[name]
            if _kind(f_node, self.f_modules) == _kind(arg, self.modules) and \
                    getattr(f_env.get(name), "shape", None) == getattr(value, "shape", ()):
                return f_node
        return None

    def _input(self, arg: fx.Node, f_env: dict[str, Any]) -> tuple[Any, Optional[tuple[str, Any]]]:
        """(value the kernel gets, (float source, the float value that integer input stands for) or None)."""
        value = self.q_env[arg.name]
        inputs = arg.all_input_nodes
        if arg.op == "call_module" and not _is_int(value) and len(inputs) == 1 and inputs[0].name in self.qinfo:
            src = self._float_source(inputs[0], f_env)  # a DeQuantize: the float consumer gets the exact value
            if src is not None and src.name in f_env:
                return f_env[src.name], None
        src = self._float_source(arg, f_env)
        if src is None or src.name not in f_env:
            return value, None
        exact = f_env[src.name]
        if not _is_int(value):
            return exact, None
        info = self.qinfo.get(arg.name)
        if info is None:
            return value, None
        scale, zp, lo, hi, dtype = info
        q = quantize_per_tensor(exact, scale.reshape(()), zp.reshape(()), lo, hi, dtype)
        if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last) and not value.is_contiguous():
            q = q.contiguous(memory_format=torch.channels_last)
        return q, (src.name, self.as_float(arg, q))

    def output_end(self, node: fx.Node) -> fx.Node:
        """An op left in float form is followed by its output quantization (a Quantize module): include it."""
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and users[0].name in self.qinfo and \
                not _is_int(self.q_env.get(node.name)):
            return users[0]
        return node

    def value(self, node: fx.Node) -> Any:
        """What ``node`` hands on, as float (after its output quantization)."""
        end = self.output_end(node)
        return self.as_float(end)

    def _float_chain(self, first: fx.Node, last: fx.Node, f_env: dict[str, Any], overrides: dict[str, Any]) -> Any:
        """The float ops ``first .. last`` evaluated with some of their inputs replaced (``overrides``)."""
        env = dict(overrides)
        cur = first
        while True:
            env[cur.name] = _capture.snapshot(_capture.run_node(
                self.f_gm, cur, lambda a: _capture.snapshot(env[a.name] if a.name in env else f_env[a.name])))
            if cur is last:
                return env[cur.name]
            cur = next(iter(cur.users))

    def shadow(self, node: fx.Node, f_env: dict[str, Any], first: fx.Node, last: fx.Node) -> tuple[Any, Any]:
        """(``node`` run on the float model's input values, the float ops ``first .. last`` on the same values).

        A kernel that takes integers gets the float values quantized as its producers quantize them; the float
        side then sees the same (dequantized) values, so only this layer's own error is measured."""
        with torch.no_grad():
            inputs: dict[str, Any] = {}
            overrides: dict[str, Any] = {}
            self._shadow_inputs(node, f_env, inputs, overrides, 0)
            out = _capture.run_node(self.q_gm, node, lambda a: inputs[a.name])
            end = self.output_end(node)
            if end is not node:
                out = _capture.run_node(self.q_gm, end, lambda a: out if a is node else self.q_env[a.name])
            reference = self._float_chain(first, last, f_env, overrides) if overrides else f_env[last.name]
        return self.as_float(end, out), reference

    def _helper_op(self, node: fx.Node, depth: int = 0) -> bool:
        """A float op the lowering made from integers (the float cast, mean or pooling before a Requantize) with no
        float twin: the shadow run recomputes it rather than taking the quantized model's value."""
        if node.op not in ("call_function", "call_method", "call_module") or _is_int(self.q_env.get(node.name)) or \
                node.name in self.f_nodes or FLOAT_NAME in node.meta or depth > 4 or not node.all_input_nodes:
            return False
        if node.op == "call_module" and type(self.modules.get(str(node.target))).__name__ == "DeQuantize":
            return False  # a float consumer's input: fed the exact float value instead (see _input)
        return all(_is_int(self.q_env.get(a.name)) or self._helper_op(a, depth + 1) for a in node.all_input_nodes) \
            and self.match(node) is None

    def _shadow_inputs(self, node: fx.Node, f_env: dict[str, Any], inputs: dict[str, Any],
                       overrides: dict[str, Any], depth: int) -> None:
        """The values ``node`` gets in a shadow run (into ``inputs``), and the float values they stand for."""
        for a in node.all_input_nodes:
            if a.name in inputs:
                continue
            if depth < 4 and self._helper_op(a):
                self._shadow_inputs(a, f_env, inputs, overrides, depth + 1)
                inputs[a.name] = _capture.snapshot(_capture.run_node(self.q_gm, a, lambda b: inputs[b.name]))
                continue
            value, sub = self._input(a, f_env)
            inputs[a.name] = _capture.snapshot(value)
            if sub is not None:
                overrides[sub[0]] = sub[1]
