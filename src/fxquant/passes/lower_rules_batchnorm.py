"""Lowering rule for eval-mode batch norms left between quantized values (DenseNet's pre-activation
``BN -> ReLU -> conv``, where no conv precedes the norm to fold it into)::

    quantize(BatchNorm*d(dequantize(q)))           -> QuantizedBatchNorm(q)
    quantize(BNReLU2d/3d(dequantize(q)))           -> QuantizedBatchNorm(q, relu)
    quantize(relu(BatchNorm*d(dequantize(q))))     -> QuantizedBatchNorm(q, relu)

Only modules in eval mode with running statistics (a training-mode norm uses each batch's statistics).
"""
from __future__ import annotations

from typing import Any, Optional

from torch import fx, nn

from .. import nn as fnn
from ..kernels.uint8 import RANGES
from ..nn.intrinsic.modules import BNReLU2d, BNReLU3d
from .lower_build import Lowering, Rule
from .lower_match import kind_of

__all__ = ["BATCHNORM_RULES"]

Q = fnn.quantized
_NORMS = frozenset({nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d})
_FUSED = frozenset({BNReLU2d, BNReLU3d})
_RELU = frozenset({"relu", nn.ReLU})


def _match(node: fx.Node, low: Lowering) -> Optional[dict[str, fx.Node]]:
    op = node.args[0] if node.args else None
    kind = kind_of(op, low.modules)
    found: dict[str, fx.Node] = {"out": node}
    if kind in _RELU and isinstance(op, fx.Node) and len(op.users) == 1 and op.args:
        found["relu"] = op
        op = op.args[0]
        kind = kind_of(op, low.modules)
        if kind not in _NORMS:
            return None
    if kind not in _NORMS | _FUSED or not isinstance(op, fx.Node) or len(op.users) != 1 or len(op.args) != 1:
        return None
    dq = op.args[0]
    if kind_of(dq, low.modules) != "dq":
        return None
    found.update(op=op, dq_x=dq)
    return found


def _norm_of(low: Lowering, op: fx.Node) -> tuple[Any, bool]:
    mod = low.module(op)
    return (mod[0], True) if type(mod) in _FUSED else (mod, False)


def _when(low: Lowering, m: dict[str, fx.Node]) -> str:
    bn, _ = _norm_of(low, m["op"])
    if bn.training:
        return "batch norm in training mode (normalizes by each batch)"
    if bn.running_mean is None or bn.running_var is None:
        return "batch norm without running statistics"
    dtypes = {low.qparams(m["dq_x"]).dtype, low.qparams(m["out"]).dtype}
    return "" if len(dtypes) == 1 and dtypes <= set(RANGES) else f"activation dtypes {sorted(map(str, dtypes))}"


def _replace(low: Lowering, m: dict[str, fx.Node]) -> fx.Node:
    bn, fused_relu = _norm_of(low, m["op"])
    x, out = low.qparams(m["dq_x"]), low.qparams(m["out"])
    mod = Q.QuantizedBatchNorm.from_batch_norm(bn, (x.scale, x.zero_point), (out.scale, out.zero_point),
                                               fused_relu or "relu" in m, out.dtype, out.quant_min, out.quant_max)
    return low.call_module(m["out"], str(m["op"].target), mod, (m["dq_x"].args[0],))


BATCHNORM_RULES: tuple[Rule, ...] = (
    Rule("batch_norm", frozenset({"q"}), _match, _replace, _when),
)
