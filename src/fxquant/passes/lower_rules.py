"""Lowering rules for weighted ops (conv / linear / embedding / rnn): static, dynamic and weight-only.

Static rules are anchored at the quantize of the op's output and replace, in one node::

    quantize(relu?(ref_conv(dequantize(x))))                                     -> QConv(x)            post_op relu?
    quantize(relu?(add(dequantize(quantize(ref_conv(dequantize(x)))), dequantize(y))))
                                                                                 -> QConv(x, y)         post_op add(_relu)

The add variants apply only when ``FUSE_ADD_ACROSS_QUANTIZE`` is set (off by default): a fused add skips the
quantize of the conv's own output, its rounding and its clamp to the observed range. Dynamic and weight-only rules are anchored at the reference module itself.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import fx, nn

from .. import nn as fnn
from ..nn.quantized import reference as ref
from .lower_build import Lowering, Rule
from .lower_match import Pat, split_weighted

__all__ = ["WEIGHTED_RULES", "CannotLower", "STATIC_CLASSES"]

Q = fnn.quantized


class CannotLower(Exception):
    """A rule matched but the module cannot be built (the reason is recorded; the op stays in reference form)."""


STATIC_CLASSES: dict[type, type] = {
    ref.Conv1d: Q.Conv1d, ref.Conv2d: Q.Conv2d, ref.Conv3d: Q.Conv3d, ref.ConvTranspose1d: Q.ConvTranspose1d,
    ref.ConvTranspose2d: Q.ConvTranspose2d, ref.ConvTranspose3d: Q.ConvTranspose3d, ref.Linear: Q.Linear,
}
WEIGHT_ONLY_CLASSES: dict[type, Any] = {ref.Linear: Q.LinearWeightOnly, ref.Embedding: Q.Embedding,
                                        ref.EmbeddingBag: Q.EmbeddingBag, ref.LSTM: Q.LSTM, ref.GRU: Q.GRU}
_INT_ACTIVATIONS = (torch.uint8, torch.int8)

# --------------------------------------------------------------------------------------------------- patterns
_X = Pat("dq", name="dq_x")
_W = Pat("weighted", (_X,), name="mod", single_use=True)
_MID = Pat("dq", (Pat("q", (_W,), name="mid", single_use=True),), single_use=True)
_ADD = Pat("add", (_MID, Pat("dq", name="dq_other")), name="add", single_use=True)


def _q(inner: Pat) -> Pat:
    return Pat("q", (inner,), name="out")


# --------------------------------------------------------------------------------------------------- helpers
def _part(low: Lowering, m: dict[str, fx.Node]) -> tuple[nn.Module, str]:
    part, post = split_weighted(low.module(m["mod"]))
    return part, post  # type: ignore[return-value]


def _record_original(low: Lowering, name: str, part: nn.Module, mod: nn.Module) -> None:
    """keep_original_weights: the float weight stays reachable, on the module and in the model's lookup, outside
    the state dict (an LSTM keeps several weights and is not recorded)."""
    weight, bias = getattr(part, "original_weight", None), getattr(part, "bias", None)
    if isinstance(weight, torch.Tensor):
        weight = mod.__dict__["original_weight"] = weight.detach()
        low.keep_original(name, weight, bias.detach() if isinstance(bias, torch.Tensor) else None)


def _lowered_call(low: Lowering, m: dict[str, fx.Node], mod: nn.Module, args: tuple, part: nn.Module) -> fx.Node:
    node = low.call_module(m.get("out", m["mod"]), str(m["mod"].target), mod, args)
    _record_original(low, str(node.target), part, mod)
    return node


# Fusing ``add(dequantize(quantize(conv)), other)`` into the conv (onednn's binary post-op) skips the quantize of
# the conv's own output: its rounding (half a step) and its clamp to the observed range, which an input outside
# the calibration range makes arbitrarily large (11 output steps were seen). Off, the conv writes its exact
# integer output and the add runs as an integer op, as in the reference; on, models with residual adds run one
# integer add fewer per block but may leave the one-step contract for such inputs.
FUSE_ADD_ACROSS_QUANTIZE = False


_BINARY_POSTS = frozenset({"add", "add_relu"})


def _module_other(low: Lowering, m: dict[str, fx.Node]) -> Optional[fx.Node]:
    """The second input of a weighted module that adds it itself (ConvAdd2d / ConvAddReLU2d), else None."""
    _, post = _part(low, m)
    if post not in _BINARY_POSTS:
        return None
    args = tuple(m["mod"].args) + tuple(m["mod"].kwargs.values())
    if len(args) != 2:
        raise CannotLower(f"{type(low.module(m['mod'])).__name__} called with {len(args)} inputs, expected 2")
    return args[1]  # type: ignore[return-value]


def _unary_only(low: Lowering, m: dict[str, fx.Node]) -> str:
    _, post = _part(low, m)
    return f"{type(low.module(m['mod'])).__name__} adds a second input: only its static int8 form takes one" \
        if post in _BINARY_POSTS else ""


def _static_when(extra_post: str) -> Any:
    def when(low: Lowering, m: dict[str, fx.Node]) -> str:
        from .lower_match import kind_of

        if "mid" in m and not FUSE_ADD_ACROSS_QUANTIZE:
            return ("the add reads the conv output after its own quantization (rounded and clamped to its observed "
                    "range); fusing would skip that clamp, so conv and add are lowered separately")
        part, post = _part(low, m)
        if type(part) not in STATIC_CLASSES:
            return f"no static int8 kernel for {type(part).__name__}"
        if extra_post != "none" and post != "none":
            return f"{type(low.module(m['mod'])).__name__} already applies {post}; cannot fuse {extra_post} too"
        dtypes = {low.qparams(m["dq_x"]).dtype, low.qparams(m["out"]).dtype}
        if "dq_other" in m:
            dtypes.add(low.qparams(m["dq_other"]).dtype)
        try:
            other = _module_other(low, m)
        except CannotLower as err:
            return str(err)
        if other is not None:
            if kind_of(other, low.modules) != "dq":
                return "the added input is not a statically quantized value"
            dtypes.add(low.qparams(other).dtype)
        return "" if dtypes <= set(_INT_ACTIVATIONS) else f"activation dtypes {sorted(map(str, dtypes))}"
    return when


def _static_replace(extra_post: str) -> Any:
    def replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
        part, post = _part(low, m)
        post = extra_post if post == "none" else post
        xq, out = low.qparams(m["dq_x"]), low.qparams(m["out"])
        lo, hi = low.input_range(m["dq_x"])
        options: dict[str, Any] = {"input_dtype": xq.dtype, "input_quant_min": lo, "input_quant_max": hi,
                                   "output_quant_min": out.quant_min, "output_quant_max": out.quant_max}
        args: tuple = (m["dq_x"].args[0],)
        other = m.get("dq_other") or _module_other(low, m)
        if other is not None:
            oq = low.qparams(other)
            olo, ohi = low.input_range(other)
            options.update(other_scale=oq.scale, other_zero_point=oq.zero_point, other_dtype=oq.dtype,
                           other_quant_min=olo, other_quant_max=ohi)
            args += (other.args[0],)
        try:
            mod = STATIC_CLASSES[type(part)].from_reference(part, xq.scale, xq.zero_point, out.scale, out.zero_point,
                                                            output_dtype=out.dtype, post_op=post, **options)
        except (TypeError, ValueError) as err:
            raise CannotLower(str(err)) from err
        return _lowered_call(low, m, mod, args, part)
    return replace


def _float_out_when(low: Lowering, m: dict[str, fx.Node]) -> str:
    part, _ = _part(low, m)
    reason = _unary_only(low, m)
    if reason:
        return reason
    if type(part) not in STATIC_CLASSES:
        return f"no static int8 kernel for {type(part).__name__}"
    return "" if low.qparams(m["dq_x"]).dtype in _INT_ACTIVATIONS else "input is not uint8 / int8"


def _float_out_replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    part, post = _part(low, m)
    xq = low.qparams(m["dq_x"])
    lo, hi = low.input_range(m["dq_x"])
    try:
        mod = STATIC_CLASSES[type(part)].from_reference(part, xq.scale, xq.zero_point, output_dtype=torch.float32,
                                                        post_op=post, input_dtype=xq.dtype, input_quant_min=lo,
                                                        input_quant_max=hi)
    except (TypeError, ValueError) as err:
        raise CannotLower(str(err)) from err
    return _lowered_call(low, m, mod, (m["dq_x"].args[0],), part)


# --------------------------------------------------------------------------------------------------- dynamic
def _dynamic_when(low: Lowering, m: dict[str, fx.Node]) -> str:
    part, _ = _part(low, m)
    reason = _unary_only(low, m)
    if reason:
        return reason
    chooser = m["qd"].args[1].args[0] if isinstance(m["qd"].args[1], fx.Node) else None
    if type(part) is not ref.Linear:
        return "" if type(part) in (ref.LSTM, ref.GRU) else f"no dynamic kernel for {type(part).__name__}"
    if chooser is None or len(chooser.args) < 5 or (len(chooser.args) > 5 and chooser.args[5]):
        return "dynamic qparams are not affine per-tensor ones"
    return ""


def _dynamic_replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    part, post = _part(low, m)
    if type(part) in (ref.LSTM, ref.GRU):
        return _dynamic_rnn(low, m, part)
    chooser = m["qd"].args[1].args[0]
    _, qmin, qmax, _, dtype = chooser.args[:5]
    try:
        mod = Q.LinearDynamic.from_reference(part, dtype=dtype, quant_min=qmin, quant_max=qmax, post_op=post)
    except (TypeError, ValueError) as err:
        raise CannotLower(str(err)) from err
    return _lowered_call(low, m, mod, (m["qd"].args[0],), part)


def _dynamic_rnn(low: Lowering, m: dict[str, fx.Node], part: Any) -> fx.Node:
    """A dynamic LSTM / GRU: torch.ao's converted numerics (the input and each step's hidden state quantized at run
    time, int8 products) where the activation qparams are per-tensor uint8 ones; else the reference's float
    recurrence on the fake-quantized input."""
    chooser = m["qd"].args[1].args[0] if isinstance(m["qd"].args[1], fx.Node) else None
    args = chooser.args if chooser is not None else ()
    if len(args) >= 5 and args[4] == torch.uint8 and not (len(args) > 5 and args[5]) and \
            not Q.rnn_dynamic.supports(part):
        cls = Q.DynamicLSTM if type(part) is ref.LSTM else Q.DynamicGRU
        mod = cls.from_reference(part, quant_min=args[1], quant_max=args[2])
        return _lowered_call(low, m, mod, (m["qd"].args[0],) + tuple(m["mod"].args[1:]), part)
    mod = WEIGHT_ONLY_CLASSES[type(part)].from_reference(part)
    return _lowered_call(low, m, mod, (m["dqd"],) + tuple(m["mod"].args[1:]), part)


# --------------------------------------------------------------------------------------------------- weight-only
def _weight_only_when(low: Lowering, m: dict[str, fx.Node]) -> str:
    part, _ = _part(low, m)
    reason = _unary_only(low, m)
    if reason:
        return reason
    first = m["mod"].args[0] if m["mod"].args else None
    from .lower_match import kind_of

    if type(part) not in WEIGHT_ONLY_CLASSES:
        return f"no weight-only kernel for {type(part).__name__}"
    if kind_of(first, low.modules) in ("dq", "dq_dynamic"):
        return "the input is quantized (a static or dynamic rule applies)"
    return ""


def _weight_only_replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    part, post = _part(low, m)
    cls = WEIGHT_ONLY_CLASSES[type(part)]
    try:
        mod = cls.from_reference(part, post_op=post) if cls is Q.LinearWeightOnly else cls.from_reference(part)
    except (TypeError, ValueError) as err:
        raise CannotLower(str(err)) from err
    if post != "none" and cls is not Q.LinearWeightOnly:
        raise CannotLower(f"{cls.__name__} cannot apply {post}")
    node = low.call_module(m["mod"], str(m["mod"].target), mod, m["mod"].args)
    node.kwargs = dict(m["mod"].kwargs)
    _record_original(low, str(node.target), part, mod)
    return node


_DYN = Pat("dq_dynamic", (Pat("q_dynamic", name="qd"),), name="dqd")
_ROOT_Q, _ROOT_W = frozenset({"q"}), frozenset({"weighted"})

WEIGHTED_RULES: tuple[Rule, ...] = (
    Rule("weighted_add_relu", _ROOT_Q, _q(Pat("relu", (_ADD,), name="relu", single_use=True)),
         _static_replace("add_relu"), _static_when("add_relu")),
    Rule("weighted_add", _ROOT_Q, _q(_ADD), _static_replace("add"), _static_when("add")),
    Rule("weighted_relu", _ROOT_Q, _q(Pat("relu", (_W,), name="relu", single_use=True)), _static_replace("relu"),
         _static_when("relu")),
    Rule("weighted", _ROOT_Q, _q(_W), _static_replace("none"), _static_when("none")),
    Rule("weighted_float_output", _ROOT_W, Pat("weighted", (_X,), name="mod"), _float_out_replace, _float_out_when),
    Rule("dynamic", _ROOT_W, Pat("weighted", (_DYN,), name="mod"), _dynamic_replace, _dynamic_when),
    Rule("weight_only", _ROOT_W, Pat("weighted", name="mod"), _weight_only_replace, _weight_only_when),
)
