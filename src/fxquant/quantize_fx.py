"""The public entry points, with torch.ao.quantization.quantize_fx's signatures (CONTRACT §1).

Each is a few lines over :mod:`fxquant.pipeline`: build a Context, run a stage.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import fx, nn

from . import pipeline
from .pipeline import Context

__all__ = ["fuse_fx", "prepare_fx", "prepare_qat_fx", "convert_fx", "convert_to_reference_fx"]


def _coerce(value: Any, cls_path: str) -> Any:
    """Accept the legacy dict form of a config object (``X.from_dict``)."""
    if value is None or not isinstance(value, dict):
        return value
    module_name, _, cls_name = cls_path.rpartition(".")
    import importlib

    cls = getattr(importlib.import_module(module_name, __package__), cls_name)
    return cls.from_dict(value)


def _check_example_inputs(example_inputs: Any) -> tuple:
    if example_inputs is None:
        raise TypeError("prepare_fx needs example_inputs: a tuple of positional inputs, e.g. (torch.randn(1, 3, 224, "
                        "224),)")
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}; "
                        f"wrap a single tensor as (x,)")
    return example_inputs


_HALF = (torch.float16, torch.bfloat16)


def _check_float32(model: nn.Module, example_inputs: tuple) -> None:
    """Half-precision models are refused with the fix: their quantize / dequantize boundaries would meet float32
    dequantized values (torch.ao fails there too, later: "Quantize only works on Float Tensor, got BFloat16")."""
    tensors = [("parameter", n, t) for n, t in model.named_parameters()] + \
        [("buffer", n, t) for n, t in model.named_buffers()] + \
        [("example input", str(i), x) for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor)]
    where = next((f"{kind} '{name}' is {t.dtype}" for kind, name, t in tensors if t.dtype in _HALF), None)
    if where is not None:
        raise TypeError(f"fxquant quantizes float32 models, and this one holds half-precision values: {where}. "
                        f"Fix: call model.float() (and give float32 example inputs) before prepare_fx; the converted "
                        f"model runs int8 kernels with float32 between them, or float16 ones under a float16 qconfig")


def _prepare(model: nn.Module, qconfig_mapping: Any, example_inputs: Any, prepare_custom_config: Any,
             backend_config: Any, is_qat: bool, is_standalone: bool = False) -> fx.GraphModule:
    if qconfig_mapping is None:
        raise TypeError("prepare_fx needs a qconfig_mapping, e.g. fxquant.get_default_qconfig_mapping('x86')")
    example_inputs = _check_example_inputs(example_inputs)
    _check_float32(model, example_inputs)
    ctx = Context(qconfig_mapping=_coerce(qconfig_mapping, ".qconfig_mapping.QConfigMapping"),
                  backend_config=_coerce(backend_config, ".backend_config.BackendConfig"),
                  example_inputs=example_inputs,
                  prepare_custom_config=_coerce(prepare_custom_config, ".custom_config.PrepareCustomConfig"),
                  is_qat=is_qat, is_standalone=is_standalone)
    return pipeline.run(model, pipeline.PREPARE_QAT if is_qat else pipeline.PREPARE, ctx)


def fuse_fx(model: nn.Module, fuse_custom_config: Any = None, backend_config: Any = None) -> fx.GraphModule:
    """Trace ``model`` and fuse the op sequences the backend fuses (conv-bn-relu, linear-relu, ...)."""
    ctx = Context(fuse_custom_config=_coerce(fuse_custom_config, ".custom_config.FuseCustomConfig"),
                  backend_config=_coerce(backend_config, ".backend_config.BackendConfig"))
    return pipeline.run(model, pipeline.FUSE, ctx)


def prepare_fx(model: nn.Module, qconfig_mapping: Any, example_inputs: tuple, prepare_custom_config: Any = None,
               _equalization_config: Any = None, backend_config: Any = None) -> fx.GraphModule:
    """Insert observers into a traced copy of ``model`` (in eval mode) for post-training quantization.

    Run calibration data through the result, then call :func:`convert_fx`.

    ``prepare_custom_config`` may declare quantized model inputs / outputs (``set_input_quantized_indexes``,
    ``set_output_quantized_indexes``): calibration still runs on float data; the converted model then takes and
    returns plain integer tensors there, and :func:`fxquant.boundary_qparams` gives their scale and zero point.
    Unlike torch.ao, a quantized input keeps the observer of the op that reads it (one observer more than torch.ao's
    prepared graph): its range is the scale the converted model expects the input in.
    ``_equalization_config`` is accepted for signature compatibility; equalization is not implemented yet and a
    non-None value raises NotImplementedError.
    """
    if _equalization_config is not None:
        raise NotImplementedError("_equalization_config is not supported yet by fxquant; pass None")
    return _prepare(model, qconfig_mapping, example_inputs, prepare_custom_config, backend_config, is_qat=False)


def prepare_qat_fx(model: nn.Module, qconfig_mapping: Any, example_inputs: tuple, prepare_custom_config: Any = None,
                   backend_config: Any = None) -> fx.GraphModule:
    """Like :func:`prepare_fx` for quantization-aware training: fake quants, QAT modules (model in train mode)."""
    return _prepare(model, qconfig_mapping, example_inputs, prepare_custom_config, backend_config, is_qat=True)


def _convert(graph_module: fx.GraphModule, stage: tuple[str, ...], convert_custom_config: Any, remove_qconfig: bool,
             qconfig_mapping: Any, backend_config: Any, keep_original_weights: bool) -> fx.GraphModule:
    ctx = Context(convert_custom_config=_coerce(convert_custom_config, ".custom_config.ConvertCustomConfig"),
                  remove_qconfig=remove_qconfig, convert_qconfig_mapping=qconfig_mapping,
                  backend_config=_coerce(backend_config, ".backend_config.BackendConfig"),
                  keep_original_weights=keep_original_weights)
    return pipeline.run(graph_module, stage, ctx)


def convert_fx(graph_module: fx.GraphModule, convert_custom_config: Any = None, _remove_qconfig: bool = True,
               qconfig_mapping: Optional[Union[Any, dict]] = None, backend_config: Any = None,
               keep_original_weights: bool = False) -> fx.GraphModule:
    """Convert a calibrated / trained prepared model into a quantized model (in place, like torch.ao)."""
    return _convert(graph_module, pipeline.CONVERT, convert_custom_config, _remove_qconfig, qconfig_mapping,
                    backend_config, keep_original_weights)


def convert_to_reference_fx(graph_module: fx.GraphModule, convert_custom_config: Any = None,
                            _remove_qconfig: bool = True, qconfig_mapping: Optional[Union[Any, dict]] = None,
                            backend_config: Any = None) -> fx.GraphModule:
    """Convert a prepared model into a reference quantized model: quantize / dequantize ops around float ops."""
    return _convert(graph_module, pipeline.REFERENCE, convert_custom_config, _remove_qconfig, qconfig_mapping,
                    backend_config, False)


