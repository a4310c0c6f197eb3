"""Backends reached through ExecuTorch (QNNPACK / XNNPACK): torch.ao's ``get_executorch_backend_config``.

Conv2d only (no transposed conv), linear without fusions, add/sub/mul (+relu), a smaller list of
shared-qparams ops, cat/concat/concatenate, BatchNorm2d, uint8 weight-only embeddings (also F.embedding).
"""
from __future__ import annotations

from ._build import build_backend_config
from .backend_config import BackendConfig
from .dtype_configs import (default_dynamic_float16_dtype_config, default_dynamic_int8_dtype_config,
                            default_op_qint8_symmetric_dtype_config, default_op_quint8_dtype_config,
                            dynamic_qint8_symmetric_dtype_config, weight_only_quint8_dtype_config,
                            weighted_op_qint8_symmetric_dtype_config, weighted_op_quint8_dtype_config)

__all__ = ["get_executorch_backend_config"]

_WEIGHTED = [weighted_op_qint8_symmetric_dtype_config, weighted_op_quint8_dtype_config]
_DEFAULT = [default_op_qint8_symmetric_dtype_config, default_op_quint8_dtype_config]
_LINEAR = [*_WEIGHTED, default_dynamic_int8_dtype_config, dynamic_qint8_symmetric_dtype_config,
           default_dynamic_float16_dtype_config]
SECTIONS = [
    ("linear_no_fusion", _LINEAR), ("conv2d_no_transpose", _WEIGHTED),
    # torch.ao lists the weighted uint8 config for binary ops (the weight entry is never checked there)
    ("executorch_binary", [default_op_qint8_symmetric_dtype_config, weighted_op_quint8_dtype_config]),
    ("executorch_share_qparams", _DEFAULT), ("bn2d", _DEFAULT), ("executorch_cat", _DEFAULT),
    ("executorch_embedding", [weight_only_quint8_dtype_config]),
]


def get_executorch_backend_config() -> BackendConfig:
    """The BackendConfig for backends PyTorch lowers to through ExecuTorch."""
    return build_backend_config("executorch", SECTIONS)
