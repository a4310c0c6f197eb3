"""Which ops the lowering runs on integer tensors, as data (keys are :func:`fxquant.vocab.op_key` results).

* :data:`INTEGER_OPS` move or select values without computing new ones (shape ops, max pooling, nearest
  upsampling, chunk / split), so ``op(dequantize(q)) == dequantize(op(q))`` exactly: the dequantize sinks below
  them and they run on the uint8 tensor. Each entry says when the op qualifies and whether it returns several
  tensors (then its ``getitem`` users get the dequantize). Bilinear resizing also runs on integers
  (:func:`fxquant.kernels.uint8.interpolate`, one rounding: within one step of the float op).
* :data:`SHAPE_QUERIES` read only the shape: they take the integer tensor as is.
* :data:`AFFINE_OPS` are linear with weights summing to one (average pooling, mean, bilinear interpolation):
  ``op((q - zp) * s) == (op(q) - zp) * s``, so they run in float on ``q.float()`` and a requantize folds both
  qparams (:class:`fxquant.nn.quantized.Requantize`).
* :data:`UNARY_OPS` are element-wise functions of one value: any chain of them between a dequantize and a
  quantize is one 256-entry table (:class:`fxquant.nn.quantized.LookupTable`), computed with the reference ops.
* :data:`IDENTITY_OPS` vanish in eval mode (dropout, identity; :data:`IDENTITY_FUNCTIONS_BY_NAME` for other
  libraries' functions, e.g. torchvision's stochastic depth).
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..kernels import uint8
from .lower_match import kind_of

__all__ = ["INTEGER_OPS", "SHAPE_QUERIES", "AFFINE_OPS", "UNARY_OPS", "IDENTITY_OPS", "RENAMED_METHODS",
           "INTEGER_KERNELS", "node_arg", "IDENTITY_FUNCTIONS_BY_NAME", "qualified_name",
           "pads_zero_points"]

Check = Callable[[fx.Node, Any], bool]  # (node, module or None) -> qualifies


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` / keyword ``name`` of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _always(node: fx.Node, mod: Any) -> bool:
    return True


def _nearest(node: fx.Node, mod: Any) -> bool:
    mode = getattr(mod, "mode", None) if mod is not None else node_arg(node, 3, "mode", "nearest")
    return mode == "nearest"


def _mode(node: fx.Node, mod: Any) -> Any:
    return getattr(mod, "mode", None) if mod is not None else node_arg(node, 3, "mode", "nearest")


def _integer_resize(node: fx.Node, mod: Any) -> bool:
    """nearest (exact) or bilinear: torch's uint8 bilinear kernel rounds once, within one step of the float op."""
    return _mode(node, mod) in ("nearest", "bilinear")


def _not_nearest(node: fx.Node, mod: Any) -> bool:
    return not _nearest(node, mod)


def pads_zero_points(node: fx.Node, mod: Any) -> bool:
    """An average pool whose padding counts in the average: its padded zeros are real zeros, which on integer input
    are zero points (the lowering pools ``q - zp`` there)."""
    padding = getattr(mod, "padding", 0) if mod is not None else node_arg(node, 3, "padding", 0)
    include = getattr(mod, "count_include_pad", True) if mod is not None else node_arg(node, 5, "count_include_pad",
                                                                                        True)
    return bool(include) and any(p != 0 for p in ((padding,) if isinstance(padding, int) else padding))


def _avg_pool(node: fx.Node, mod: Any) -> bool:
    """Average pooling with weights summing to one (no ``divisor_override``)."""
    override = getattr(mod, "divisor_override", None) if mod is not None else node_arg(node, 6, "divisor_override")
    return override is None


def _no_indices(node: fx.Node, mod: Any) -> bool:
    return not (getattr(mod, "return_indices", False) if mod is not None else
                node_arg(node, 6, "return_indices", False))


def _eval_mode(node: fx.Node, mod: Any) -> bool:
    return mod is not None and not mod.training


# kind -> (qualifies, returns several tensors)
INTEGER_OPS: dict[Any, tuple[Check, bool]] = {
    **{k: (_always, False) for k in (
        "view", "reshape", torch.reshape, "permute", torch.permute, "transpose", torch.transpose, "contiguous",
        "flatten", "squeeze", torch.squeeze, "unsqueeze", torch.unsqueeze, "expand", "repeat", "narrow",
        torch.narrow, "select", torch.select, operator.getitem, "t", torch.t, "detach", "clone", nn.PixelShuffle,
        nn.PixelUnshuffle, F.pixel_shuffle, F.pixel_unshuffle, "flip", torch.flip, "roll", torch.roll,
        "swapaxes", torch.swapaxes, "swapdims", torch.swapdims, "movedim", torch.movedim, "moveaxis", torch.moveaxis,
        "view_as", "reshape_as", "expand_as", "unflatten", torch.unflatten, torch.flatten)},
    **{k: (_no_indices, False) for k in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, F.max_pool1d, F.max_pool2d,
                                         F.max_pool3d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d)},
    **{k: (_integer_resize, False) for k in (nn.Upsample, F.interpolate, F.upsample)},
    nn.UpsamplingNearest2d: (_always, False), nn.UpsamplingBilinear2d: (_always, False),
    **{k: (_always, True) for k in ("chunk", torch.chunk, "split", torch.split, "unbind", torch.unbind)},
}
SHAPE_QUERIES = frozenset({"size", "dim", "numel"})


def _max_pool_module(mod: nn.MaxPool2d) -> tuple:
    return (mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode)


# kind -> (integer kernel, module -> its arguments after the input; None: the call's own arguments)
INTEGER_KERNELS: dict[Any, tuple[Callable[..., torch.Tensor], Any]] = {
    **{k: (kernel, _max_pool_module if isinstance(k, type) else None)
       for kernel, kinds in ((uint8.max_pool1d, (nn.MaxPool1d, F.max_pool1d, torch.max_pool1d)),
                             (uint8.max_pool2d, (nn.MaxPool2d, F.max_pool2d, torch.max_pool2d)),
                             (uint8.max_pool3d, (nn.MaxPool3d, F.max_pool3d, torch.max_pool3d)))
       for k in kinds},
    **{k: (uint8.interpolate, uint8.upsample_args) for k in (nn.Upsample, nn.UpsamplingNearest2d,
                                                              nn.UpsamplingBilinear2d)},
    F.interpolate: (uint8.interpolate, None), F.upsample: (uint8.interpolate, None),
}
# method spellings that must change on integer tensors: a view of a channels-last int8 conv output may not exist
RENAMED_METHODS = {"view": "reshape"}

AFFINE_OPS: dict[Any, Check] = {
    **{k: _always for k in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, F.adaptive_avg_pool1d,
                            F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, "mean", torch.mean)},
    **{k: _avg_pool for k in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)},
    **{k: _not_nearest for k in (nn.Upsample, F.interpolate, F.upsample)},  # bicubic, trilinear, ...
}

UNARY_OPS = frozenset({
    "relu", "relu6", "sigmoid", "tanh", "hardsigmoid", nn.Hardswish, F.hardswish, nn.Hardtanh, F.hardtanh,
    nn.GELU, F.gelu, nn.SiLU, F.silu, nn.ELU, F.elu, nn.LeakyReLU, F.leaky_relu, nn.Mish, F.mish, nn.Softplus,
    F.softplus, nn.CELU, nn.SELU, nn.Tanhshrink, nn.Softsign, "clamp", torch.clamp, "clamp_min", "clamp_max",
    "neg", torch.neg, "abs", torch.abs, "exp", torch.exp, "square", "add", "mul", operator.sub, "sub",
    operator.truediv, "div", torch.div,
})
def _not_training(index: int, default: bool) -> Check:
    """A functional dropout whose ``training`` argument (position ``index``) is a constant False."""
    return lambda node, mod: node_arg(node, index, "training", default) is False


def _to_float32_of_dequantize(node: fx.Node, mod: Any) -> bool:
    """``x.to(torch.float32)`` / ``x.float()`` of a dequantize's float32 result (an RMSNorm's upcast): no-op."""
    src = node.args[0] if node.args else None
    if not (isinstance(src, fx.Node) and src.op == "call_function" and kind_of(src, {}) in ("dq", "dq_dynamic")):
        return False
    out_dtype = node_arg(src, 6, "out_dtype")
    if out_dtype not in (None, torch.float32):
        return False
    if node.target == "float":
        return len(node.args) == 1 and not node.kwargs
    rest = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k == "dtype"]
    return rest == [torch.float32] and set(node.kwargs) <= {"dtype"}


IDENTITY_OPS: dict[Any, Check] = {"to": _to_float32_of_dequantize, "float": _to_float32_of_dequantize,
                                  nn.Identity: _always, nn.Dropout: _eval_mode, nn.Dropout1d: _eval_mode,
                                  nn.Dropout2d: _eval_mode, nn.Dropout3d: _eval_mode, nn.AlphaDropout: _eval_mode,
                                  F.dropout: _not_training(2, True), F.dropout1d: _not_training(2, True),
                                  F.dropout2d: _not_training(2, True), F.dropout3d: _not_training(2, True),
                                  F.alpha_dropout: _not_training(2, False),
                                  F.feature_alpha_dropout: _not_training(2, False)}
# functions of libraries fxquant does not import, by qualified name: identities when their ``training`` is False
# (torchvision's stochastic depth: traced as a call, as torchvision wraps it for torch.fx)
IDENTITY_FUNCTIONS_BY_NAME: dict[str, Check] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": _not_training(3, True),
}


def qualified_name(target: Any) -> str:
    """``module.qualname`` of a function node's target ("" for anything without them)."""
    module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
    return f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else ""
