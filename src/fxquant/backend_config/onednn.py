"""PyTorch's oneDNN backend: torch.ao's ``get_onednn_backend_config``.

Beyond the common patterns: Conv2d (+BatchNorm2d) + add (+ReLU) fusions into ConvAdd2d / ConvAddReLU2d
(complex-format patterns; the add's other input is any node), Linear + LeakyReLU / Tanh (+BatchNorm1d)
fusions, int8 weight-only embeddings, dynamic int8 (no float16) linear and RNNs.
"""
from __future__ import annotations

from ._build import build_backend_config
from .backend_config import BackendConfig
from .dtype_configs import (default_dynamic_int8_dtype_config, default_op_quint8_dtype_config,
                            input_output_only_quint8_dtype_config, weight_only_qint8_dtype_config,
                            weighted_op_quint8_dtype_config)

__all__ = ["get_onednn_backend_config"]

_CONV = [weighted_op_quint8_dtype_config]
_LINEAR = [weighted_op_quint8_dtype_config, default_dynamic_int8_dtype_config]
_DEFAULT = [default_op_quint8_dtype_config]
SECTIONS = [
    ("conv", _CONV), ("onednn_conv_add", _CONV), ("linear", _LINEAR), ("onednn_linear", _LINEAR),
    ("binary", _DEFAULT), ("cat", _DEFAULT), ("default", _DEFAULT), ("fixed_qparams", _DEFAULT),
    ("share_qparams", _DEFAULT), ("bn", _DEFAULT), ("layer_norm", [input_output_only_quint8_dtype_config]),
    ("rnn", [default_dynamic_int8_dtype_config]), ("embedding", [weight_only_qint8_dtype_config]),
]


def get_onednn_backend_config() -> BackendConfig:
    """The BackendConfig of PyTorch's oneDNN backend."""
    return build_backend_config("onednn", SECTIONS)
