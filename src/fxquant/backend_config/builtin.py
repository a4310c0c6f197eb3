"""Registry of the built-in backend configs by name."""
from __future__ import annotations

from collections.abc import Callable

from .backend_config import BackendConfig
from .executorch import get_executorch_backend_config
from .fbgemm import get_fbgemm_backend_config
from .native import get_native_backend_config
from .onednn import get_onednn_backend_config
from .qnnpack import get_qnnpack_backend_config
from .tensorrt import get_tensorrt_backend_config
from .x86 import get_x86_backend_config

__all__ = ["ALL_BACKENDS", "get_backend_config"]

ALL_BACKENDS: dict[str, Callable[[], BackendConfig]] = {
    "native": get_native_backend_config, "x86": get_x86_backend_config, "fbgemm": get_fbgemm_backend_config,
    "qnnpack": get_qnnpack_backend_config, "onednn": get_onednn_backend_config,
    "executorch": get_executorch_backend_config, "tensorrt": get_tensorrt_backend_config,
}


def get_backend_config(name: str) -> BackendConfig:
    """A fresh built-in BackendConfig by name (``"native"``, ``"x86"``, ``"fbgemm"``, ``"qnnpack"``,
    ``"onednn"``, ``"executorch"``, ``"tensorrt"``)."""
    if name not in ALL_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; built-in backends: {sorted(ALL_BACKENDS)}")
    return ALL_BACKENDS[name]()
