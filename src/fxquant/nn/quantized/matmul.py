"""Lowered matmul / bmm of two quantized activations, optionally followed by a softmax (attention scores).

The product runs on the zero-point-shifted integers in float32: ``(a - za) @ (b - zb)`` is exact while
``K * 255 * 255 < 2**24`` (K up to 258) and within float32 rounding beyond, then one multiply-add by
``sa * sb / s_out`` and ``zp_out``, rounding half to even like the reference quantize. With ``softmax_dim``
the float product goes through ``softmax(sa * sb * logit_multiplier * acc, softmax_dim)`` first (the reference
``quantize(softmax(c * matmul(dequantize(a), dequantize(b))))``, e.g. an unquantized ``bmm`` feeding a softmax);
there the logits' scale is folded into ``a - za`` (one op fewer; float32 rounding like the reference's own).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from fxquant.kernels import uint8 as k
from fxquant.nn.quantized.elementwise import _check_range, _ScalarModule
from fxquant.nn.quantized.normalization import softmax_to

__all__ = ["QuantizedMatmul"]


def _shifted(q: torch.Tensor, neg_zp: Optional[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """``(q - zp) * scale`` in float32, one op (``neg_zp = -zp * scale``)."""
    if neg_zp is None:
        return q.to(torch.float32) if scale == 1.0 else torch.mul(q, scale)
    return torch.add(neg_zp, q, alpha=scale)


class QuantizedMatmul(_ScalarModule):
    """``quantize(matmul(dequantize(a), dequantize(b)))`` (``torch.matmul`` broadcasting), or with
    ``softmax_dim`` set ``quantize(softmax(logit_multiplier * matmul(...), softmax_dim))``."""

    def __init__(self, a_qparams: tuple[Any, Any], b_qparams: tuple[Any, Any], out_qparams: tuple[Any, Any],
                 dtype: torch.dtype = torch.uint8, quant_min: int = 0, quant_max: int = 255,
                 softmax_dim: Optional[int] = None, logit_multiplier: float = 1.0) -> None:
        super().__init__()
        _check_range(dtype, quant_min, quant_max, "QuantizedMatmul")
        self.dtype, self.quant_min, self.quant_max = dtype, quant_min, quant_max
        self.softmax_dim, self.logit_multiplier = softmax_dim, float(logit_multiplier)
        for prefix, (scale, zp) in (("a_", a_qparams), ("b_", b_qparams), ("out_", out_qparams)):
            self._qparam(prefix, scale, zp)

    def _build_scalars(self) -> tuple:
        za, zb = int(self.a_zero_point), int(self.b_zero_point)
        product_scale = float(self.a_scale) * float(self.b_scale)
        if self.softmax_dim is not None:  # the logits' scale folds into a's shift (the softmax rounds anyway)
            c = product_scale * self.logit_multiplier
            exact = bool(za) and not k.fold_safe(c, za)  # huge logits scale: shift exactly (uint8.FOLD_LIMIT)
            neg = (k.offset(-za * c) if za and not exact else None, k.offset(-zb) if zb else None)
            return neg, c, 1.0 / float(self.out_scale), int(self.out_zero_point), za if exact else None
        neg = (k.offset(-za) if za else None, k.offset(-zb) if zb else None)
        return neg, product_scale / float(self.out_scale), k.offset(float(self.out_zero_point))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._reference(a, b)
        consts = self._scalars()
        (neg_za, neg_zb), multiplier = consts[0], consts[1]
        if self.softmax_dim is not None:
            exact_za = consts[4]
            shifted_a = _shifted(a, neg_za, multiplier) if exact_za is None else \
                k.dequantize_exact(a, multiplier, exact_za)
            logits = torch.matmul(shifted_a, _shifted(b, neg_zb))
            return softmax_to(logits, self.softmax_dim, consts[2], consts[3], self.quant_min, self.quant_max,
                              self.dtype)
        acc = torch.matmul(_shifted(a, neg_za), _shifted(b, neg_zb))
        torch.add(consts[2], acc, alpha=multiplier, out=acc)
        return k.finish(acc, self.quant_min, self.quant_max, self.dtype)

    def _reference(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The reference computation from the buffers (plain aten ops, for tracing)."""
        fa = (a.to(torch.float32) - self.a_zero_point) * self.a_scale
        fb = (b.to(torch.float32) - self.b_zero_point) * self.b_scale
        y = torch.matmul(fa, fb)
        if self.softmax_dim is not None:
            y = torch.softmax(y * self.logit_multiplier, self.softmax_dim)
        q = torch.round(y / self.out_scale + self.out_zero_point)
        return q.clamp(self.quant_min, self.quant_max).to(self.dtype)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "softmax_dim": self.softmax_dim,
                "logit_multiplier": self.logit_multiplier}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.softmax_dim, self.logit_multiplier = state["softmax_dim"], float(state["logit_multiplier"])

    def extra_repr(self) -> str:
        post = "" if self.softmax_dim is None else \
            f", softmax(dim={self.softmax_dim}, multiplier={self.logit_multiplier:.6g})"
        return (f"a=({float(self.a_scale):.6g}, {int(self.a_zero_point)}), b=({float(self.b_scale):.6g}, "
                f"{int(self.b_zero_point)}), out=({float(self.out_scale):.6g}, {int(self.out_zero_point)})"
                f"{post}, {self._range_repr()}")
