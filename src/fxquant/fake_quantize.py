"""Fake quantization for QAT: observe, then quantize-dequantize in float with a straight-through gradient.

Same classes, constructor parameters, buffers and defaults as ``torch.ao.quantization.fake_quantize``.
The quantize-dequantize itself is :func:`fxquant.ops.fake_quantize_per_tensor` /
:func:`fxquant.ops.fake_quantize_per_channel` (gradient 1 where the value lands inside
[quant_min, quant_max], 0 outside).

One deliberate difference: torch.ao's :class:`FusedMovingAvgObsFakeQuantize` trains with qparams from its own
fused kernel (``torch.fused_moving_avg_obs_fake_quant``, fbgemm's ``ChooseQuantizationParams``): symmetric
ranges are split as ``max(|min| / 128, max / 127)`` instead of ``max(|min|, max) / 127.5``, the zero point is
"nudged", and a zero range gives scale 0.1 instead of ``eps`` - so the scale it trains with is not the scale its
own ``calculate_qparams`` hands to convert. Here every fake quant trains with exactly the qparams convert uses
(those of :func:`fxquant.qparams.compute_qparams`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fxquant import ops
from fxquant._fake_quantize_base import (FakeQuantizeBase, disable_fake_quant, disable_observer, enable_fake_quant,
                                         enable_observer)
from fxquant.observer import (FixedQParamsObserver, HistogramObserver, MovingAverageMinMaxObserver,
                              MovingAveragePerChannelMinMaxObserver, default_fixed_qparams_range_0to1_observer,
                              default_fixed_qparams_range_neg1to1_observer)
from fxquant.qparams import is_float_qparams, is_per_channel, is_symmetric

__all__ = [
    "FakeQuantizeBase", "FakeQuantize", "FixedQParamsFakeQuantize", "FusedMovingAvgObsFakeQuantize",
    "LearnableFakeQuantize", "_LearnableFakeQuantize",
    "enable_fake_quant", "disable_fake_quant", "enable_observer", "disable_observer",
    "default_fake_quant", "default_weight_fake_quant", "default_dynamic_fake_quant",
    "default_fixed_qparams_range_neg1to1_fake_quant", "default_fixed_qparams_range_0to1_fake_quant",
    "default_symmetric_fixed_qparams_fake_quant", "default_affine_fixed_qparams_fake_quant",
    "default_per_channel_weight_fake_quant", "default_embedding_fake_quant", "default_embedding_fake_quant_4bit",
    "default_histogram_fake_quant", "default_fused_act_fake_quant", "default_fused_wt_fake_quant",
    "default_fused_per_channel_wt_fake_quant", "fused_wt_fake_quant_range_neg_127_to_127",
    "fused_per_channel_wt_fake_quant_range_neg_127_to_127",
]


def fake_quantize_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, ch_axis: int | None,
                         quant_min: int, quant_max: int) -> torch.Tensor:
    """Per-tensor (``ch_axis=None``) or per-channel fake quantization through :mod:`fxquant.ops`."""
    if ch_axis is None:
        return ops.fake_quantize_per_tensor(x, scale, zero_point, quant_min, quant_max)
    return ops.fake_quantize_per_channel(x, scale, zero_point, ch_axis, quant_min, quant_max)


class FakeQuantize(FakeQuantizeBase):
    """Observer + fake quantization: ``out = (clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale``.

    Args:
        observer: observer constructor (default :class:`~fxquant.observer.MovingAverageMinMaxObserver`).
        quant_min, quant_max: the integer range (both or neither), passed to the observer.
        is_dynamic: passed to the observer.
        **observer_kwargs: more observer arguments (dtype, qscheme, reduce_range, ch_axis, ...).

    Each forward with the observer enabled updates ``scale`` / ``zero_point`` (buffers, shape (1,) or (C,);
    int32 zero point, float32 for ``per_channel_affine_float_qparams``) from ``calculate_qparams()``.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, observer: Callable[..., Any] = MovingAverageMinMaxObserver, quant_min: int | None = None,
                 quant_max: int | None = None, is_dynamic: bool = False, **observer_kwargs: Any) -> None:
        super().__init__()
        if quant_min is not None and quant_max is not None:
            if quant_min >= quant_max:
                raise ValueError(f"{type(self).__name__}: quant_min={quant_min} must be below quant_max={quant_max}")
            observer_kwargs.update(quant_min=quant_min, quant_max=quant_max)
        observer_kwargs["is_dynamic"] = is_dynamic
        self.activation_post_process = observer(**observer_kwargs)
        app = self.activation_post_process
        self.quant_min, self.quant_max = app.quant_min, app.quant_max
        self.is_dynamic = app.is_dynamic
        self.dtype, self.qscheme = app.dtype, app.qscheme
        self.ch_axis = getattr(app, "ch_axis", -1)
        self.is_per_channel = is_per_channel(self.qscheme)
        zp_dtype = torch.float32 if is_float_qparams(self.qscheme) else torch.int32
        self.register_buffer("scale", torch.tensor([1.0], dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor([0], dtype=zp_dtype))

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The observer's qparams (what convert uses)."""
        return self.activation_post_process.calculate_qparams()

    def _refresh_qparams(self) -> None:
        scale, zero_point = self.calculate_qparams()
        scale, zero_point = scale.to(self.scale.device), zero_point.to(self.zero_point.device)
        if self.scale.shape != scale.shape:
            self.scale.resize_(scale.shape)
            self.zero_point.resize_(zero_point.shape)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Observe ``X`` (if enabled), refresh scale / zero point, fake-quantize (if enabled)."""
        if self.observer_enabled[0] == 1:
            self.activation_post_process(X.detach())
            self._refresh_qparams()
        if self.fake_quant_enabled[0] == 1:
            axis = self.ch_axis if self.is_per_channel else None
            # Copies: autograd keeps the qparams for backward, and the next forward of this module (a shared
            # fake quant called twice, gradient accumulation) refreshes the buffers in place before backward runs.
            X = fake_quantize_tensor(X, self.scale.clone(), self.zero_point.clone(), axis,
                                     self.activation_post_process.quant_min, self.activation_post_process.quant_max)
        return X

    def extra_repr(self) -> str:
        app = self.activation_post_process
        return (f"fake_quant_enabled={self.fake_quant_enabled}, observer_enabled={self.observer_enabled}, "
                f"quant_min={app.quant_min}, quant_max={app.quant_max}, dtype={self.dtype}, qscheme={self.qscheme}, "
                f"ch_axis={self.ch_axis}, scale={self.scale}, zero_point={self.zero_point}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        for name in ("scale", "zero_point"):  # per-channel qparams arrive with C entries: make room
            if prefix + name in state_dict:
                getattr(self, name).resize_(state_dict[prefix + name].shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class FixedQParamsFakeQuantize(FakeQuantize):
    """Fake quantization with fixed qparams (sigmoid, tanh, softmax); ``observer`` builds a FixedQParamsObserver
    whose ``scale`` / ``zero_point`` buffers this module shares."""

    def __init__(self, observer: Callable[..., Any]) -> None:
        super().__init__(observer=observer)
        if type(self.activation_post_process) is not FixedQParamsObserver:
            raise ValueError(f"FixedQParamsFakeQuantize needs a FixedQParamsObserver constructor, got one building "
                             f"{type(self.activation_post_process).__name__}")
        self._observer_ctr = observer
        self.scale = self.activation_post_process.scale
        self.zero_point = self.activation_post_process.zero_point

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed ``(scale, zero_point)``."""
        return self.scale, self.zero_point

    def extra_repr(self) -> str:
        app = self.activation_post_process
        return (f"fake_quant_enabled={self.fake_quant_enabled}, observer_enabled={self.observer_enabled}, "
                f"scale={self.scale}, zero_point={self.zero_point}, dtype={self.dtype}, quant_min={app.quant_min}, "
                f"quant_max={app.quant_max}, qscheme={self.qscheme}")


class FusedMovingAvgObsFakeQuantize(FakeQuantize):
    """torch.ao's "fused" moving-average observer + fake quant, with the scale it trains with equal to the
    scale convert uses (see the module docstring).

    Args: ``observer`` (a MovingAverage(PerChannel)MinMaxObserver constructor), ``quant_min`` (0),
    ``quant_max`` (255), ``**observer_kwargs``. The switches are int64 buffers, as in torch.ao.
    """

    def __init__(self, observer: Callable[..., Any] = MovingAverageMinMaxObserver, quant_min: int = 0,
                 quant_max: int = 255, **observer_kwargs: Any) -> None:
        super().__init__(observer, quant_min, quant_max, **observer_kwargs)
        if not isinstance(self.activation_post_process,
                          (MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver)):
            raise ValueError(f"FusedMovingAvgObsFakeQuantize needs a MovingAverageMinMaxObserver or "
                             f"MovingAveragePerChannelMinMaxObserver, got "
                             f"{type(self.activation_post_process).__name__}")
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.long))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.long))
        self.is_symmetric_quant = is_symmetric(self.qscheme)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduce_range={self.activation_post_process.reduce_range}"


from fxquant._lsq import LearnableFakeQuantize  # noqa: E402

_LearnableFakeQuantize = LearnableFakeQuantize

# ---- the default fake-quant constructors of torch.ao.quantization.fake_quantize --------------------------------
default_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.uint8,
    qscheme=torch.per_tensor_affine, reduce_range=True)
default_weight_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8,
    qscheme=torch.per_tensor_symmetric, reduce_range=False)
default_dynamic_fake_quant = FakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, is_dynamic=True, dtype=torch.uint8,
    averaging_constant=1)
default_fixed_qparams_range_neg1to1_fake_quant = FixedQParamsFakeQuantize.with_args(
    observer=default_fixed_qparams_range_neg1to1_observer)
default_fixed_qparams_range_0to1_fake_quant = FixedQParamsFakeQuantize.with_args(
    observer=default_fixed_qparams_range_0to1_observer)
default_symmetric_fixed_qparams_fake_quant = default_fixed_qparams_range_neg1to1_fake_quant
default_affine_fixed_qparams_fake_quant = default_fixed_qparams_range_0to1_fake_quant
default_per_channel_weight_fake_quant = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8,
    qscheme=torch.per_channel_symmetric, reduce_range=False, ch_axis=0)
default_embedding_fake_quant = FakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, qscheme=torch.per_channel_affine_float_qparams,
    dtype=torch.uint8, quant_min=0, quant_max=255, ch_axis=0, averaging_constant=1)
default_embedding_fake_quant_4bit = FakeQuantize.with_args(  # torch.ao: dtype quint4x2 (range 0..15)
    observer=MovingAveragePerChannelMinMaxObserver, qscheme=torch.per_channel_affine_float_qparams, ch_axis=0,
    dtype=torch.uint8, quant_min=0, quant_max=15, averaging_constant=1)
default_histogram_fake_quant = FakeQuantize.with_args(
    observer=HistogramObserver, quant_min=0, quant_max=255, dtype=torch.uint8, qscheme=torch.per_tensor_affine,
    reduce_range=True)
default_fused_act_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.uint8)
default_fused_wt_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8,
    qscheme=torch.per_tensor_symmetric)
default_fused_per_channel_wt_fake_quant = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.int8,
    qscheme=torch.per_channel_symmetric)
fused_wt_fake_quant_range_neg_127_to_127 = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAverageMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.int8,
    qscheme=torch.per_tensor_symmetric, eps=2**-12)
fused_per_channel_wt_fake_quant_range_neg_127_to_127 = FusedMovingAvgObsFakeQuantize.with_args(
    observer=MovingAveragePerChannelMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.int8,
    qscheme=torch.per_channel_symmetric, eps=2**-12)

for _cls in (FakeQuantizeBase, LearnableFakeQuantize):
    _cls.__module__ = __name__
del _cls
