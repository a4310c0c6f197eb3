"""fxquant.qparams: the scale / zero-point formula, bit for bit against torch.ao, and range validation."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.qparams import (check_qrange_fits_dtype, compute_qparams, default_qrange, resolve_qrange,
                             symmetric_zero_point, validate_qmin_qmax)

tao_obs = pytest.importorskip("torch.ao.quantization.observer")
tao_utils = pytest.importorskip("torch.ao.quantization.utils")

LEGACY = {torch.uint8: torch.quint8, torch.int8: torch.qint8, torch.int32: torch.qint32}
finite = st.floats(-2.0**20, 2.0**20, allow_nan=False, allow_infinity=False, width=32)
tiny = st.floats(-(2.0**-20), 2.0**-20, allow_nan=False, width=32)
SETTINGS = settings(max_examples=150, deadline=None)


def _torch_ao_qparams(lo, hi, dtype, qscheme, qrange, eps):
    """torch.ao's own formula (UniformQuantizationObserverBase._calculate_qparams) as the oracle."""
    cls = tao_obs.PerChannelMinMaxObserver if lo.dim() else tao_obs.MinMaxObserver
    kw = {} if qrange is None else dict(quant_min=qrange[0], quant_max=qrange[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs = cls(dtype=LEGACY[dtype], qscheme=qscheme, eps=eps, **kw)
        return obs._calculate_qparams(lo, hi), (obs.quant_min, obs.quant_max)


@st.composite
def ranges(draw, channels):
    vals = st.one_of(finite, tiny, st.sampled_from([0.0, -0.0, 1.0, -1.0]))
    a = torch.tensor(draw(st.lists(vals, min_size=channels, max_size=channels)), dtype=torch.float32)
    b = torch.tensor(draw(st.lists(vals, min_size=channels, max_size=channels)), dtype=torch.float32)
    return torch.minimum(a, b), torch.maximum(a, b)


PER_TENSOR = [torch.per_tensor_affine, torch.per_tensor_symmetric]
PER_CHANNEL = [torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams]
QRANGES = {torch.uint8: [None, (0, 127), (0, 255), (0, 15), (0, 200)],
           torch.int8: [None, (-127, 127), (-64, 63), (-8, 7)],
           torch.int32: [None, (-1000, 1000)]}


@st.composite
def configs(draw, schemes):
    dtype = draw(st.sampled_from([torch.uint8, torch.int8, torch.int32]))
    qrange = draw(st.sampled_from(QRANGES[dtype]))
    eps = draw(st.sampled_from([torch.finfo(torch.float32).eps, 2**-12, 1e-3]))
    return dtype, draw(st.sampled_from(schemes)), qrange, eps


@SETTINGS
@given(r=ranges(1), cfg=configs(PER_TENSOR))
def test_per_tensor_matches_torch_ao_bit_for_bit(r, cfg):
    dtype, qscheme, qrange, eps = cfg
    lo, hi = r[0][0], r[1][0]  # 0-dim, like the observers' buffers
    (t_scale, t_zp), (qmin, qmax) = _torch_ao_qparams(lo, hi, dtype, qscheme, qrange, eps)
    scale, zp = compute_qparams(lo, hi, qmin, qmax, qscheme, dtype, eps, customized_range=qrange is not None)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int64
    assert scale.shape == lo.shape and zp.shape == lo.shape
    assert scale.reshape(1).view(torch.int32).equal(t_scale.view(torch.int32))  # same bits
    if qscheme == torch.per_tensor_affine:
        _assert_zero_points(zp.reshape(1), t_zp, scale.reshape(1), lo.reshape(1), qmin, qmax)
    else:
        assert zp.reshape(1).equal(t_zp.to(torch.int64))


@SETTINGS
@given(r=ranges(4), cfg=configs(PER_CHANNEL))
def test_per_channel_matches_torch_ao_bit_for_bit(r, cfg):
    dtype, qscheme, qrange, eps = cfg
    (t_scale, t_zp), (qmin, qmax) = _torch_ao_qparams(r[0], r[1], dtype, qscheme, qrange, eps)
    scale, zp = compute_qparams(r[0], r[1], qmin, qmax, qscheme, dtype, eps, customized_range=qrange is not None)
    assert scale.view(torch.int32).equal(t_scale.view(torch.int32))
    expected_zp_dtype = torch.float32 if qscheme == torch.per_channel_affine_float_qparams else torch.int64
    assert zp.dtype == expected_zp_dtype
    _assert_zero_points(zp, t_zp, scale, r[0], qmin, qmax)


def _assert_zero_points(zp, t_zp, scale, lo, qmin, qmax):
    """Equal to torch.ao, except where torch.ao's int32 arithmetic overflows (32-bit ranges): there fxquant
    must give the exact clamp(qmin - round(min' / scale))."""
    offset = torch.round(torch.clamp(lo, max=0.0) / scale).double()
    overflow = (offset.abs() >= 2**31) & (zp.dtype == torch.int64)
    assert torch.equal(zp[~overflow], t_zp.to(zp.dtype)[~overflow])
    exact = torch.clamp(qmin - offset, qmin, qmax).to(torch.int64)
    assert torch.equal(zp[overflow], exact[overflow])


@SETTINGS
@given(r=ranges(1), qrange=st.sampled_from([(0, 255), (0, 127), (-128, 127), (-127, 127), (-8, 7)]))
def test_affine_range_is_representable(r, qrange):
    """Property (no oracle): 0 maps exactly to the zero point and both ends of the range land inside it."""
    lo, hi = r[0][0], r[1][0]
    qmin, qmax = qrange
    dtype = torch.uint8 if qmin == 0 else torch.int8
    scale, zp = compute_qparams(lo, hi, qmin, qmax, torch.per_tensor_affine, dtype, torch.finfo(torch.float32).eps)
    assert scale > 0 and math.isfinite(scale.item())
    assert qmin <= zp.item() <= qmax
    for x in (min(lo.item(), 0.0), max(hi.item(), 0.0)):
        q = round(x / scale.item()) + zp.item()
        assert qmin - 1 <= q <= qmax + 1  # one step of float rounding at most


def test_symmetric_zero_points():
    lo, hi = torch.tensor(-2.0), torch.tensor(3.0)
    eps = torch.finfo(torch.float32).eps
    assert compute_qparams(lo, hi, 0, 255, torch.per_tensor_symmetric, torch.uint8, eps)[1].item() == 128
    assert compute_qparams(lo, hi, 0, 255, torch.per_tensor_symmetric, torch.uint8, eps,
                           customized_range=True)[1].item() == 127  # torch.ao: rounded-down midpoint
    assert compute_qparams(lo, hi, -128, 127, torch.per_tensor_symmetric, torch.int8, eps)[1].item() == 0
    scale = compute_qparams(lo, hi, -128, 127, torch.per_tensor_symmetric, torch.int8, eps)[0]
    assert scale.item() == pytest.approx(3.0 / 127.5)
    assert symmetric_zero_point(torch.uint16, 0, 2**16 - 1, False) == 2**15
    with pytest.raises(ValueError, match="outside"):
        symmetric_zero_point(torch.uint8, 0, 127, customized_range=False)


def test_eps_floor_and_all_zero_range():
    zero = torch.tensor(0.0)
    for qscheme, expected_zp in ((torch.per_tensor_affine, -128), (torch.per_tensor_symmetric, 0)):
        scale, zp = compute_qparams(zero, zero, -128, 127, qscheme, torch.int8, 2**-12)
        assert scale.item() == 2**-12 and zp.item() == expected_zp
    scale, zp = compute_qparams(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]), 0, 255,
                                torch.per_channel_affine_float_qparams, torch.uint8, 1e-6)
    assert scale.tolist() == [1.0, 1.0] and zp.tolist() == [-1.0, -2.0]  # degenerate: scale 1, zp = -min


def test_32_bit_affine_zero_point_does_not_overflow():
    lo, hi = torch.tensor(-100.0), torch.tensor(1.0)
    scale, zp = compute_qparams(lo, hi, -(2**31), 2**31 - 1, torch.per_tensor_affine, torch.int32, 1e-12)
    assert -(2**31) <= zp.item() <= 2**31 - 1
    assert abs((-100.0 / scale.item() + zp.item()) - (-(2**31))) < 2**9  # min maps near quant_min


@pytest.mark.parametrize("lo,hi,match", [
    (float("nan"), 1.0, "not all finite"), (0.0, float("inf"), "not all finite"),
    (float("inf"), float("-inf"), "no \\(finite\\) data"), (2.0, 1.0, "must not exceed"),
    (-3e38, 3e38, "too wide")])
def test_bad_min_max_is_an_error(lo, hi, match):
    with pytest.raises(ValueError, match=match):
        compute_qparams(torch.tensor(lo), torch.tensor(hi), 0, 255, torch.per_tensor_affine, torch.uint8, 1e-7)


def test_bad_arguments_name_the_values():
    lo, hi = torch.tensor(0.0), torch.tensor(1.0)
    with pytest.raises(ValueError, match="unsupported qscheme"):
        compute_qparams(lo, hi, 0, 255, torch.per_channel_affine_float_qparams.__class__, torch.uint8, 1e-7)
    with pytest.raises(ValueError, match="quant_min=5 must be strictly less than quant_max=5"):
        compute_qparams(lo, hi, 5, 5, torch.per_tensor_affine, torch.uint8, 1e-7)
    with pytest.raises(ValueError, match="shape"):
        compute_qparams(torch.zeros(2), torch.zeros(3), 0, 255, torch.per_channel_affine, torch.uint8, 1e-7)


@pytest.mark.parametrize("qmin,qmax,match", [(1, 10, "must include 0"), (-5, -1, "must include 0"),
                                             (0, 0, "strictly less")])
def test_validate_qmin_qmax(qmin, qmax, match):
    with pytest.raises(ValueError, match=match):
        validate_qmin_qmax(qmin, qmax)


@pytest.mark.parametrize("dtype,qmin,qmax", [(torch.int8, -200, 100), (torch.int8, 0, 255), (torch.uint8, 0, 256),
                                             (torch.quint8, -1, 255), (torch.int16, 0, 2**15)])
def test_range_too_wide_for_dtype(dtype, qmin, qmax):
    with pytest.raises(ValueError, match=f"quant_min={qmin}, quant_max={qmax}.*too wide"):
        check_qrange_fits_dtype(qmin, qmax, dtype)
    with pytest.raises(ValueError, match="too wide"):
        resolve_qrange(dtype, qmin, qmax)


@pytest.mark.parametrize("dtype", [torch.quint8, torch.qint8, torch.qint32, torch.uint8, torch.int8, torch.int32,
                                   torch.int16, torch.uint16, torch.quint4x2])
@pytest.mark.parametrize("reduce_range", [False, True])
@pytest.mark.parametrize("qrange", [None, (0, 15), (-8, 7), (0, 127)])
def test_resolve_qrange_matches_torch_ao(dtype, reduce_range, qrange):
    unsigned = dtype in (torch.quint8, torch.uint8, torch.uint16, torch.quint4x2)
    if qrange is not None and (qrange[0] < 0 and unsigned or dtype == torch.quint4x2 and qrange[1] > 15):
        with pytest.raises(ValueError, match="too wide"):  # torch.ao accepts these silently
            resolve_qrange(dtype, *qrange, reduce_range)
        return
    qmin, qmax = (None, None) if qrange is None else qrange
    expected = tao_utils.calculate_qmin_qmax(qmin, qmax, qrange is not None, dtype, reduce_range)
    assert resolve_qrange(dtype, qmin, qmax, reduce_range) == expected


def test_resolve_qrange_needs_both_bounds_and_fp8_uses_float_range():
    with pytest.raises(ValueError, match="both"):
        resolve_qrange(torch.uint8, 0, None)
    assert default_qrange(torch.float8_e4m3fn) == (-448, 448)
    with pytest.raises(ValueError, match="no quantization range"):
        default_qrange(torch.float32)
