"""Reference quantized modules (mirror ``torch.ao.nn.quantized.reference``).

Each keeps its weight as plain-dtype buffers ``weight_int / weight_scale / weight_zero_point`` and computes in
float with the dequantized weight, so its output is bit-identical to torch.ao's reference module. Build one with
``Cls.from_float(float_module, weight_qparams)`` where ``weight_qparams`` is torch.ao's dict
``{"qscheme", "dtype", "scale", "zero_point", "axis"}``.
"""
from fxquant.nn.quantized.reference._module import ReferenceWeightMixin
from fxquant.nn.quantized.reference._weight import WeightSpec
from fxquant.nn.quantized.reference.conv import (
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    ConvTranspose3d,
)
from fxquant.nn.quantized.reference.linear import Linear
from fxquant.nn.quantized.reference.rnn import GRU, LSTM
from fxquant.nn.quantized.reference.sparse import Embedding, EmbeddingBag

__all__ = ["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
           "Embedding", "EmbeddingBag", "LSTM", "GRU",
           "ReferenceWeightMixin", "WeightSpec"]
