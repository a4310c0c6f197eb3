"""PyTorch's FBGEMM backend: torch.ao's ``get_fbgemm_backend_config``."""
from __future__ import annotations

from ._build import build_backend_config
from .backend_config import BackendConfig
from .dtype_configs import (default_dynamic_float16_dtype_config, default_dynamic_int8_dtype_config,
                            default_op_quint8_dtype_config, weight_only_quint4x2_dtype_config,
                            weight_only_quint8_dtype_config, weighted_op_quint8_dtype_config)

__all__ = ["get_fbgemm_backend_config"]

_DEFAULT = [default_op_quint8_dtype_config]
_DYNAMIC = [default_dynamic_int8_dtype_config, default_dynamic_float16_dtype_config]
SECTIONS = [
    ("conv", [weighted_op_quint8_dtype_config]), ("linear", [weighted_op_quint8_dtype_config, *_DYNAMIC]),
    ("binary", _DEFAULT), ("cat", _DEFAULT), ("default", _DEFAULT), ("fixed_qparams", _DEFAULT),
    ("share_qparams", _DEFAULT), ("tensor_info", _DEFAULT), ("bn", _DEFAULT), ("rnn", _DYNAMIC),
    ("embedding", [weight_only_quint8_dtype_config, weight_only_quint4x2_dtype_config]),
]


def get_fbgemm_backend_config() -> BackendConfig:
    """The BackendConfig of PyTorch's FBGEMM backend (no LayerNorm pattern, as in torch.ao)."""
    return build_backend_config("fbgemm", SECTIONS)
