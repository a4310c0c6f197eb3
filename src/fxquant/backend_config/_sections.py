"""Row tables for the built-in backends: one row per pattern, grouped in named sections.

A row is a dict (see :func:`row`). ``"$name"`` is a placeholder filled from the section's namespace (the
conv section is one table instantiated for 1d, 2d and 3d); ``Ref("nni.ConvReLU2d")`` names a class in
another fxquant module. Where torch.ao sets a pattern twice the later setting wins (the first keeps its
place), and these tables hold the result: e.g. ``ConvReLU2d`` carries only its QAT module.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._refs import Ref
from .dtype_configs import FIXED_QPARAMS_0_TO_1, FIXED_QPARAMS_NEG1_TO_1
from .pattern import MatchAllNode

Row = dict[str, Any]
Namespace = dict[str, Any]
W12 = {"weight": 1, "bias": 2}


def row(pattern: Any, **fields: Any) -> Row:
    """A row: ``pattern`` plus any of obs ('diff' | 'share' | 'none'), root, qat, ref, fused, fuser
    ('seq' = wrap in the fused module, or a fuser), itoi (input_type_to_index), ntat (True = the binary-op
    num_tensor_args mapping), complex (pattern is in complex format), root_getter, extra_getter, fixed
    (DTypeWithConstraints applied to activations of fixed-qparams ops)."""
    return {"pattern": pattern, **fields}


def _conv_namespace(d: int) -> Namespace:
    return {"conv": getattr(nn, f"Conv{d}d"), "convt": getattr(nn, f"ConvTranspose{d}d"),
            "bn": getattr(nn, f"BatchNorm{d}d"), "f": getattr(F, f"conv{d}d"),
            "ft": getattr(F, f"conv_transpose{d}d"), "ref": Ref(f"nnqr.Conv{d}d"),
            "reft": Ref(f"nnqr.ConvTranspose{d}d"), "qat": Ref(f"nnqat.Conv{d}d"),
            "cr": Ref(f"nni.ConvReLU{d}d"), "cb": Ref(f"nni.ConvBn{d}d"), "cbr": Ref(f"nni.ConvBnReLU{d}d"),
            "qcr": Ref(f"nniqat.ConvReLU{d}d"), "qcb": Ref(f"nniqat.ConvBn{d}d"),
            "qcbr": Ref(f"nniqat.ConvBnReLU{d}d")}


_SWAP = {"root": "$conv", "ref": "$ref"}
CONV_ROWS = [
    row("$conv", qat="$qat", **_SWAP), row("$qat", **_SWAP), row("$f", itoi=W12),
    row(("$conv", nn.ReLU), fuser="seq", fused="$cr"), row(("$conv", F.relu), fuser="seq", fused="$cr"),
    row("$cr", qat="$qcr"), row("$qcr", **_SWAP), row(("$f", nn.ReLU)), row(("$f", F.relu)),
    row(("$conv", "$bn"), fuser=Ref("fuser.fuse_conv_bn"), fused="$cb"),
    row(("$conv", "$bn", nn.ReLU), fuser=Ref("fuser.fuse_conv_bn_relu"), fused="$cbr"),
    row(("$conv", "$bn", F.relu), root="$conv", fuser=Ref("fuser.fuse_conv_bn_relu"), fused="$cbr"),
    row("$cb", qat="$qcb"), row("$cbr", qat="$qcbr"), row("$qcb", **_SWAP), row("$qcbr", **_SWAP),
]
CONV_TRANSPOSE_ROWS = [
    row("$convt", root="$convt", ref="$reft"),
    row(("$convt", "$bn"), fuser=Ref("fuser.fuse_convtranspose_bn"), root="$convt", ref="$reft"),
    row("$ft", itoi=W12),
]

_LINEAR_SWAP = {"root": nn.Linear, "ref": Ref("nnqr.Linear")}
LINEAR_BASIC_ROWS = [
    row(nn.Linear, qat=Ref("nnqat.Linear"), **_LINEAR_SWAP), row(Ref("nnqat.Linear"), **_LINEAR_SWAP),
    row(F.linear, itoi=W12),
]
LINEAR_FUSION_ROWS = [
    row((nn.Linear, nn.ReLU), fuser="seq", fused=Ref("nni.LinearReLU")),
    row((nn.Linear, F.relu), fuser="seq", fused=Ref("nni.LinearReLU")),
    row(Ref("nni.LinearReLU"), qat=Ref("nniqat.LinearReLU"), **_LINEAR_SWAP),
    row(Ref("nniqat.LinearReLU"), **_LINEAR_SWAP), row((F.linear, nn.ReLU)), row((F.linear, F.relu)),
    row((nn.Linear, nn.BatchNorm1d), fuser=Ref("fuser.fuse_linear_bn"), fused=Ref("nni.LinearBn1d")),
    row(Ref("nni.LinearBn1d"), qat=Ref("nniqat.LinearBn1d"), **_LINEAR_SWAP),
    row(Ref("nniqat.LinearBn1d"), **_LINEAR_SWAP),
]


def _linear_eltwise_rows(post_module: type, post_op: Any, fused: Ref) -> list[Row]:
    return [row((nn.Linear, post_module), fuser="seq", fused=fused), row((nn.Linear, post_op), fuser="seq", fused=fused),
            row(fused, **_LINEAR_SWAP), row((F.linear, post_module)), row((F.linear, post_op))]


ONEDNN_LINEAR_ROWS = [
    *_linear_eltwise_rows(nn.LeakyReLU, F.leaky_relu, Ref("nni.LinearLeakyReLU")),
    row((nn.Linear, nn.BatchNorm1d, nn.LeakyReLU), fuser=Ref("fuser.fuse_linear_bn_leaky_relu"),
        fused=Ref("nni.LinearLeakyReLU")),
    *_linear_eltwise_rows(nn.Tanh, torch.tanh, Ref("nni.LinearTanh")),
]


def _binary_rows(ops: tuple[Any, ...]) -> list[Row]:
    return [row(pattern, ntat=True) for op in ops
            for pattern in ((op, nn.ReLU), (op, F.relu), (op, torch.relu), op)]


BINARY_ROWS = [*_binary_rows((operator.add, torch.add, operator.mul, torch.mul)), row(torch.matmul)]
EXECUTORCH_BINARY_ROWS = _binary_rows((operator.add, torch.add, operator.sub, torch.sub, operator.mul, torch.mul))
CAT_ROWS = [row(torch.cat, obs="share")]
EXECUTORCH_CAT_ROWS = [row(op, obs="share") for op in (torch.cat, torch.concat, torch.concatenate)]

DEFAULT_OP_ROWS = [
    *(row(op) for op in (nn.ELU, nn.LeakyReLU, nn.Hardswish, nn.InstanceNorm1d, nn.InstanceNorm2d,
                         nn.InstanceNorm3d, nn.Dropout, nn.PReLU, F.elu, F.hardswish, F.leaky_relu, F.dropout)),
    row(F.group_norm, itoi={"weight": 2, "bias": 3}), row(F.instance_norm, itoi={"weight": 3, "bias": 4}),
]

_FIXED_QPARAMS_OPS = (
    (FIXED_QPARAMS_0_TO_1, (nn.Hardsigmoid, F.hardsigmoid, "hardsigmoid", "hardsigmoid_", nn.Sigmoid,
                            torch.sigmoid, "sigmoid", "sigmoid_", nn.Softmax)),
    (FIXED_QPARAMS_NEG1_TO_1, (nn.Tanh, torch.tanh, "tanh", "tanh_")),
)
FIXED_QPARAMS_ROWS = [row(op, fixed=constraints) for constraints, ops in _FIXED_QPARAMS_OPS for op in ops]

SHARE_QPARAMS_ROWS = [row(op, obs="share") for op in (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.Hardtanh, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.ReLU, nn.ReLU6, torch.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.hardtanh,
    F.hardtanh_, F.interpolate, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.pixel_shuffle, F.pixel_unshuffle,
    F.relu, F.relu6, torch.avg_pool1d, torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d, torch.clamp,
    torch.flatten, torch.mean, torch.narrow, torch.repeat_interleave, torch.transpose, torch.squeeze,
    torch.stack, torch.unsqueeze, operator.floordiv, "contiguous", "clamp", "detach", "detach_", "mean",
    "permute", "repeat", "repeat_interleave", "reshape", "resize_", "relu", "relu_", "squeeze", "squeeze_",
    "transpose", "unsqueeze", "unsqueeze_", "view")]
EXECUTORCH_SHARE_QPARAMS_ROWS = [row(op, obs="share") for op in (
    nn.Flatten, F.adaptive_avg_pool2d, F.elu, F.hardtanh, F.max_pool2d, F.pad, F.relu, F.relu6, F.leaky_relu,
    F.leaky_relu_, nn.AdaptiveAvgPool2d, nn.ConstantPad2d, nn.ELU, nn.MaxPool2d, nn.ReLU6, nn.Hardtanh,
    nn.LeakyReLU, torch.clamp, torch.flatten, torch.mean, torch.permute, torch.permute_copy, torch.squeeze,
    "clamp", "mean", "permute", "reshape", "relu", "relu_", "squeeze", "squeeze_", "leaky_relu")]

TENSOR_INFO_ROWS = [row(op, obs="none") for op in ("shape", "size")]

_BN_RELU = ((nn.BatchNorm2d, Ref("nni.BNReLU2d")), (nn.BatchNorm3d, Ref("nni.BNReLU3d")))
BN_ROWS = [
    *(r for bn, fused in _BN_RELU for r in (row((bn, nn.ReLU), fuser="seq", fused=fused),
                                              row((bn, F.relu), fuser="seq", fused=fused), row(bn))),
    *(row(fused) for _bn, fused in _BN_RELU),
]
LAYER_NORM_ROWS = [row(nn.LayerNorm), row(F.layer_norm, itoi={"weight": 2, "bias": 3})]
RNN_ROWS = [row(op, root=op, ref=Ref(f"nnqr.{op.__name__}"))
            for op in (nn.GRUCell, nn.LSTMCell, nn.RNNCell, nn.LSTM, nn.GRU)]


def _embedding_rows(functional: bool) -> list[Row]:
    rows = []
    for op in (nn.Embedding, nn.EmbeddingBag):
        qat, swap = Ref(f"nnqat.{op.__name__}"), {"root": op, "ref": Ref(f"nnqr.{op.__name__}")}
        rows += [row(op, qat=qat, **swap), row(qat, **swap)]
        if functional and op is nn.Embedding:
            rows.append(row(F.embedding, itoi={"weight": 1}))
    return rows


EMBEDDING_ROWS = _embedding_rows(functional=False)
EXECUTORCH_EMBEDDING_ROWS = _embedding_rows(functional=True)
TENSORRT_ADDMM_ROWS = [row(torch.addmm, itoi={"bias": 0, "input": 1, "weight": 2})]


def _conv_add_rows(relu: bool) -> list[Row]:
    """onednn Conv2d (+BatchNorm2d) + add (+ReLU) fusions, in complex format; the add's other input is
    MatchAllNode, on the right of the conv branch (``conv_first``) or on the left."""
    rows = []
    for conv_first in (True, False):
        for with_bn, add_op in ((True, torch.add), (True, operator.add), (False, torch.add), (False, operator.add)):
            rows.append(_conv_add_row(relu, conv_first, with_bn, add_op))
    return rows


def _conv_add_row(relu: bool, conv_first: bool, with_bn: bool, add_op: Any) -> Row:
    branch = (nn.BatchNorm2d, nn.Conv2d) if with_bn else nn.Conv2d
    add = (add_op, branch, MatchAllNode) if conv_first else (add_op, MatchAllNode, branch)
    base = (1,) if relu else ()                     # where the add pattern sits in the matched items
    branch_at, extra_at = base + ((1,) if conv_first else (2,)), base + ((2,) if conv_first else (1,))
    conv_at = branch_at + ((1,) if with_bn else ())
    order = [conv_at, *([branch_at + (0,)] if with_bn else []), base + (0,), *([(0,)] if relu else [])]
    name = "fuse_conv" + ("_bn" if with_bn else "") + "_add" + ("_relu" if relu else "")
    return row((nn.ReLU, add) if relu else add, complex=True, fuser=(Ref(f"fuser.{name}"), tuple(order)),
               fused=Ref("nni.ConvAddReLU2d" if relu else "nni.ConvAdd2d"),
               root_getter=(conv_at,), extra_getter=(extra_at,))


_CONV2D_SWAP = {"root": nn.Conv2d, "ref": Ref("nnqr.Conv2d")}
ONEDNN_CONV_ADD_ROWS = [*_conv_add_rows(relu=False), row(Ref("nni.ConvAdd2d"), **_CONV2D_SWAP),
                        *_conv_add_rows(relu=True), row(Ref("nni.ConvAddReLU2d"), **_CONV2D_SWAP)]

_CONV_NAMESPACES = [_conv_namespace(d) for d in (1, 2, 3)]
# section name -> list of (rows, namespace for "$name" placeholders)
SECTIONS: dict[str, list[tuple[list[Row], Namespace]]] = {
    "conv": [(CONV_ROWS + CONV_TRANSPOSE_ROWS, ns) for ns in _CONV_NAMESPACES],
    "conv2d_no_transpose": [(CONV_ROWS, _CONV_NAMESPACES[1])],
    "onednn_conv_add": [(ONEDNN_CONV_ADD_ROWS, {})],
    "linear": [(LINEAR_BASIC_ROWS + LINEAR_FUSION_ROWS, {})],
    "linear_no_fusion": [(LINEAR_BASIC_ROWS, {})],
    "onednn_linear": [(ONEDNN_LINEAR_ROWS, {})],
    "binary": [(BINARY_ROWS, {})],
    "executorch_binary": [(EXECUTORCH_BINARY_ROWS, {})],
    "cat": [(CAT_ROWS, {})],
    "executorch_cat": [(EXECUTORCH_CAT_ROWS, {})],
    "default": [(DEFAULT_OP_ROWS, {})],
    "fixed_qparams": [(FIXED_QPARAMS_ROWS, {})],
    "share_qparams": [(SHARE_QPARAMS_ROWS, {})],
    "executorch_share_qparams": [(EXECUTORCH_SHARE_QPARAMS_ROWS, {})],
    "tensor_info": [(TENSOR_INFO_ROWS, {})],
    "bn": [(BN_ROWS, {})],
    "bn2d": [([row(nn.BatchNorm2d)], {})],
    "layer_norm": [(LAYER_NORM_ROWS, {})],
    "rnn": [(RNN_ROWS, {})],
    "embedding": [(EMBEDDING_ROWS, {})],
    "executorch_embedding": [(EXECUTORCH_EMBEDDING_ROWS, {})],
    "addmm": [(TENSORRT_ADDMM_ROWS, {})],
}
