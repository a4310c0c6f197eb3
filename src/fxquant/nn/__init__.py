"""fxquant.nn: fused float modules, QAT modules, reference and quantized modules.

Subpackages (mirroring ``torch.ao.nn``):

* ``fxquant.nn.intrinsic``      fused float modules (ConvReLU2d, ConvBnReLU2d, LinearReLU, ...)
* ``fxquant.nn.intrinsic.qat``  fused QAT modules (ConvBn2d with BN kept during training, ...)
* ``fxquant.nn.qat``            QAT modules (Linear, Conv2d, Embedding, ...)
* ``fxquant.nn.quantized``      reference and lowered modules on plain dtypes

Subpackages are imported lazily on first attribute access, so ``import fxquant.nn`` stays cheap and has no
import-order coupling between them.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["intrinsic", "qat", "quantized"]

_SUBPACKAGES = frozenset(__all__)


def __getattr__(name: str) -> ModuleType:
    if name in _SUBPACKAGES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}; subpackages are {sorted(_SUBPACKAGES)}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBPACKAGES)
