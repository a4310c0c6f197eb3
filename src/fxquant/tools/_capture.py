"""Node-level capture for :mod:`fxquant.tools.compare`: run a GraphModule and keep every node's value, find the
quantize / dequantize chain around a node, and re-run one node on the float model's inputs ("shadow").

In a reference model a quantized op looks like::

    x_float_src -> quantize -> dequantize -> conv -> quantize -> dequantize -> next op
                   \\__ the producer's output __/          \\__ conv's output quantization __/

so the value "conv produced" is the one after its own output chain, and conv's local error is measured by feeding it
the float model's value of ``x_float_src`` directly (the input quantization belongs to the producer).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import fx

__all__ = ["snapshot", "record", "is_qdq", "output_end", "source_of", "run_node", "shadow_value", "sqnr", "is_float_value"]

_QDQ_NAMES = ("quantize_per_tensor", "quantize_per_channel", "quantize_per_token", "dequantize_per_tensor",
              "dequantize_per_channel", "dequantize_per_token")


def snapshot(value: Any) -> Any:
    """A copy of the tensors in ``value`` (later in-place ops, e.g. ``ReLU(inplace=True)``, must not change it)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(snapshot(v) for v in value) if type(value) in (tuple, list) else value
    return value


def record(gm: fx.GraphModule, inputs: tuple) -> dict[str, Any]:
    """Run ``gm`` on ``inputs`` (no grad) and return ``{node name: value}`` for every node (copies)."""
    env: dict[str, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            env[n.name] = snapshot(value)
            return value

    with torch.no_grad():
        _Recorder(gm).run(*inputs)
    return env


def is_qdq(node: fx.Node) -> bool:
    """A quantize / dequantize op of a converted graph (torch.ops.fxquant.*), or a float cast ``x.to(dtype)``."""
    if node.op == "call_method" and node.target == "to":
        return len(node.args) >= 2 and isinstance(node.args[1], torch.dtype)
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace == "fxquant" and target._overloadpacket.__name__ in _QDQ_NAMES
    return getattr(target, "__name__", "") in _QDQ_NAMES and "fxquant" in getattr(target, "__module__", "")


def output_end(node: fx.Node) -> fx.Node:
    """The last node of ``node``'s output quantization chain (``node`` itself when it has none)."""
    cur = node
    for _ in range(4):
        users = [u for u in cur.users if is_qdq(u) and u.args and u.args[0] is cur]
        if len(users) != 1 or len(cur.users) != 1:
            break
        cur = users[0]
    return cur


def source_of(node: fx.Node) -> fx.Node:
    """Walk back through quantize / dequantize ops to the node that produced the float value."""
    cur = node
    while is_qdq(cur) and cur.args and isinstance(cur.args[0], fx.Node):
        cur = cur.args[0]
    return cur


def run_node(gm: fx.GraphModule, node: fx.Node, env: Callable[[fx.Node], Any]) -> Any:
    """Execute one call node with argument values from ``env``."""
    args = fx.node.map_arg(node.args, env)
    kwargs = fx.node.map_arg(node.kwargs, env)
    if node.op == "call_module":
        return gm.get_submodule(str(node.target))(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, str(node.target))(*rest, **kwargs)
    raise ValueError(f"cannot run {node.op} node {node.name!r} on its own")


def _is_float_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _chain(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """The nodes strictly after ``start`` up to and including ``end`` along the single-user qdq chain."""
    out, cur = [], start
    while cur is not end:
        cur = next(iter(cur.users))
        out.append(cur)
    return out


def _input_value(gm: fx.GraphModule, arg: fx.Node, q_env: dict[str, Any], f_env: dict[str, Any]) -> Any:
    """The value ``arg`` would have if its producer were exact (float model's value, re-quantized if consumed int)."""
    src = source_of(arg)
    if src.op == "get_attr" or src.name not in f_env:
        return q_env[arg.name]
    if _is_float_tensor(q_env[arg.name]) or src is arg:
        return f_env[src.name]
    local = {src.name: f_env[src.name]}  # the consumer takes an integer tensor: re-quantize the float value
    path, cur = [], arg
    while cur is not src:
        path.append(cur)
        cur = cur.args[0]  # type: ignore[assignment]
    for n in reversed(path):
        local[n.name] = run_node(gm, n, lambda a: local[a.name] if a.name in local else q_env[a.name])
    return local[arg.name]


def shadow_value(gm: fx.GraphModule, node: fx.Node, q_env: dict[str, Any], f_env: dict[str, Any]) -> Any:
    """``node`` (and its output chain) evaluated in the quantized model on the float model's input values."""
    with torch.no_grad():
        inputs = {a.name: snapshot(_input_value(gm, a, q_env, f_env)) for a in node.all_input_nodes}
        local = {node.name: run_node(gm, node, lambda a: inputs[a.name])}
        end = output_end(node)
        for n in _chain(node, end):
            local[n.name] = run_node(gm, n, lambda a: local[a.name] if a.name in local else q_env[a.name])
    return local[end.name]


def is_float_value(value: Any) -> bool:
    """True for a float tensor or a (nested) tuple / list holding at least one: something SQNR can measure."""
    return _flat(value) is not None


def _flat(value: Any) -> Optional[list[torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else None
    if isinstance(value, (tuple, list)):
        parts = [_flat(v) for v in value]
        tensors = [t for p in parts if p for t in p]
        return tensors or None
    return None


def sqnr(reference: Any, test: Any) -> Optional[float]:
    """Signal-to-quantization-noise ratio in dB, ``10 log10(sum(ref^2) / sum((ref - test)^2))``.

    ``inf`` when equal; ``None`` when the values are not comparable (not float tensors, different shapes).
    Positions where ``reference`` is not finite are left out.
    """
    ref, tst = _flat(reference), _flat(test)
    ref = None if ref is None else [t.detach() for t in ref]
    tst = None if tst is None else [t.detach() for t in tst]
    if ref is None or tst is None or len(ref) != len(tst) or any(a.shape != b.shape for a, b in zip(ref, tst)):
        return None
    # positions where the float model itself is inf / NaN (an attention mask of -inf) carry no measurable signal,
    # and no quantized tensor can hold them: they are left out rather than making every mask the "worst layer"
    # and a quantized value that overflowed to +-inf (a finfo.min mask dequantized: (0 - zp) * scale rounds past
    # the largest float32) counts as that largest float32, which the float model's value then is
    finite = [torch.isfinite(a) for a in ref]
    big = torch.finfo(torch.float32).max
    signal = sum(float(a.double()[f].pow(2).sum()) for a, f in zip(ref, finite))
    noise = sum(float((a.double() - b.double().clamp(-big, big))[f].pow(2).sum()) for a, b, f in zip(ref, tst, finite))
    if not math.isfinite(noise) or not math.isfinite(signal):
        return float("-inf")  # NaN / inf where the float model is finite: as bad as it gets
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)
