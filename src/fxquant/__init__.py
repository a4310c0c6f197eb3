"""fxquant: FX graph mode quantization for PyTorch, rebuilt on plain dtypes.

Migrating from torch.ao is one import: ``import torch.ao.quantization as tq`` -> ``import fxquant as tq`` and
``from torch.ao.quantization.quantize_fx import prepare_fx, convert_fx`` -> ``from fxquant import prepare_fx, convert_fx``.
"""
from .backend_config import (BackendConfig, BackendPatternConfig, DTypeConfig, DTypeWithConstraints,
                             ObservationType, get_executorch_backend_config, get_fbgemm_backend_config,
                             get_native_backend_config, get_native_backend_config_dict, get_onednn_backend_config,
                             get_qnnpack_backend_config, get_x86_backend_config)
from .custom_config import *  # noqa: F401,F403
from .custom_config import __all__ as _custom_all
from .fake_quantize import *  # noqa: F401,F403
from .fake_quantize import __all__ as _fq_all
from . import ops
from .boundaries import BoundaryQParams, QParamsInfo, boundary_qparams
from .migrate import from_torch_ao, is_torch_ao_object
from .observer import *  # noqa: F401,F403
from .observer import __all__ as _obs_all
from .qconfig import *  # noqa: F401,F403
from .qconfig import __all__ as _qconfig_all
from .qconfig_mapping import (QConfigMapping, build_qconfig_resolver, get_default_qat_qconfig_mapping,
                              get_default_qconfig_mapping, resolve_qconfig)
from .quantize_fx import convert_fx, convert_to_reference_fx, fuse_fx, prepare_fx, prepare_qat_fx
from .tools.compare import CompareReport, compare
from .passes.lower_build import lowering_report
from .tools.explain import ExplainRow, explain, format_explain
from .tools.serialize import load, register_safe, save

__version__ = "0.1.0"

__all__ = sorted(set(_custom_all) | set(_fq_all) | set(_obs_all) | set(_qconfig_all) | {
    "BackendConfig", "BackendPatternConfig", "DTypeConfig", "DTypeWithConstraints", "ObservationType",
    "get_executorch_backend_config", "get_fbgemm_backend_config", "get_native_backend_config",
    "get_native_backend_config_dict", "get_onednn_backend_config", "get_qnnpack_backend_config",
    "get_x86_backend_config", "from_torch_ao", "is_torch_ao_object", "QConfigMapping", "build_qconfig_resolver",
    "get_default_qat_qconfig_mapping", "get_default_qconfig_mapping", "resolve_qconfig", "convert_fx",
    "convert_to_reference_fx", "fuse_fx", "prepare_fx", "prepare_qat_fx", "ExplainRow", "explain",
    "format_explain", "compare", "CompareReport", "save", "load", "register_safe", "lowering_report",
    "boundary_qparams", "BoundaryQParams", "QParamsInfo", "__version__"})
