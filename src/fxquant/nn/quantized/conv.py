"""Lowered Conv1d/2d/3d and ConvTranspose1d/2d/3d on plain dtypes (uint8 in -> uint8 / float out).

Replaces ``dequantize -> reference conv -> [relu | add (+relu)] -> quantize``::

    q = Conv2d.from_reference(ref, input_scale, input_zero_point, output_scale, output_zero_point,
                              output_dtype=torch.uint8, post_op="add_relu", other_scale=s, other_zero_point=z)
    y_q = q(x_q, other_q)

Kernels (``fxquant.kernels.x86.RULES["conv"]``): onednn ``qconv_pointwise`` (``qconv2d_pointwise.binary`` for
the fused add) with a lazily prepacked weight, producing channels-last output; the exact split variant for
full-range uint8 input on CPUs without VNNI (1x1 convs, where it measured faster); the float path
(dequantize -> conv -> quantize) for other full-range convs,
non-zero ``padding_mode``, string padding, transposed convs, other devices and ``torch.export``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fxquant.kernels import native, onednn, portable, uint8, x86
from fxquant.nn.quantized._base import QuantizedModuleBase
from fxquant.nn.quantized._lowering import from_reference_args, reference_weight

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d"]

_GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
             "padding_mode", "_reversed_padding_repeated_twice")
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _QuantizedConvNd(QuantizedModuleBase):
    _OP = "conv"
    _SPATIAL: int
    _TRANSPOSED = False

    def __init__(self, geometry: dict[str, Any]) -> None:
        super().__init__()
        for name, value in geometry.items():
            setattr(self, name, value)

    @classmethod
    def from_reference(cls, ref: Any, input_scale: float | torch.Tensor, input_zero_point: int | torch.Tensor,
                       output_scale: float | torch.Tensor | None = None,
                       output_zero_point: int | torch.Tensor | None = None,
                       output_dtype: torch.dtype = torch.uint8, post_op: str = "none", **options: Any) -> Any:
        """Build from a reference conv of the same kind and the activation qparams around it.

        Arguments as in :meth:`fxquant.nn.quantized.Linear.from_reference`; ``post_op`` is one of ``none, relu,
        add, add_relu`` (binary ones take ``other_scale`` / ``other_zero_point`` and ``forward(x, other)``).
        """
        fields = _GEOMETRY + (("output_padding",) if cls._TRANSPOSED else ())
        mod = cls({name: getattr(ref, name) for name in fields if hasattr(ref, name)})
        if getattr(ref, "transposed", False) != cls._TRANSPOSED or ref.weight_int.dim() != cls._SPATIAL + 2:
            raise TypeError(f"{mod._get_name()}.from_reference: {type(ref).__name__} is not the matching reference "
                            f"conv ({'transposed' if cls._TRANSPOSED else 'regular'}, {cls._SPATIAL}-d)")
        act = from_reference_args(mod._get_name(), input_scale, input_zero_point, output_scale, output_zero_point,
                                  output_dtype, post_op, options)
        spec, weight, bias = reference_weight(ref, mod._get_name())
        mod._init_quant(spec, weight, bias, act)
        return mod

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        if not compiling:  # eager: the kernel chosen for this batch size, with every argument bound
            run = self._kernel_cache.get((x.shape[0], x.is_cpu))
            if run is not None:
                return run(x, other)  # type: ignore[no-any-return]
        if x.dim() != self._SPATIAL + 2:
            raise ValueError(f"{self._get_name()}: expected a {self._SPATIAL + 2}-d (batched) quantized input, "
                             f"got shape {tuple(x.shape)}")
        facts = self._facts(x, compiling, native_ok=not compiling)
        kernel = x86.choose(self._OP, facts)
        if compiling:
            return _KERNELS[kernel](self, x, self._other(other))
        run = _plan(self, kernel)
        self._kernel_cache[(x.shape[0], x.is_cpu)] = run
        return run(x, other)  # type: ignore[no-any-return]

    def _facts(self, x: torch.Tensor, compiling: bool, native_ok: bool) -> x86.Facts:
        return x86.Facts(device=x.device.type, rows=x.shape[0], onednn_ok=self._conv_onednn_ok(),
                         macs=self._macs(x), binary=self.post_op in portable.BINARY_POST_OPS,
                         input_7bit=self.input_spec.quant_max <= 127,
                         depthwise=self.groups > 1 and self.groups == self.in_channels,
                         pointwise=all(k == 1 for k in self.kernel_size),
                         fused_ok=self.post_op in onednn.CONV_FUSED[self._SPATIAL], compiling=compiling,
                         native_ok=native_ok and self._native_ok(),
                         outputs=x.shape[0] * self.out_channels * self._positions(x), positions=self._positions(x))

    def _positions(self, x: torch.Tensor) -> int:
        """Output positions per image and channel (estimated from the input and the strides)."""
        return math.prod(x.shape[2:]) // max(math.prod(self.stride), 1)

    def _macs(self, x: torch.Tensor) -> int:
        """Multiply-accumulates of one call."""
        per_output = (self.in_channels // self.groups) * math.prod(self.kernel_size)
        return int(x.shape[0] * self.out_channels * self._positions(x) * per_output)

    def _native_ok(self) -> bool:
        """FBGEMM's convolution computes this module: uint8 in and out, symmetric int8 weights, post-op none or
        relu (fused), or a folded activation with its table (applied after rounding the conv's own output),
        groups 1 or a multiple of 8 (its depthwise kernel is ~50x slower on other channel counts, e.g. 116
        channels: 3.9 ms against 75 us for 120)."""
        return (self._conv_onednn_ok() and self.output_spec.dtype == torch.uint8
                and (self.post_op in ("none", "relu") or self._activation_table() is not None)
                and (self.groups == 1 or self.groups % 8 == 0))

    def _activation_table(self) -> torch.Tensor | None:
        """The uint8 table of a folded activation (with the conv's own output qparams), when recorded."""
        table = getattr(self, "activation_table", None)
        ok = table is not None and table.dtype == torch.uint8 and getattr(self, "pre_activation_range", None) \
            and self.post_op not in portable.BINARY_POST_OPS
        return table if ok else None

    def _conv_onednn_ok(self) -> bool:
        plain = not self._TRANSPOSED and self.padding_mode == "zeros" and not isinstance(self.padding, str)
        return plain and self._onednn_ok()

    def _geometry(self) -> tuple[list[int], list[int], list[int], int]:
        return list(self.stride), list(self.padding), list(self.dilation), self.groups

    def _float_conv(self, xf: torch.Tensor) -> torch.Tensor:
        w = self.float_weight()
        if self._TRANSPOSED:
            return _CONVT_FN[self._SPATIAL](xf, w, self.bias, self.stride, self.padding, self.output_padding,
                                            self.groups, self.dilation)
        padding = self.padding
        if self.padding_mode != "zeros":
            xf, padding = F.pad(xf, self._reversed_padding_repeated_twice, mode=self.padding_mode), 0
        return _CONV_FN[self._SPATIAL](xf, w, self.bias, self.stride, padding, self.dilation, self.groups)

    def _act(self) -> tuple[onednn.ActQParams, onednn.ActQParams, onednn.ActQParams | None]:
        def build() -> tuple[onednn.ActQParams, onednn.ActQParams, onednn.ActQParams | None]:
            out_dtype = None if self.output_spec.dtype == torch.uint8 else self.output_spec.dtype
            out = onednn.ActQParams(*(1.0, 0) if self.output_scale is None else
                                    (float(self.output_scale), int(self.output_zero_point)), out_dtype)
            oth = None if self.other_scale is None else onednn.ActQParams(float(self.other_scale),
                                                                          int(self.other_zero_point))
            return onednn.ActQParams(float(self.input_scale), int(self.input_zero_point)), out, oth
        return self._cached("act", build)  # type: ignore[no-any-return]

    def _packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w_scale = self._cached("w_scale", lambda: self._weight_scale_per_channel(self.out_channels))
        packed = self._cached("onednn_conv", lambda: onednn.pack_conv(self.weight_int, w_scale, self._act()[0],
                                                                      *self._geometry()))
        return packed, w_scale, self._cached("w_zp", lambda: torch.zeros(self.out_channels, dtype=torch.long))

    def _geometry_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.kernel_size)}, "
                f"stride={tuple(self.stride)}, padding={self.padding}")
        if self.groups != 1:
            text += f", groups={self.groups}"
        return text if self.padding_mode == "zeros" else f"{text}, padding_mode={self.padding_mode}"


def _float_kernel(mod: _QuantizedConvNd, x: torch.Tensor, other: Any) -> torch.Tensor:
    y = mod._float_conv(portable.dequantize(x, mod.input_scale, mod.input_zero_point))
    return portable.finish(y, mod.post_op, mod.output_spec.out, mod.output_scale, mod.output_zero_point, other)


def _onednn_kernel(mod: _QuantizedConvNd, x: torch.Tensor, other: Any) -> torch.Tensor:
    packed, w_scale, w_zp = mod._packed()
    xq, out, oth = mod._act()
    acc = None if other is None else (other[0], oth)
    spec = mod.output_spec
    clamp = None if spec.dtype.is_floating_point or (spec.quant_min, spec.quant_max) == (0, 255) else \
        (spec.quant_min, spec.quant_max)
    return onednn.conv(x, xq, packed, w_scale, w_zp, mod.bias, mod._geometry(), out, mod.post_op, acc, clamp)


def _unfused_kernel(mod: _QuantizedConvNd, x: torch.Tensor, other: Any, split: bool = False) -> torch.Tensor:
    """Exact onednn call(s) with float output; post-op and quantization in aten ops.

    ``split``: full-range uint8 input without VNNI runs as two calls on the 7-bit halves, summed in float.
    """
    packed, w_scale, w_zp = mod._packed()
    xq = mod._act()[0]
    parts = onednn.split_halves(x, xq) if split else ((x, xq),)
    f32, geometry = onednn.ActQParams(1.0, 0, torch.float32), mod._geometry()
    y = onednn.conv(parts[0][0], parts[0][1], packed, w_scale, w_zp, mod.bias, geometry, f32)
    for part, part_q in parts[1:]:
        y = y + onednn.conv(part, part_q, packed, w_scale, w_zp, None, geometry, f32)
    return portable.finish(y, mod.post_op, mod.output_spec.out, mod.output_scale, mod.output_zero_point, other)


_KERNELS: dict[str, Callable[[_QuantizedConvNd, torch.Tensor, Any], torch.Tensor]] = {
    "float": _float_kernel, "onednn": _onednn_kernel, "onednn_unfused": _unfused_kernel,
    "onednn_split": lambda mod, x, other: _unfused_kernel(mod, x, other, split=True),
    "fbgemm": lambda mod, x, other: _fbgemm_plan(mod, "fbgemm")(x, other)}


Plan = Callable[[torch.Tensor, Any], torch.Tensor]


def _generic_plan(mod: _QuantizedConvNd, kernel: str) -> Plan:
    fn = _KERNELS[kernel]
    return lambda x, other: fn(mod, x, mod._other(other))


def _onednn_plan(mod: _QuantizedConvNd, kernel: str) -> Plan:
    """The onednn call with every argument but the activations bound (no per-call Python work)."""
    packed, w_scale, w_zp = mod._packed()
    xq, out, oth = mod._act()
    stride, padding, dilation, groups = mod._geometry()
    out_scale, out_zp = (1.0, 0) if out.dtype in (torch.float32, torch.bfloat16) else (out.scale, out.zero_point)
    spec, bias = mod.output_spec, mod.bias
    clamp = None if spec.dtype.is_floating_point or (spec.quant_min, spec.quant_max) == (0, 255) else \
        (spec.quant_min, spec.quant_max)
    if mod.post_op in onednn.BINARY:
        binary, unary = torch.ops.onednn.qconv2d_pointwise.binary, onednn.BINARY[mod.post_op]
        assert oth is not None
        accum_scale, accum_zp = oth.scale, oth.zero_point

        def run(x: torch.Tensor, other: Any) -> torch.Tensor:
            if other is None:
                mod._other(other)  # raises the explanatory error
            accum = other.clone(memory_format=torch.channels_last)  # onednn adds into its accumulator in place
            y = binary(x, xq.scale, xq.zero_point, packed, w_scale, w_zp, accum, bias, stride, padding, dilation,
                       groups, out_scale, out_zp, out.dtype, accum_scale, accum_zp, "sum", 1.0, unary, [], None)
            return y if clamp is None else y.clamp_(*clamp)
        return run
    op = torch.ops.onednn.qconv_pointwise.default
    attr, scalars, algo, clamp = onednn.unary_with_clamp(mod.post_op, clamp, out_scale, out_zp)

    def run_unary(x: torch.Tensor, other: Any) -> torch.Tensor:
        y = op(x, xq.scale, xq.zero_point, packed, w_scale, w_zp, bias, stride, padding, dilation, groups,
               out_scale, out_zp, out.dtype, attr, scalars, algo or None)
        return y if clamp is None else y.clamp_(*clamp)
    return run_unary


def _float_plan(mod: _QuantizedConvNd, kernel: str) -> Plan:
    """Float conv with both qparams folded into weight and bias: ``clamp(conv(q - zp_in, W * s_in / s_out,
    b / s_out + zp_out))`` -- four aten ops (the subtraction also converts to float); a residual add is one
    ``add(y, other, alpha=s_other / s_out)`` more (its zero point folds into the bias). For the small convs the
    kernel rules send here this beats onednn's per-call setup; transposed convs go generic."""
    if mod._TRANSPOSED or mod.padding_mode != "zeros" or mod.output_spec.dtype.is_floating_point:
        return _generic_plan(mod, kernel)
    spec, zp_in, post_op = mod.output_spec, int(mod.input_zero_point), mod.post_op
    inv_out, zp_out = 1.0 / float(mod.output_scale), int(mod.output_zero_point)
    folded = post_op in ("none", "relu", "add", "add_relu")  # else: the post-op runs in float, then a quantize
    w = (mod.float_weight() * (float(mod.input_scale) * (inv_out if folded else 1.0))).contiguous()
    b = torch.zeros(mod.out_channels) if mod.bias is None else mod.bias.clone()
    bias_out = uint8.offset(zp_out)
    k_other = 0.0
    if post_op in portable.BINARY_POST_OPS:
        k_other = float(mod.other_scale) * inv_out
        b = b - int(mod.other_zero_point) * float(mod.other_scale)
    if folded:
        b = b * inv_out + float(bias_out)
    lo = max(spec.quant_min, zp_out) if post_op in ("relu", "add_relu") else spec.quant_min
    neg_zp = uint8.offset(-zp_in) if zp_in else None
    conv, geometry = _CONV_FN[mod._SPATIAL], (mod.stride, mod.padding, mod.dilation, mod.groups)
    post = portable.UNARY_POST_OPS.get(post_op)
    # a 1x1 conv on a 1x1 image (squeeze-excite) is a matrix product: F.linear, not aten's slow generic conv
    # (~10 vs ~55 us at batch 1)
    as_linear = mod.groups == 1 and all(k == 1 for k in mod.kernel_size) and all(v == 1 for v in mod.stride) and \
        not isinstance(mod.padding, str) and all(v == 0 for v in mod.padding)
    w_matrix = w.reshape(mod.out_channels, mod.in_channels) if as_linear else None
    unit = (1,) * mod._SPATIAL

    def run(x: torch.Tensor, other: Any) -> torch.Tensor:
        xf = uint8.widen(x, zp_in, neg_zp)
        if w_matrix is not None and xf.shape[2:] == unit:
            y = F.linear(xf.reshape(xf.shape[0], -1), w_matrix, b).reshape(xf.shape[0], -1, *unit)
        else:
            y = conv(xf, w, b, *geometry)
        if k_other:
            if other is None:
                mod._other(other)  # raises the explanatory error
            y = y.add_(other, alpha=k_other)
        if folded:
            return uint8.finish(y, lo, spec.quant_max, spec.dtype)
        return uint8.quantize(post(y), inv_out, bias_out, lo, spec.quant_max, spec.dtype)
    return run


def _fbgemm_plan(mod: _QuantizedConvNd, kernel: str) -> Plan:
    """FBGEMM's convolution through the native library (:mod:`fxquant.kernels.native`): one ctypes call with the
    weight packed once, relu, the output range and a folded activation's table fused. Input that could saturate
    FBGEMM's int16 pair sums on a CPU without VNNI (beyond the calibrated 7-bit range) runs :func:`_fallback`
    where that kernel is exact (the float plan, onednn's depthwise kernel); where the rules would give onednn for
    an ungrouped conv, which pairs its products in int16 the same way (``x86.SATURATING``), FBGEMM runs unchecked:
    the same arithmetic class, faster. Every call takes the fallback where FBGEMM cannot pack the geometry."""
    spec, table = mod.output_spec, mod._activation_table()
    out_qparams = (float(mod.output_scale), int(mod.output_zero_point))
    low, high = spec.quant_min, spec.quant_max
    if table is not None:  # round at the conv's own qparams, then the activation's table
        out_qparams = (float(mod.pre_activation_scale), int(mod.pre_activation_zero_point))
        low, high = mod.pre_activation_range

    def build(check_7bit: bool) -> native.ConvPlan:
        return native.ConvPlan(
            mod.weight_int, mod.weight_scale, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups,
            (float(mod.input_scale), int(mod.input_zero_point)), out_qparams, mod.post_op == "relu", low, high,
            check_7bit=check_7bit, table=table)
    try:
        conv: native.ConvPlan | None = build(not x86.cpu_has_vnni())
    except RuntimeError:  # FBGEMM cannot pack this geometry: every call takes the fallback
        conv = None
    fallback: dict[int, Plan] = {}
    unchecked: list[native.ConvPlan] = []  # built once, for the batch sizes whose fallback saturates anyway

    def run(x: torch.Tensor, other: Any) -> torch.Tensor:
        y = None if conv is None else conv(x)
        if y is not None:
            return y
        if x.shape[0] not in fallback:
            kernel = x86.choose(mod._OP, mod._facts(x, compiling=False, native_ok=False))
            if conv is not None and kernel in x86.SATURATING and mod.groups == 1:  # (depthwise onednn is exact)
                if not unchecked:
                    unchecked.append(build(False))
                fallback[x.shape[0]] = lambda x, other, plan=unchecked[0]: plan(x)
            else:
                fallback[x.shape[0]] = _fallback(mod, x, kernel)
        return fallback[x.shape[0]](x, other)
    return run


def _fallback(mod: _QuantizedConvNd, x: torch.Tensor, kernel: str) -> Plan:
    """The plan for input the native kernel refused (values that could saturate its int16 pair sums): the kernel
    the rules choose without it (as before the native kernel existed: onednn for most sizes, which trusts the
    calibrated 7-bit range the same way). A folded activation with its table keeps the reference's order:
    onednn's conv rounded at the conv's own qparams, or the float conv, then the table."""
    table = mod._activation_table()
    if table is None:
        return _plan(mod, kernel)
    pre = onednn.ActQParams(float(mod.pre_activation_scale), int(mod.pre_activation_zero_point))
    inv, offset = 1.0 / pre.scale, uint8.offset(pre.zero_point)
    low, high = mod.pre_activation_range
    clamp = None if (low, high) == (0, 255) else (low, high)

    def run(x: torch.Tensor, other: Any) -> torch.Tensor:
        if kernel == "onednn":
            packed, w_scale, w_zp = mod._packed()
            q = onednn.conv(x, mod._act()[0], packed, w_scale, w_zp, mod.bias, mod._geometry(), pre, "none", None,
                            clamp)
        else:
            y = mod._float_conv(portable.dequantize(x, mod.input_scale, mod.input_zero_point))
            q = uint8.quantize(y, inv, offset, low, high, torch.uint8)
        return uint8.lookup(q, table)
    return run


def _plan(mod: _QuantizedConvNd, kernel: str) -> Plan:
    return _PLANS[kernel](mod, kernel) if kernel in _PLANS else _generic_plan(mod, kernel)


_PLANS: dict[str, Callable[[_QuantizedConvNd, str], Plan]] = {"onednn": _onednn_plan, "float": _float_plan,
                                                              "fbgemm": _fbgemm_plan}


class Conv1d(_QuantizedConvNd):
    """Quantized Conv1d (see the module docstring)."""

    _SPATIAL = 1


class Conv2d(_QuantizedConvNd):
    """Quantized Conv2d (see the module docstring)."""

    _SPATIAL = 2


class Conv3d(_QuantizedConvNd):
    """Quantized Conv3d (see the module docstring)."""

    _SPATIAL = 3


class ConvTranspose1d(_QuantizedConvNd):
    """Quantized ConvTranspose1d (float-path kernel: onednn has no int8 transposed conv op in torch)."""

    _SPATIAL, _TRANSPOSED = 1, True


class ConvTranspose2d(_QuantizedConvNd):
    """Quantized ConvTranspose2d (float-path kernel)."""

    _SPATIAL, _TRANSPOSED = 2, True


class ConvTranspose3d(_QuantizedConvNd):
    """Quantized ConvTranspose3d (float-path kernel)."""

    _SPATIAL, _TRANSPOSED = 3, True
