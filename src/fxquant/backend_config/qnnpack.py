"""PyTorch's QNNPACK backend: torch.ao's ``get_qnnpack_backend_config``.

Each op accepts the XNNPACK-compatible symmetric int8 config (activation scale >= 2**-12, weights in
-127..127) first, then the usual uint8 one.
"""
from __future__ import annotations

from ._build import build_backend_config
from .backend_config import BackendConfig
from .dtype_configs import (default_dynamic_float16_dtype_config, default_dynamic_int8_dtype_config,
                            default_op_qint8_symmetric_dtype_config, default_op_quint8_dtype_config,
                            weight_only_quint4x2_dtype_config, weight_only_quint8_dtype_config,
                            weighted_op_qint8_symmetric_dtype_config, weighted_op_quint8_dtype_config)

__all__ = ["get_qnnpack_backend_config"]

_WEIGHTED = [weighted_op_qint8_symmetric_dtype_config, weighted_op_quint8_dtype_config]
_DEFAULT = [default_op_qint8_symmetric_dtype_config, default_op_quint8_dtype_config]
_DYNAMIC = [default_dynamic_int8_dtype_config, default_dynamic_float16_dtype_config]
SECTIONS = [
    ("conv", _WEIGHTED), ("linear", _WEIGHTED + _DYNAMIC), ("binary", _DEFAULT), ("cat", _DEFAULT),
    ("default", _DEFAULT), ("fixed_qparams", _DEFAULT), ("share_qparams", _DEFAULT), ("bn", _DEFAULT),
    ("rnn", _DYNAMIC), ("embedding", [weight_only_quint8_dtype_config, weight_only_quint4x2_dtype_config]),
]


def get_qnnpack_backend_config() -> BackendConfig:
    """The BackendConfig of PyTorch's QNNPACK backend (no tensor-info or LayerNorm patterns, as in torch.ao)."""
    return build_backend_config("qnnpack", SECTIONS)
