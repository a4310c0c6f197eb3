"""QAT ``Linear``: ``nn.Linear`` whose weight goes through ``weight_fake_quant`` in forward."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.nn.intrinsic.modules import FusedModule

from ._base import check_float_module, check_qconfig, detached_param, make_weight_fake_quant, share_param

__all__ = ["Linear"]


class Linear(nn.Linear):
    """``nn.Linear`` with a weight fake quant, for quantization aware training (torch.ao.nn.qat.Linear).

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        qconfig: a QConfig whose ``weight`` builds the weight fake quant (required).

    Attributes:
        weight_fake_quant: the fake quant module applied to ``weight`` in every forward.
    """

    _FLOAT_MODULE: ClassVar[type[nn.Module]] = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, qconfig: Any = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        check_qconfig(type(self).__name__, qconfig)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.qconfig = qconfig
        self.weight_fake_quant = make_weight_fake_quant(qconfig, device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``linear(input, weight_fake_quant(weight), bias)``."""
        return F.linear(input, self.weight_fake_quant(self.weight), self.bias)

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> Linear:
        """Build from a float ``nn.Linear`` (or fused ``LinearReLU`` for subclasses) carrying ``mod.qconfig``.

        The QAT module shares ``mod``'s weight and bias parameters. ``use_precomputed_fake_quant`` is accepted for
        torch.ao compatibility and has no effect on QAT modules.
        """
        qconfig = check_float_module(cls, mod)
        linear = mod[0] if isinstance(mod, FusedModule) else mod
        qat = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, qconfig=qconfig)
        share_param(linear, qat, "weight")
        share_param(linear, qat, "bias")
        return qat

    def _float_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        linear.weight = detached_param(self.weight)
        if self.bias is not None:
            linear.bias = detached_param(self.bias)
        linear.train(self.training)
        return linear

    def to_float(self) -> nn.Module:
        """A float ``nn.Linear`` with detached copies of the (not fake-quantized) weight and bias."""
        return self._float_linear()
