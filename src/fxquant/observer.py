"""Observers: modules that watch tensors during calibration and turn what they saw into scale / zero point.

Same classes, constructor parameters, defaults, attributes and state-dict buffers as
``torch.ao.quantization.observer``; ``calculate_qparams()`` is bit-identical to torch.ao for the same data
(the formula lives in :mod:`fxquant.qparams`). Differences, all on purpose:

* dtypes are plain (``torch.uint8`` where torch.ao says ``quint8``); legacy dtypes are accepted and normalised.
* NaN and +-inf in the data are ignored (one warning per observer) instead of poisoning the range.
* bad configurations raise ``ValueError`` naming the value (torch.ao: ``AssertionError`` or silent nonsense).

The classes live in small private modules and are re-exported here.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from fxquant._histogram import HistogramObserver
from fxquant._observer_base import (MinMaxObserver, MovingAverageMinMaxObserver, ObserverBase,
                                    UniformQuantizationObserverBase)
from fxquant._partial import PartialConstructor, is_observer_constructor
from fxquant._per_channel_observer import MovingAveragePerChannelMinMaxObserver, PerChannelMinMaxObserver
from fxquant._simple_observers import (FixedQParamsObserver, NoopObserver, PlaceholderObserver, RecordingObserver,
                                       ReuseInputObserver)

__all__ = [
    "ObserverBase", "UniformQuantizationObserverBase", "MinMaxObserver", "MovingAverageMinMaxObserver",
    "PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver", "HistogramObserver",
    "FixedQParamsObserver", "PlaceholderObserver", "RecordingObserver", "NoopObserver", "ReuseInputObserver",
    "PartialConstructor", "is_observer_constructor", "get_observer_state_dict", "load_observer_state_dict",
    "default_observer", "default_placeholder_observer", "default_debug_observer", "default_weight_observer",
    "weight_observer_range_neg_127_to_127", "default_histogram_observer", "default_per_channel_weight_observer",
    "per_channel_weight_observer_range_neg_127_to_127", "default_dynamic_quant_observer",
    "default_float_qparams_observer", "default_float_qparams_observer_4bit",
    "default_fixed_qparams_range_neg1to1_observer", "default_fixed_qparams_range_0to1_observer",
    "default_symmetric_fixed_qparams_observer", "default_affine_fixed_qparams_observer",
    "default_reuse_input_observer", "float16_static_placeholder_observer", "float16_dynamic_placeholder_observer",
]

def _is_activation_post_process(module: torch.nn.Module) -> bool:
    from fxquant.fake_quantize import FakeQuantizeBase
    return isinstance(module, (ObserverBase, FakeQuantizeBase))


def get_observer_state_dict(mod: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The entries of ``mod.state_dict()`` that belong to observers (``activation_post_process`` in the key)."""
    full = mod.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict((k, v) for k, v in full.items()
                                                      if "activation_post_process" in k)
    out._metadata = getattr(full, "_metadata", None)  # type: ignore[attr-defined]
    return out


def load_observer_state_dict(mod: torch.nn.Module, obs_dict: dict[str, torch.Tensor]) -> None:
    """Load observer statistics saved by :func:`get_observer_state_dict` into the observers of ``mod``."""
    missing: list[str] = []
    unexpected: list[str] = []
    for name, module in mod.named_modules():
        if _is_activation_post_process(module):
            module._load_from_state_dict(obs_dict, name + ".", {}, True, missing, unexpected, [])
    bad = [k for k in missing if "activation_post_process" in k or "observer" in k]
    if bad:
        raise KeyError(f"observer state dict lacks {bad}; it was saved from a different model")


# ---- the default observer constructors of torch.ao.quantization.observer ---------------------------------------
default_observer = MinMaxObserver.with_args(quant_min=0, quant_max=127)
default_placeholder_observer = PlaceholderObserver
default_debug_observer = RecordingObserver
default_weight_observer = MinMaxObserver.with_args(dtype=torch.int8, qscheme=torch.per_tensor_symmetric)
weight_observer_range_neg_127_to_127 = MinMaxObserver.with_args(
    dtype=torch.int8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127, eps=2**-12)
default_histogram_observer = HistogramObserver.with_args(quant_min=0, quant_max=127)
default_per_channel_weight_observer = PerChannelMinMaxObserver.with_args(
    dtype=torch.int8, qscheme=torch.per_channel_symmetric)
per_channel_weight_observer_range_neg_127_to_127 = PerChannelMinMaxObserver.with_args(
    dtype=torch.int8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127, eps=2**-12)
default_dynamic_quant_observer = PlaceholderObserver.with_args(
    dtype=torch.uint8, quant_min=0, quant_max=255, is_dynamic=True)
default_float_qparams_observer = PerChannelMinMaxObserver.with_args(
    dtype=torch.uint8, qscheme=torch.per_channel_affine_float_qparams, ch_axis=0)
default_float_qparams_observer_4bit = PerChannelMinMaxObserver.with_args(
    dtype=torch.uint8, quant_min=0, quant_max=15, qscheme=torch.per_channel_affine_float_qparams, ch_axis=0)
default_fixed_qparams_range_neg1to1_observer = FixedQParamsObserver.with_args(
    scale=2.0 / 256.0, zero_point=128, dtype=torch.uint8, quant_min=0, quant_max=255)
default_fixed_qparams_range_0to1_observer = FixedQParamsObserver.with_args(
    scale=1.0 / 256.0, zero_point=0, dtype=torch.uint8, quant_min=0, quant_max=255)
default_symmetric_fixed_qparams_observer = default_fixed_qparams_range_neg1to1_observer
default_affine_fixed_qparams_observer = default_fixed_qparams_range_0to1_observer
default_reuse_input_observer = ReuseInputObserver
float16_static_placeholder_observer = PlaceholderObserver.with_args(dtype=torch.float16)
float16_dynamic_placeholder_observer = PlaceholderObserver.with_args(dtype=torch.float16, is_dynamic=True)

# keep the names of the helper modules' classes pointing here, as torch.ao users expect
for _cls in (ObserverBase, UniformQuantizationObserverBase, MinMaxObserver, MovingAverageMinMaxObserver,
             PerChannelMinMaxObserver, MovingAveragePerChannelMinMaxObserver, HistogramObserver,
             FixedQParamsObserver, PlaceholderObserver, RecordingObserver, NoopObserver, ReuseInputObserver):
    _cls.__module__ = __name__
del _cls
