"""The native float <-> 8-bit conversions (fxquant.kernels.native.quantize / dequantize) behind Quantize,
DeQuantize, uint8.finish / widen / dequantize_exact: equal to the aten arithmetic they replace at every length
around the 8-value steps, for uint8 and int8, halves rounded to even, out-of-range values clamped; a contiguous
image quantized straight into the channels-last layout equals quantize-then-copy for every channel count; the
parallel path (two threads, large tensors) equals the serial one; the modules use them and keep their layouts."""
from __future__ import annotations

import pytest
import torch

from fxquant.kernels import native, uint8
from fxquant.nn.quantized.elementwise import DeQuantize, Quantize

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")

RANGES = [(torch.uint8, 0, 255), (torch.uint8, 3, 250), (torch.int8, -128, 127), (torch.int8, 0, 127),
          (torch.int8, -100, 90)]


def _floats(n: int, seed: int, spread: float = 200.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g) - 0.5) * spread
    halves = torch.arange(-140, 140, dtype=torch.float32) + 0.5  # exact halves: rounding ties
    k = min(n, halves.numel())
    x[:k] = halves[torch.randperm(halves.numel(), generator=g)[:k]]
    if n > 300:
        x[290:300] = torch.tensor([float("inf"), float("-inf"), 1e30, -1e30, 0.0, -0.0, 255.5, -128.5, 127.5, 1e-3])
    return x


def _expected(x: torch.Tensor, inv: float, zp: int, low: int, high: int, dtype: torch.dtype) -> torch.Tensor:
    """zp + x * inv (two roundings, as the native kernel), clamped, rounded half to even."""
    y = torch.mul(x, inv).add_(float(zp))
    return torch.round(y.clamp_(low, high)).to(torch.int32).to(dtype)


@needs_native
@pytest.mark.parametrize("dtype,low,high", RANGES)
def test_quantize_equals_the_aten_arithmetic_at_every_length(dtype: torch.dtype, low: int, high: int) -> None:
    for n in list(range(0, 40)) + [255, 301, 1000, 4099, 70_001]:
        x = _floats(n, n)
        for inv, zp in ((1.0, 0), (0.37, 5), (3.0, -7 if dtype == torch.int8 else 128)):
            got = native.quantize(x, inv, zp, low, high, dtype)
            assert got.dtype == dtype and torch.equal(got, _expected(x, inv, zp, low, high, dtype)), (n, inv, zp)


@needs_native
@pytest.mark.parametrize("dtype,low,high", RANGES)
def test_finish_takes_the_native_pass_and_keeps_the_aten_result(dtype: torch.dtype, low: int, high: int) -> None:
    y = _floats(7 * 17 * 42, 1).reshape(1, 7, 17, 42)
    y_cl = y.contiguous(memory_format=torch.channels_last)
    aten = y.clone().clamp_(low, high).add_(uint8.ROUNDING_MAGIC).view(torch.int32).to(dtype)
    for src in (y, y_cl):
        got = uint8.finish(src.clone(), low, high, dtype)
        assert torch.equal(got, aten)
        assert got.stride() == src.stride()  # the layout is kept


@needs_native
@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5, 16, 33])
@pytest.mark.parametrize("side", [1, 5, 15, 16, 17, 40])
def test_quantize_into_channels_last_equals_quantize_then_copy(channels: int, side: int) -> None:
    x = _floats(2 * channels * side * (side + 3), channels * side).reshape(2, channels, side, side + 3)
    got = native.quantize(x, 0.5, 7, 0, 255, torch.uint8, channels_last=True)
    want = _expected(x, 0.5, 7, 0, 255, torch.uint8).contiguous(memory_format=torch.channels_last)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want) and got.stride() == want.stride()


@needs_native
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_dequantize_is_the_reference_arithmetic(dtype: torch.dtype) -> None:
    lo, hi = uint8.RANGES[dtype]
    for n in list(range(0, 40)) + [256, 4097, 70_001]:
        q = torch.randint(lo, hi + 1, (n,), dtype=dtype, generator=torch.Generator().manual_seed(n))
        for scale, zp in ((0.0123, 0), (0.5, 3), (1.7e-5, -9 if dtype == torch.int8 else 200), (1.0, 37)):
            want = (q.to(torch.float32) - zp) * scale
            got = native.dequantize(q, scale, zp)
            assert got.dtype == torch.float32 and torch.equal(got, want), (n, scale, zp)


@needs_native
def test_two_threads_equal_one() -> None:
    x = _floats(3 * 300 * 301, 3).reshape(1, 3, 300, 301)
    q = torch.randint(0, 256, (1, 8, 300, 301), dtype=torch.uint8)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((native.quantize(x, 0.3, 4, 0, 255, torch.uint8),
                            native.quantize(x, 0.3, 4, 0, 255, torch.uint8, channels_last=True),
                            native.dequantize(q, 0.02, 9)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_native
def test_modules_use_the_native_passes_and_keep_layouts() -> None:
    x = _floats(2 * 3 * 20 * 21, 5).reshape(2, 3, 20, 21)
    quant = Quantize(0.25, 100, channels_last=True)
    q = quant(x)
    assert q.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(q, _expected(x, 4.0, 100, 0, 255, torch.uint8))
    deq = DeQuantize(0.25, 100)
    assert torch.equal(deq(q), (q.to(torch.float32) - 100) * 0.25)
    assert deq(q).is_contiguous(memory_format=torch.channels_last)
    # a strided (non-dense) input takes the aten form with the same values
    strided = q[:, :, ::2]
    assert torch.equal(deq(strided), (strided.to(torch.float32) - 100) * 0.25)
    assert torch.equal(uint8.widen(q, 100), q.to(torch.float32) - 100)
    assert torch.equal(uint8.widen(strided, 100), strided.to(torch.float32) - 100)


@needs_native
def test_bad_ranges_raise() -> None:
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="int8"):
        native.quantize(x, 1.0, 0, -128, 255, torch.int8)
    with pytest.raises(ValueError, match="uint8"):
        native.quantize(x, 1.0, 0, -1, 255, torch.uint8)
    with pytest.raises(ValueError, match="needs"):
        native.quantize(x, 1.0, 0, 0, 255, torch.int32)
    with pytest.raises(ValueError, match="uint8 / int8"):
        native.dequantize(torch.zeros(4, dtype=torch.int32), 1.0, 0)


@needs_native
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_add_of_one_value_per_channel_takes_the_affine_pass(relu: bool, batch: int) -> None:
    """A quantized add of (N, C, H, W) and (1, C, 1, 1) (a frozen batch norm's shift) is the native per-channel
    affine pass: within one step of dequantize -> add -> quantize and of the aten form, in either argument
    order, layout kept."""
    from fxquant.nn.quantized.elementwise import QuantizedBinary
    g = torch.Generator().manual_seed(batch)
    big = torch.randint(0, 256, (batch, 24, 9, 11), dtype=torch.uint8, generator=g)
    small = torch.randint(0, 256, (1, 24, 1, 1), dtype=torch.uint8, generator=g)
    for first, second in ((big, small), (small, big), (big.contiguous(memory_format=torch.channels_last), small)):
        mod = QuantizedBinary("add", (0.0517, 10), (0.0231, 128), (0.0613, 20), relu=relu)
        got = mod(first, second)
        y = ((first.float() - 10) * 0.0517 + (second.float() - 128) * 0.0231) / 0.0613 + 20
        want = torch.round(y).clamp(20 if relu else 0, 255)
        assert got.shape == want.shape and (got.float() - want).abs().max() <= 1
        assert (got.float() != want).float().mean() < 0.02  # off by one only at near-ties
        consts, relu_min = mod._scalars()
        aten = uint8.binary("add", first, second, consts, relu_min, 0, 255, torch.uint8)
        assert (got.int() - aten.int()).abs().max() <= 1
        if first.shape == big.shape and not first.is_contiguous():  # the channels-last input
            assert got.is_contiguous(memory_format=torch.channels_last)
    # a shift that differs per sample keeps the aten form (same values as it)
    per_sample = torch.randint(0, 256, (batch, 24, 1, 1), dtype=torch.uint8, generator=g)
    mod = QuantizedBinary("add", (0.0517, 10), (0.0231, 128), (0.0613, 20))
    consts, relu_min = mod._scalars()
    if batch > 1:
        assert torch.equal(mod(big, per_sample), uint8.binary("add", big, per_sample, consts, relu_min, 0, 255,
                                                              torch.uint8))
