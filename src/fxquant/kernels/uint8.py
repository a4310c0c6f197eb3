"""Element-wise kernels on plain integer activations (uint8 / int8) in as few aten ops as possible.

They run between the int8 convolutions and linears of a lowered model, where torch.ao would dequantize, run a
float op and quantize again. At the sizes of a batch-1 forward each aten call costs more than its arithmetic, so
every kernel is written to the smallest op count:

=====================  ==============================================================================  =========
kernel                 computes                                                                        aten ops
=====================  ==============================================================================  =========
``quantize``           ``clamp(rint(x / scale + zp))`` from float                                      3
``dequantize``         ``(q - zp) * scale`` in float32, as ``q * scale + (-zp * scale)``               1
``lookup``             any function of one uint8 / int8 value, as a 256-entry table                     2
``round_to``           ``clamp(rint(y * a + b))`` of a float result (``a = 1, b = 0``: plain rounding)  3
``binary``             ``quantize(dequantize(a) (+|*) dequantize(b))`` (+ relu)                         4-6
=====================  ==============================================================================  =========

Rounding: half to even everywhere, like the reference (``torch.round``), by :func:`finish`'s float trick (adding
1.5 * 2**23 rounds in the FPU); the float arithmetic is the reference's up to float32 rounding, so a result stays
within the one quantization step the lowering contract allows.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fxquant.kernels import native

__all__ = ["quantize", "dequantize", "dequantize_exact", "widen", "native_ready", "fold_safe", "FOLD_LIMIT", "folds_exactly", "STEPS_LIMIT",
           "lookup", "round_to", "binary", "binary_consts", "table_index", "max_pool1d", "max_pool2d", "max_pool3d",
           "interpolate", "offset", "finish", "RANGES", "Offset", "ROUNDING_MAGIC"]

# dtype -> (min, max) of the integer activations these kernels accept
RANGES: dict[torch.dtype, tuple[int, int]] = {torch.uint8: (0, 255), torch.int8: (-128, 127)}
Offset = torch.Tensor  # a 0-d float32 tensor: one torch.add(offset, x, alpha=a) computes x * a + offset


def offset(value: float) -> Offset:
    return torch.tensor(value, dtype=torch.float32)


# 1.5 * 2**23: adding it to a float32 in [-2**22, 2**22] leaves the exponent fixed, so the addition rounds to an
# integer (half to even, the FPU's rounding) stored in the low mantissa bits: the float's int32 bits end in it
ROUNDING_MAGIC = 12582912.0


def finish(y: torch.Tensor, quant_min: int, quant_max: int, dtype: torch.dtype) -> torch.Tensor:
    """Round half to even, clamp and store float32 ``y`` as ``dtype`` (``y`` is overwritten).

    As ``clamp -> + 1.5 * 2**23 -> view as int32 -> cast``: the low byte of the float's bits is the rounded value,
    and torch casts int32 to uint8 / int8 with vectorized code where float32 -> uint8 is element by element
    (59 vs 72 us at 1x160x14x14, 83 vs 167 us at 1x32x56x56, 0.32 vs 1.0 ms at 1x256x56x56)."""
    if dtype not in RANGES or y.dtype != torch.float32:
        return y.round_().clamp_(quant_min, quant_max).to(dtype)
    if native_ready(y):  # one AVX2 pass (the same rounding of the clamped value), where aten takes four
        return native.quantize(y, 1.0, 0, quant_min, quant_max, dtype)
    return y.clamp_(quant_min, quant_max).add_(ROUNDING_MAGIC).view(torch.int32).to(dtype)


def native_ready(t: torch.Tensor) -> bool:
    """Whether the native element-wise kernels take ``t``: eager mode, a dense (contiguous or channels-last) CPU
    tensor, the library built."""
    return t.is_cpu and not torch.compiler.is_compiling() and native.available() and native.dense(t)


def widen(q: torch.Tensor, zero_point: int, neg_zero_point: Offset | None = None) -> torch.Tensor:
    """``q - zero_point`` as float32 (exact); ``neg_zero_point``: :func:`offset` of ``-zero_point`` for the aten
    form (one add), built here when not given."""
    if native_ready(q):
        return native.dequantize(q, 1.0, zero_point)
    if not zero_point:
        return q.to(torch.float32)
    return torch.add(offset(-zero_point) if neg_zero_point is None else neg_zero_point, q)


def quantize(x: torch.Tensor, inv_scale: float, bias: Offset, quant_min: int, quant_max: int,
             dtype: torch.dtype) -> torch.Tensor:
    """``clamp(rint(x * inv_scale + zero_point))`` as ``dtype``; ``bias = zero_point``."""
    return finish(torch.add(bias, x, alpha=inv_scale), quant_min, quant_max, dtype)


def dequantize(q: torch.Tensor, scale: float, bias: Offset) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32 with ``bias = -zero_point * scale`` (one op; only where
    :func:`fold_safe` holds, else :func:`dequantize_exact`)."""
    return torch.add(bias, q, alpha=scale)


def dequantize_exact(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32 as the reference computes it (a zero point gives exactly 0)."""
    if q.dtype in RANGES and native_ready(q):
        return native.dequantize(q, scale, zero_point)
    y = q.to(torch.float32)
    return (y.sub_(zero_point) if zero_point else y).mul_(scale)


# Folding the zero point into one ``q * scale + (-zero_point * scale)`` rounds ``-zero_point * scale`` once: the
# result is within ``|zero_point * scale| * 2**-24`` of the exact value, a negligible part of a step, but absolute.
# Downstream float ops that amplify absolute offsets (softmax's exp) turn that into garbage when the range is huge
# -- Hugging Face attention masks hold finfo.min, so "logits + mask" gets a scale near 1e36 and the folded form
# puts ~1e31 where the reference has 0. Beyond this bound (an absolute error above 2**-14) dequantize exactly.
FOLD_LIMIT = 2.0 ** 10


def fold_safe(scale: float, zero_point: int) -> bool:
    """Whether ``-zero_point * scale`` may be folded into one add (see :data:`FOLD_LIMIT`)."""
    return abs(zero_point * scale) <= FOLD_LIMIT


# An integer result computed as one float32 sum of scaled integers (``a * ka + b * kb + c``, in output steps) is
# within 1/8 step of the exact one while every term stays below 2**20 steps (float32 keeps 24 bits). Ranges that
# differ by more than that (an input holding an attention mask's finfo.min, requantized to a logits range) need
# the reference's order -- dequantize each input, combine, quantize -- where a zero point stays exactly zero.
STEPS_LIMIT = 2.0 ** 20


def folds_exactly(*terms: float) -> bool:
    """Whether every term (a folded constant, or a factor times the largest integer) is finite and at most
    :data:`STEPS_LIMIT` steps."""
    return all(math.isfinite(t) and abs(t) <= STEPS_LIMIT for t in terms)


def table_index(q: torch.Tensor) -> torch.Tensor:
    """Index of each value in a 256-entry table (uint8: the value; int8: the value + 128), as int64."""
    idx = q.to(torch.int64)
    return idx if q.dtype == torch.uint8 else idx.add_(128)


_FLAT_LOOKUP_MIN = 4096  # below this many elements the two-op ``take`` wins on call overhead


def _storage_view(t: torch.Tensor) -> torch.Tensor | None:
    """A 1-d view of ``t``'s elements in memory order when they are contiguous (plain or channels-last), else
    None. Element k of the view of ``t`` and of ``torch.empty_like(t)`` is the same logical element."""
    if t.is_contiguous():
        return t.view(-1)
    return t.as_strided((t.numel(),), (1,), t.storage_offset()) if native.dense(t) else None


def lookup(q: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[q]`` element-wise: ``table`` has 256 entries indexed by :func:`table_index`.

    Large dense tensors (channels-last images included) index the table with int32 positions in memory order
    (``index_select``: ~4x faster than ``take``'s int64 gather, measured at 0.8 M elements) into an output laid
    out like ``q``; with the native library, dense CPU tensors of any size and a 1-byte table take one native pass
    (:func:`fxquant.kernels.native.lookup`)."""
    if table.element_size() == 1 and q.dtype in RANGES and native_ready(q) and table.is_contiguous():
        out = torch.empty_like(q, dtype=table.dtype)
        native.lookup(q, table, out)
        return out
    flat = _storage_view(q) if q.numel() >= _FLAT_LOOKUP_MIN and not torch.compiler.is_compiling() else None
    if flat is None:
        return table.take(table_index(q))
    idx = flat.to(torch.int32)
    if q.dtype != torch.uint8:
        idx.add_(128)
    out = torch.empty_like(q, dtype=table.dtype)
    torch.index_select(table, 0, idx, out=_storage_view(out))
    return out


def round_to(y: torch.Tensor, a: float, bias: Offset, quant_min: int, quant_max: int,
             dtype: torch.dtype) -> torch.Tensor:
    """``clamp(rint(y * a + b))`` as ``dtype`` with ``bias = b``; ``y`` float."""
    return finish(torch.add(bias, y, alpha=a), quant_min, quant_max, dtype)


def binary(op: str, a: torch.Tensor, b: torch.Tensor, consts: tuple, relu_min: int, quant_min: int,
           quant_max: int, dtype: torch.dtype) -> torch.Tensor:
    """``quantize(dequantize(a) op dequantize(b))`` (``op``: ``add`` / ``mul``), clamped below at ``relu_min``.

    ``consts`` from :func:`binary_consts`. add: ``a * ka + b * kb + c`` (4 ops); mul:
    ``(a - za) * k * (b - zb) + c`` (5 ops when the zero points are 0).
    """
    if op == "add":
        ka, kb, c = consts
        y = torch.add(torch.add(c, a, alpha=ka), b, alpha=kb)  # out of place: a and b may broadcast
    else:
        k, neg_za, neg_zb, c = consts
        if min(a.numel(), b.numel()) * _BROADCAST_RATIO <= max(a.numel(), b.numel()):
            y = _scaled_by_small(a, b, k, neg_za, neg_zb, c)
        else:
            y = torch.mul(a, k) if neg_za is None else torch.add(neg_za, a).mul_(k)
            y = torch.mul(y, b if neg_zb is None else torch.add(neg_zb, b)).add_(c)
    return finish(y, max(relu_min, quant_min), quant_max, dtype)


# a product whose one operand broadcasts over the other (a squeeze-excite gate of shape (N, C, 1, 1) times the
# feature map): folding everything into per-element factors of the small side leaves one pass over the big one,
# ``addcmul(offsets, big, factors)``, instead of three (``bench/bench_kernels.py --only gate``: 1.6-2.2x the
# three-pass form at batch 16, 96 / 576 channels; level at batch 1, where the op count decides)
_BROADCAST_RATIO = 8


def _scaled_by_small(a: torch.Tensor, b: torch.Tensor, k: float, neg_za: Offset | None, neg_zb: Offset | None,
                     c: Offset) -> torch.Tensor:
    """``(a - za) * k * (b - zb) + c`` as ``big * f + (c - z_big * f)`` with ``f = k * (small - z_small)``."""
    big, small, neg_big, neg_small = (a, b, neg_za, neg_zb) if b.numel() <= a.numel() else (b, a, neg_zb, neg_za)
    factor = (small.to(torch.float32) if neg_small is None else torch.add(neg_small, small)).mul_(k)
    shift = c if neg_big is None else torch.addcmul(c, factor, neg_big)
    return torch.addcmul(shift, big, factor)


def binary_consts(op: str, a_qp: tuple[float, int], b_qp: tuple[float, int], out_qp: tuple[float, int],
                  dtype: torch.dtype) -> tuple | None:
    """The constants :func:`binary` takes, from ``(scale, zero_point)`` of both inputs and the output; None where
    the folded form would not be exact (:func:`folds_exactly`): compute as the reference does then."""
    (sa, za), (sb, zb), (so, zo) = a_qp, b_qp, out_qp
    top = 256.0  # the largest |integer| of any 8-bit input
    if op == "add":
        ka, kb = sa / so, sb / so
        c = zo - (za * ka + zb * kb)
        return (ka, kb, offset(c)) if folds_exactly(ka * top, kb * top, za * ka, zb * kb, c) else None
    k = sa * sb / so
    if not folds_exactly(k * top * top, float(zo)):
        return None
    return k, offset(-za) if za else None, offset(-zb) if zb else None, offset(zo)


def max_pool2d(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``F.max_pool2d`` for integer tensors in any layout (same arguments).

    Channels-last input runs the native one-pass kernel (:func:`fxquant.kernels.native.max_pool2d`); without it,
    since torch 2.13's channels-last kernel rejects uint8 / int8 images above 255 elements (its index type is the
    element type), through aten's int16 / int32 kernels (fine and vectorized; two more passes).
    Tracers (torch.fx, when a pickled GraphModule is rebuilt) see it as one call, like ``F.max_pool2d``.
    """
    if torch.overrides.has_torch_function_unary(x):
        return torch.overrides.handle_torch_function(max_pool2d, (x,), x, *args, **kwargs)  # type: ignore[no-any-return]
    if x.dim() == 4 and x.dtype in RANGES and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        if x.is_cpu and not torch.compiler.is_compiling() and native.available():
            pooled = native.max_pool2d(x, *_pool2d_arguments(*args, **kwargs))
            if pooled is not None:
                return pooled
        return F.max_pool2d(x.to(_pool_index_dtype(x, 2)), *args, **kwargs).to(x.dtype)
    return F.max_pool2d(x, *args, **kwargs)


def _pool2d_arguments(kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                      ceil_mode: bool = False, return_indices: bool = False) -> tuple:
    """F.max_pool2d's arguments as (kernel, stride, padding, dilation) pairs and ceil_mode; kernel sizes of 0
    (refused by the native kernel, so aten reports them) for return_indices, which it does not compute."""
    def pair(v: Any) -> list[int]:
        v = [int(e) for e in v] if isinstance(v, (tuple, list)) else [int(v)] * 2
        return v * 2 if len(v) == 1 else v
    kernel = [0, 0] if return_indices else pair(kernel_size)
    return kernel, pair(kernel_size if stride is None or stride in ([], ()) else stride), pair(padding), pair(dilation), \
        bool(ceil_mode)


def _pool_index_dtype(x: torch.Tensor, rank: int) -> torch.dtype:
    """torch's channels-last max pools index the image with the element type: int16 while the image has at most
    32767 positions, else int32 (both vectorized)."""
    return torch.int16 if math.prod(x.shape[-rank:]) <= 32767 else torch.int32


def max_pool3d(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``F.max_pool3d`` for integer tensors in any layout (same arguments): torch 2.13's channels-last-3d kernel
    rejects uint8 / int8 input of any size (index type = element type), so a non-contiguous integer input goes
    through int16 / int32 (:func:`_pool_index_dtype`)."""
    if torch.overrides.has_torch_function_unary(x):
        return torch.overrides.handle_torch_function(max_pool3d, (x,), x, *args, **kwargs)  # type: ignore[no-any-return]
    if x.dtype in RANGES and not x.is_contiguous():
        return F.max_pool3d(x.to(_pool_index_dtype(x, 3)), *args, **kwargs).to(x.dtype)
    return F.max_pool3d(x, *args, **kwargs)


def max_pool1d(x: torch.Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
               ceil_mode: bool = False, return_indices: bool = False) -> torch.Tensor:
    """``F.max_pool1d`` for integer tensors (same arguments; no indices): torch 2.13 has no integer 1-d max
    pool, so it runs as a 2-d pool over a height-1 image (exact: a max of the same elements)."""
    if torch.overrides.has_torch_function_unary(x):
        return torch.overrides.handle_torch_function(  # type: ignore[no-any-return]
            max_pool1d, (x,), x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    if return_indices:
        raise ValueError("fxquant's integer max_pool1d returns no indices (the lowering keeps such pools in float)")
    if x.dtype not in RANGES:
        return F.max_pool1d(x, kernel_size, stride, padding, dilation, ceil_mode)

    def one(v: Any, default: int) -> int:
        v = default if v is None or (isinstance(v, (tuple, list)) and not v) else v
        return int(v[0] if isinstance(v, (tuple, list)) else v)

    k = one(kernel_size, 1)
    two_d = ((1, k), (1, one(stride, k)), (0, one(padding, 0)), (1, one(dilation, 1)))
    return F.max_pool2d(x.unsqueeze(-2), *two_d, ceil_mode=ceil_mode).squeeze(-2)


_FLOAT_RESIZE_MIN = 4096  # smaller images: torch's integer kernel (one op) beats three


def interpolate(x: torch.Tensor, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                align_corners: Any = None, recompute_scale_factor: Any = None, antialias: bool = False) -> torch.Tensor:
    """``F.interpolate`` for integer tensors (same arguments), rounding interpolated values half to even.

    Nearest modes, and bilinear on small tensors, use torch's integer kernel. Other modes (whose integer kernels
    round differently: bicubic overshoots) and bilinear on larger tensors run in float32 in the input's layout
    and round: torch 2.13's uint8 bilinear kernel took 2.6-5x longer than that on
    channels-last conv outputs at batch 1 (1x21x112x112: 9.3 ms vs 3.5 ms) and lost only on contiguous batches.
    The weights of these modes sum to one, so ``op(q) == op(q - zp) + zp`` and the result is the reference's
    ``quantize(op(dequantize(q)))`` up to float rounding."""
    if torch.overrides.has_torch_function_unary(x):
        return torch.overrides.handle_torch_function(  # type: ignore[no-any-return]
            interpolate, (x,), x, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)
    args = (size, scale_factor, mode, align_corners, recompute_scale_factor, antialias)
    integer_ok = mode.startswith("nearest") or mode == "bilinear" and (
        x.numel() < _FLOAT_RESIZE_MIN or
        not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) or x.shape[0] <= 2))
    if integer_ok or x.dtype not in RANGES:
        return F.interpolate(x, *args)
    return finish(F.interpolate(x.float(), *args), *RANGES[x.dtype], x.dtype)


def upsample_args(mod: Any) -> tuple:
    """:func:`interpolate`'s arguments after the input for an ``nn.Upsample`` (or subclass) module."""
    return (mod.size, mod.scale_factor, mod.mode, mod.align_corners, getattr(mod, "recompute_scale_factor", None))
