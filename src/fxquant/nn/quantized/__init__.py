"""Quantized modules on plain dtypes (mirror ``torch.ao.nn.quantized``).

* ``fxquant.nn.quantized.reference``: reference modules (int weight buffers, float compute, torch.ao-identical).
* Lowered modules (built with ``from_reference``), running int8 kernels on plain uint8 / int8 tensors:
  ``Linear``, ``LinearDynamic``, ``LinearWeightOnly``.
"""
from fxquant.nn.quantized import reference
from fxquant.nn.quantized.linear import Linear, LinearDynamic, LinearWeightOnly

__all__ = ["reference", "Linear", "LinearDynamic", "LinearWeightOnly"]
