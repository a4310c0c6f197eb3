"""Fused linear QAT modules: LinearBn1d (BN kept while training) and LinearReLU."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_linear_bn_weights

from fxquant.nn import intrinsic as nni
from fxquant.nn import qat as nnqat
from fxquant.nn.intrinsic.modules import FusedModule
from fxquant.nn.qat._base import check_float_module, check_qconfig, detached_param, make_weight_fake_quant, share_param

from ._bn_fold import BnFoldingMixin, check_bn_for_qat

__all__ = ["LinearBn1d", "LinearReLU"]


class LinearBn1d(BnFoldingMixin, nn.Linear, FusedModule):
    """Linear + BatchNorm1d for QAT (torch.ao.nn.intrinsic.qat.LinearBn1d).

    Training keeps ``bn`` and fake-quantizes the BN-scaled weight (see :mod:`._bn_fold`); ``to_float()`` returns an
    ``nn.Linear`` with BN folded in. Input must be 2-d ``(batch, in_features)``, as for torch.ao.
    """

    _FLOAT_MODULE: ClassVar[type[nn.Module]] = nni.LinearBn1d

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-05,
                 momentum: float | None = 0.1, freeze_bn: bool = False, qconfig: Any = None) -> None:
        check_qconfig(type(self).__name__, qconfig)
        nn.Linear.__init__(self, in_features, out_features, bias)
        self.qconfig = qconfig
        self.weight_fake_quant = make_weight_fake_quant(qconfig)
        self._init_bn(nn.BatchNorm1d, out_features, eps, momentum, freeze_bn)

    def _weight_op(self, input: torch.Tensor, weight: torch.Tensor, zero_bias: torch.Tensor) -> torch.Tensor:
        return F.linear(input, weight, zero_bias)

    def _weight_ndim(self) -> int:
        return 2

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``bn(linear(input))`` with the BN-folded weight fake-quantized."""
        return self._bn_folded_forward(input)

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> LinearBn1d:
        """Build from ``nni.LinearBn1d(linear, bn)`` carrying ``mod.qconfig``; shares parameters and BN buffers."""
        qconfig = check_float_module(cls, mod)
        linear, bn = mod[0], mod[1]
        check_bn_for_qat(f"{cls.__name__}.from_float", linear.out_features, bn)
        qat = cls(linear.in_features, linear.out_features, linear.bias is not None, bn.eps, bn.momentum, False,
                  qconfig)
        share_param(linear, qat, "weight")
        share_param(linear, qat, "bias")
        qat._share_bn(bn)
        return qat

    def to_float(self) -> nn.Linear:
        """``nn.Linear`` with the BN running statistics folded into weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features)
        linear.weight, linear.bias = self._folded_weight_and_bias(fuse_linear_bn_weights, self.weight.detach(),
                                                                  None if self.bias is None else self.bias.detach())
        return linear.train(self.training)


class LinearReLU(nnqat.Linear, FusedModule):
    """Linear + ReLU for QAT (torch.ao.nn.intrinsic.qat.LinearReLU); ``from_float`` takes ``nni.LinearReLU``."""

    _FLOAT_MODULE: ClassVar[type[nn.Module]] = nni.LinearReLU

    def __init__(self, in_features: int, out_features: int, bias: bool = True, qconfig: Any = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, qconfig, device=device, dtype=dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``relu(linear(input, weight_fake_quant(weight), bias))``."""
        return F.relu(F.linear(input, self.weight_fake_quant(self.weight), self.bias))

    def to_float(self) -> nn.Module:
        """``nni.LinearReLU(linear, ReLU())`` with detached weight / bias."""
        return nni.LinearReLU(self._float_linear(), nn.ReLU()).train(self.training)
