"""Lowered normalizations on plain integer activations: LayerNorm / GroupNorm / InstanceNorm and softmax.

Both families are invariant to what a dequantization does to their input, so they run on ``q.float()`` directly
and skip the dequantize:

* a normalization subtracts the mean and divides by the standard deviation, so ``norm(s * (q - zp), eps) ==
  norm(q, eps / s**2)``; the output quantization folds into the affine parameters (``weight / s_out``,
  ``bias / s_out + zp_out``), leaving round, clamp and cast;
* softmax is shift-invariant along its dim, so ``softmax(s * (q - zp)) == softmax(s * q)``; a scalar multiplier
  in front of it (``scores / sqrt(d)``) folds into ``s`` (:attr:`QuantizedSoftmax.logit_scale`).

Rounding is half to even, like the reference quantize. Results match ``quantize(op(dequantize(q)))`` up to float32
rounding (within one output step). Under ``torch.export`` / ``torch.compile`` the forwards compute from the
buffers with plain aten ops.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from fxquant.kernels import uint8 as k
from fxquant.nn.quantized.elementwise import _check_range, _ScalarModule

__all__ = ["QuantizedNorm", "QuantizedSoftmax", "NORM_KINDS"]

NORM_KINDS = ("layer_norm", "group_norm", "instance_norm")


def _optional(value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if value is None else value.detach().to(torch.float32).clone()


class QuantizedNorm(_ScalarModule):
    """``quantize(norm(dequantize(q)))`` for ``kind`` ``"layer_norm"`` (over ``normalized_shape``),
    ``"group_norm"`` (``num_groups`` groups of channels) or ``"instance_norm"`` (per sample and channel).

    ``weight`` / ``bias``: the float affine parameters (None: not affine); ``no_batch_dim``: the input rank an
    ``nn.InstanceNorm*d`` treats as one unbatched sample (None: always batched).
    """

    def __init__(self, kind: str, in_scale: Any, in_zero_point: Any, out_scale: Any, out_zero_point: Any,
                 weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: float = 1e-5,
                 normalized_shape: tuple[int, ...] = (), num_groups: int = 1, no_batch_dim: Optional[int] = None,
                 dtype: torch.dtype = torch.uint8, quant_min: int = 0, quant_max: int = 255) -> None:
        super().__init__()
        if kind not in NORM_KINDS:
            raise ValueError(f"QuantizedNorm: kind must be one of {NORM_KINDS}, got {kind!r}")
        _check_range(dtype, quant_min, quant_max, "QuantizedNorm")
        self.kind, self.eps, self.normalized_shape = kind, float(eps), tuple(int(d) for d in normalized_shape)
        self.num_groups, self.no_batch_dim = int(num_groups), no_batch_dim
        self.dtype, self.quant_min, self.quant_max = dtype, quant_min, quant_max
        self._qparam("in_", in_scale, in_zero_point)
        self._qparam("out_", out_scale, out_zero_point)
        self.register_buffer("weight", _optional(weight))
        self.register_buffer("bias", _optional(bias))

    # ------------------------------------------------------------------------------------------ kernel
    def _build_scalars(self) -> float:
        return self.eps / float(self.in_scale) ** 2  # float64 arithmetic, one rounding when the kernel takes it

    def _folded(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight / s_out, bias / s_out + zp_out)`` for affine parameters of ``shape`` (cached per shape)."""
        key = ("folded", shape)
        cached = self._kernel_cache.get(key)
        if cached is None:
            inv, zp = 1.0 / float(self.out_scale), float(self.out_zero_point)
            w = torch.ones(shape, dtype=torch.float64) if self.weight is None else self.weight.double()
            b = torch.zeros(shape, dtype=torch.float64) if self.bias is None else self.bias.double()
            cached = self._kernel_cache[key] = ((w * inv).float(), (b * inv + zp).float())
        return cached  # type: ignore[no-any-return]

    def _affine_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return self.normalized_shape if self.kind == "layer_norm" else (x.shape[1],)

    def _normalize(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
        if self.kind == "layer_norm":
            return F.layer_norm(x, self.normalized_shape, w, b, eps)
        if self.kind == "group_norm":
            return F.group_norm(x, self.num_groups, w, b, eps)
        return F.instance_norm(x, None, None, w, b, True, 0.0, eps)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        unbatched = self.no_batch_dim is not None and q.dim() == self.no_batch_dim
        x = q.unsqueeze(0) if unbatched else q
        if torch.compiler.is_compiling():
            y = self._reference(x)
        else:
            w, b = self._folded(self._affine_shape(x))
            y = k.finish(self._normalize(x.to(torch.float32), w, b, self._scalars()), self.quant_min,
                         self.quant_max, self.dtype)
        return y.squeeze(0) if unbatched else y

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        """The reference computation from the buffers (plain aten ops, for tracing)."""
        y = self._normalize(x.to(torch.float32) * self.in_scale, self.weight, self.bias, self.eps)
        q = torch.round(y / self.out_scale + self.out_zero_point)
        return q.clamp(self.quant_min, self.quant_max).to(self.dtype)

    # ------------------------------------------------------------------------------------------ persistence
    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "kind": self.kind, "eps": self.eps,
                "normalized_shape": list(self.normalized_shape), "num_groups": self.num_groups,
                "no_batch_dim": self.no_batch_dim}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.kind, self.eps = state["kind"], float(state["eps"])
        self.normalized_shape = tuple(int(d) for d in state["normalized_shape"])
        self.num_groups, self.no_batch_dim = int(state["num_groups"]), state["no_batch_dim"]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in ("weight", "bias"):  # adopt saved affine parameters a freshly built module lacks
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor) and (self._buffers.get(name) is None or
                                                    self._buffers[name].shape != saved.shape):
                self._buffers[name] = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        what = {"layer_norm": f"normalized_shape={self.normalized_shape}",
                "group_norm": f"num_groups={self.num_groups}", "instance_norm": "instance"}[self.kind]
        return (f"{self.kind}, {what}, eps={self.eps:g}, affine={self.weight is not None}, "
                f"in_scale={float(self.in_scale):.6g}, out=({float(self.out_scale):.6g}, "
                f"{int(self.out_zero_point)}), {self._range_repr()}")


class QuantizedSoftmax(_ScalarModule):
    """``quantize(softmax(logit_scale * q, dim))``: the reference ``quantize(softmax(c * dequantize(q)))`` with
    ``logit_scale = c * s_in`` (the input zero point cancels along ``dim``)."""

    def __init__(self, dim: int, logit_scale: Any, out_scale: Any, out_zero_point: Any,
                 dtype: torch.dtype = torch.uint8, quant_min: int = 0, quant_max: int = 255) -> None:
        super().__init__()
        _check_range(dtype, quant_min, quant_max, "QuantizedSoftmax")
        self.dim, self.dtype, self.quant_min, self.quant_max = int(dim), dtype, quant_min, quant_max
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale, dtype=torch.float32).detach().clone()
                             .reshape(()))
        self._qparam("out_", out_scale, out_zero_point)

    def _build_scalars(self) -> tuple[float, float, int]:
        return float(self.logit_scale), 1.0 / float(self.out_scale), int(self.out_zero_point)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            y = torch.softmax(q.to(torch.float32) * self.logit_scale, self.dim)
            out = torch.round(y / self.out_scale + self.out_zero_point)
            return out.clamp(self.quant_min, self.quant_max).to(self.dtype)
        scale, inv, zp = self._scalars()
        return softmax_to(q * scale, self.dim, inv, zp, self.quant_min, self.quant_max, self.dtype)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "dim": self.dim}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.dim = int(state["dim"])

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, logit_scale={float(self.logit_scale):.6g}, out=({float(self.out_scale):.6g}, "
                f"{int(self.out_zero_point)}), {self._range_repr()}")


def softmax_to(logits: torch.Tensor, dim: int, inv_scale: float, zero_point: int, quant_min: int, quant_max: int,
               dtype: torch.dtype) -> torch.Tensor:
    """``clamp(rint(softmax(logits, dim) / scale + zero_point))`` as ``dtype`` (in place on the softmax result)."""
    y = torch.softmax(logits, dim).mul_(inv_scale)
    if zero_point:
        y.add_(zero_point)
    return k.finish(y, quant_min, quant_max, dtype)
