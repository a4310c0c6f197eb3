"""PyTorch's x86 backend (fbgemm + onednn kernels): torch.ao's ``get_x86_backend_config``.

As in torch.ao, binary ops and fixed-qparams ops list the *weighted* int8 DTypeConfig (weight int8, bias
float32); those entries are only checked where the op has a weight / bias input, so they behave like the
plain uint8 config.
"""
from __future__ import annotations

from ._build import build_backend_config
from .backend_config import BackendConfig
from .dtype_configs import (default_dynamic_float16_dtype_config, default_dynamic_int8_dtype_config,
                            default_op_quint8_dtype_config, weight_only_quint4x2_dtype_config,
                            weight_only_quint8_dtype_config, weighted_op_quint8_dtype_config)

__all__ = ["get_x86_backend_config"]

_WEIGHTED = [weighted_op_quint8_dtype_config]
_DEFAULT = [default_op_quint8_dtype_config]
_DYNAMIC = [default_dynamic_int8_dtype_config, default_dynamic_float16_dtype_config]
SECTIONS = [
    ("conv", _WEIGHTED), ("linear", _WEIGHTED + _DYNAMIC), ("binary", _WEIGHTED), ("cat", _DEFAULT),
    ("default", _DEFAULT), ("fixed_qparams", _WEIGHTED), ("share_qparams", _DEFAULT), ("tensor_info", _DEFAULT),
    ("bn", _DEFAULT), ("rnn", _DYNAMIC), ("embedding", [weight_only_quint8_dtype_config, weight_only_quint4x2_dtype_config]),
]


def get_x86_backend_config() -> BackendConfig:
    """The BackendConfig of PyTorch's x86 backend (no LayerNorm pattern, as in torch.ao)."""
    return build_backend_config("x86", SECTIONS)
