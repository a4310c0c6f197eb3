"""Fused conv QAT modules: ConvBn1d/2d/3d, ConvBnReLU1d/2d/3d (BN kept while training), ConvReLU1d/2d/3d.

The conv-bn modules keep a real ``bn`` submodule during training (see :mod:`._bn_fold` for the forward) and fold it
into the conv weights in ``to_float()``, which convert uses. Parameter / buffer names (``weight``, ``bias``,
``bn.*``, ``weight_fake_quant.*``) match torch.ao's, so state dicts load either way.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from fxquant.nn import intrinsic as nni
from fxquant.nn import qat as nnqat
from fxquant.nn.intrinsic.modules import FusedModule
from fxquant.nn.qat._base import check_float_module, check_qconfig, make_weight_fake_quant, share_param
from fxquant.nn.qat.conv import float_conv_like

from ._bn_fold import BnFoldingMixin, check_bn_for_qat

__all__ = ["ConvBn1d", "ConvBn2d", "ConvBn3d", "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d", "ConvReLU1d",
           "ConvReLU2d", "ConvReLU3d"]

Size = int | tuple[int, ...]


class _ConvBnNd(BnFoldingMixin, nn.modules.conv._ConvNd, FusedModule):
    """Conv + BatchNorm for QAT. Subclasses name the float conv / BN / ReLU classes they stand for."""

    _version = 2
    _FLOAT_MODULE: ClassVar[type[nn.Module]]
    _FLOAT_CONV_MODULE: ClassVar[type[nn.Module]]
    _FLOAT_BN_MODULE: ClassVar[type[nn.Module]]
    _FLOAT_RELU_MODULE: ClassVar[type[nn.Module] | None] = None
    _FUSED_FLOAT_MODULE: ClassVar[type[nn.Module] | None] = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Size, stride: Size = 1,
                 padding: str | Size = 0, dilation: Size = 1, groups: int = 1, bias: bool | None = None,
                 padding_mode: str = "zeros", eps: float = 1e-05, momentum: float | None = 0.1,
                 freeze_bn: bool = False, qconfig: Any = None) -> None:
        check_qconfig(type(self).__name__, qconfig)
        self._FLOAT_CONV_MODULE.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                                         groups, False, padding_mode)
        self.qconfig = qconfig
        self.weight_fake_quant = make_weight_fake_quant(qconfig)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        self._init_bn(self._FLOAT_BN_MODULE, out_channels, eps, momentum, freeze_bn)

    def reset_bn_parameters(self) -> None:
        """Reset BN as torch.ao does, then re-draw the conv bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
        super().reset_bn_parameters()
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _weight_op(self, input: torch.Tensor, weight: torch.Tensor, zero_bias: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(input, weight, zero_bias)  # type: ignore[attr-defined]

    def _weight_ndim(self) -> int:
        return len(self.kernel_size) + 2

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``bn(conv(input))`` with the BN-folded weight fake-quantized."""
        return self._bn_folded_forward(input)

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> Any:
        """Build from the fused float module (``nni.ConvBn2d(conv, bn)`` ...) carrying ``mod.qconfig``.

        Shares the conv weight / bias and the BN parameters and running-stat buffers with ``mod``.
        """
        qconfig = check_float_module(cls, mod)
        conv, bn = mod[0], mod[1]
        check_bn_for_qat(f"{cls.__name__}.from_float", conv.out_channels, bn)
        qat = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, bn.eps, bn.momentum, False, qconfig)
        share_param(conv, qat, "weight")
        share_param(conv, qat, "bias")
        qat._share_bn(bn)
        return qat

    def to_float(self) -> nn.Module:
        """The float conv with BN folded in (running stats), wrapped with ReLU for the ConvBnReLU classes."""
        conv = float_conv_like(self._FLOAT_CONV_MODULE, self)
        conv.weight, conv.bias = self._folded_weight_and_bias(fuse_conv_bn_weights, conv.weight, conv.bias)
        if self._FLOAT_RELU_MODULE is not None and self._FUSED_FLOAT_MODULE is not None:
            conv = self._FUSED_FLOAT_MODULE(conv, self._FLOAT_RELU_MODULE())
        return conv.train(self.training)


class _ConvBnReLUMixin:
    """ReLU after the conv-bn forward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``relu(bn(conv(input)))`` with the BN-folded weight fake-quantized."""
        return F.relu(self._bn_folded_forward(input))  # type: ignore[attr-defined]


class ConvBn1d(_ConvBnNd, nn.Conv1d):
    """Conv1d + BatchNorm1d for QAT (torch.ao.nn.intrinsic.qat.ConvBn1d)."""

    _FLOAT_MODULE = nni.ConvBn1d
    _FLOAT_CONV_MODULE = nn.Conv1d
    _FLOAT_BN_MODULE = nn.BatchNorm1d


class ConvBn2d(_ConvBnNd, nn.Conv2d):
    """Conv2d + BatchNorm2d for QAT (torch.ao.nn.intrinsic.qat.ConvBn2d)."""

    _FLOAT_MODULE = nni.ConvBn2d
    _FLOAT_CONV_MODULE = nn.Conv2d
    _FLOAT_BN_MODULE = nn.BatchNorm2d


class ConvBn3d(_ConvBnNd, nn.Conv3d):
    """Conv3d + BatchNorm3d for QAT (torch.ao.nn.intrinsic.qat.ConvBn3d)."""

    _FLOAT_MODULE = nni.ConvBn3d
    _FLOAT_CONV_MODULE = nn.Conv3d
    _FLOAT_BN_MODULE = nn.BatchNorm3d


class ConvBnReLU1d(_ConvBnReLUMixin, ConvBn1d):
    """Conv1d + BatchNorm1d + ReLU for QAT; ``to_float()`` gives ``ConvReLU1d(folded_conv, ReLU())``."""

    _FLOAT_MODULE = nni.ConvBnReLU1d
    _FLOAT_RELU_MODULE = nn.ReLU
    _FUSED_FLOAT_MODULE = nni.ConvReLU1d


class ConvBnReLU2d(_ConvBnReLUMixin, ConvBn2d):
    """Conv2d + BatchNorm2d + ReLU for QAT; ``to_float()`` gives ``ConvReLU2d(folded_conv, ReLU())``."""

    _FLOAT_MODULE = nni.ConvBnReLU2d
    _FLOAT_RELU_MODULE = nn.ReLU
    _FUSED_FLOAT_MODULE = nni.ConvReLU2d


class ConvBnReLU3d(_ConvBnReLUMixin, ConvBn3d):
    """Conv3d + BatchNorm3d + ReLU for QAT; ``to_float()`` gives ``ConvReLU3d(folded_conv, ReLU())``."""

    _FLOAT_MODULE = nni.ConvBnReLU3d
    _FLOAT_RELU_MODULE = nn.ReLU
    _FUSED_FLOAT_MODULE = nni.ConvReLU3d


class _ConvReLUMixin:
    """ReLU after the fake-quantized conv; ``from_float`` / ``to_float`` come from the QAT conv."""

    _FLOAT_RELU_MODULE: ClassVar[type[nn.Module]] = nn.ReLU

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``relu(conv(input, weight_fake_quant(weight)))``."""
        return F.relu(self._conv_forward(input, self.weight_fake_quant(self.weight), self.bias))  # type: ignore


class ConvReLU1d(_ConvReLUMixin, nnqat.Conv1d, FusedModule):
    """Conv1d + ReLU for QAT (torch.ao.nn.intrinsic.qat.ConvReLU1d)."""

    _FLOAT_MODULE = nni.ConvReLU1d


class ConvReLU2d(_ConvReLUMixin, nnqat.Conv2d, FusedModule):
    """Conv2d + ReLU for QAT (torch.ao.nn.intrinsic.qat.ConvReLU2d)."""

    _FLOAT_MODULE = nni.ConvReLU2d


class ConvReLU3d(_ConvReLUMixin, nnqat.Conv3d, FusedModule):
    """Conv3d + ReLU for QAT (torch.ao.nn.intrinsic.qat.ConvReLU3d)."""

    _FLOAT_MODULE = nni.ConvReLU3d
