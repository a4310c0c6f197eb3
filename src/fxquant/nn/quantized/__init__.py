"""Quantized modules on plain dtypes (mirror ``torch.ao.nn.quantized``).

* ``fxquant.nn.quantized.reference``: reference modules (int weight buffers, float compute, torch.ao-identical).
* Lowered modules (built with ``from_reference``), running int8 kernels on plain uint8 / int8 tensors:
  ``Linear``, ``LinearDynamic``, ``LinearWeightOnly``, ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``,
  ``Embedding``, ``EmbeddingBag`` (8-bit or packed 4-bit rows), ``LSTM``, ``GRU`` (int8 weights, float
  recurrence).
* Element-wise modules between them: ``Quantize``, ``DeQuantize``, ``LookupTable``, ``Requantize``,
  ``QuantizedBinary``, ``FakeQuantizeDynamic``.
* Normalizations and products of activations: ``QuantizedBatchNorm`` (eval BatchNorm (+ ReLU)), ``QuantizedNorm`` (LayerNorm / GroupNorm / InstanceNorm),
  ``QuantizedSoftmax``, ``QuantizedMatmul`` (matmul / bmm, optionally + softmax).
"""
from fxquant.nn.quantized import reference
from fxquant.nn.quantized.batchnorm import QuantizedBatchNorm
from fxquant.nn.quantized.conv import Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d
from fxquant.nn.quantized.elementwise import (DeQuantize, FakeQuantizeDynamic, LookupTable, Quantize, QuantizedBinary,
                                              Requantize)
from fxquant.nn.quantized.embedding import Embedding, EmbeddingBag
from fxquant.nn.quantized.linear import Linear, LinearDynamic, LinearWeightOnly
from fxquant.nn.quantized.matmul import QuantizedMatmul
from fxquant.nn.quantized.normalization import QuantizedNorm, QuantizedSoftmax
from fxquant.nn.quantized.rnn import GRU, LSTM
from fxquant.nn.quantized.rnn_dynamic import DynamicGRU, DynamicLSTM

__all__ = ["reference", "Linear", "LinearDynamic", "LinearWeightOnly", "Conv1d", "Conv2d", "Conv3d",
           "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Embedding", "EmbeddingBag", "LSTM", "GRU",
           "DynamicLSTM", "DynamicGRU",
           "Quantize", "DeQuantize", "LookupTable", "Requantize", "QuantizedBinary", "FakeQuantizeDynamic",
           "QuantizedNorm", "QuantizedSoftmax", "QuantizedMatmul", "QuantizedBatchNorm"]
