"""Reference quantized Linear: int8 weight buffers, float compute with the dequantized weight."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.nn.quantized.reference._module import ReferenceWeightMixin

__all__ = ["Linear"]


class Linear(ReferenceWeightMixin, nn.Linear):
    """``y = F.linear(x, dequantize(weight_int), bias)`` -- bit-identical to torch.ao's reference Linear.

    Buffers ``weight_int``, ``weight_scale``, ``weight_zero_point``; float ``bias`` parameter. In a converted graph
    it sits between a dequantize and a quantize node; the lowering pass fuses the three into one int8 kernel.
    """

    _IS_REFERENCE = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: torch.dtype | None = None, weight_qparams: Mapping[str, Any] | None = None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._attach_weight("weight", self._parameters["weight"], weight_qparams)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.get_weight(), self.bias)

    @classmethod
    def from_float(cls, float_linear: nn.Linear, weight_qparams: Mapping[str, Any],
                   keep_original_weights: bool = False) -> Linear:
        """Quantize ``float_linear``'s weight with ``weight_qparams`` (torch.ao's dict); the bias stays float."""
        if not isinstance(float_linear, nn.Linear):
            raise TypeError(f"Linear.from_float expects an nn.Linear, got {type(float_linear).__name__}")
        ref = cls._new_like(float_linear, lambda: cls(
            float_linear.in_features, float_linear.out_features, float_linear.bias is not None, device="meta",
            dtype=float_linear.weight.dtype))
        ref._attach_weight("weight", float_linear.weight, weight_qparams, keep_original_weights)
        ref.register_parameter("bias", None if float_linear.bias is None else
                               nn.Parameter(float_linear.bias.detach().clone()))
        return ref
