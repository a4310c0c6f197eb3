"""What the lowering rules match on: node kinds, activation qparams, and tree patterns.

A reference graph is made of a few node kinds (:func:`kind_of`)::

    "q"            fxquant quantize_per_tensor with constant (get_attr) qparams
    "dq"           fxquant dequantize_per_tensor with constant qparams
    "q_dynamic"    quantize_per_tensor whose qparams come from choose_qparams (getitem nodes)
    "dq_dynamic"   the matching dequantize
    "dq_weight"    dequantize_per_channel / per_tensor of a get_attr (a functional op's folded weight)
    "weighted"     a reference conv / linear, or a fused container whose first part is one
    anything else  the op's canonical key from :mod:`fxquant.vocab` (``"relu"``, ``"add"``, ``nn.MaxPool2d``, ...)

A :class:`Pat` is a tree over ``node.args``: ``Pat("q", (Pat("weighted", (Pat("dq", name="x"),), name="mod"),))``
matches ``quantize(ref_conv(dequantize(x)))`` and binds ``x`` and ``mod``. Commutative kinds (``add``, ``mul``)
also try their two operands swapped.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional, Union

import torch
from torch import fx, nn

from ..nn.quantized import reference as ref
from ..vocab import op_key

__all__ = ["QParams", "Pat", "Match", "kind_of", "qparams_of", "match", "OBSERVED_RANGE", "attr_value",
           "WEIGHTED_PARTS", "split_weighted"]

OBSERVED_RANGE = "fxquant_observed_range"  # node.meta of quantize nodes (set by to_reference)
_OPS = torch.ops.fxquant

_FUNCTION_KINDS: dict[Any, str] = {}


def _register_ops() -> None:
    from .. import ops  # noqa: F401  (registers torch.ops.fxquant)

    _FUNCTION_KINDS.update({_OPS.quantize_per_tensor.default: "q", _OPS.dequantize_per_tensor.default: "dq",
                            _OPS.dequantize_per_channel.default: "dq_weight",
                            _OPS.choose_qparams_per_tensor.default: "choose_qparams"})


# reference module class -> its role; fused containers are looked through (first part)
WEIGHTED_PARTS: dict[type, str] = {
    ref.Conv1d: "conv", ref.Conv2d: "conv", ref.Conv3d: "conv", ref.ConvTranspose1d: "conv",
    ref.ConvTranspose2d: "conv", ref.ConvTranspose3d: "conv", ref.Linear: "linear",
    ref.Embedding: "embedding", ref.EmbeddingBag: "embedding_bag", ref.LSTM: "rnn", ref.GRU: "rnn",
}
_COMMUTATIVE = frozenset({"add", "mul"})


@dataclasses.dataclass(frozen=True)
class QParams:
    """Per-tensor activation qparams of a quantize / dequantize node, as Python numbers."""

    scale: float
    zero_point: int
    dtype: torch.dtype
    quant_min: int  # the op's clamp range (the dtype's range in reference graphs)
    quant_max: int
    observed: tuple[int, int]  # the observer's range (x86 reduce_range: 0..127); = clamp range when unknown

    def same_values(self, other: QParams) -> bool:
        """Same scale, zero point and dtype: a dequantize with these and a quantize with ``other`` cancel."""
        return (self.scale, self.zero_point, self.dtype) == (other.scale, other.zero_point, other.dtype)


def attr_value(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The object a get_attr node reads."""
    obj: Any = gm
    for atom in str(node.target).split("."):
        obj = getattr(obj, atom)
    return obj


def split_weighted(mod: nn.Module) -> tuple[Optional[nn.Module], str]:
    """``(reference part, post-op)`` of a weighted module: itself with ``"none"``, a fused container's first
    part with ``"relu"``, a conv that adds its second input (onednn's ConvAdd2d / ConvAddReLU2d) with ``"add"`` /
    ``"add_relu"``; ``(None, "")`` for anything else."""
    from ..nn.intrinsic import ConvAdd2d, ConvAddReLU2d

    if type(mod) in WEIGHTED_PARTS:
        return mod, "none"
    if isinstance(mod, (ConvAdd2d, ConvAddReLU2d)):  # (before the relu case: ConvAddReLU2d holds a ReLU too)
        return (mod[0], "add_relu" if isinstance(mod, ConvAddReLU2d) else "add") if type(mod[0]) in WEIGHTED_PARTS \
            else (None, "")
    if isinstance(mod, nn.Sequential) and len(mod) == 2 and type(mod[0]) in WEIGHTED_PARTS \
            and isinstance(mod[1], nn.ReLU):
        return mod[0], "relu"
    return None, ""


def kind_of(node: Any, modules: dict[str, nn.Module]) -> Any:
    """The kind of ``node`` (see the module docstring); None for non-nodes, placeholders, get_attr and output."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        part, _ = split_weighted(mod) if mod is not None else (None, "")
        return "weighted" if part is not None else op_key(type(mod))
    if node.op == "call_function":
        if not _FUNCTION_KINDS:
            _register_ops()
        kind = _FUNCTION_KINDS.get(node.target)
        if kind in ("q", "dq"):
            static = isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr"
            return kind if static else f"{kind}_dynamic"
        return kind if kind is not None else op_key(node.target)
    if node.op == "call_method":
        return op_key(node.target)
    return None


def qparams_of(node: fx.Node, gm: fx.GraphModule) -> QParams:
    """QParams of a static quantize / dequantize node (qparams read from the get_attr buffers)."""
    _, scale, zp, qmin, qmax, dtype = node.args[:6]
    observed = node.meta.get(OBSERVED_RANGE, (qmin, qmax))
    return QParams(float(attr_value(gm, scale)), int(attr_value(gm, zp)), dtype, int(qmin), int(qmax),
                   (int(observed[0]), int(observed[1])))


Kind = Union[str, type, Any]


@dataclasses.dataclass(frozen=True)
class Pat:
    """Match a node of ``kind`` (one kind, a frozenset of kinds, or ``"*"`` for any node) whose first
    ``len(args)`` arguments match ``args``; bind it as ``name``. ``single_use``: the node has exactly one user
    (it is folded into the replacement)."""

    kind: Any
    args: tuple[Pat, ...] = ()
    name: str = ""
    single_use: bool = False

    def kinds(self) -> frozenset:
        return self.kind if isinstance(self.kind, frozenset) else frozenset({self.kind})


Match = dict[str, fx.Node]


def _match(pat: Pat, node: Any, modules: dict[str, nn.Module], out: Match) -> bool:
    if not isinstance(node, fx.Node):
        return False
    kind = kind_of(node, modules)
    if pat.kind != "*" and kind not in pat.kinds():
        return False
    if pat.single_use and len(node.users) != 1:
        return False
    if len(node.args) < len(pat.args):
        return False
    orders = [node.args]
    if kind in _COMMUTATIVE and len(pat.args) == 2:
        orders.append((node.args[1], node.args[0]))
    for args in orders:
        trial: Match = {}
        if all(_match(p, a, modules, trial) for p, a in zip(pat.args, args)):
            out.update(trial)
            if pat.name:
                out[pat.name] = node
            return True
    return False


def match(pat: Pat, node: fx.Node, modules: dict[str, nn.Module]) -> Optional[Match]:
    """Bindings of ``pat`` rooted at ``node``, or None."""
    out: Match = {}
    return out if _match(pat, node, modules, out) else None


def is_getitem(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem
