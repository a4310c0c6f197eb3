"""Lowered eval-mode batch norm (+ relu) on plain integer activations.

An eval-mode batch norm is a per-channel affine map ``y = a_c * x + b_c`` (``a = weight / sqrt(var + eps)``,
``b = bias - mean * a``). On ``x = s_in * (q - zp_in)`` and quantized with ``(s_out, zp_out)`` that is
``round(q * A_c + B_c)`` with ``A = a * s_in / s_out`` and ``B = (b - a * s_in * zp_in) / s_out + zp_out``, then a
clamp (from ``zp_out`` for the relu). Three kernels:

* ``native``: one pass over the uint8 image, ``round(clamp(q * A_c + B_c))`` in float32 as the ``float`` kernel
  computes it (:func:`fxquant.kernels.native.channel_affine`);
* ``onednn``: a 1x1 depthwise int8 convolution (weights ``sign(a_c)``, per-channel weight scales ``|a_c|``, bias
  ``b_c``, relu fused) — one call for a 4-d uint8 image; exact (one product per output, no saturation), rounding
  half to even like the reference;
* ``float``: ``addcmul(B, q.float(), A)``, then :func:`fxquant.kernels.uint8.finish` (round half to even,
  clamp, store).

Both equal ``quantize(relu?(batch_norm(dequantize(q))))`` up to float32 rounding (within one output step).
"""
from __future__ import annotations

from typing import Any

import torch

from fxquant.kernels import native, onednn, x86
from fxquant.kernels import uint8 as k
from fxquant.nn.quantized.elementwise import _check_range, _ScalarModule

__all__ = ["QuantizedBatchNorm"]


class QuantizedBatchNorm(_ScalarModule):
    """``quantize(relu?(batch_norm(dequantize(q))))`` of an eval-mode batch norm, channels on dim 1.

    ``channel_scale`` / ``channel_shift``: the float per-channel map ``a`` and ``b`` (see the module docstring);
    build one from a ``BatchNorm*d`` with :meth:`from_batch_norm`.
    """

    def __init__(self, channel_scale: torch.Tensor, channel_shift: torch.Tensor, in_qparams: tuple[Any, Any],
                 out_qparams: tuple[Any, Any], relu: bool = False, dtype: torch.dtype = torch.uint8,
                 quant_min: int = 0, quant_max: int = 255) -> None:
        super().__init__()
        _check_range(dtype, quant_min, quant_max, "QuantizedBatchNorm")
        if channel_scale.shape != channel_shift.shape or channel_scale.dim() != 1:
            raise ValueError(f"QuantizedBatchNorm: channel_scale and channel_shift need one value per channel, got "
                             f"shapes {tuple(channel_scale.shape)} and {tuple(channel_shift.shape)}")
        self.relu, self.dtype, self.quant_min, self.quant_max = bool(relu), dtype, quant_min, quant_max
        self.register_buffer("channel_scale", channel_scale.detach().to(torch.float32).clone())
        self.register_buffer("channel_shift", channel_shift.detach().to(torch.float32).clone())
        self._qparam("in_", *in_qparams)
        self._qparam("out_", *out_qparams)

    @classmethod
    def from_batch_norm(cls, bn: torch.nn.modules.batchnorm._BatchNorm, in_qparams: tuple[Any, Any],
                        out_qparams: tuple[Any, Any], relu: bool = False, dtype: torch.dtype = torch.uint8,
                        quant_min: int = 0, quant_max: int = 255) -> QuantizedBatchNorm:
        """From an eval-mode ``BatchNorm1d/2d/3d`` with running statistics."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("QuantizedBatchNorm.from_batch_norm: the batch norm has no running statistics "
                             "(track_running_stats=False normalizes by each batch)")
        a = torch.rsqrt(bn.running_var.detach().float() + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight.detach().float()
        b = -bn.running_mean.detach().float() * a
        if bn.bias is not None:
            b = b + bn.bias.detach().float()
        return cls(a, b, in_qparams, out_qparams, relu, dtype, quant_min, quant_max)

    # ------------------------------------------------------------------------------------------ kernels
    def _build_scalars(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(A, B, lower bound)`` of the float kernel (see the module docstring)."""
        s_in, zp_in = float(self.in_scale), int(self.in_zero_point)
        s_out, zp_out = float(self.out_scale), int(self.out_zero_point)
        a = self.channel_scale.double() * s_in / s_out
        b = (self.channel_shift.double() - self.channel_scale.double() * s_in * zp_in) / s_out + zp_out
        lo = max(self.quant_min, zp_out) if self.relu else self.quant_min
        return a.float(), b.float(), lo

    def _onednn_plan(self, channels: int) -> Any:
        plan = self._kernel_cache.get("onednn")
        if plan is None:
            scale = self.channel_scale
            weight = torch.sign(scale).to(torch.int8).reshape(channels, 1, 1, 1)
            w_scale = torch.where(scale == 0, torch.ones_like(scale), scale.abs())
            x_q = onednn.ActQParams(float(self.in_scale), int(self.in_zero_point))
            out_q = onednn.ActQParams(float(self.out_scale), int(self.out_zero_point))
            packed = onednn.pack_conv(weight, w_scale, x_q, [1, 1], [0, 0], [1, 1], channels)
            plan = self._kernel_cache["onednn"] = (x_q, out_q, packed, w_scale, torch.zeros(channels, dtype=torch.long),
                                                   self.channel_shift.clone())
        return plan

    def _kernel(self, q: torch.Tensor) -> str:
        key = ("kernel", q.dim(), q.numel())
        choice = self._kernel_cache.get(key)
        if choice is None:
            u8 = q.dtype == self.dtype == torch.uint8 and q.is_cpu
            ok = u8 and q.dim() == 4 and x86.onednn_available()
            facts = x86.Facts(device=q.device.type, macs=q.numel(), onednn_ok=ok, native_ok=u8)
            choice = self._kernel_cache[key] = x86.choose("batch_norm", facts)
        return choice  # type: ignore[no-any-return]

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if q.dim() < 2 or q.shape[1] != self.channel_scale.numel():
            raise ValueError(f"QuantizedBatchNorm: expected {self.channel_scale.numel()} channels on dim 1, got "
                             f"input of shape {tuple(q.shape)}")
        shape = (-1,) + (1,) * (q.dim() - 2)
        if torch.compiler.is_compiling():
            x = (q.to(torch.float32) - self.in_zero_point) * self.in_scale
            y = x * self.channel_scale.reshape(shape) + self.channel_shift.reshape(shape)
            y = torch.relu(y) if self.relu else y
            out = torch.round(y / self.out_scale + self.out_zero_point)
            return out.clamp(self.quant_min, self.quant_max).to(self.dtype)
        kernel = self._kernel(q)
        if kernel == "native":
            a, b, lo = self._scalars()
            return native.channel_affine(q, a, b, lo, self.quant_max)
        if kernel == "onednn_depthwise":
            x_q, out_q, packed, w_scale, w_zp, bias = self._onednn_plan(q.shape[1])
            clamp = None if (self.quant_min, self.quant_max) == (0, 255) else (self.quant_min, self.quant_max)
            return onednn.conv(q, x_q, packed, w_scale, w_zp, bias, ([1, 1], [0, 0], [1, 1], q.shape[1]), out_q,
                               "relu" if self.relu else "none", clamp=clamp)
        a, b, lo = self._scalars()
        y = torch.addcmul(b.reshape(shape), q.to(torch.float32), a.reshape(shape))
        return k.finish(y, lo, self.quant_max, self.dtype)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "relu": self.relu}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.relu = bool(state["relu"])

    def extra_repr(self) -> str:
        return (f"channels={self.channel_scale.numel()}, relu={self.relu}, in=({float(self.in_scale):.6g}, "
                f"{int(self.in_zero_point)}), out=({float(self.out_scale):.6g}, {int(self.out_zero_point)}), "
                f"{self._range_repr()}")
