"""QAT ``Conv1d/2d/3d``: float convs whose weight goes through ``weight_fake_quant`` in forward."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from fxquant.nn.intrinsic.modules import FusedModule

from ._base import check_float_module, check_qconfig, detached_param, make_weight_fake_quant, share_param

__all__ = ["Conv1d", "Conv2d", "Conv3d", "float_conv_like"]

Size = int | tuple[int, ...]


def float_conv_like(conv_cls: type[nn.Module], module: nn.Module) -> nn.Module:
    """A new ``conv_cls`` with ``module``'s hyper-parameters and detached copies of its weight and bias."""
    conv = conv_cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.groups, module.bias is not None, module.padding_mode)
    conv.weight = detached_param(module.weight)
    if module.bias is not None:
        conv.bias = detached_param(module.bias)
    return conv


class _ConvNd:
    """Mixin placed before ``nn.ConvNd`` in the bases: adds the qconfig and the weight fake quant.

    Subclasses set ``_FLOAT_MODULE`` (what ``from_float`` accepts) and ``_FLOAT_CONV_MODULE`` (the plain conv).
    """

    _FLOAT_MODULE: ClassVar[type[nn.Module]]
    _FLOAT_CONV_MODULE: ClassVar[type[nn.Module]]

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Size, stride: Size = 1,
                 padding: str | Size = 0, dilation: Size = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", qconfig: Any = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        check_qconfig(type(self).__name__, qconfig)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,  # type: ignore[call-arg]
                         padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         device=device, dtype=dtype)
        self.qconfig = qconfig
        self.weight_fake_quant = make_weight_fake_quant(qconfig, device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Convolve ``input`` with ``weight_fake_quant(weight)``."""
        return self._conv_forward(input, self.weight_fake_quant(self.weight), self.bias)  # type: ignore[attr-defined]

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> Any:
        """Build from the float conv (or fused ``ConvReLUNd`` for the fused subclasses) carrying ``mod.qconfig``.

        Shares ``mod``'s weight and bias. ``use_precomputed_fake_quant`` is accepted for torch.ao compatibility.
        """
        qconfig = check_float_module(cls, mod)
        conv = mod[0] if isinstance(mod, FusedModule) else mod
        qat = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, qconfig=qconfig)
        share_param(conv, qat, "weight")
        share_param(conv, qat, "bias")
        return qat

    def to_float(self) -> nn.Module:
        """The float conv with detached weight / bias (wrapped with its ReLU for fused subclasses)."""
        conv = float_conv_like(self._FLOAT_CONV_MODULE, self)  # type: ignore[arg-type]
        relu_cls = getattr(type(self), "_FLOAT_RELU_MODULE", None)
        result = self._FLOAT_MODULE(conv, relu_cls()) if relu_cls is not None else conv  # type: ignore[call-arg]
        return result.train(self.training)  # type: ignore[attr-defined]


class Conv1d(_ConvNd, nn.Conv1d):
    """``nn.Conv1d`` with a weight fake quant (torch.ao.nn.qat.Conv1d); ``qconfig`` is required."""

    _FLOAT_MODULE = nn.Conv1d
    _FLOAT_CONV_MODULE = nn.Conv1d


class Conv2d(_ConvNd, nn.Conv2d):
    """``nn.Conv2d`` with a weight fake quant (torch.ao.nn.qat.Conv2d); ``qconfig`` is required."""

    _FLOAT_MODULE = nn.Conv2d
    _FLOAT_CONV_MODULE = nn.Conv2d


class Conv3d(_ConvNd, nn.Conv3d):
    """``nn.Conv3d`` with a weight fake quant (torch.ao.nn.qat.Conv3d); ``qconfig`` is required."""

    _FLOAT_MODULE = nn.Conv3d
    _FLOAT_CONV_MODULE = nn.Conv3d
