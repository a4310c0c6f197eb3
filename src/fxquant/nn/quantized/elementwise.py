"""Small lowered modules that move activations between float and plain integer tensors, or compute on them.

======================  ====================================================================================
module                  forward
======================  ====================================================================================
``Quantize``            float -> uint8 / int8 with fixed qparams (model inputs, results of float ops)
``DeQuantize``          uint8 / int8 -> float32 (model outputs, inputs of float ops)
``LookupTable``         uint8 -> uint8: any function of one quantized value (activations with fixed qparams,
                        requantization, chains of unary ops), exact: the table is the reference computation
``Requantize``          float result computed from integer values (``op(q.float())``) -> integers with new
                        qparams: ``rint(y * s_in / s_out + (zp_out - zp_in * s_in / s_out))``
``QuantizedBinary``     ``add`` / ``mul`` (+ relu) of two quantized tensors
``FakeQuantizeDynamic`` float -> float through run-time (dynamic) qparams: ``dequantize(quantize(x))``
======================  ====================================================================================

qparams are buffers (so ``load_state_dict`` moves them); the Python numbers the kernels take are cached in
``_kernel_cache``, which is dropped on load, copy and pickling. Under ``torch.export`` / ``torch.compile`` the
forwards use the buffers directly.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fxquant.kernels import dynamic, native, onednn, x86
from fxquant.kernels import uint8 as k

__all__ = ["Quantize", "DeQuantize", "LookupTable", "Requantize", "QuantizedBinary", "FakeQuantizeDynamic"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _ScalarModule(nn.Module):
    """Buffers for qparams plus a cache of the Python numbers computed from them."""

    def __init__(self) -> None:
        super().__init__()
        self._kernel_cache: dict[str, Any] = {}

    def _qparam(self, prefix: str, scale: Any, zero_point: Any) -> None:
        self.register_buffer(f"{prefix}scale", torch.as_tensor(scale, dtype=torch.float32).detach().clone().reshape(()))
        self.register_buffer(f"{prefix}zero_point",
                             torch.as_tensor(zero_point).detach().to(torch.int64).clone().reshape(()))

    def _scalars(self) -> Any:
        cached = self._kernel_cache.get("scalars")
        if cached is None:
            cached = self._kernel_cache["scalars"] = self._build_scalars()
        return cached

    def _build_scalars(self) -> Any:
        raise NotImplementedError

    def _load_from_state_dict(self, *args: Any) -> None:
        self._kernel_cache = {}
        super()._load_from_state_dict(*args)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_kernel_cache"] = {}
        return state

    def get_extra_state(self) -> dict[str, Any]:
        return {"dtype": _dtype_name(self.dtype), "quant_min": self.quant_min, "quant_max": self.quant_max}

    def set_extra_state(self, state: Any) -> None:
        self.dtype = getattr(torch, state["dtype"])
        self.quant_min, self.quant_max = int(state["quant_min"]), int(state["quant_max"])
        self._kernel_cache = {}

    def _range_repr(self) -> str:
        return f"dtype={_dtype_name(self.dtype)}, quant_min={self.quant_min}, quant_max={self.quant_max}"


def _check_range(dtype: torch.dtype, quant_min: int, quant_max: int, where: str) -> None:
    if dtype not in k.RANGES:
        raise ValueError(f"{where}: dtype {dtype} is not supported; use torch.uint8 or torch.int8")
    lo, hi = k.RANGES[dtype]
    if not lo <= quant_min < quant_max <= hi:
        raise ValueError(f"{where}: quant range [{quant_min}, {quant_max}] does not fit {dtype}")


class Quantize(_ScalarModule):
    """``clamp(rint(x / scale + zero_point), quant_min, quant_max)`` as uint8 / int8.

    ``channels_last``: give 4-d results the channels-last layout the int8 convolutions read fastest.
    """

    def __init__(self, scale: Any, zero_point: Any, dtype: torch.dtype = torch.uint8, quant_min: int = 0,
                 quant_max: int = 255, channels_last: bool = False) -> None:
        super().__init__()
        _check_range(dtype, quant_min, quant_max, "Quantize")
        self.dtype, self.quant_min, self.quant_max, self.channels_last = dtype, quant_min, quant_max, channels_last
        self._qparam("", scale, zero_point)

    def _build_scalars(self) -> tuple[float, torch.Tensor, int]:
        return 1.0 / float(self.scale), k.offset(int(self.zero_point)), int(self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            y = torch.round(x * torch.reciprocal(self.scale) + self.zero_point)
            return y.clamp(self.quant_min, self.quant_max).to(self.dtype)
        inv, bias, zp = self._scalars()
        if x.dtype == torch.float32 and x.is_cpu and native.dense(x) and _native_elementwise(self):
            # (a contiguous image is quantized straight into the channels-last layout)
            q = native.quantize(x, inv, zp, self.quant_min, self.quant_max, self.dtype, self.channels_last)
        else:
            q = k.quantize(x, inv, bias, self.quant_min, self.quant_max, self.dtype)
        return q.contiguous(memory_format=torch.channels_last) if self.channels_last and q.dim() == 4 else q

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "channels_last": self.channels_last}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.channels_last = bool(state.get("channels_last", False))

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.6g}, zero_point={int(self.zero_point)}, {self._range_repr()}"


class DeQuantize(_ScalarModule):
    """``(q - zero_point) * scale`` in float32."""

    def __init__(self, scale: Any, zero_point: Any, dtype: torch.dtype = torch.uint8, quant_min: int = 0,
                 quant_max: int = 255) -> None:
        super().__init__()
        self.dtype, self.quant_min, self.quant_max = dtype, quant_min, quant_max
        self._qparam("", scale, zero_point)

    def _build_scalars(self) -> tuple[float, torch.Tensor | None, int]:
        scale, zp = float(self.scale), int(self.zero_point)
        return scale, (k.offset(-zp * scale) if k.fold_safe(scale, zp) else None), zp

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return (q.to(torch.float32) - self.zero_point) * self.scale
        scale, bias, zp = self._scalars()
        if q.dtype in k.RANGES and k.native_ready(q):  # exact, one pass
            return native.dequantize(q, scale, zp)
        return k.dequantize_exact(q, scale, zp) if bias is None else k.dequantize(q, scale, bias)

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.6g}, zero_point={int(self.zero_point)}"


class LookupTable(nn.Module):
    """``table[q]``: one quantized value in, one out; ``table`` has 256 entries (int8 input: index ``q + 128``)."""

    def __init__(self, table: torch.Tensor, output_qparams: tuple[float, int] | None = None) -> None:
        """``output_qparams``: the ``(scale, zero_point)`` the table's values are in, when known (kept as
        non-persistent buffers, for tools that read the output as float; the state dict holds only the table)."""
        super().__init__()
        if table.shape != (256,):
            raise ValueError(f"LookupTable: the table needs 256 entries, got shape {tuple(table.shape)}")
        self.register_buffer("table", table.detach().clone())
        if output_qparams is not None:
            self.register_buffer("output_scale", torch.tensor(float(output_qparams[0])), persistent=False)
            self.register_buffer("output_zero_point", torch.tensor(int(output_qparams[1])), persistent=False)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return k.lookup(q, self.table)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "table")
        if isinstance(saved, torch.Tensor) and saved.dtype != self.table.dtype:
            self.table = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"out_dtype={_dtype_name(self.table.dtype)}"


class Requantize(_ScalarModule):
    """Integers from a float result ``y`` computed on integer values with qparams ``(in_scale, in_zero_point)``.

    Used after ops that commute with the affine map ``q -> (q - zp) * s`` (average pooling, mean, bilinear
    interpolation), which then run on ``q.float()`` instead of on dequantized values. With equal in / out qparams
    it rounds ``y`` in place (it is given the op's fresh result).
    """

    def __init__(self, in_scale: Any, in_zero_point: Any, out_scale: Any, out_zero_point: Any,
                 dtype: torch.dtype = torch.uint8, quant_min: int = 0, quant_max: int = 255,
                 global_mean: bool = False) -> None:
        """``global_mean``: the module takes the integer image itself and averages it over its spatial dims first
        (a global average pool: ``torch.mean(q, (-2, -1), keepdim=True, dtype=torch.float32)``, or one native
        pass where :mod:`fxquant.kernels.native` runs)."""
        super().__init__()
        _check_range(dtype, quant_min, quant_max, "Requantize")
        self.dtype, self.quant_min, self.quant_max = dtype, quant_min, quant_max
        self.global_mean = global_mean
        self._qparam("in_", in_scale, in_zero_point)
        self._qparam("out_", out_scale, out_zero_point)

    def _build_scalars(self) -> tuple[float, torch.Tensor | None, bool]:
        same = float(self.in_scale) == float(self.out_scale) and int(self.in_zero_point) == int(self.out_zero_point)
        a = 1.0 if same else float(self.in_scale) / float(self.out_scale)
        b = float(self.out_zero_point) - float(self.in_zero_point) * a
        return a, None if same else k.offset(b), same or k.folds_exactly(a * 256.0, b)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if getattr(self, "global_mean", False):
            fast = None if torch.compiler.is_compiling() else self._native_mean(y)
            if fast is not None:
                return fast
            y = torch.mean(y, (-2, -1), keepdim=True, dtype=torch.float32)
        if torch.compiler.is_compiling():
            a = self.in_scale / self.out_scale
            out = torch.round(y * a + (self.out_zero_point - self.in_zero_point * a))
            return out.clamp(self.quant_min, self.quant_max).to(self.dtype)
        a, bias, folds = self._scalars()
        if bias is None:  # same qparams: round y in place (the lowering gives this module y's only use)
            return k.finish(y, self.quant_min, self.quant_max, self.dtype)
        if not folds:  # ranges far apart (k.STEPS_LIMIT): dequantize, then quantize, as the reference does
            x = k.dequantize_exact(y, float(self.in_scale), int(self.in_zero_point))
            return k.quantize(x, 1.0 / float(self.out_scale), k.offset(float(self.out_zero_point)), self.quant_min,
                              self.quant_max, self.dtype)
        return k.round_to(y, a, bias, self.quant_min, self.quant_max, self.dtype)

    def _native_mean(self, q: torch.Tensor) -> torch.Tensor | None:
        """The global mean and the requantization in one native pass, where it applies (else None)."""
        if not (q.dtype == self.dtype == torch.uint8 and q.is_cpu and q.dim() == 4 and native.dense(q)):
            return None
        consts = self._kernel_cache.get("native_mean")
        if consts is None:
            a, bias, folds = self._scalars()
            ok = folds and _native_elementwise(self)
            consts = self._kernel_cache["native_mean"] = (a, 0.0 if bias is None else float(bias)) if ok else ()
        if not consts:
            return None
        return native.mean_requantize(q, consts[0], consts[1], self.quant_min, self.quant_max)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "global_mean": bool(getattr(self, "global_mean", False))}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.global_mean = bool(state.get("global_mean", False))

    def extra_repr(self) -> str:
        mean = "global_mean, " if getattr(self, "global_mean", False) else ""
        return (f"{mean}in=({float(self.in_scale):.6g}, {int(self.in_zero_point)}), "
                f"out=({float(self.out_scale):.6g}, {int(self.out_zero_point)}), {self._range_repr()}")


def _native_elementwise(mod: nn.Module) -> bool:
    """Whether the kernel rules send this module's element-wise work to the native library (cached)."""
    choice = mod._kernel_cache.get("native_elementwise")
    if choice is None:
        choice = mod._kernel_cache["native_elementwise"] = \
            x86.choose("add", x86.Facts(device="cpu", native_ok=True)) == "native"
    return choice  # type: ignore[no-any-return]


def _gated(big: torch.Tensor, gate: torch.Tensor, batch: int | None = None) -> bool:
    """``big`` (N, C, *spatial), dense, and ``gate`` (batch, C, 1, ...): one value per (batch, channel); ``batch``
    defaults to N (a squeeze-excite gate), 1 is one value per channel for the whole batch (a frozen batch norm)."""
    return (big.dim() >= 3 and gate.dim() == big.dim() and gate.shape[1] == big.shape[1]
            and gate.shape[0] == (big.shape[0] if batch is None else batch)
            and all(v == 1 for v in gate.shape[2:]) and math.prod(big.shape[2:]) > 1 and big.numel() > 0
            and native.dense(big))


class QuantizedBinary(_ScalarModule):
    """``quantize(dequantize(a) <op> dequantize(b))`` with ``op`` ``add`` or ``mul``, optionally followed by relu."""

    def __init__(self, op: str, a_qparams: tuple[Any, Any], b_qparams: tuple[Any, Any],
                 out_qparams: tuple[Any, Any], relu: bool = False, dtype: torch.dtype = torch.uint8,
                 quant_min: int = 0, quant_max: int = 255) -> None:
        super().__init__()
        if op not in ("add", "mul"):
            raise ValueError(f"QuantizedBinary: op must be 'add' or 'mul', got {op!r}")
        _check_range(dtype, quant_min, quant_max, "QuantizedBinary")
        self.op, self.relu = op, relu
        self.dtype, self.quant_min, self.quant_max = dtype, quant_min, quant_max
        for prefix, (scale, zp) in (("a_", a_qparams), ("b_", b_qparams), ("out_", out_qparams)):
            self._qparam(prefix, scale, zp)

    def _build_scalars(self) -> tuple[tuple, int]:
        qps = [(float(getattr(self, f"{p}scale")), int(getattr(self, f"{p}zero_point"))) for p in ("a_", "b_", "out_")]
        relu_min = qps[2][1] if self.relu else self.quant_min
        return k.binary_consts(self.op, qps[0], qps[1], qps[2], self.dtype), relu_min

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        consts, relu_min = (None, 0) if torch.compiler.is_compiling() else self._scalars()
        if consts is None:  # tracing, or ranges too far apart to fold (k.binary_consts): the reference's order
            fa = (a.to(torch.float32) - self.a_zero_point) * self.a_scale
            fb = (b.to(torch.float32) - self.b_zero_point) * self.b_scale
            y = fa + fb if self.op == "add" else fa * fb
            y = torch.relu(y) if self.relu else y
            q = torch.round(y / self.out_scale + self.out_zero_point)
            return q.clamp(self.quant_min, self.quant_max).to(self.dtype)
        if a.dtype == b.dtype == self.dtype == torch.uint8 and a.is_cpu and b.is_cpu:
            y = self._native(a, b, relu_min)
            if y is not None:
                return y
        if self.op == "add" and a.dim() == 4 and a.shape == b.shape and a.dtype == b.dtype == self.dtype == \
                torch.uint8 and a.is_cpu and self._onednn_add(a):
            return self._run_onednn_add(a, b)
        return k.binary(self.op, a, b, consts, relu_min, self.quant_min, self.quant_max, self.dtype)

    def _native(self, a: torch.Tensor, b: torch.Tensor, relu_min: int) -> torch.Tensor | None:
        """One pass of the native library (:mod:`fxquant.kernels.native`) where it applies: an add of two
        tensors laid out alike, or a product with a gate holding one value per (batch, channel); else None."""
        swapped = False
        if self.op == "add":
            if a.shape != b.shape or a.stride() != b.stride() or not native.dense(a):
                return self._native_channel_add(a, b, relu_min)
        elif not _gated(a, b):
            if not _gated(b, a):
                return None
            a, b, swapped = b, a, True
        consts = self._kernel_cache.get("native")
        if consts is None:
            consts = self._kernel_cache["native"] = self._native_consts(relu_min) if _native_elementwise(self) else ()
        if not consts:
            return None
        if self.op == "add":
            ka, kb, c, lo, hi = consts
            return native.add(a, b, ka, kb, c, lo, hi)
        k, za, zb, c, lo, hi = consts
        if swapped:
            za, zb = zb, za
        return native.mul_gate(a, b, k, za, zb, c, lo, hi)

    def _native_channel_add(self, a: torch.Tensor, b: torch.Tensor, relu_min: int) -> torch.Tensor | None:
        """An add of one value per channel, shared by the batch (a frozen batch norm's shift: b or a of shape
        (1, C, 1, ...)), as the native per-channel affine pass: ``round(clamp(x * ka + (y[c] * kb + c)))``;
        else None."""
        if not _gated(a, b, batch=1):
            if not _gated(b, a, batch=1):
                return None
            a, b, ka, kb = b, a, float(self.b_scale), float(self.a_scale)
            za, zb = int(self.b_zero_point), int(self.a_zero_point)
        else:
            ka, kb = float(self.a_scale), float(self.b_scale)
            za, zb = int(self.a_zero_point), int(self.b_zero_point)
        if not _native_elementwise(self):
            return None
        so, zo = float(self.out_scale), int(self.out_zero_point)
        ka, kb = ka / so, kb / so
        shift = b.reshape(-1).to(torch.float32).mul_(kb).add_(zo - (za * ka + zb * kb))
        key = ("channel_factor", ka, shift.numel())  # (the constant factor, built once per channel count)
        factor = self._kernel_cache.get(key)
        if factor is None:
            factor = self._kernel_cache[key] = torch.full_like(shift, ka)
        return native.channel_affine(a, factor, shift, max(relu_min, self.quant_min), self.quant_max)

    def _native_consts(self, relu_min: int) -> tuple:
        """The native kernel's constants."""
        sa, za = float(self.a_scale), int(self.a_zero_point)
        sb, zb = float(self.b_scale), int(self.b_zero_point)
        so, zo = float(self.out_scale), int(self.out_zero_point)
        lo, hi = max(relu_min, self.quant_min), self.quant_max
        if self.op == "add":
            ka, kb = sa / so, sb / so
            return ka, kb, zo - (za * ka + zb * kb), lo, hi
        return sa * sb / so, za, zb, float(zo), lo, hi

    def _onednn_add(self, a: torch.Tensor) -> bool:
        """Whether the kernel rules send an add of this size to onednn (cached per element count)."""
        key = ("add_kernel", a.numel())
        choice = self._kernel_cache.get(key)
        if choice is None:
            facts = x86.Facts(device=a.device.type, macs=a.numel(), onednn_ok=True)
            choice = self._kernel_cache[key] = x86.choose("add", facts)
        return choice == "onednn_identity_conv"  # type: ignore[no-any-return]

    def _run_onednn_add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        key = ("onednn_add", a.shape[1])
        plan = self._kernel_cache.get(key)
        if plan is None:
            a_q = onednn.ActQParams(float(self.a_scale), int(self.a_zero_point))
            b_q = onednn.ActQParams(float(self.b_scale), int(self.b_zero_point))
            out = onednn.ActQParams(float(self.out_scale), int(self.out_zero_point))
            plan = self._kernel_cache[key] = (a_q, b_q, out, onednn.pack_identity_depthwise(a.shape[1], a_q))
        a_q, b_q, out, packed = plan
        y = onednn.add(a, a_q, b, b_q, out, self.relu, packed)
        return y if (self.quant_min, self.quant_max) == (0, 255) else y.clamp_(self.quant_min, self.quant_max)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "op": self.op, "relu": self.relu}

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)
        self.op, self.relu = state["op"], bool(state["relu"])

    def extra_repr(self) -> str:
        return f"op={self.op}{'_relu' if self.relu else ''}, {self._range_repr()}"


class FakeQuantizeDynamic(nn.Module):
    """``dequantize(quantize(x))`` with qparams chosen from ``x`` at run time (affine, per tensor)."""

    def __init__(self, quant_min: int, quant_max: int, dtype: torch.dtype = torch.uint8) -> None:
        super().__init__()
        self.quant_min, self.quant_max, self.dtype = quant_min, quant_max, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.aminmax(x.detach())
        if torch.compiler.is_compiling():
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
            scale = ((hi - lo) / float(self.quant_max - self.quant_min)).clamp_(min=torch.finfo(torch.float32).eps)
            zp = (self.quant_min - torch.round(lo / scale)).clamp_(self.quant_min, self.quant_max)
            return torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), self.quant_min, self.quant_max)
        scale, zp = dynamic.affine_qparams(float(lo), float(hi), self.quant_min, self.quant_max)
        return dynamic.fake_quantize(x, scale, zp, self.quant_min, self.quant_max)

    def get_extra_state(self) -> dict[str, Any]:
        return {"dtype": _dtype_name(self.dtype), "quant_min": self.quant_min, "quant_max": self.quant_max}

    def set_extra_state(self, state: Any) -> None:
        self.dtype = getattr(torch, state["dtype"])
        self.quant_min, self.quant_max = int(state["quant_min"]), int(state["quant_max"])

    def extra_repr(self) -> str:
        return f"dtype={_dtype_name(self.dtype)}, quant_min={self.quant_min}, quant_max={self.quant_max}"
