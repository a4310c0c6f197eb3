"""BackendConfig: which op patterns a backend quantizes, with which dtypes, and how (torch.ao's
``torch.ao.quantization.backend_config``, on plain dtypes).

Data model: :class:`BackendConfig`, :class:`BackendPatternConfig`, :class:`DTypeConfig`,
:class:`DTypeWithConstraints`, :class:`ObservationType`. Built-ins: ``get_native_backend_config`` (what
``backend_config=None`` means), ``get_x86_backend_config``, ``get_fbgemm_backend_config``,
``get_qnnpack_backend_config``, ``get_onednn_backend_config``, ``get_executorch_backend_config``,
``get_tensorrt_backend_config``. :func:`qconfig_matches_dtype_config` says whether (and why not) a qconfig
fits a DTypeConfig; :func:`patterns_table` lists a backend's patterns for the docs.
"""
from __future__ import annotations

from ._refs import missing_references
from .backend_config import BackendConfig
from .builtin import ALL_BACKENDS, get_backend_config
from .dtype_config import DTypeConfig, DTypeWithConstraints, ObservationType
from .executorch import get_executorch_backend_config
from .fbgemm import get_fbgemm_backend_config
from .matching import ACTIVATION_ROLES, ALL_ROLES, find_dtype_config, qconfig_matches_dtype_config
from .native import (get_native_backend_config, get_native_backend_config_dict,
                     get_test_only_legacy_native_backend_config)
from .onednn import get_onednn_backend_config
from .pattern import MatchAllNode, pattern_to_str, to_complex_format
from .pattern_config import BackendPatternConfig
from .qnnpack import get_qnnpack_backend_config
from .table import PatternRow, patterns_table, patterns_table_markdown
from .tensorrt import get_tensorrt_backend_config, get_tensorrt_backend_config_dict
from .x86 import get_x86_backend_config

__all__ = [
    "BackendConfig", "BackendPatternConfig", "DTypeConfig", "DTypeWithConstraints", "ObservationType",
    "MatchAllNode", "get_native_backend_config", "get_native_backend_config_dict",
    "get_test_only_legacy_native_backend_config", "get_x86_backend_config", "get_fbgemm_backend_config",
    "get_qnnpack_backend_config", "get_onednn_backend_config", "get_executorch_backend_config",
    "get_tensorrt_backend_config", "get_tensorrt_backend_config_dict", "get_backend_config", "ALL_BACKENDS",
    "qconfig_matches_dtype_config", "find_dtype_config", "ALL_ROLES", "ACTIVATION_ROLES", "patterns_table",
    "patterns_table_markdown", "PatternRow", "pattern_to_str", "to_complex_format", "missing_references",
]
