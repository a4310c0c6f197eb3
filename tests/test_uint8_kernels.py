"""Integer element-wise kernels (fxquant.kernels.uint8): table lookups and resizing on uint8 / int8 tensors, and the
cleanup step that moves a table lookup in front of a nearest-neighbour upsample."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.kernels import native, uint8
from fxquant.nn.quantized import LookupTable

LAYOUTS = ("contiguous", "channels_last", "strided")


def _tensor(dtype: torch.dtype, shape: tuple, layout: str, seed: int = 0) -> torch.Tensor:
    lo, hi = uint8.RANGES[dtype]
    gen = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other channel: neither contiguous nor channels-last
        shape = (shape[0], shape[1] * 2) + tuple(shape[2:])
    x = torch.randint(lo, hi + 1, shape, generator=gen).to(dtype)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x[:, ::2] if layout == "strided" else x


@pytest.mark.parametrize("dtype", (torch.uint8, torch.int8))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", ((1, 3, 4, 5), (2, 16, 24, 24)))  # below / above the flat-lookup threshold
def test_lookup_equals_gather_and_keeps_layout(dtype, layout, shape):
    x = _tensor(dtype, shape, layout)
    table = torch.randint(0, 256, (256,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = table[x.to(torch.int64) + (0 if dtype == torch.uint8 else 128)]
    got = uint8.lookup(x, table)
    assert torch.equal(got, expected)
    if layout == "channels_last" and x.numel() >= uint8._FLAT_LOOKUP_MIN:  # (small ones: take, contiguous)
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_lookup_int8_table_output():
    x = _tensor(torch.uint8, (1, 8, 40, 40), "channels_last")
    table = torch.arange(-128, 128, dtype=torch.int8).flip(0)
    assert torch.equal(uint8.lookup(x, table), table[x.long()])


def _reference_resize(x: torch.Tensor, **kw) -> torch.Tensor:
    lo, hi = uint8.RANGES[x.dtype]
    return F.interpolate(x.double(), **kw).round().clamp(lo, hi)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("shape", ((1, 3, 6, 6), (1, 21, 20, 20), (4, 8, 24, 24)))
@pytest.mark.parametrize("mode,align", (("nearest", None), ("bilinear", False), ("bilinear", True),
                                        ("bicubic", False)))
def test_interpolate_matches_the_rounded_float_op(layout, shape, mode, align):
    x = _tensor(torch.uint8, shape, layout, seed=3)
    kw = dict(scale_factor=2.0, mode=mode, align_corners=align)
    got = uint8.interpolate(x, None, 2.0, mode, align)
    assert got.dtype == torch.uint8 and got.shape == (shape[0], shape[1], shape[2] * 2, shape[3] * 2)
    diff = (got.double() - _reference_resize(x, **kw)).abs().max().item()
    if mode == "nearest":
        assert diff == 0
    else:  # float32 vs float64 arithmetic may move an exact .5 tie by one step; torch's uint8 kernel likewise
        assert diff <= 1


def test_interpolate_int8_and_size_argument():
    x = _tensor(torch.int8, (1, 8, 30, 30), "channels_last", seed=4)
    got = uint8.interpolate(x, (45, 45), None, "bilinear", False)
    assert got.dtype == torch.int8 and got.shape[-2:] == (45, 45)
    assert (got.double() - _reference_resize(x, size=(45, 45), mode="bilinear", align_corners=False)).abs().max() <= 1


class _UpThenTable(nn.Module):
    """conv -> nearest upsample -> concat with a differently scaled branch: the lowering requantizes the
    upsampled tensor to the concat's qparams with a table lookup."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 2, 1)
        self.b = nn.Conv2d(3, 8, 3, 1, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        return torch.cat([self.up(torch.relu(self.a(x)) * 3.0), self.b(x)], dim=1)


def _reference_and_lowered(model: nn.Module, shape: tuple) -> tuple[nn.Module, nn.Module]:
    """(convert_to_reference_fx, convert_fx) of ``model`` calibrated on three random batches (x86 defaults)."""
    torch.manual_seed(0)
    data = [torch.randn(*shape) for _ in range(3)]
    prepared = fxquant.prepare_fx(model.eval(), fxquant.get_default_qconfig_mapping("x86"), (data[0],))
    for d in data:
        prepared(d)
    reference = fxquant.convert_to_reference_fx(copy.deepcopy(prepared))  # (conversion works in place)
    return reference, fxquant.convert_fx(prepared)


def test_table_lookup_moves_before_nearest_upsample_and_output_is_unchanged():
    reference, lowered = _reference_and_lowered(_UpThenTable(), (1, 3, 32, 32))
    modules = dict(lowered.named_modules())
    tables = [n for n in lowered.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], LookupTable)]
    assert tables, lowered.code
    # the two requantizations (after the scalar mul, and to the concat's qparams) became one table, applied
    # before the upsample (on a quarter of the values)
    assert len(tables) == 1, lowered.code
    assert tables[0].args[0].target == "a" and [u.target for u in tables[0].users] == [uint8.interpolate]
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    out, ref = lowered(x), reference(x)
    step = float([m.scale for m in lowered.modules() if type(m).__name__ == "DeQuantize"][-1])
    assert (out - ref).abs().max().item() <= 1.001 * step


@pytest.mark.parametrize("relu", (False, True))
@pytest.mark.parametrize("quant_max", (127, 255))
def test_large_quantized_add_through_onednn_equals_the_aten_kernel(relu, quant_max):
    from fxquant.kernels import x86
    from fxquant.nn.quantized import QuantizedBinary

    if not x86.onednn_available():
        pytest.skip("onednn int8 ops not in this build")
    gen = torch.Generator().manual_seed(5)
    shape = (2, 32, 40, 40)  # 102k elements: above the rule's 2^16
    a = torch.randint(0, quant_max + 1, shape, generator=gen).to(torch.uint8).contiguous(
        memory_format=torch.channels_last)
    b = torch.randint(0, quant_max + 1, shape, generator=gen).to(torch.uint8)  # contiguous: converted by the kernel
    mod = QuantizedBinary("add", (0.05, 64), (0.04, 70), (0.07, 60), relu=relu, quant_max=quant_max)
    assert mod._onednn_add(a)
    b_before = b.clone()
    got = mod(a, b)
    consts, relu_min = mod._scalars()
    expected = uint8.binary("add", a, b, consts, relu_min, 0, quant_max, torch.uint8)
    assert torch.equal(got, expected)
    assert torch.equal(b, b_before)  # onednn accumulates into a copy: b is not written
    small = a[:, :, :8, :8].contiguous()
    assert not mod._onednn_add(small)


@pytest.mark.parametrize("relu", (False, True))
def test_pointwise_conv_on_a_1x1_image_runs_as_a_matrix_product_with_the_same_result(relu, monkeypatch):
    """Squeeze-excite convs (1x1 kernels on pooled 1x1 images) take F.linear in the folded float plan (the plan
    for small convs where the native FBGEMM kernels are not available: turned off here)."""
    monkeypatch.setattr(native, "available", lambda: False)
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)

        def forward(self, x):
            s = self.fc1(self.pool(x))
            return x * torch.sigmoid(self.fc2(torch.relu(s) if relu else s))

    reference, lowered = _reference_and_lowered(SE(), (2, 16, 8, 8))
    x = torch.randn(2, 16, 8, 8)
    calls = []
    original = F.linear
    try:
        F.linear = lambda *a, **k: calls.append(a[1].shape) or original(*a, **k)  # type: ignore[assignment]
        out = lowered(x)
    finally:
        F.linear = original  # type: ignore[assignment]
    assert (16, 8) in calls and (8, 16) in calls  # both convs took the matrix product
    ref = reference(x)
    step = float([m.scale for m in lowered.modules() if type(m).__name__ == "DeQuantize"][-1])
    assert (out - ref).abs().max().item() <= step * 1.001
    again = lowered(x[:, :, :1, :1].contiguous())  # a 1x1 input image: the pooled tensor is 1x1 too
    assert again.shape == (2, 16, 1, 1)


@pytest.mark.parametrize("dtype,lo,hi", [(torch.uint8, 0, 255), (torch.uint8, 3, 200), (torch.int8, -128, 127),
                                         (torch.int8, -100, 90)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_finish_rounds_half_to_even_clamps_and_keeps_layout(dtype, lo, hi, layout):
    """finish's float trick (+1.5 * 2**23, int32 bits, cast) equals round -> clamp -> cast, ties and negatives
    included."""
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(2, 8, 5, 7, generator=gen) * 700 - 350
    flat = y.view(-1)
    flat[:12] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -127.5, -128.5, 254.5, 255.5])
    flat[12:15] = torch.tensor([float("inf"), float("-inf"), 1e30])
    y = y.contiguous(memory_format=layout)
    expected = torch.round(y).clamp(lo, hi).to(dtype)
    got = uint8.finish(y.clone(memory_format=torch.preserve_format), lo, hi, dtype)
    assert got.dtype == dtype and torch.equal(got, expected)
    assert got.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("qrange,zp", [((0, 255), 131), ((-128, 127), -3), ((0, 127), 0)])
def test_dynamic_fake_quantize_matches_the_reference_ops(qrange, zp):
    """kernels.dynamic.fake_quantize on a large tensor (five vectorized ops, +1.5*2^23 rounding) equals the
    reference graph's quantize -> dequantize bit for bit, exact ties and clamping included; small tensors take
    aten's fused op (which rounds x / scale before adding the zero point: ties may differ by one step)."""
    from fxquant.kernels import dynamic
    scale = 0.03125  # a power of two: x / scale is exact, so the values below are exact ties
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 3
    x[:6] = torch.tensor([0.5, 1.5, -2.5, 2.5, 100.0, -100.0]) * scale
    dtype = torch.uint8 if qrange[0] >= 0 else torch.int8
    q = fxquant.ops.quantize_per_tensor(x, scale, zp, qrange[0], qrange[1], dtype)
    expected = fxquant.ops.dequantize_per_tensor(q, scale, zp, qrange[0], qrange[1], dtype)
    assert x.numel() > dynamic.FUSED_MAX_NUMEL
    assert torch.equal(dynamic.fake_quantize(x, scale, zp, *qrange), expected)
    assert torch.equal(dynamic.quantize_to_float(x, scale, zp, *qrange), q.float())
    small = x[:100]
    assert torch.equal(dynamic.fake_quantize(small, scale, zp, *qrange),
                       torch.fake_quantize_per_tensor_affine(small, scale, zp, *qrange))


@pytest.mark.parametrize("dtype", (torch.uint8, torch.int8))
@pytest.mark.parametrize("rank, layout", ((1, None), (2, torch.channels_last), (3, torch.channels_last_3d),
                                          (3, torch.contiguous_format)))
@pytest.mark.parametrize("args", (dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=2),
                                  dict(kernel_size=3, stride=1, dilation=2, ceil_mode=True)))
def test_integer_max_pools_equal_the_float_op_in_every_rank_and_layout(dtype, rank, layout, args):
    # torch 2.13 has no integer max_pool1d and its channels-last-3d kernel rejects uint8 / int8 (found on s3d)
    lo, hi = uint8.RANGES[dtype]
    shape = (2, 8) + (9, 18, 20)[-rank:]
    x = torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(rank)).to(dtype)
    if layout is not None:
        x = x.contiguous(memory_format=layout)
    kernel = {1: uint8.max_pool1d, 2: uint8.max_pool2d, 3: uint8.max_pool3d}[rank]
    float_op = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]
    got = kernel(x, **args)
    assert got.dtype == dtype
    assert torch.equal(got, float_op(x.float(), **args).to(dtype))
    assert torch.equal(kernel(x[0], **args), got[0])  # unbatched input


@pytest.mark.parametrize("rank", (2, 3))
def test_channels_last_integer_max_pool_on_an_image_of_more_than_32767_positions(rank):
    # the int16 detour of torch's channels-last pool indexes positions in int16 (s3d at 224, 2-d stems at 512)
    shape = (1, 4, 184, 184) if rank == 2 else (1, 4, 4, 96, 96)
    layout = torch.channels_last if rank == 2 else torch.channels_last_3d
    x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    x = x.contiguous(memory_format=layout)
    kernel, float_op = (uint8.max_pool2d, F.max_pool2d) if rank == 2 else (uint8.max_pool3d, F.max_pool3d)
    assert torch.equal(kernel(x, 3, 2, 1), float_op(x.float(), 3, 2, 1).to(torch.uint8))


@pytest.mark.parametrize("scale, zero_point", ((0.02, 128), (2.68e36, 127), (50.0, 255)))
def test_dequantize_module_equals_the_reference_formula_and_gives_exact_zeros(scale, zero_point):
    """The one-add form folds ``-zero_point * scale``; for huge ranges (an attention mask's finfo.min) that rounding
    is ~1e31 absolute, so the module switches to the exact form there (uint8.FOLD_LIMIT)."""
    from fxquant.nn.quantized import DeQuantize

    q = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    reference = (q.to(torch.float32) - zero_point) * torch.tensor(scale, dtype=torch.float32)
    got = DeQuantize(scale, zero_point)(q)
    assert got[q == zero_point].eq(0).all()
    assert torch.allclose(got, reference, rtol=1e-6, atol=abs(zero_point * scale) * 2.0 ** -22)
    assert uint8.fold_safe(scale, zero_point) == (abs(scale * zero_point) <= uint8.FOLD_LIMIT)


def _reference_binary(op, a, b, qa, qb, qo, relu=False):
    fa = (a.to(torch.float32) - qa[1]) * torch.tensor(qa[0])
    fb = (b.to(torch.float32) - qb[1]) * torch.tensor(qb[0])
    y = fa + fb if op == "add" else fa * fb
    y = torch.relu(y) if relu else y
    return fxquant.ops.quantize_per_tensor(y, qo[0], qo[1], 0, 255, torch.uint8)


@pytest.mark.parametrize("op", ("add", "mul"))
@pytest.mark.parametrize("b_qparams", ((0.02, 130), (1.33e36, 255), (1e30, 7)))
def test_binary_with_ranges_far_apart_follows_the_reference(op, b_qparams):
    """A QAT model's ``logits + mask`` (the mask's range ~1e38, the output's ~10) made the folded constants
    overflow float32 (RuntimeError in convert_fx's model) or cancel to garbage: such ranges run in the
    reference's order, and a zero point stays an exact zero."""
    from fxquant.nn.quantized import QuantizedBinary

    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 256, (2, 4, 8, 8), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 4, 8, 8), generator=g, dtype=torch.uint8)
    b[:, :2] = b_qparams[1]  # half the "mask" at its zero point: adds exactly nothing
    qa, qo = (0.05, 120), (0.04, 128)
    got = QuantizedBinary(op, qa, b_qparams, qo)(a, b)
    expected = _reference_binary(op, a, b, qa, b_qparams, qo)
    assert (got.int() - expected.int()).abs().max() <= 1


def test_requantize_between_ranges_far_apart_keeps_the_zero_point_exact():
    from fxquant.nn.quantized import Requantize

    y = torch.tensor([255.0, 127.0, 127.0, 0.0, 126.5])
    got = Requantize(1.33e36, 127, 0.04, 128)(y.clone())
    expected = fxquant.ops.quantize_per_tensor((y - 127) * torch.tensor(1.33e36), 0.04, 128, 0, 255, torch.uint8)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("gate_first", (False, True))
@pytest.mark.parametrize("qa, qb", (((0.05, 3), (1 / 256, 0)), ((0.05, 0), (0.02, 17)), ((0.1, 200), (0.03, 90))))
def test_broadcast_product_by_small_side_factors_is_within_one_step(gate_first, qa, qb):
    """A squeeze-excite gate (N, C, 1, 1) times the feature map runs as one addcmul over the map with per-channel
    factors; either operand order, any zero points, channels-last kept."""
    from fxquant.nn.quantized import QuantizedBinary

    g = torch.Generator().manual_seed(4)
    fmap = torch.randint(0, 256, (2, 24, 9, 9), generator=g, dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)
    gate = torch.randint(0, 256, (2, 24, 1, 1), generator=g, dtype=torch.uint8)
    qo = (0.04, 2)
    a, b, qpa, qpb = (gate, fmap, qb, qa) if gate_first else (fmap, gate, qa, qb)
    got = QuantizedBinary("mul", qpa, qpb, qo)(a, b)
    expected = _reference_binary("mul", a, b, qpa, qpb, qo)
    assert (got.int() - expected.int()).abs().max() <= 1
    assert (got != expected).float().mean() < 0.02
    assert got.is_contiguous(memory_format=torch.channels_last)
