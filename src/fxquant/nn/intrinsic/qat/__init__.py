"""fxquant.nn.intrinsic.qat: fused QAT modules (mirrors ``torch.ao.nn.intrinsic.qat``).

Use ``model.apply(freeze_bn_stats)`` to stop updating BatchNorm statistics late in QAT, ``update_bn_stats`` to
resume.
"""
from ._bn_fold import BnFoldingMixin, freeze_bn_stats, update_bn_stats
from .conv_fused import (
    ConvBn1d, ConvBn2d, ConvBn3d, ConvBnReLU1d, ConvBnReLU2d, ConvBnReLU3d, ConvReLU1d, ConvReLU2d, ConvReLU3d,
)
from .linear_fused import LinearBn1d, LinearReLU

__all__ = [
    "LinearReLU", "LinearBn1d", "ConvReLU1d", "ConvReLU2d", "ConvReLU3d", "ConvBn1d", "ConvBn2d", "ConvBn3d",
    "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d", "update_bn_stats", "freeze_bn_stats", "BnFoldingMixin",
]
