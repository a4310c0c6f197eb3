"""fxquant.nn.intrinsic: fused float modules (mirrors ``torch.ao.nn.intrinsic``).

``fxquant.nn.intrinsic.qat`` (fused QAT modules) is imported lazily on first access.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .modules import (
    BNReLU2d, BNReLU3d, ConvAdd2d, ConvAddReLU2d, ConvBn1d, ConvBn2d, ConvBn3d, ConvBnReLU1d, ConvBnReLU2d,
    ConvBnReLU3d, ConvReLU1d, ConvReLU2d, ConvReLU3d, FusedModule, FusionTypeError, LinearBn1d, LinearLeakyReLU,
    LinearReLU, LinearTanh, _FusedModule,
)

__all__ = [
    "ConvBn1d", "ConvBn2d", "ConvBn3d", "ConvBnReLU1d", "ConvBnReLU2d", "ConvBnReLU3d", "ConvReLU1d", "ConvReLU2d",
    "ConvReLU3d", "LinearReLU", "BNReLU2d", "BNReLU3d", "LinearBn1d", "LinearLeakyReLU", "LinearTanh", "ConvAdd2d",
    "ConvAddReLU2d", "FusedModule", "FusionTypeError",
]


def __getattr__(name: str) -> ModuleType:
    if name == "qat":
        module = importlib.import_module(f"{__name__}.qat")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
