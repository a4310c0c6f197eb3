"""LearnableFakeQuantize: fake quantization with learned scale and zero point (LSQ / LSQ+).

torch.ao's ``_LearnableFakeQuantize`` (re-exported by :mod:`fxquant.fake_quantize` under both names). The
forward is ordinary fake quantization with the zero point rounded and clamped; the backward is LSQ's
(Esser et al., https://openreview.net/pdf?id=rkgO66VKDS), with ``q = round(x / s) + z``:

=====================  ============  ==================================  =====================
where                  d out / d x   d out / d scale                     d out / d zero_point
=====================  ============  ==================================  =====================
qmin <= q <= qmax      1             ``(q - z) - x / s``                 0
q < qmin               0             ``qmin - z``                        ``-s``
q > qmax               0             ``qmax - z``                        ``-s``
=====================  ============  ==================================  =====================

scale / zero-point gradients are multiplied by ``grad_factor`` (``1 / sqrt(numel * quant_max)`` with
``use_grad_scaling``) and summed over everything but the channel axis.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fxquant._fake_quantize_base import FakeQuantizeBase

__all__ = ["LearnableFakeQuantize"]


def _rounded_zero_point(zero_point: torch.Tensor, quant_min: int, quant_max: int) -> torch.Tensor:
    return zero_point.detach().round().clamp(quant_min, quant_max).to(torch.int64)


def _per_channel_view(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``t`` shaped to broadcast against ``x`` (per tensor: as is; per channel: along ``axis``)."""
    if axis is None:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _reduce_to(grad: torch.Tensor, shape: torch.Size, axis: int | None) -> torch.Tensor:
    if axis is None:
        return grad.sum().reshape(shape)
    axis = axis % grad.dim()
    return grad.sum(dim=[d for d in range(grad.dim()) if d != axis]).reshape(shape)


class _LSQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None,
                quant_min: int, quant_max: int, grad_factor: float) -> torch.Tensor:
        from fxquant.fake_quantize import fake_quantize_tensor
        zp = _rounded_zero_point(zero_point, quant_min, quant_max)
        ctx.save_for_backward(x, scale, zp)
        ctx.config = (axis, quant_min, quant_max, grad_factor, zero_point.shape)
        return fake_quantize_tensor(x, scale.detach(), zp, axis, quant_min, quant_max)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, zp = ctx.saved_tensors
        axis, quant_min, quant_max, grad_factor, zp_shape = ctx.config
        s = _per_channel_view(scale.detach(), x, axis)
        z = _per_channel_view(zp.to(x.dtype), x, axis)
        scaled = x * (1.0 / s)
        q = torch.round(scaled) + z
        below, above = q < quant_min, q > quant_max
        inside = ~(below | above)
        d_scale = torch.where(inside, (q - z) - scaled, torch.where(below, quant_min - z, quant_max - z))
        d_zp = torch.where(inside, torch.zeros_like(q), -s.expand_as(q))
        d_scale = _reduce_to(grad_out * d_scale * grad_factor, scale.shape, axis)
        d_zp = _reduce_to(grad_out * d_zp * grad_factor, zp_shape, axis)
        return grad_out * inside, d_scale, d_zp, None, None, None, None


class LearnableFakeQuantize(FakeQuantizeBase):
    """Fake quantization whose ``scale`` and ``zero_point`` are ``nn.Parameter`` s learned by backpropagation.

    Args:
        observer: observer constructor for the static estimate (``static_enabled``).
        quant_min, quant_max: integer range (default 0..255), also passed to the observer.
        scale, zero_point: initial values; channel_len: -1 per tensor, else the number of channels.
        use_grad_scaling: scale the qparam gradients by ``1 / sqrt(numel * quant_max)`` (LSQ).
        **observer_kwargs: more observer arguments.

    Buffers: ``fake_quant_enabled``, ``static_enabled`` (observer estimates overwrite the parameters),
    ``learning_enabled``, ``eps`` (lower bound of the scale).
    """

    def __init__(self, observer: Callable[..., Any], quant_min: int = 0, quant_max: int = 255, scale: float = 1.0,
                 zero_point: float = 0.0, channel_len: int = -1, use_grad_scaling: bool = False,
                 **observer_kwargs: Any) -> None:
        super().__init__()
        if quant_min >= quant_max:
            raise ValueError(f"LearnableFakeQuantize: quant_min={quant_min} must be below quant_max={quant_max}")
        if channel_len != -1 and not (isinstance(channel_len, int) and channel_len > 0):
            raise ValueError(f"LearnableFakeQuantize: channel_len must be -1 or a positive int, got {channel_len!r}")
        self.quant_min, self.quant_max = quant_min, quant_max
        self.use_grad_scaling = use_grad_scaling
        count = 1 if channel_len == -1 else channel_len
        self.scale = torch.nn.Parameter(torch.full((count,), float(scale)))
        self.zero_point = torch.nn.Parameter(torch.full((count,), float(zero_point)))
        self.activation_post_process = observer(**{**observer_kwargs, "quant_min": quant_min,
                                                   "quant_max": quant_max})
        app = self.activation_post_process
        self.dtype, self.qscheme = app.dtype, app.qscheme
        self.ch_axis = getattr(app, "ch_axis", -1)
        self.register_buffer("static_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("learning_enabled", torch.tensor([0], dtype=torch.uint8))
        self.bitwidth = (quant_max - quant_min + 1).bit_length() - 1
        self.register_buffer("eps", torch.tensor([torch.finfo(torch.float32).eps]))

    def enable_param_learning(self) -> "LearnableFakeQuantize":
        """Learn scale / zero point (observer off, fake quant on)."""
        return self.toggle_qparam_learning(True).toggle_fake_quant(True).toggle_observer_update(False)

    def enable_static_estimate(self) -> "LearnableFakeQuantize":
        """Take scale / zero point from the observer (learning off, fake quant on)."""
        return self.toggle_qparam_learning(False).toggle_fake_quant(True).toggle_observer_update(True)

    def enable_static_observation(self) -> "LearnableFakeQuantize":
        """Only observe: forward returns its input, the observer estimate updates the parameters."""
        return self.toggle_qparam_learning(False).toggle_fake_quant(False).toggle_observer_update(True)

    def toggle_observer_update(self, enabled: bool = True) -> "LearnableFakeQuantize":
        """Switch the observer's static estimate on or off."""
        self.static_enabled[0] = int(enabled)
        return self

    def enable_observer(self, enabled: bool = True) -> None:
        """Same as :meth:`toggle_observer_update` (what ``fxquant.fake_quantize.enable_observer`` calls)."""
        self.toggle_observer_update(enabled)

    def toggle_qparam_learning(self, enabled: bool = True) -> "LearnableFakeQuantize":
        """Switch gradient updates of scale / zero point on or off."""
        self.learning_enabled[0] = int(enabled)
        self.scale.requires_grad = enabled
        self.zero_point.requires_grad = enabled
        return self

    def toggle_fake_quant(self, enabled: bool = True) -> "LearnableFakeQuantize":
        """Switch fake quantization on or off."""
        self.fake_quant_enabled[0] = int(enabled)
        return self

    def observe_quant_params(self) -> None:
        """Print the current scale and zero point."""
        print(f"LearnableFakeQuantize Scale: {self.scale.detach()}")
        print(f"LearnableFakeQuantize Zero Point: {self.zero_point.detach()}")

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (clamped to ``eps``) and the rounded, clamped int64 zero point."""
        self.scale.data.clamp_(min=self.eps.item())
        return self.scale.detach(), _rounded_zero_point(self.zero_point, self.quant_min, self.quant_max)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Observe (if ``static_enabled``), then fake-quantize with the learnable qparams (if enabled)."""
        if self.static_enabled[0] == 1:
            self.activation_post_process(X.detach())
            scale, zero_point = self.activation_post_process.calculate_qparams()
            self.scale.data.copy_(scale.to(self.scale.device))
            self.zero_point.data.copy_(zero_point.to(self.zero_point.device))
        else:
            self.scale.data.clamp_(min=self.eps.item())
        if self.fake_quant_enabled[0] != 1:
            return X
        if self.qscheme in (torch.per_channel_symmetric, torch.per_tensor_symmetric):
            self.zero_point.data.zero_()
        grad_factor = 1.0 / (X.numel() * self.quant_max) ** 0.5 if self.use_grad_scaling else 1.0
        axis = self.ch_axis if self.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine) else None
        return _LSQ.apply(X, self.scale, self.zero_point, axis, self.quant_min, self.quant_max, grad_factor)
