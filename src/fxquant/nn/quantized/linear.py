"""Lowered Linear modules: static int8 (uint8 in -> uint8 / float out), dynamic and weight-only.

Static ``Linear`` replaces ``dequantize -> reference Linear -> [relu | gelu | add (+relu)] -> quantize``::

    q = Linear.from_reference(ref, input_scale, input_zero_point, output_scale, output_zero_point,
                              output_dtype=torch.uint8, post_op="relu")
    y_q = q(x_q)            # x_q: uint8 tensor quantized with (input_scale, input_zero_point)

Kernels (chosen per call from ``fxquant.kernels.x86.RULES``): FBGEMM's static int8 GEMM through the native
library (uint8 output, relu or no post-op), onednn ``qlinear_pointwise`` with a lazily prepacked weight, the exact
split variant for full-range uint8 input on CPUs without VNNI, the fp16 GEMM on the weight's integers, or the
float path (dequantize -> F.linear -> quantize) that runs anywhere and under ``torch.export``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fxquant.kernels import dynamic, fp16_gemm, native, onednn, portable, uint8, x86
from fxquant.nn.quantized._base import QuantizedModuleBase, act_spec
from fxquant.nn.quantized._lowering import dynamic_qparams, from_reference_args, reference_weight

__all__ = ["Linear", "LinearDynamic", "LinearWeightOnly"]


class Linear(QuantizedModuleBase):
    """Static quantized linear on plain dtypes; see the module docstring."""

    _OP = "linear"

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_reference(cls, ref: Any, input_scale: float | torch.Tensor, input_zero_point: int | torch.Tensor,
                       output_scale: float | torch.Tensor | None = None,
                       output_zero_point: int | torch.Tensor | None = None,
                       output_dtype: torch.dtype = torch.uint8, post_op: str = "none", **options: Any) -> Linear:
        """Build from a reference ``Linear`` and the activation qparams around it.

        ``output_dtype`` ``torch.float32`` returns float (then ``output_scale`` / ``output_zero_point`` are
        unused). ``post_op``: ``none, relu, gelu, gelu_tanh, add, add_relu``; the binary ones need
        ``other_scale`` / ``other_zero_point`` and ``forward(x, other)``. Keyword ``options``: ``input_dtype``
        (default uint8), ``input_quant_min/max``, ``output_quant_min/max``, ``other_dtype``,
        ``other_quant_min/max`` (defaults: the dtype's full range).
        """
        mod = cls(ref.in_features, ref.out_features)
        act = from_reference_args(mod._get_name(), input_scale, input_zero_point, output_scale, output_zero_point,
                                  output_dtype, post_op, options)
        spec, weight, bias = reference_weight(ref, mod._get_name())
        mod._init_quant(spec, weight, bias, act)
        return mod

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // max(self.in_features, 1)
        compiling = torch.compiler.is_compiling()
        if not compiling:  # eager: the kernel chosen for this many rows, with every argument bound
            run = self._kernel_cache.get((rows, x.is_cpu))
            if run is not None:
                return run(x, other)  # type: ignore[no-any-return]
        facts = x86.Facts(device=x.device.type, rows=rows, macs=rows * self.in_features * self.out_features,
                          onednn_ok=self._onednn_ok(), input_7bit=self.input_spec.quant_max <= 127,
                          compiling=compiling, native_ok=self._native_ok() and x.is_cpu)
        kernel = x86.choose("linear", facts)
        if compiling:
            return _STATIC_KERNELS[kernel](self, x, self._other(other), self._act)
        plan = _PLANS.get(kernel) if self.post_op in _PLANNED_POST_OPS else None
        run = plan(self) if plan is not None else \
            (lambda x, other, fn=_STATIC_KERNELS[kernel]: fn(self, x, self._other(other), self._act))
        self._kernel_cache[(rows, x.is_cpu)] = run
        return run(x, other)  # type: ignore[no-any-return]

    def _native_ok(self) -> bool:
        """FBGEMM's static kernel fits: onednn's dtypes with a uint8 output, relu or no post-op."""
        return self._onednn_ok() and self.output_spec.dtype == torch.uint8 and self.post_op in ("none", "relu")

    def _act(self) -> tuple[onednn.ActQParams, onednn.ActQParams, onednn.ActQParams | None]:
        def build() -> tuple[onednn.ActQParams, onednn.ActQParams, onednn.ActQParams | None]:
            x = onednn.ActQParams(float(self.input_scale), int(self.input_zero_point))
            out_dtype = None if self.output_spec.dtype == torch.uint8 else self.output_spec.dtype
            out = onednn.ActQParams(float(self.output_scale) if self.output_scale is not None else 1.0,
                                    int(self.output_zero_point) if self.output_zero_point is not None else 0,
                                    out_dtype)
            oth = None if self.other_scale is None else onednn.ActQParams(float(self.other_scale),
                                                                          int(self.other_zero_point))
            return x, out, oth
        return self._cached("act", build)  # type: ignore[no-any-return]

    def _geometry_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


_Acts = Callable[[], tuple[onednn.ActQParams, onednn.ActQParams, "onednn.ActQParams | None"]]


def _float_kernel(mod: Linear, x: torch.Tensor, other: Any, acts: _Acts) -> torch.Tensor:
    y = F.linear(portable.dequantize(x, mod.input_scale, mod.input_zero_point), mod.float_weight(), mod.bias)
    return portable.finish(y, mod.post_op, mod.output_spec.out, mod.output_scale, mod.output_zero_point, other)


def _clamp_to_range(y: torch.Tensor, mod: QuantizedModuleBase) -> torch.Tensor:
    spec = mod.output_spec
    full = (0, 255) if spec.dtype == torch.uint8 else (spec.quant_min, spec.quant_max)
    if spec.dtype.is_floating_point or (spec.quant_min, spec.quant_max) == full:
        return y
    return y.clamp_(spec.quant_min, spec.quant_max)


def _onednn_kernel(mod: Linear, x: torch.Tensor, other: Any, acts: _Acts) -> torch.Tensor:
    packed = mod._cached("onednn_linear", lambda: onednn.pack_linear(mod.weight_int))
    w_scale = mod._cached("w_scale", lambda: mod._weight_scale_per_channel(mod.out_features))
    w_zp = mod._cached("w_zp", lambda: torch.zeros(mod.out_features, dtype=torch.long))
    xq, out, oth = acts()
    lead = x.shape[:-1]
    acc = None if other is None else (other[0].reshape(-1, mod.out_features), oth)
    y = onednn.linear(x.reshape(-1, mod.in_features).contiguous(), xq, packed, w_scale, w_zp, mod.bias, out,
                      mod.post_op, acc)
    return _clamp_to_range(y, mod).reshape(*lead, mod.out_features)


def _onednn_plan(mod: Linear) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """``qlinear_pointwise`` with every argument but the activations bound."""
    packed = mod._cached("onednn_linear", lambda: onednn.pack_linear(mod.weight_int))
    w_scale = mod._cached("w_scale", lambda: mod._weight_scale_per_channel(mod.out_features))
    w_zp = mod._cached("w_zp", lambda: torch.zeros(mod.out_features, dtype=torch.long))
    xq, out, _ = mod._act()
    out_scale, out_zp = (1.0, 0) if out.dtype in (torch.float32, torch.bfloat16) else (out.scale, out.zero_point)
    op, bias, k, n = torch.ops.onednn.qlinear_pointwise.default, mod.bias, mod.in_features, mod.out_features
    spec = mod.output_spec
    clamp = None if spec.dtype.is_floating_point or (spec.quant_min, spec.quant_max) == (0, 255) else \
        (spec.quant_min, spec.quant_max)
    attr, scalars, algo, clamp = onednn.unary_with_clamp(mod.post_op, clamp, out_scale, out_zp)

    def run(x: torch.Tensor, other: Any) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, k)
        y = op(x2 if x2.is_contiguous() else x2.contiguous(), xq.scale, xq.zero_point, packed, w_scale, w_zp, bias,
               out_scale, out_zp, out.dtype, attr, scalars, algo)
        y = y if clamp is None else y.clamp_(*clamp)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)
    return run


def _float_plan(mod: Linear) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The float kernel with the input qparams folded into the weight and bias, and for integer outputs the
    output qparams too: ``clamp(F.linear(q.float(), W * s_in / s_out, b'))`` -- four aten ops in all.

    ``F.linear((q - zp) * s, W, b) / s_out + zp_out == F.linear(q, W * s / s_out, (b - zp * s * W.sum(1)) / s_out
    + zp_out)``; relu becomes the lower clamp at ``zp_out``.
    """
    w, b = _input_folded(mod)
    out = _integer_output(mod)
    if out is None:
        post = portable.UNARY_POST_OPS[mod.post_op]
        return lambda x, other: post(F.linear(x.to(torch.float32), w, b))
    inv, zp_out, lo, hi, dtype = out
    w, b = w * inv, b * inv + zp_out
    return lambda x, other: uint8.finish(F.linear(x.to(torch.float32), w, b), lo, hi, dtype)


def _input_folded(mod: Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W * s_in, b - zp_in * s_in * W.sum(1))``: ``F.linear((q - zp_in) * s_in, W, b) == F.linear(q, W', b')``."""
    s_in, zp_in = float(mod.input_scale), int(mod.input_zero_point)
    w = mod.float_weight() * s_in
    return w, -zp_in * w.sum(1) + (0.0 if mod.bias is None else mod.bias)


def _integer_output(mod: Linear) -> tuple[float, int, int, int, torch.dtype] | None:
    """``(1 / s_out, zp_out, lowest value (relu: zp_out), highest, dtype)`` of an integer output, None for float."""
    spec = mod.output_spec
    if spec.dtype.is_floating_point:
        return None
    zp_out = int(mod.output_zero_point)
    lo = max(spec.quant_min, zp_out) if mod.post_op == "relu" else spec.quant_min
    return 1.0 / float(mod.output_scale), zp_out, lo, spec.quant_max, spec.dtype


def _integer_weight(mod: Linear) -> torch.Tensor | None:
    """``weight_int - zero_point`` as float32 (small integers), or None for weights quantized along another axis."""
    spec = mod.weight_spec
    if spec.granularity not in ("per_tensor", "per_channel") or (spec.granularity == "per_channel" and spec.axis != 0):
        return None
    zp = mod.weight_zero_point.to(torch.float32).reshape(-1, 1)
    return mod.weight_int.to(torch.float32) - zp


def _fp16_weight(mod: Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(packed integer weight, per-channel weight scales, N zeros)`` for :mod:`fxquant.kernels.fp16_gemm`
    (cached, rebuilt after load / copy), or None for weights it cannot hold."""
    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        w_int = _integer_weight(mod)
        n = mod.out_features
        return None if w_int is None else (fp16_gemm.pack(w_int), mod._weight_scale_per_channel(n), torch.zeros(n))
    return mod._cached("fp16_gemm", build)  # type: ignore[no-any-return]


def _fp16_gemm_plan(mod: Linear) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The float plan's math with the weight's integers in float16 (:mod:`fxquant.kernels.fp16_gemm`: half the
    bytes of fp32 weights, exact): ``finish(addcmul(b', q.float() @ W_int.T, s_w * s_in / s_out))``."""
    found = _fp16_weight(mod)
    if found is None:
        return _float_plan(mod)
    packed, w_scale, zeros = found
    k = w_scale * float(mod.input_scale)
    b = _input_folded(mod)[1]
    n_in, n_out = mod.in_features, mod.out_features

    def gemm(x: torch.Tensor) -> torch.Tensor:
        y = fp16_gemm.linear(x.reshape(-1, n_in).to(torch.float32), packed, zeros)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n_out)
    out = _integer_output(mod)
    if out is None:
        post = portable.UNARY_POST_OPS[mod.post_op]
        return lambda x, other: post(torch.addcmul(b, gemm(x), k))
    inv, zp_out, lo, hi, dtype = out
    k, b = k * inv, b * inv + zp_out
    return lambda x, other: uint8.finish(torch.addcmul(b, gemm(x), k), lo, hi, dtype)


def _fbgemm_plan(mod: Linear) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """FBGEMM's static int8 GEMM through the native library (:mod:`fxquant.kernels.native`): one ctypes call, the
    requantization, relu and the output range fused. Input beyond the int16-safe limit on a CPU without VNNI runs
    the kernel the rules choose without the native library, for that call -- or, where that is onednn (which pairs
    its products in int16 the same way: ``x86.SATURATING``), FBGEMM unchecked."""
    spec = mod.output_spec

    def build(check_7bit: bool) -> native.StaticLinearPlan:
        return native.StaticLinearPlan(
            mod.weight_int, mod.weight_scale, mod.bias, (float(mod.input_scale), int(mod.input_zero_point)),
            (float(mod.output_scale), int(mod.output_zero_point)), mod.post_op == "relu", spec.quant_min,
            spec.quant_max, check_7bit=check_7bit)
    try:
        plan: native.StaticLinearPlan | None = build(not x86.cpu_has_vnni())
    except RuntimeError:
        plan = None
    fallback: dict[int, Callable[[torch.Tensor, Any], torch.Tensor]] = {}
    unchecked: list[native.StaticLinearPlan] = []

    def run(x: torch.Tensor, other: Any) -> torch.Tensor:
        y = None if plan is None else plan(x)
        if y is not None:
            return y
        rows = x.numel() // max(mod.in_features, 1)
        if rows not in fallback:
            facts = x86.Facts(rows=rows, macs=rows * mod.in_features * mod.out_features, onednn_ok=mod._onednn_ok(),
                              input_7bit=mod.input_spec.quant_max <= 127)
            kernel = x86.choose("linear", facts)
            if plan is not None and kernel in x86.SATURATING:
                if not unchecked:
                    unchecked.append(build(False))
                fallback[rows] = lambda x, other, fbgemm=unchecked[0]: fbgemm(x)
            else:
                fallback[rows] = _PLANS[kernel](mod)
        return fallback[rows](x, other)
    return run


_PLANS: dict[str, Callable[[Linear], Callable[[torch.Tensor, Any], torch.Tensor]]] = {
    "onednn": _onednn_plan, "float": _float_plan, "fp16_gemm": _fp16_gemm_plan, "fbgemm": _fbgemm_plan}
_PLANNED_POST_OPS = frozenset({"none", "relu"})


def _split_kernel(mod: Linear, x: torch.Tensor, other: Any, acts: _Acts) -> torch.Tensor:
    """Full-range uint8 input without VNNI: two exact onednn calls on the 7-bit halves, summed in float."""
    packed = mod._cached("onednn_linear", lambda: onednn.pack_linear(mod.weight_int))
    w_scale = mod._cached("w_scale", lambda: mod._weight_scale_per_channel(mod.out_features))
    w_zp = mod._cached("w_zp", lambda: torch.zeros(mod.out_features, dtype=torch.long))
    xq, _, _ = acts()
    (hi, hq), (lo, lq) = onednn.split_halves(x.reshape(-1, mod.in_features).contiguous(), xq)
    f32 = onednn.ActQParams(1.0, 0, torch.float32)
    y = onednn.linear(hi, hq, packed, w_scale, w_zp, mod.bias, f32)
    y = y + onednn.linear(lo, lq, packed, w_scale, w_zp, None, f32)
    y = y.reshape(*x.shape[:-1], mod.out_features)
    return portable.finish(y, mod.post_op, mod.output_spec.out, mod.output_scale, mod.output_zero_point, other)


_STATIC_KERNELS: dict[str, Callable[[Linear, torch.Tensor, Any, _Acts], torch.Tensor]] = {
    "float": _float_kernel, "onednn": _onednn_kernel, "onednn_split": _split_kernel,
    "fp16_gemm": _float_kernel}  # (post-ops other than relu: the plain float kernel)


class LinearDynamic(Linear):
    """Float in, float out; activations quantized at run time (per tensor, or per token = per row).

    ``LinearDynamic.from_reference(ref, dtype=torch.uint8, quant_min=0, quant_max=255, granularity="per_tensor")``
    matches the reference graph ``choose_qparams -> quantize -> dequantize -> reference Linear``.
    """

    _OP = "linear_dynamic"

    @classmethod
    def from_reference(cls, ref: Any, dtype: torch.dtype = torch.uint8, quant_min: int | None = None,  # type: ignore[override]
                       quant_max: int | None = None, granularity: str = "per_tensor",
                       post_op: str = "none") -> LinearDynamic:
        """Build from a reference ``Linear``; ``granularity`` is ``"per_tensor"`` or ``"per_token"``."""
        if granularity not in ("per_tensor", "per_token"):
            raise ValueError(f"LinearDynamic: granularity {granularity!r} must be 'per_tensor' or 'per_token'")
        mod = cls(ref.in_features, ref.out_features)
        spec = act_spec(dtype, quant_min, quant_max, mod._get_name())
        act = {"input_spec": spec, "output_spec": act_spec(torch.float32, None, None, ""), "post_op": post_op,
               "input_scale": 1.0, "input_zero_point": 0}
        wspec, weight, bias = reference_weight(ref, mod._get_name())
        mod._init_quant(wspec, weight, bias, act)
        mod.granularity = granularity
        return mod

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        if self.granularity == "per_tensor" and x.dtype == torch.float32 and not torch.compiler.is_compiling():
            return self._forward_eager(x)
        scale, zp = dynamic_qparams(x, self.input_spec, self.granularity)
        spec = self.input_spec
        qx = portable.quantize(x, scale, zp, portable.OutSpec(spec.dtype, spec.quant_min, spec.quant_max))
        rows = x.numel() // max(self.in_features, 1)
        facts = x86.Facts(device=x.device.type, rows=rows, macs=rows * self.in_features * self.out_features,
                          onednn_ok=self._onednn_ok() and self.granularity == "per_tensor",
                          input_7bit=spec.quant_max <= 127, compiling=torch.compiler.is_compiling())
        kernel = x86.choose("linear_dynamic", facts)
        if kernel in ("float", "fp16_gemm"):  # (fp16_gemm: the eager per-tensor path only)
            y = F.linear(portable.dequantize(qx, scale, zp), self.float_weight(), self.bias)
            return portable.UNARY_POST_OPS[self.post_op](y)
        acts = (onednn.ActQParams(float(scale), int(zp)), onednn.ActQParams(1.0, 0, torch.float32), None)
        return _STATIC_KERNELS[kernel](self, qx, None, lambda: acts)  # post-op fused or applied by finish

    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """Per-tensor qparams in Python numbers (:mod:`fxquant.kernels.dynamic`), then the chosen kernel."""
        spec, rows = self.input_spec, x.numel() // max(self.in_features, 1)
        kernel = self._kernel_cache.get(("dynamic", rows))
        if kernel is None:
            facts = x86.Facts(device=x.device.type, rows=rows, macs=rows * self.in_features * self.out_features,
                              onednn_ok=self._onednn_ok(), input_7bit=spec.quant_max <= 127,
                              native_ok=self._onednn_ok() and x.is_cpu)
            kernel = self._kernel_cache[("dynamic", rows)] = x86.choose("linear_dynamic", facts)
        lo, hi = torch.aminmax(x)
        scale, zp = dynamic.affine_qparams(float(lo), float(hi), spec.quant_min, spec.quant_max)
        if kernel == "fbgemm":
            plan = self._cached("fbgemm_dynamic", lambda: native.DynamicLinearPlan(
                self.weight_int, self.weight_scale, self.bias, relu=self.post_op == "relu"))
            y = plan(x, scale, zp)
            return y if self.post_op in ("none", "relu") else portable.UNARY_POST_OPS[self.post_op](y)
        if kernel == "fp16_gemm" and _fp16_weight(self) is not None:
            return portable.UNARY_POST_OPS[self.post_op](self._fp16_dynamic(x, scale, zp))
        if kernel in ("float", "fp16_gemm"):
            return portable.UNARY_POST_OPS[self.post_op](self._float_dynamic(x, scale, zp))
        bias = uint8.offset(zp)
        qx = uint8.quantize(x, 1.0 / scale, bias, spec.quant_min, spec.quant_max, spec.dtype)
        acts = (onednn.ActQParams(scale, zp), onednn.ActQParams(1.0, 0, torch.float32), None)
        return _STATIC_KERNELS[kernel](self, qx, None, lambda: acts)

    def _fp16_dynamic(self, x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
        """Few rows: ``(q - zp) @ W_int.T * (s_x * s_w) + b`` with the weight's integers in float16 (exact;
        :mod:`fxquant.kernels.fp16_gemm`), ``q - zp`` held in float."""
        spec = self.input_spec
        packed, w_scale, zeros = _fp16_weight(self)  # type: ignore[misc]
        q = dynamic.quantize_to_float(x.reshape(-1, self.in_features), scale, zp, spec.quant_min, spec.quant_max,
                                      shift=zp)
        y = torch.addcmul(zeros if self.bias is None else self.bias, fp16_gemm.linear(q, packed, zeros), w_scale,
                          value=scale)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _float_dynamic(self, x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
        """``F.linear(dequantize(quantize(x)), W, b)``: small inputs through aten's fused fake quantization; larger
        ones as integers held in float, ``addmm(b - zp * scale * W.sum(1), q, W.T, alpha=scale)`` (6 ops)."""
        spec, w = self.input_spec, self.float_weight()
        if x.numel() <= dynamic.FUSED_MAX_NUMEL or x.dim() < 2:
            return F.linear(dynamic.fake_quantize(x, scale, zp, spec.quant_min, spec.quant_max), w, self.bias)
        q = dynamic.quantize_to_float(x.reshape(-1, self.in_features), scale, zp, spec.quant_min, spec.quant_max)
        w_t, row_sum = self._cached("float_weight_t", lambda: (w.t(), w.sum(1)))
        bias = torch.mul(row_sum, -zp * scale) if self.bias is None else \
            torch.add(self.bias, row_sum, alpha=-zp * scale)
        return torch.addmm(bias, q, w_t, alpha=scale).reshape(*x.shape[:-1], self.out_features)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "granularity": self.granularity}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.granularity = state["granularity"]


class LinearWeightOnly(Linear):
    """Float in, float out, int8 per-channel weights: ``F.linear(x, dequantize(weight), bias)``.

    Kernel: ``aten._weight_int8pack_mm`` where it is fast (AVX512); at a few rows of large layers the int8
    integers as float16 through fbgemm's fp16 GEMM (:mod:`fxquant.kernels.fp16_gemm`, scales applied to the
    outputs); else a cached dequantized weight.
    """

    _OP = "linear_weight_only"

    @classmethod
    def from_reference(cls, ref: Any, post_op: str = "none") -> LinearWeightOnly:  # type: ignore[override]
        """Build from a reference ``Linear`` (any weight qscheme)."""
        mod = cls(ref.in_features, ref.out_features)
        act = {"input_spec": act_spec(torch.float32, None, None, ""), "post_op": post_op,
               "output_spec": act_spec(torch.float32, None, None, ""), "input_scale": 1.0, "input_zero_point": 0}
        wspec, weight, bias = reference_weight(ref, mod._get_name())
        mod._init_quant(wspec, weight, bias, act)
        return mod

    def _float16_exact_weight(self) -> bool:
        """An unquantized weight (float16 recipes) whose values are all float16 numbers: torch.ao's reference keeps
        an ``nn.Linear``'s weight in float32 (not rounded), a functional linear's rounded; only the rounded one may
        run through the float16 GEMM without changing the result."""
        if self.weight_spec.granularity != "none" or torch.compiler.is_compiling():
            return False

        def check() -> bool:
            w = self.float_weight()
            return bool(w.dtype == torch.float32 and torch.equal(w, w.to(torch.float16).to(torch.float32)))
        return self._cached("float16_exact", check)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // max(self.in_features, 1)
        compiling = torch.compiler.is_compiling()
        key = ("weight_only", rows, x.dtype, x.device.type)
        kernel = None if compiling else self._kernel_cache.get(key)
        if kernel is None:
            half = self._float16_exact_weight()
            facts = x86.Facts(device=x.device.type, rows=rows, macs=rows * self.in_features * self.out_features,
                              compiling=compiling, float16_weight=half)
            usable = x.dtype == torch.float32 and (half or self._symmetric_int8_weight())
            kernel = x86.choose("linear_weight_only", facts) if usable else "float"
            if not compiling:
                self._kernel_cache[key] = kernel
        if kernel == "fp16_gemm_half":  # float16 values: fbgemm's fp16 GEMM reads them as they are (exact)
            packed = self._cached("fp16_gemm_half", lambda: fp16_gemm.pack(self.float_weight().float()))
            zeros = self._cached("zeros", lambda: torch.zeros(self.out_features))
            y = fp16_gemm.linear(x.reshape(-1, self.in_features), packed, zeros if self.bias is None else self.bias)
            y = y.reshape(*x.shape[:-1], self.out_features)
        elif kernel == "fp16_gemm":  # few rows: a pass over the weight, its int8 integers read as float16 (exact)
            packed, scale, zeros = _fp16_weight(self)  # type: ignore[misc]  (symmetric int8: never None)
            y = fp16_gemm.linear(x.reshape(-1, self.in_features), packed, zeros)
            y = y.mul_(scale) if self.bias is None else torch.addcmul(self.bias, y, scale)
            y = y.reshape(*x.shape[:-1], self.out_features)
        elif kernel == "int8pack_mm":
            scale = self._cached("w_scale", lambda: self._weight_scale_per_channel(self.out_features))
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight_int, scale)
            y = y.reshape(*x.shape[:-1], self.out_features)
            y = y if self.bias is None else y + self.bias
        else:
            y = F.linear(x, self.float_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return portable.UNARY_POST_OPS[self.post_op](y)
