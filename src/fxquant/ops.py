"""Quantization primitives on plain dtypes, registered as ``torch.ops.fxquant.*`` operators.

Quantized values are ordinary ``uint8 / int8 / int16 / int32`` (or ``float16 / bfloat16 / float8``) tensors; scale
and zero point travel next to them as tensors or Python numbers. Each operator is a single node for
``torch.export`` / ``torch.compile`` (fake kernels give shapes), and the numerics reproduce torch's x86 quantized
kernels bit for bit (formulas in :mod:`fxquant._quant_math`; proof in ``tests/test_ops_numerics.py``)::

    q = fxquant.ops.quantize_per_tensor(x, 0.02, 128, 0, 255, torch.uint8)     # uint8 tensor
    y = fxquant.ops.dequantize_per_tensor(q, 0.02, 128, 0, 255, torch.uint8)   # float32 tensor
    torch.ops.fxquant.quantize_per_tensor.default(x, scale_t, zp_t, 0, 255, torch.uint8)  # the operator itself

==============================  =================================================================================
operator                        computes
==============================  =================================================================================
quantize_per_tensor             ``clamp(rint(x / scale + zp), quant_min, quant_max)`` as ``dtype``
dequantize_per_tensor           ``(q - zp) * scale`` as ``out_dtype`` (float32 by default)
quantize_per_channel / dequ..   the same with one scale / zero point per slice along ``axis``
quantize_per_token / dequ..     one scale / zero point per row of the last dimension (``x.shape[:-1] + (1,)``)
choose_qparams_per_tensor       dynamic ``(scale, zero_point)`` from ``x``'s min / max (``qparams.compute_qparams``)
choose_qparams_per_token        the same for each row of the last dimension
fake_quantize_per_tensor        torch's fake quantization, straight-through gradient inside the range
fake_quantize_per_channel       per-channel fake quantization (float zero points allowed: embeddings)
==============================  =================================================================================

``.default`` overloads take qparams as tensors; the per-tensor operators also have a ``.scalar`` overload taking a
Python float scale and int zero point (no tensor to build per call). Float targets (fp16 / bf16 / fp8) compute
``x / scale`` clamped to the dtype's finite range (and to ``[quant_min, quant_max]``) and ignore the zero point.

Only plain dtypes reach the operators; the Python wrappers below also take torch's legacy ``quint8 / qint8 /
qint32`` (normalised by name), Python numbers or sequences for qparams, and ``None`` ranges (the dtype's range).

Registration: ``torch.library.Library("fxquant", "DEF")`` + ``impl`` + ``register_fake``. Measured on this
project's CPU, dispatching such an operator costs about 10 us, against about 45 us for ``torch.library.custom_op``
(``bench/bench_ops.py``).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _ops_kernels as kernels
from ._dtypes import normalize_dtype
from ._quant_math import INT64_MAX, INT64_MIN
from ._ops_checks import FLOAT_QDTYPES, INT_QDTYPES

__all__ = ["quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel",
           "quantize_per_token", "dequantize_per_token", "choose_qparams_per_tensor", "choose_qparams_per_token",
           "fake_quantize_per_tensor", "fake_quantize_per_channel", "NAMESPACE"]

NAMESPACE = "fxquant"
_QP = "int quant_min, int quant_max, ScalarType dtype"
_OUT = "ScalarType? out_dtype=None"
_CHOOSE = "(Tensor input, int quant_min, int quant_max, float eps, ScalarType dtype, bool symmetric=False)"
_SCHEMAS = {
    "quantize_per_tensor": f"(Tensor input, Tensor scale, Tensor zero_point, {_QP}) -> Tensor",
    "quantize_per_tensor.scalar": f"(Tensor input, float scale, int zero_point, {_QP}) -> Tensor",
    "dequantize_per_tensor": f"(Tensor input, Tensor scale, Tensor zero_point, {_QP}, {_OUT}) -> Tensor",
    "dequantize_per_tensor.scalar": f"(Tensor input, float scale, int zero_point, {_QP}, {_OUT}) -> Tensor",
    "quantize_per_channel": f"(Tensor input, Tensor scales, Tensor zero_points, int axis, {_QP}) -> Tensor",
    "dequantize_per_channel": f"(Tensor input, Tensor scales, Tensor zero_points, int axis, {_QP}, {_OUT}) -> Tensor",
    "quantize_per_token": f"(Tensor input, Tensor scales, Tensor zero_points, {_QP}) -> Tensor",
    "dequantize_per_token": f"(Tensor input, Tensor scales, Tensor zero_points, {_QP}, {_OUT}) -> Tensor",
    "choose_qparams_per_tensor": f"{_CHOOSE} -> (Tensor, Tensor)",
    "choose_qparams_per_token": f"{_CHOOSE} -> (Tensor, Tensor)",
    "fake_quantize_per_tensor": "(Tensor input, Tensor scale, Tensor zero_point, int quant_min, int quant_max)"
                                " -> Tensor",
    "fake_quantize_per_tensor.scalar": "(Tensor input, float scale, int zero_point, int quant_min, int quant_max) "
                                       "-> Tensor",
    "fake_quantize_per_channel": "(Tensor input, Tensor scales, Tensor zero_points, int axis, int quant_min, "
                                 "int quant_max) -> Tensor",
}
_FAKE_QUANT_OPS = ("fake_quantize_per_tensor", "fake_quantize_per_tensor.scalar", "fake_quantize_per_channel")


def _setup_fake_quant(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.is_tensor = [isinstance(v, Tensor) for v in inputs]
    # qparams are saved as copies (they are tiny): an observer updating its scale in place before backward
    # (shared fake quants, gradient accumulation) must not invalidate this step's gradient
    ctx.save_for_backward(*[v if i == 0 else v.detach().clone() for i, v in enumerate(inputs)
                            if isinstance(v, Tensor)])
    ctx.constants = [v for v in inputs if not isinstance(v, Tensor)]


def _make_backward(name: str) -> Any:
    mask_of = kernels.FAKE_QUANT_MASKS[name.split(".")[0]]

    def backward(ctx: Any, grad: Tensor) -> tuple:
        tensors, constants = iter(ctx.saved_tensors), iter(ctx.constants)
        inputs = tuple(next(tensors) if t else next(constants) for t in ctx.is_tensor)
        return (grad * mask_of(*inputs),) + (None,) * (len(inputs) - 1)
    return backward


_NON_DIFFERENTIABLE_OPS = ("choose_qparams_per_tensor", "choose_qparams_per_token")


def _setup_non_differentiable(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.mark_non_differentiable(*output)
    ctx.num_inputs = len(inputs)


def _no_gradient(ctx: Any, *grads: Tensor) -> tuple:
    return (None,) * ctx.num_inputs


def _register() -> torch.library.Library:
    lib = torch.library.Library(NAMESPACE, "DEF")
    for name, schema in _SCHEMAS.items():
        lib.define(name + schema)
        real, fake = kernels.KERNELS[name]
        lib.impl(name, real, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=lib)
    for name in _FAKE_QUANT_OPS:
        torch.library.register_autograd(f"{NAMESPACE}::{name}", _make_backward(name),
                                        setup_context=_setup_fake_quant, lib=lib)
    for name in _NON_DIFFERENTIABLE_OPS:  # dynamic qparams: outputs never require grad
        torch.library.register_autograd(f"{NAMESPACE}::{name}", _no_gradient, setup_context=_setup_non_differentiable,
                                        lib=lib)
    return lib


_lib = _register()
_ops = torch.ops.fxquant

# --------------------------------------------------------------------------------------------------------------
# Python wrappers
# --------------------------------------------------------------------------------------------------------------

ScaleArg = Union[Tensor, float]
ZeroPointArg = Union[Tensor, int]
SeqArg = Union[Tensor, Sequence[float]]


def _plain(dtype: torch.dtype) -> torch.dtype:
    plain = normalize_dtype(dtype)
    assert plain is not None
    return plain


def _qrange(dtype: torch.dtype, quant_min: Optional[int], quant_max: Optional[int]) -> tuple[int, int]:
    """Explicit bounds, or the dtype's full range for ``None`` (float targets: the int64 extremes, "no bound")."""
    if quant_min is not None and quant_max is not None:
        return int(quant_min), int(quant_max)
    lo, hi = INT_QDTYPES.get(dtype, (INT64_MIN, INT64_MAX))
    return int(lo if quant_min is None else quant_min), int(hi if quant_max is None else quant_max)


def _zp_int(zero_point: Any) -> int:
    if isinstance(zero_point, float) and not zero_point.is_integer():
        raise ValueError(f"zero_point={zero_point} is not an integer; per-tensor zero points are integers")
    return int(zero_point)


def _per_tensor_args(scale: ScaleArg, zero_point: ZeroPointArg) -> tuple[Any, Any, bool]:
    """``(scale, zero_point, as_tensors)``: tensors if either one is a tensor, else Python float / int."""
    if isinstance(scale, Tensor) or isinstance(zero_point, Tensor):
        ref = scale if isinstance(scale, Tensor) else zero_point
        assert isinstance(ref, Tensor)
        s = scale if isinstance(scale, Tensor) else torch.tensor(float(scale), device=ref.device)
        z = zero_point if isinstance(zero_point, Tensor) else torch.tensor(_zp_int(zero_point), device=ref.device)
        return s, z, True
    return float(scale), _zp_int(zero_point), False


def _seq(values: SeqArg, dtype: torch.dtype, device: torch.device) -> Tensor:
    return values if isinstance(values, Tensor) else torch.as_tensor(values, dtype=dtype, device=device)


def _zps(values: SeqArg, device: torch.device) -> Tensor:
    if isinstance(values, Tensor):
        return values
    t = torch.as_tensor(values, device=device)
    return t if t.is_floating_point() else t.to(torch.int64)


def quantize_per_tensor(input: Tensor, scale: ScaleArg, zero_point: ZeroPointArg, quant_min: Optional[int],
                        quant_max: Optional[int], dtype: torch.dtype) -> Tensor:
    """Quantize ``input`` (float32 / float16 / bfloat16) with one scale and zero point.

    Integer ``dtype``: ``clamp(rint(input / scale + zero_point), quant_min, quant_max)``, equal bit for bit to
    the integers of torch's x86 per-tensor quantize kernel. Float ``dtype`` (fp16 / bf16 / fp8): ``input / scale``
    clamped to the finite range, cast. Raises ValueError for a bad dtype, range, scale or zero point.
    """
    dtype = _plain(dtype)
    qmin, qmax = _qrange(dtype, quant_min, quant_max)
    s, z, as_tensors = _per_tensor_args(scale, zero_point)
    op = _ops.quantize_per_tensor.default if as_tensors else _ops.quantize_per_tensor.scalar
    return op(input, s, z, qmin, qmax, dtype)


def dequantize_per_tensor(input: Tensor, scale: ScaleArg, zero_point: ZeroPointArg, quant_min: Optional[int],
                          quant_max: Optional[int], dtype: torch.dtype,
                          out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``(input - zero_point) * scale`` in float32 (as torch's ``.dequantize()``), returned as ``out_dtype``."""
    dtype = _plain(dtype)
    qmin, qmax = _qrange(dtype, quant_min, quant_max)
    s, z, as_tensors = _per_tensor_args(scale, zero_point)
    op = _ops.dequantize_per_tensor.default if as_tensors else _ops.dequantize_per_tensor.scalar
    return op(input, s, z, qmin, qmax, dtype, out_dtype)


def quantize_per_channel(input: Tensor, scales: SeqArg, zero_points: SeqArg, axis: int, quant_min: Optional[int],
                         quant_max: Optional[int], dtype: torch.dtype) -> Tensor:
    """Quantize with one scale / zero point per slice along ``axis``, equal to torch's per-channel quantize kernel.

    ``zero_points`` may be floats (``per_channel_affine_float_qparams``, embeddings).
    """
    dtype = _plain(dtype)
    qmin, qmax = _qrange(dtype, quant_min, quant_max)
    return _ops.quantize_per_channel.default(input, _seq(scales, torch.float32, input.device),
                                             _zps(zero_points, input.device), axis, qmin, qmax, dtype)


def dequantize_per_channel(input: Tensor, scales: SeqArg, zero_points: SeqArg, axis: int,
                           quant_min: Optional[int], quant_max: Optional[int], dtype: torch.dtype,
                           out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Per-channel ``(input - zero_points) * scales`` in float32, returned as ``out_dtype``."""
    dtype = _plain(dtype)
    qmin, qmax = _qrange(dtype, quant_min, quant_max)
    return _ops.dequantize_per_channel.default(input, _seq(scales, torch.float32, input.device),
                                               _zps(zero_points, input.device), axis, qmin, qmax, dtype, out_dtype)


def quantize_per_token(input: Tensor, scales: SeqArg, zero_points: SeqArg, quant_min: Optional[int],
                       quant_max: Optional[int], dtype: torch.dtype) -> Tensor:
    """Quantize each row of the last dimension with its own qparams (shape ``input.shape[:-1] + (1,)``).

    Integer dtypes round like :func:`quantize_per_channel`; fp8 gives row-wise scaled float8.
    """
    dtype = _plain(dtype)
    qmin, qmax = _qrange(dtype, quant_min, quant_max)
    return _ops.quantize_per_token.default(input, _seq(scales, torch.float32, input.device),
                                           _zps(zero_points, input.device), qmin, qmax, dtype)


def dequantize_per_token(input: Tensor, scales: SeqArg, zero_points: SeqArg, quant_min: Optional[int],
                         quant_max: Optional[int], dtype: torch.dtype,
                         out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Per-token ``(input - zero_points) * scales`` in float32, returned as ``out_dtype``."""
    dtype = _plain(dtype)
    qmin, qmax = _qrange(dtype, quant_min, quant_max)
    return _ops.dequantize_per_token.default(input, _seq(scales, torch.float32, input.device),
                                             _zps(zero_points, input.device), qmin, qmax, dtype, out_dtype)


def _eps(eps: Optional[float]) -> float:
    return float(torch.finfo(torch.float32).eps) if eps is None else float(eps)


def choose_qparams_per_tensor(input: Tensor, quant_min: Optional[int], quant_max: Optional[int],
                              eps: Optional[float], dtype: torch.dtype,
                              symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Dynamic qparams of ``input``: :func:`fxquant.qparams.compute_qparams` of its min and max.

    Equals torch.ao's dynamic (decomposed) ``choose_qparams`` / a MinMax observer over the same data: float32
    0-dim scale, int64 0-dim zero point. ``eps=None`` is float32 machine epsilon. ValueError for an empty or
    non-finite input.
    """
    dtype = _plain(dtype)
    qmin, qmax = _qrange(dtype, quant_min, quant_max)
    return _ops.choose_qparams_per_tensor.default(input, qmin, qmax, _eps(eps), dtype, symmetric)


def choose_qparams_per_token(input: Tensor, quant_min: Optional[int], quant_max: Optional[int],
                             eps: Optional[float], dtype: torch.dtype,
                             symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """Dynamic qparams of each row of the last dimension (shapes ``input.shape[:-1] + (1,)``)."""
    dtype = _plain(dtype)
    qmin, qmax = _qrange(dtype, quant_min, quant_max)
    return _ops.choose_qparams_per_token.default(input, qmin, qmax, _eps(eps), dtype, symmetric)


def fake_quantize_per_tensor(input: Tensor, scale: ScaleArg, zero_point: ZeroPointArg, quant_min: int,
                             quant_max: int) -> Tensor:
    """Fake quantization equal to ``torch.fake_quantize_per_tensor_affine`` (values and gradient).

    The gradient passes straight through where ``rint(input / scale) + zero_point`` lies in
    ``[quant_min, quant_max]`` and is zero elsewhere; scale and zero point get no gradient.
    """
    s, z, as_tensors = _per_tensor_args(scale, zero_point)
    op = _ops.fake_quantize_per_tensor.default if as_tensors else _ops.fake_quantize_per_tensor.scalar
    return op(input, s, z, int(quant_min), int(quant_max))


def fake_quantize_per_channel(input: Tensor, scales: SeqArg, zero_points: SeqArg, axis: int, quant_min: int,
                              quant_max: int) -> Tensor:
    """Per-channel fake quantization equal to ``torch.fake_quantize_per_channel_affine`` (straight-through)."""
    return _ops.fake_quantize_per_channel.default(input, _seq(scales, torch.float32, input.device),
                                                  _zps(zero_points, input.device), axis, int(quant_min),
                                                  int(quant_max))


assert set(FLOAT_QDTYPES).isdisjoint(INT_QDTYPES)
