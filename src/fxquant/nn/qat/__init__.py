"""fxquant.nn.qat: QAT modules (mirrors ``torch.ao.nn.qat``).

Each module is its float counterpart plus ``weight_fake_quant`` built from ``qconfig.weight()``;
``from_float(mod)`` reads ``mod.qconfig`` and shares the float parameters, ``to_float()`` returns a float module.
"""
from ._base import QATConfigError
from .conv import Conv1d, Conv2d, Conv3d
from .embedding_ops import Embedding, EmbeddingBag
from .linear import Linear

__all__ = ["Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "EmbeddingBag", "QATConfigError"]
