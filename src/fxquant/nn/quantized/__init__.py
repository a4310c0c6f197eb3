"""Quantized modules on plain dtypes: ``reference`` (float compute, torch.ao-identical) and lowered kernels."""
from fxquant.nn.quantized import reference

__all__ = ["reference"]
