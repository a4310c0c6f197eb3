"""fxquant.ops: the operator interface, wrappers, errors, float targets, per-token, choose_qparams and export.

Bit-exactness against torch's quantized kernels is in test_ops_numerics.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant import ops
from fxquant.qparams import compute_qparams

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
F = torch.ops.fxquant
EPS = float(torch.finfo(torch.float32).eps)
FLOAT_TARGETS = [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


def test_operators_are_registered_with_their_overloads() -> None:
    names = {"quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel",
             "quantize_per_token", "dequantize_per_token", "choose_qparams_per_tensor", "choose_qparams_per_token",
             "fake_quantize_per_tensor", "fake_quantize_per_channel"}
    for name in names:
        assert "default" in getattr(F, name).overloads(), name
    for name in ("quantize_per_tensor", "dequantize_per_tensor", "fake_quantize_per_tensor"):
        assert "scalar" in getattr(F, name).overloads(), name


@pytest.mark.parametrize("legacy,plain,qrange", [(torch.quint8, torch.uint8, (0, 255)),
                                                 (torch.qint8, torch.int8, (-128, 127)),
                                                 (torch.qint32, torch.int32, (-(2**31), 2**31 - 1))])
def test_wrappers_accept_legacy_dtypes_and_default_ranges(legacy: torch.dtype, plain: torch.dtype,
                                                          qrange: tuple[int, int]) -> None:
    x = torch.randn(64) * 50
    q = ops.quantize_per_tensor(x, 0.3, 5, None, None, legacy)
    assert q.dtype == plain
    assert torch.equal(q, ops.quantize_per_tensor(x, 0.3, 5, *qrange, plain))
    y = ops.dequantize_per_tensor(q, 0.3, 5, None, None, legacy)
    assert y.dtype == torch.float32
    qc = ops.quantize_per_channel(x.reshape(8, 8), [0.3] * 8, [5] * 8, 0, None, None, legacy)
    assert torch.equal(qc.reshape(-1), q)


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(1e-4, 1e3), zp=st.integers(0, 255), seed=st.integers(0, 2**16))
def test_scalar_and_tensor_overloads_agree(scale: float, zp: int, seed: int) -> None:
    x = torch.randn(257, generator=torch.Generator().manual_seed(seed)) * scale * 100
    s_t, z_t = torch.tensor([scale]), torch.tensor(zp)
    q = F.quantize_per_tensor.scalar(x, scale, zp, 0, 255, torch.uint8)
    assert torch.equal(q, F.quantize_per_tensor.default(x, s_t, z_t, 0, 255, torch.uint8))
    assert torch.equal(F.dequantize_per_tensor.scalar(q, scale, zp, 0, 255, torch.uint8),
                       F.dequantize_per_tensor.default(q, s_t, z_t, 0, 255, torch.uint8))
    assert torch.equal(F.fake_quantize_per_tensor.scalar(x, scale, zp, 0, 255),
                       F.fake_quantize_per_tensor.default(x, s_t, z_t, 0, 255))


@settings(max_examples=60, deadline=None)
@given(scale=st.floats(1e-3, 10.0), zp=st.integers(-128, 127), seed=st.integers(0, 2**16))
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(scale: float, zp: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    s32 = float(torch.tensor(scale, dtype=torch.float32))
    x = (torch.rand(500, generator=g) * 255 - 128 - zp) * s32  # inside [qmin - zp, qmax - zp] * scale
    q = ops.quantize_per_tensor(x, scale, zp, -128, 127, torch.int8)
    back = ops.dequantize_per_tensor(q, scale, zp, -128, 127, torch.int8)
    assert float((back - x).abs().max()) <= s32 * (0.5 + 1e-5)
    fq = ops.fake_quantize_per_tensor(x, scale, zp, -128, 127)
    # inside the range the fake quant equals quantize -> dequantize, except on (near) ties: torch's fake quant
    # rounds rint(RN32(x / scale)) + zp, its quantize kernel rint(x / scale + zp) in one FMA
    t = x * (1.0 / torch.tensor(s32))
    near_tie = ((t - t.floor()) - 0.5).abs() <= 4 * torch.finfo(torch.float32).eps * t.abs().clamp_min(1)
    differ = fq != back
    assert not bool((differ & ~near_tie).any())
    q_fq = ops.quantize_per_tensor(fq, scale, zp, -128, 127, torch.int8)  # fq holds exact grid values
    assert torch.equal(q_fq[~differ], q[~differ])
    assert bool(((q_fq.int() - q.int())[differ].abs() == 1).all())  # one step apart where they differ


def test_int16_rounds_like_int8_and_clamps_to_its_own_range() -> None:
    """torch has no 16-bit quantized tensor; int16 uses the 8-bit formulas, so inside int8's range both agree."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20_000, generator=g) * 3
    k = torch.randint(-100, 100, (20_000,), generator=g)
    x = torch.cat([x, (k + 0.5) * 0.0173 - 0.0173 * 7])  # ties of x / scale + zp
    for scale, zp in ((0.0173, 7), (0.02, -3), (2.0**-7, 0)):
        q16 = ops.quantize_per_tensor(x, scale, zp, None, None, torch.int16)
        q8 = ops.quantize_per_tensor(x, scale, zp, None, None, torch.int8)
        inside = (q16 >= -128) & (q16 <= 127)
        assert q16.dtype == torch.int16 and torch.equal(q16[inside].to(torch.int8), q8[inside])
        c16 = ops.quantize_per_channel(x.reshape(2, -1), [scale] * 2, [zp] * 2, 0, None, None, torch.int16)
        c8 = ops.quantize_per_channel(x.reshape(2, -1), [scale] * 2, [zp] * 2, 0, None, None, torch.int8)
        inside = (c16 >= -128) & (c16 <= 127)
        assert torch.equal(c16[inside].to(torch.int8), c8[inside])
    big = ops.quantize_per_tensor(torch.tensor([1e9, -1e9, math.nan]), 1.0, 0, None, None, torch.int16)
    assert big.tolist() == [32767, -32768, 32767]
    back = ops.dequantize_per_tensor(big, 0.5, 3, None, None, torch.int16)
    assert back.tolist() == [(32767 - 3) * 0.5, (-32768 - 3) * 0.5, (32767 - 3) * 0.5]


def test_layouts_do_not_change_results() -> None:
    x = torch.randn(2, 8, 5, 5) * 3
    for view in (x.transpose(1, 3), x.to(memory_format=torch.channels_last), x[:, ::2]):
        assert torch.equal(ops.quantize_per_tensor(view, 0.02, 128, 0, 255, torch.uint8),
                           ops.quantize_per_tensor(view.contiguous(), 0.02, 128, 0, 255, torch.uint8))
        c = view.shape[1]
        args = (torch.rand(c) * 0.1 + 0.01, torch.randint(-5, 5, (c,)), 1, -128, 127, torch.int8)
        assert torch.equal(ops.quantize_per_channel(view, *args), ops.quantize_per_channel(view.contiguous(), *args))
        assert torch.equal(ops.fake_quantize_per_channel(view, *args[:-1]),
                           ops.fake_quantize_per_channel(view.contiguous(), *args[:-1]))
    cl = ops.quantize_per_tensor(x.to(memory_format=torch.channels_last), 0.02, 128, 0, 255, torch.uint8)
    assert cl.is_contiguous(memory_format=torch.channels_last)


def test_dequantize_out_dtype_rounds_the_float32_result_once() -> None:
    q = torch.randint(0, 256, (1000,), dtype=torch.uint8)
    ref = ops.dequantize_per_tensor(q, 0.0123, 77, 0, 255, torch.uint8)
    for out_dtype in (torch.float16, torch.bfloat16, torch.float64):
        got = ops.dequantize_per_tensor(q, 0.0123, 77, 0, 255, torch.uint8, out_dtype)
        assert got.dtype == out_dtype and torch.equal(got, ref.to(out_dtype))
    got = ops.dequantize_per_channel(q.reshape(10, 100), [0.0123] * 10, [77] * 10, 0, 0, 255, torch.uint8,
                                     torch.bfloat16)
    assert torch.equal(got.reshape(-1), ref.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", FLOAT_TARGETS)
def test_float_targets_saturate_keep_nan_and_round_trip(dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    x = torch.cat([torch.randn(4000) * 10, torch.tensor([1e30, -1e30, math.inf, -math.inf, math.nan, 0.0])])
    scale = 0.25  # a power of two: the round trip only adds the target's own rounding error
    q = ops.quantize_per_tensor(x, scale, 0, None, None, dtype)
    assert q.dtype == dtype
    back = ops.dequantize_per_tensor(q, scale, 0, None, None, dtype)
    inside = (x / scale).abs() <= info.max
    normal = inside & ((x / scale).abs() >= info.tiny)
    rel = (back - x).abs()[normal] / x.abs()[normal]
    assert float(rel.max()) <= info.eps / 2 * 1.0001  # round to nearest, no more
    outside = ~inside & ~x.isnan()
    assert outside.sum() >= 2 and back[outside].abs().eq(info.max * scale).all()  # saturated, not inf / NaN
    assert torch.equal(back[outside].sign(), x[outside].sign())
    assert back[x.isnan()].isnan().all()
    exact = (torch.randn(1000) * 4).to(dtype).float()  # values the target holds exactly survive unchanged
    assert torch.equal(ops.dequantize_per_tensor(ops.quantize_per_tensor(exact * scale, scale, 0, None, None, dtype),
                                                 scale, 0, None, None, dtype), exact * scale)
    narrow = ops.quantize_per_tensor(x[inside], scale, 0, -4, 4, dtype).float()
    assert narrow.min() >= -4 and narrow.max() <= 4  # an explicit quant range narrows the clamp


def test_per_token_equals_per_channel_over_rows_and_torchao_decomposed() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 16, generator=g) * 4
    scales = torch.rand(3, 5, 1, generator=g) * 0.1 + 0.01
    zps = torch.randint(-20, 20, (3, 5, 1), generator=g)
    q = ops.quantize_per_token(x, scales, zps, -128, 127, torch.int8)
    rows = ops.quantize_per_channel(x.reshape(15, 16), scales.reshape(-1), zps.reshape(-1), 0, -128, 127, torch.int8)
    assert torch.equal(q.reshape(15, 16), rows)
    back = ops.dequantize_per_token(q, scales, zps, -128, 127, torch.int8)
    assert torch.equal(back.reshape(15, 16),
                       ops.dequantize_per_channel(rows, scales.reshape(-1), zps.reshape(-1), 0, -128, 127, torch.int8))
    decomposed = pytest.importorskip("torch.ao.quantization.fx._decomposed")
    assert decomposed is not None
    theirs = torch.ops.quantized_decomposed.quantize_per_token(x, scales, zps, -128, 127, torch.int8)
    assert torch.equal(q, theirs)
    f8 = ops.quantize_per_token(x, scales, torch.zeros_like(zps), None, None, torch.float8_e4m3fn)
    assert torch.equal(f8, (x / scales).clamp(-448, 448).to(torch.float8_e4m3fn))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype,qrange", [(torch.uint8, (0, 255)), (torch.uint8, (0, 127)),
                                          (torch.int8, (-128, 127)), (torch.int8, (-64, 63))])
def test_choose_qparams_equals_torchao_dynamic_and_minmax(symmetric: bool, dtype: torch.dtype,
                                                          qrange: tuple[int, int]) -> None:
    pytest.importorskip("torch.ao.quantization.fx._decomposed")
    from torch.ao.quantization.observer import MinMaxObserver
    if symmetric and dtype == torch.uint8 and qrange[1] < 255:  # zero point 128 would lie outside 0..127
        with pytest.raises(ValueError, match="outside"):
            ops.choose_qparams_per_tensor(torch.randn(10), *qrange, EPS, dtype, symmetric)
        return
    g = torch.Generator().manual_seed(qrange[1])
    decomposed = (torch.ops.quantized_decomposed.choose_qparams_symmetric.tensor if symmetric
                  else torch.ops.quantized_decomposed.choose_qparams.tensor)
    qscheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    for i in range(40):
        x = torch.randn(97, generator=g) * 10.0 ** float(torch.empty(1).uniform_(-3, 3, generator=g))
        x = x + float(torch.randn(1, generator=g)) * x.abs().max() * (i % 3)
        scale, zp = ops.choose_qparams_per_tensor(x, *qrange, EPS, dtype, symmetric)
        assert scale.dtype == torch.float32 and zp.dtype == torch.int64 and scale.shape == zp.shape == ()
        s_ref, z_ref = decomposed(x, *qrange, EPS, dtype)
        assert float(scale) == float(s_ref) and int(zp) == int(z_ref)
        reduced = qrange[1] - qrange[0] == 127
        obs = MinMaxObserver(dtype=dtype, qscheme=qscheme, reduce_range=reduced)
        obs(x)
        s_obs, z_obs = obs.calculate_qparams()
        assert float(scale) == float(s_obs) and int(zp) == int(z_obs)


def test_choose_qparams_carries_no_gradient() -> None:
    w = torch.nn.Parameter(torch.randn(4, 3))
    for scale, zp in (ops.choose_qparams_per_tensor(w, 0, 255, None, torch.uint8),
                      ops.choose_qparams_per_token(w, -128, 127, None, torch.int8, True)):
        assert not scale.requires_grad and not zp.requires_grad


def test_choose_qparams_per_token_is_per_tensor_on_each_row() -> None:
    x = torch.randn(4, 6, 33) * torch.rand(4, 6, 1) * 5
    scales, zps = ops.choose_qparams_per_token(x, -128, 127, None, torch.int8)
    assert scales.shape == zps.shape == (4, 6, 1)
    for i in range(4):
        for j in range(6):
            s, z = ops.choose_qparams_per_tensor(x[i, j], -128, 127, None, torch.int8)
            assert float(scales[i, j, 0]) == float(s) and int(zps[i, j, 0]) == int(z)
    mn, mx = torch.aminmax(x, dim=-1, keepdim=True)
    ref = compute_qparams(mn, mx, -128, 127, torch.per_tensor_symmetric, torch.int8, EPS)
    got = ops.choose_qparams_per_token(x, -128, 127, None, torch.int8, symmetric=True)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


_Q = (torch.randn(4, 3), 0, 255, torch.uint8)
BAD_CALLS = [
    ("scale=0.0", lambda: ops.quantize_per_tensor(_Q[0], 0.0, 0, 0, 255, torch.uint8)),
    ("scale=-1.0", lambda: ops.quantize_per_tensor(_Q[0], -1.0, 0, 0, 255, torch.uint8)),
    ("scale=nan", lambda: ops.dequantize_per_tensor(torch.zeros(3, dtype=torch.uint8), math.nan, 0, 0, 255,
                                                    torch.uint8)),
    ("scale=inf", lambda: ops.fake_quantize_per_tensor(_Q[0], torch.tensor(math.inf), torch.tensor(0), 0, 255)),
    ("zero_point=300", lambda: ops.quantize_per_tensor(_Q[0], 0.1, 300, 0, 255, torch.uint8)),
    ("quant_min=10, quant_max=5", lambda: ops.quantize_per_tensor(_Q[0], 0.1, 0, 10, 5, torch.uint8)),
    ("quant_max=300", lambda: ops.quantize_per_tensor(_Q[0], 0.1, 0, 0, 300, torch.uint8)),
    ("dtype torch.float32", lambda: ops.quantize_per_tensor(_Q[0], 0.1, 0, 0, 255, torch.float32)),
    ("dtype torch.bool", lambda: ops.quantize_per_tensor(_Q[0], 0.1, 0, 0, 1, torch.bool)),
    ("input has dtype torch.float64", lambda: ops.quantize_per_tensor(_Q[0].double(), 0.1, 0, 0, 255, torch.uint8)),
    ("input has dtype torch.int8 but dtype=torch.uint8",
     lambda: ops.dequantize_per_tensor(torch.zeros(3, dtype=torch.int8), 0.1, 0, 0, 255, torch.uint8)),
    ("out_dtype=torch.int32", lambda: ops.dequantize_per_tensor(torch.zeros(3, dtype=torch.uint8), 0.1, 0, 0, 255,
                                                                torch.uint8, torch.int32)),
    ("scale must hold one value", lambda: ops.quantize_per_tensor(_Q[0], torch.ones(2), torch.tensor(0), 0, 255,
                                                                  torch.uint8)),
    ("zero_point has dtype torch.float32", lambda: ops.quantize_per_tensor(_Q[0], torch.tensor(0.1),
                                                                           torch.tensor(1.5), 0, 255, torch.uint8)),
    (r"scales\[1\]=0.0", lambda: ops.quantize_per_channel(_Q[0], [0.1, 0.0, 0.2, 0.3], [0] * 4, 0, 0, 255,
                                                          torch.uint8)),
    ("has 3 channels along axis 1", lambda: ops.quantize_per_channel(_Q[0], [0.1] * 4, [0] * 4, 1, 0, 255,
                                                                     torch.uint8)),
    ("axis=2 is out of range", lambda: ops.quantize_per_channel(_Q[0], [0.1] * 4, [0] * 4, 2, 0, 255, torch.uint8)),
    (r"zero_points span \[-3, 0\]", lambda: ops.quantize_per_channel(_Q[0], [0.1] * 4, [0, -3, 0, 0], 0, 0, 255,
                                                                     torch.uint8)),
    ("0-dim", lambda: ops.quantize_per_channel(torch.tensor(1.0), [0.1], [0], 0, 0, 255, torch.uint8)),
    ("has 4 tokens", lambda: ops.quantize_per_token(_Q[0], [0.1] * 3, [0] * 3, 0, 255, torch.uint8)),
    ("shape", lambda: ops.choose_qparams_per_tensor(torch.empty(0), 0, 255, None, torch.uint8)),
    ("not all finite", lambda: ops.choose_qparams_per_tensor(torch.tensor([1.0, math.nan]), 0, 255, None,
                                                             torch.uint8)),
    ("float zero points need", lambda: ops.fake_quantize_per_channel(_Q[0].double(), [0.1] * 4, [0.5] * 4, 0, 0,
                                                                     255)),
    ("quant_min=3 exceeds quant_max=2", lambda: ops.fake_quantize_per_tensor(_Q[0], 0.1, 2, 3, 2)),
]


@pytest.mark.parametrize("message,call", BAD_CALLS, ids=[m for m, _ in BAD_CALLS])
def test_bad_arguments_raise_value_error_naming_the_value(message: str, call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call()


def test_fake_quantize_gradient_is_straight_through_inside_the_range() -> None:
    x = torch.tensor([-1.0, -0.26, -0.25, 0.0, 1.2, 1.26, 1.3, math.nan], requires_grad=True)
    y = ops.fake_quantize_per_tensor(x, 0.1, 3, 0, 15)  # grid -0.3 .. 1.2; rint(x / 0.1) + 3 decides
    y.backward(torch.arange(1.0, 9.0))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0]  # -0.26 rounds to -3 + 3 = 0: inside
    xc = x.detach()[:6].reshape(2, 3).clone().requires_grad_()
    ops.fake_quantize_per_channel(xc, [0.1, 0.1], [3, 3], 0, 0, 15).sum().backward()
    assert xc.grad.reshape(-1).tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


class _Dynamic(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = F.choose_qparams_per_tensor.default(x, 0, 255, EPS, torch.uint8, False)
        q = F.quantize_per_tensor.default(x, scale, zp, 0, 255, torch.uint8)
        y = F.dequantize_per_tensor.default(q, scale, zp, 0, 255, torch.uint8)
        w = ops.quantize_per_channel(x.t().contiguous(), torch.full((x.shape[1],), 0.02), torch.zeros(x.shape[1],
                                     dtype=torch.int64), 0, -128, 127, torch.int8)
        w = ops.dequantize_per_channel(w, torch.full((x.shape[1],), 0.02), torch.zeros(x.shape[1], dtype=torch.int64),
                                       0, -128, 127, torch.int8)
        return ops.fake_quantize_per_tensor(y, 0.05, 10, 0, 255) + w.t().sum()


def test_torch_export_shows_single_fxquant_nodes() -> None:
    x = torch.randn(4, 8)
    ep = torch.export.export(_Dynamic(), (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    expected = {"fxquant.choose_qparams_per_tensor.default", "fxquant.quantize_per_tensor.default",
                "fxquant.dequantize_per_tensor.default", "fxquant.quantize_per_channel.default",
                "fxquant.dequantize_per_channel.default", "fxquant.fake_quantize_per_tensor.scalar"}
    assert expected <= targets, targets
    assert torch.equal(ep.module()(x), _Dynamic()(x))


def test_fake_kernels_give_shapes_and_dtypes_without_data() -> None:
    x = torch.empty(2, 3, 5, device="meta")
    s, z = torch.empty((), device="meta"), torch.empty((), dtype=torch.int64, device="meta")
    q = F.quantize_per_tensor.default(x, s, z, -128, 127, torch.int8)
    assert q.shape == x.shape and q.dtype == torch.int8 and q.device.type == "meta"
    assert F.dequantize_per_tensor.default(q, s, z, -128, 127, torch.int8, torch.bfloat16).dtype == torch.bfloat16
    sc, zc = F.choose_qparams_per_token.default(x, -128, 127, EPS, torch.int8, False)
    assert sc.shape == zc.shape == (2, 3, 1)
    with pytest.raises(ValueError, match="does not fit"):
        F.quantize_per_tensor.default(x, s, z, -129, 127, torch.int8)


@pytest.mark.parametrize("name,args", [
    ("quantize_per_tensor", (torch.randn(3, 4), torch.tensor(0.1), torch.tensor(3), 0, 255, torch.uint8)),
    ("dequantize_per_channel", (torch.randint(-128, 127, (3, 4), dtype=torch.int8), torch.rand(4) + 0.1,
                                torch.zeros(4, dtype=torch.int64), 1, -128, 127, torch.int8)),
    ("choose_qparams_per_token", (torch.randn(3, 4), -128, 127, EPS, torch.int8, True)),
    ("fake_quantize_per_channel", (torch.randn(3, 4, requires_grad=True), torch.rand(3) + 0.1,
                                   torch.zeros(3, dtype=torch.int32), 0, -128, 127)),
])
def test_opcheck_registration(name: str, args: tuple) -> None:
    """torch.library.opcheck: schema, fake kernel, autograd registration and AOT dispatch agree with the kernel."""
    torch.library.opcheck(getattr(F, name).default, args)


def test_fake_quant_gradient_survives_in_place_qparam_updates():
    x = torch.linspace(-1, 1, 11, requires_grad=True)
    scale, zero_point = torch.tensor(0.01), torch.tensor(128)
    y = ops.fake_quantize_per_tensor(x, scale, zero_point, 0, 255)
    scale.mul_(2)  # an observer updating its qparams before backward
    y.sum().backward()
    expected = ((x / 0.01).round() + 128).clamp(0, 255).eq((x / 0.01).round() + 128).float()
    assert torch.equal(x.grad, expected)
