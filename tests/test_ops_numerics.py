"""fxquant.ops numerics against torch's quantized kernels (the oracle), bit for bit.

torch.quantize_per_tensor / quantize_per_channel / fake_quantize_* and quantized-tensor ``.dequantize()`` serve as
the oracle only here; they are skipped when a future torch drops them. The inputs mix near-ties (values a few ulps
from a rounding boundary), random bit patterns (NaN, inf, subnormals, huge values), wide-range normals and
special values, over many random scales and zero points: millions of values per dtype.
"""
from __future__ import annotations

import math

import pytest
import torch

import fxquant._quant_math as qm
from fxquant import ops

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # torch's quantized-tensor deprecation warning

if not hasattr(torch, "quantize_per_tensor"):
    pytest.skip("torch's quantized tensors (the oracle) are gone", allow_module_level=True)

LEGACY = {torch.uint8: torch.quint8, torch.int8: torch.qint8, torch.int32: torch.qint32}
RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int32: (-(2**31), 2**31 - 1)}
SPECIALS = [math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39, 1.17549435e-38,
            3.4028235e38, -3.4028235e38, 2.0**31, -(2.0**31), 2.0**31 - 128, 2.0**24 + 2, 2.0**23 + 0.5, 1e10, -1e10,
            0.5, -0.5, 1.5, 2.5, -2.5, 127.5, 128.5, 255.5, -128.5]


def _scale(g: torch.Generator) -> float:
    """A float32 scale, log-uniform over [1e-6, 1e3] (sometimes a power of two)."""
    s = 10.0 ** float(torch.empty(1).uniform_(-6, 3, generator=g))
    if bool(torch.rand(1, generator=g) < 0.15):
        s = 2.0 ** round(math.log2(s))
    return qm.f32(s)


def _zero_point(g: torch.Generator, dtype: torch.dtype) -> int:
    lo, hi = RANGE[dtype]
    if dtype == torch.int32 and bool(torch.rand(1, generator=g) < 0.5):
        return int(torch.tensor([lo, hi, 0, -1000, 2**24 + 1, 2**31 - 3])[torch.randint(6, (1,), generator=g)])
    return int(torch.randint(max(lo, -(2**20)), min(hi, 2**20) + 1, (1,), generator=g))


def _inputs(g: torch.Generator, n: int, scale: float, zp: int) -> torch.Tensor:
    """float32 values: a quarter each of near-ties, random bit patterns, wide normals; plus specials."""
    k = torch.randint(-300, 300, (n // 4,), generator=g).double()
    ties = ((k + 0.5 - zp) * scale).float()
    ulps = torch.randint(-3, 4, ties.shape, generator=g).float()
    ties = torch.where(ulps == 0, ties, torch.nextafter(ties, ulps * math.inf))
    bits = torch.randint(-(2**31), 2**31, (n // 4,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    wide = torch.randn(n // 2, generator=g) * 10.0 ** torch.empty(n // 2).uniform_(-4, 4, generator=g) * scale * 100
    return torch.cat([ties, bits, wide.float(), torch.tensor(SPECIALS, dtype=torch.float32)])


def _torch_qpt(x: torch.Tensor, scale: float, zp: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.quantize_per_tensor(x, scale, zp, LEGACY[dtype]).int_repr()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32])
def test_quantize_per_tensor_matches_torch_on_millions_of_values(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(hash(str(dtype)) % 2**31)
    total = 0
    for _ in range(24):
        scale, zp = _scale(g), _zero_point(g, dtype)
        x = _inputs(g, 60_000, scale, zp)
        ours = ops.quantize_per_tensor(x, scale, zp, *RANGE[dtype], dtype)
        assert ours.dtype == dtype
        theirs = _torch_qpt(x, scale, zp, dtype)
        bad = (ours != theirs).nonzero()
        assert bad.numel() == 0, (scale, zp, x[bad[:5, 0]].tolist(), ours[bad[:5, 0]], theirs[bad[:5, 0]])
        total += x.numel()
    assert total > 1_400_000


@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 17, 33, 65])
def test_quantize_per_tensor_short_tensors_take_the_same_path(n: int) -> None:
    """torch handles the tail of a vector loop in scalar code; short tensors check that path too."""
    g = torch.Generator().manual_seed(n)
    for dtype in (torch.uint8, torch.int8, torch.int32):
        for _ in range(40):
            scale, zp = _scale(g), _zero_point(g, dtype)
            x = _inputs(g, 4 * n, scale, zp)[: 4 * n]
            ours = ops.quantize_per_tensor(x, scale, zp, None, None, dtype)
            assert torch.equal(ours, _torch_qpt(x, scale, zp, dtype))


def _halfway_products(u: float) -> list[tuple[float, float, int]]:
    """(x, inv, j) with x * inv == 0.5 + u/2 + j * 2**-48 exactly, x and inv float32 with 24-bit significands."""
    divisors = torch.arange(1 << 23, 1 << 24, dtype=torch.int64)
    found = []
    for j in (1, 2, -1, -2):
        m = (1 << 47) + int(u / 2 * 2.0**48) + j
        for a in divisors[(m % divisors) == 0].tolist():
            b = m // a
            if (1 << 23) <= b < (1 << 24):
                found.append((a * 2.0**-24, b * 2.0**-24, j))
                break
    return found


def test_fused_multiply_add_is_emulated_without_double_rounding() -> None:
    """Constructed inputs where float64 arithmetic rounds twice: x * inv + zp lies a hair beside a float32 tie.

    A plain float64 evaluation gets some of these wrong; the emulation must equal torch's FMA on all of them.
    """
    cases, naive_wrong = 0, 0
    for top in (1, 3, 5, 7):  # zero points in [2**top, 2**(top+1)) share the float32 ulp of zp + 0.5
        u = 2.0 ** (top - 23)
        for x, inv, _ in _halfway_products(u):
            scale = qm.f32(1.0 / inv)
            if qm.f32(1.0 / scale) != inv:
                x, inv = inv, x  # use the factor whose reciprocal round-trips as inv
                scale = qm.f32(1.0 / inv)
                if qm.f32(1.0 / scale) != inv:
                    continue
            zps = torch.arange(2**top, min(2 ** (top + 1), 256))
            xs = torch.full((len(zps),), x, dtype=torch.float32)
            for zp, xv in zip(zps.tolist(), xs):
                ours = ops.quantize_per_tensor(xv.reshape(1), scale, zp, 0, 255, torch.uint8)
                assert torch.equal(ours, _torch_qpt(xv.reshape(1), scale, zp, torch.uint8)), (x, scale, zp)
                naive = torch.round((xv.double() * inv + zp).float())
                naive_wrong += int(naive) != int(ours)
                cases += 1
    assert cases >= 100
    assert naive_wrong > 0  # the inputs do exercise double rounding


def test_dense_repair_equals_sparse_repair(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator path (no host sync) computes the same as the CPU path; run both on CPU."""
    g = torch.Generator().manual_seed(7)
    for _ in range(10):
        scale, zp = _scale(g), _zero_point(g, torch.uint8)
        x = _inputs(g, 20_000, scale, zp)
        sparse = ops.quantize_per_tensor(x, scale, zp, 0, 255, torch.uint8)
        with monkeypatch.context() as m:
            m.setattr(qm, "_REPAIR", {})
            dense = ops.quantize_per_tensor(x, scale, zp, 0, 255, torch.uint8)
        assert torch.equal(sparse, dense)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32])
def test_quantize_per_channel_matches_torch_on_any_axis(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(11)
    for trial in range(16):
        shape = [int(d) for d in torch.randint(1, 9, (4,), generator=g)]
        axis = int(torch.randint(-4, 4, (1,), generator=g))
        c = shape[axis]
        scales = torch.tensor([_scale(g) for _ in range(c)], dtype=torch.float32)
        zps = torch.tensor([_zero_point(g, dtype) for _ in range(c)], dtype=torch.int64)
        base = _inputs(g, 4 * math.prod(shape), float(scales[0]), int(zps[0]))
        x = base[torch.randint(base.numel(), (math.prod(shape),), generator=g)].reshape(shape)
        x = x * (scales.reshape([-1 if d == axis % 4 else 1 for d in range(4)]) / scales[0])
        ours = ops.quantize_per_channel(x, scales, zps, axis, None, None, dtype)
        theirs = torch.quantize_per_channel(x, scales.double(), zps, axis % 4, LEGACY[dtype]).int_repr()
        assert torch.equal(ours, theirs), (trial, axis)


def test_quantize_per_channel_with_float_zero_points_matches_torch() -> None:
    g = torch.Generator().manual_seed(12)
    scales = (torch.rand(6, generator=g) * 0.1 + 1e-3).float()
    zps = (torch.rand(6, generator=g) * 200 - 50).float()
    k = torch.randint(-100, 300, (6, 20_000), generator=g).float()
    x = ((k + 0.5 - zps[:, None]) * scales[:, None]).float()
    x = torch.nextafter(x, torch.randint(-1, 2, x.shape, generator=g).float() * math.inf)
    ours = ops.quantize_per_channel(x, scales, zps, 0, 0, 255, torch.uint8)
    assert torch.equal(ours, torch.quantize_per_channel(x, scales.double(), zps, 0, torch.quint8).int_repr())
    back = ops.dequantize_per_channel(ours, scales, zps, 0, 0, 255, torch.uint8)
    theirs = torch._make_per_channel_quantized_tensor(ours, scales.double(), zps, 0).dequantize()
    assert torch.equal(back.view(torch.int32), theirs.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32])
def test_dequantize_matches_torch_bit_for_bit(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(13)
    lo, hi = RANGE[dtype]
    for _ in range(12):
        q = torch.randint(lo, hi + 1, (50_000,), generator=g, dtype=torch.int64).to(dtype)
        scale, zp = _scale(g), _zero_point(g, dtype)
        ours = ops.dequantize_per_tensor(q, scale, zp, lo, hi, dtype)
        theirs = torch._make_per_tensor_quantized_tensor(q, scale, zp).dequantize()
        diff = q.to(torch.int64) - zp
        fits = (diff >= lo) & (diff <= hi) if dtype == torch.int32 else torch.ones_like(diff, dtype=torch.bool)
        # torch subtracts in int32 and wraps around on overflow; fxquant subtracts exactly there
        assert torch.equal(ours[fits].view(torch.int32), theirs[fits].view(torch.int32))
        assert torch.equal(ours[~fits], diff[~fits].float() * qm.f32(scale))
        scales = torch.tensor([_scale(g) for _ in range(5)], dtype=torch.float32)
        zps = torch.tensor([_zero_point(g, dtype) for _ in range(5)])
        qc = q[:50_000 // 5 * 5].reshape(5, -1).t().contiguous()
        ours = ops.dequantize_per_channel(qc, scales, zps, 1, lo, hi, dtype)
        theirs = torch._make_per_channel_quantized_tensor(qc, scales.double(), zps, 1).dequantize()
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


def _fq_inputs(g: torch.Generator, scale: float, zp: int) -> torch.Tensor:
    x = _inputs(g, 40_000, scale, zp)
    return x[torch.isfinite(x * qm.f32(1.0 / scale))]  # +inf after scaling: see test_fake_quantize_saturates


@pytest.mark.parametrize("qrange", [(0, 255), (-128, 127), (0, 15), (-(2**31), 2**31 - 1)])
def test_fake_quantize_matches_torch_values_and_gradients(qrange: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(qrange[1] % 1000)
    qmin, qmax = qrange
    for trial in range(8):
        scale = _scale(g)
        zp = [int(torch.randint(max(qmin, -1000), min(qmax, 1000) + 1, (1,), generator=g)), qmin, qmax][trial % 3]
        x = _fq_inputs(g, scale, zp)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = ops.fake_quantize_per_tensor(a, scale, zp, qmin, qmax)
        theirs = torch.fake_quantize_per_tensor_affine(b, scale, zp, qmin, qmax)
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), trial
        grad = torch.randn(x.shape, generator=g)
        ours.backward(grad)
        theirs.backward(grad)
        assert torch.equal(a.grad, b.grad)
        # per channel, axis 1, with each channel's own qparams
        xc = x[: x.numel() // 4 * 4].reshape(-1, 4)
        scales = torch.tensor([scale, _scale(g), scale * 3, _scale(g)], dtype=torch.float32)
        zps = torch.tensor([zp, qmin, qmax, zp], dtype=torch.int32)
        xc = xc[((xc * (1.0 / scales)).abs() < 2.0**62).all(1)]  # torch's per-channel kernel wraps beyond int64
        a, b = xc.clone().requires_grad_(), xc.clone().requires_grad_()
        ours = ops.fake_quantize_per_channel(a, scales, zps, 1, qmin, qmax)
        theirs = torch.fake_quantize_per_channel_affine(b, scales, zps, 1, qmin, qmax)
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), trial
        ours.sum().backward()
        theirs.sum().backward()
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fake_quantize_other_float_inputs_match_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(17)
    x = (torch.randn(30_000, generator=g) * 3).to(dtype)
    k = torch.randint(-20, 300, (30_000,), generator=g)
    x = torch.cat([x, ((k + 0.5 - 7) * 0.0173).to(dtype)])
    assert torch.equal(ops.fake_quantize_per_tensor(x, 0.0173, 7, 0, 255),
                       torch.fake_quantize_per_tensor_affine(x, 0.0173, 7, 0, 255))
    xc = x.reshape(2, -1)
    scales, zps = torch.tensor([0.0173, 0.031]), torch.tensor([7, 100], dtype=torch.int32)
    assert torch.equal(ops.fake_quantize_per_channel(xc, scales, zps, 0, 0, 255),
                       torch.fake_quantize_per_channel_affine(xc, scales, zps, 0, 0, 255))


def test_fake_quantize_per_channel_float_zero_points_matches_torch() -> None:
    g = torch.Generator().manual_seed(19)
    scales = (torch.rand(6, generator=g) * 0.1 + 1e-3).float()
    zps = (torch.rand(6, generator=g) * 200).float()
    k = torch.randint(-100, 300, (6, 25_000), generator=g).float()
    x = ((k + 0.5 - zps[:, None]) * scales[:, None]).float()
    x = torch.nextafter(x, torch.randint(-1, 2, x.shape, generator=g).float() * math.inf)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = ops.fake_quantize_per_channel(a, scales, zps, 0, 0, 255)
    theirs = torch.fake_quantize_per_channel_affine(b, scales, zps, 0, 0, 255)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    ours.sum().backward()
    theirs.sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_fake_quantize_saturates_where_torch_per_channel_wraps() -> None:
    """x / scale beyond int64 (or +inf) saturates to quant_max; torch's per-channel kernel wraps to quant_min."""
    x = torch.tensor([[math.inf, 3e38, 1e30, -1e30, -math.inf, math.nan, 1.0]])
    ours = ops.fake_quantize_per_channel(x, torch.tensor([0.5]), torch.tensor([3]), 0, 0, 255)
    per_tensor = ops.fake_quantize_per_tensor(x, 0.5, 3, 0, 255)
    assert ours.tolist() == per_tensor.tolist() == [[126.0, 126.0, 126.0, -1.5, -1.5, -1.5, 1.0]]
    assert torch.equal(per_tensor, torch.fake_quantize_per_tensor_affine(x, 0.5, 3, 0, 255))
    assert torch.fake_quantize_per_channel_affine(x, torch.tensor([0.5]), torch.tensor([3], dtype=torch.int32),
                                                  0, 0, 255)[0, 0] == -1.5  # the torch behaviour we do not copy
