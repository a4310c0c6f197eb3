"""PyTorch's native backend (fbgemm / qnnpack kernels): torch.ao's ``get_native_backend_config``."""
from __future__ import annotations

from typing import Any

from ._build import build_backend_config
from .backend_config import BackendConfig
from .dtype_configs import (default_dynamic_float16_dtype_config, default_dynamic_int8_dtype_config,
                            default_op_fp16_dtype_config, default_op_quint8_dtype_config,
                            input_output_only_quint8_dtype_config, weight_only_quint4x2_dtype_config,
                            weight_only_quint8_dtype_config, weighted_op_quint8_dtype_config)

__all__ = ["get_native_backend_config", "get_native_backend_config_dict", "get_test_only_legacy_native_backend_config",
           "default_op_quint8_dtype_config", "default_op_fp16_dtype_config", "default_dynamic_int8_dtype_config",
           "default_dynamic_float16_dtype_config", "input_output_only_quint8_dtype_config",
           "weight_only_quint8_dtype_config", "weight_only_quint4x2_dtype_config"]

_DEFAULT = [default_op_quint8_dtype_config]
_DYNAMIC = [default_dynamic_int8_dtype_config, default_dynamic_float16_dtype_config]
_WEIGHT_ONLY = [weight_only_quint8_dtype_config, weight_only_quint4x2_dtype_config]


def _sections(fp16: bool) -> list[tuple[str, list[Any]]]:
    extra = [default_op_fp16_dtype_config] if fp16 else []
    return [
        ("conv", [weighted_op_quint8_dtype_config]),
        ("linear", [weighted_op_quint8_dtype_config, *_DYNAMIC, *extra]),
        ("binary", _DEFAULT + extra), ("cat", _DEFAULT), ("default", _DEFAULT),
        ("fixed_qparams", _DEFAULT + extra), ("share_qparams", _DEFAULT + extra), ("tensor_info", _DEFAULT),
        ("bn", _DEFAULT), ("layer_norm", [input_output_only_quint8_dtype_config]), ("rnn", _DYNAMIC),
        ("embedding", _WEIGHT_ONLY),
    ]


def get_native_backend_config() -> BackendConfig:
    """The BackendConfig of PyTorch's native backend (fbgemm / qnnpack); what ``backend_config=None`` means."""
    return build_backend_config("native", _sections(fp16=False))


def get_native_backend_config_dict() -> dict[str, Any]:
    """:func:`get_native_backend_config` in dict form."""
    return get_native_backend_config().to_dict()


def get_test_only_legacy_native_backend_config() -> BackendConfig:
    """The native config plus float16 static configs for linear, binary, fixed- and shared-qparams ops."""
    return build_backend_config("_native_and_fp16", _sections(fp16=True))
