"""TensorRT (experimental in torch.ao too): torch.ao's ``get_tensorrt_backend_config``; int8 everywhere."""
from __future__ import annotations

from typing import Any

from ._build import build_backend_config
from .backend_config import BackendConfig
from .dtype_configs import non_weighted_op_qint8_dtype_config, weighted_op_qint8_dtype_config

__all__ = ["get_tensorrt_backend_config", "get_tensorrt_backend_config_dict"]

_WEIGHTED = [weighted_op_qint8_dtype_config]
_PLAIN = [non_weighted_op_qint8_dtype_config]
SECTIONS = [("conv", _WEIGHTED), ("addmm", _WEIGHTED), ("cat", _PLAIN), ("linear", _WEIGHTED),
            ("binary", _WEIGHTED), ("share_qparams", _PLAIN), ("tensor_info", _PLAIN)]


def get_tensorrt_backend_config() -> BackendConfig:
    """The BackendConfig for TensorRT (int8 activations and weights)."""
    return build_backend_config("tensorrt", SECTIONS)


def get_tensorrt_backend_config_dict() -> dict[str, Any]:
    """:func:`get_tensorrt_backend_config` in dict form."""
    return get_tensorrt_backend_config().to_dict()
