"""fxquant.fake_quantize: torch.ao parity, train-time qparams == convert-time qparams, STE gradients, LSQ."""
import pickle
import warnings

import pytest
import torch
from hypothesis import given, reject, settings
from hypothesis import strategies as st

import fxquant.fake_quantize as ff
import fxquant.observer as fo
from _observer_data import batch_lists, same_bits

tfq = pytest.importorskip("torch.ao.quantization.fake_quantize")
tlsq = pytest.importorskip("torch.ao.quantization._learnable_fake_quantize")
tobs = pytest.importorskip("torch.ao.quantization.observer")
pytestmark = pytest.mark.torchao

DEFAULTS = [n for n in tfq.__all__ if n.startswith(("default_", "fused_"))]
FUSED = ["default_fused_act_fake_quant", "default_fused_wt_fake_quant", "default_fused_per_channel_wt_fake_quant",
         "fused_wt_fake_quant_range_neg_127_to_127", "fused_per_channel_wt_fake_quant_range_neg_127_to_127"]


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def _describe(fq):
    app = fq.activation_post_process
    out = {"class": type(fq).__name__, "observer": type(app).__name__, "qscheme": fq.qscheme,
           "quant_min": app.quant_min, "quant_max": app.quant_max, "ch_axis": fq.ch_axis,
           "is_dynamic": getattr(fq, "is_dynamic", None), "averaging": getattr(app, "averaging_constant", None),
           "eps": app.eps.tolist() if isinstance(getattr(app, "eps", None), torch.Tensor) else None,
           "dtype": {torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.quint4x2: torch.uint8}
           .get(fq.dtype, fq.dtype),
           "buffers": sorted((k, str(v.dtype)) for k, v in fq.state_dict().items())}
    return out


def test_default_fake_quants_match_torch_ao():
    assert len(DEFAULTS) == 16
    for name in DEFAULTS:
        ours, theirs = getattr(ff, name)(), _quiet(getattr(tfq, name))
        assert _describe(ours) == _describe(theirs), name
        assert fo.is_observer_constructor(getattr(ff, name))


NON_FUSED = [n for n in DEFAULTS if n not in FUSED]


@settings(max_examples=40, deadline=None)
@given(data=batch_lists(shape=(3, 4, 5), max_batches=3), name=st.sampled_from(NON_FUSED))
def test_fake_quant_forward_matches_torch_ao(data, name):
    ours, theirs = getattr(ff, name)(), _quiet(getattr(tfq, name))
    for x in data:
        y = _quiet(ours, x)
        try:
            ty = _quiet(theirs, x)
        except AssertionError as err:  # torch.ao's moving average can put min one ulp above max on flat data
            assert "should be less than max" in str(err)
            assert torch.isfinite(y).all() and (ours.scale > 0).all()  # fxquant keeps min <= max and goes on
            reject()
        assert same_bits(ours.scale, theirs.scale) and torch.equal(ours.zero_point, theirs.zero_point)
        assert same_bits(y, ty)


@settings(max_examples=40, deadline=None)
@given(data=batch_lists(shape=(4, 3, 5), max_batches=4), name=st.sampled_from(FUSED))
def test_fused_trains_with_the_qparams_convert_uses(data, name):
    """After every step the fused module's scale / zero point are bit-identical to calculate_qparams() - and to
    torch.ao's calculate_qparams(), i.e. what torch.ao's convert would use. torch.ao's own fused kernel trains
    with different qparams (symmetric: max(|min|/128, max/127) instead of max(|min|, max)/127.5)."""
    ours, theirs = getattr(ff, name)(), _quiet(getattr(tfq, name))
    plain = ff.FakeQuantize(observer=type(ours.activation_post_process), quant_min=ours.quant_min,
                            quant_max=ours.quant_max, dtype=ours.dtype, qscheme=ours.qscheme,
                            eps=ours.activation_post_process.eps.item())
    for x in data:
        y = _quiet(ours, x)
        _quiet(theirs, x)
        scale, zp = _quiet(ours.calculate_qparams)
        t_scale, t_zp = _quiet(theirs.calculate_qparams)
        assert same_bits(ours.scale, scale) and torch.equal(ours.zero_point, zp.to(torch.int32))
        assert same_bits(ours.scale, t_scale) and torch.equal(ours.zero_point, t_zp.to(torch.int32))
        assert same_bits(y, _quiet(plain, x))  # same numerics as the unfused module


def test_torch_ao_fused_kernel_disagrees_with_its_convert():
    """The bug the fused module fixes, shown on torch.ao itself (symmetric weights)."""
    theirs = tfq.default_fused_wt_fake_quant()
    theirs(torch.tensor([-2.6458, 1.9694]))
    assert not torch.equal(theirs.scale, theirs.calculate_qparams()[0])
    ours = ff.default_fused_wt_fake_quant()
    ours(torch.tensor([-2.6458, 1.9694]))
    assert torch.equal(ours.scale, ours.calculate_qparams()[0])
    assert ours.scale.item() == pytest.approx(2.6458 / 127.5)


def test_switches_and_helpers():
    model = torch.nn.Sequential(ff.default_fake_quant(), ff.default_fused_act_fake_quant(), torch.nn.ReLU())
    x = torch.linspace(-1, 3, 50)
    model(x)
    frozen = [m.scale.clone() for m in model[:2]]
    model.apply(ff.disable_observer)
    model(x * 10)
    assert all(torch.equal(m.scale, s) for m, s in zip(model[:2], frozen))
    model.apply(ff.disable_fake_quant)
    assert torch.equal(model[0](x * 10), x * 10)
    model.apply(ff.enable_fake_quant)
    model.apply(ff.enable_observer)
    model(x * 10)
    assert all(not torch.equal(m.scale, s) for m, s in zip(model[:2], frozen))
    assert model[1].fake_quant_enabled.dtype == torch.long and model[0].fake_quant_enabled.dtype == torch.uint8


@pytest.mark.parametrize("name", ["default_fake_quant", "default_per_channel_weight_fake_quant"])
def test_straight_through_gradient(name):
    fq = getattr(ff, name)()
    x = torch.randn(4, 6)
    fq(x)
    fq.disable_observer()
    wide = (x * 4).requires_grad_()
    fq(wide).sum().backward()
    scale, zp = fq.scale, fq.zero_point.to(torch.float32)
    if fq.is_per_channel:
        scale, zp = scale[:, None], zp[:, None]
    q = torch.round(wide.detach() / scale) + zp
    inside = (q >= fq.quant_min) & (q <= fq.quant_max)
    assert inside.any() and (~inside).any()
    assert torch.equal(wide.grad, inside.float())


def test_fixed_qparams_fake_quant():
    fq = ff.default_fixed_qparams_range_0to1_fake_quant()
    assert fq.scale is fq.activation_post_process.scale
    x = torch.linspace(-0.5, 1.5, 9)
    y = fq(x)
    assert fq.scale.item() == 1 / 256 and fq.zero_point.item() == 0
    assert y.min().item() == 0.0 and y.max().item() == 255 / 256
    with pytest.raises(ValueError, match="FixedQParamsObserver"):
        ff.FixedQParamsFakeQuantize(observer=fo.MinMaxObserver)
    with pytest.raises(ValueError, match="MovingAverageMinMaxObserver"):
        ff.FusedMovingAvgObsFakeQuantize(observer=fo.MinMaxObserver)
    with pytest.raises(ValueError, match="quant_min=5 must be below quant_max=1"):
        ff.FakeQuantize(quant_min=5, quant_max=1)


def test_state_dicts_cross_load_with_torch_ao():
    x = torch.randn(5, 7)
    theirs = _quiet(tfq.default_per_channel_weight_fake_quant)
    theirs(x)
    ours = ff.default_per_channel_weight_fake_quant()
    ours.load_state_dict(theirs.state_dict())
    assert ours.scale.shape == (5,) and torch.equal(ours.scale, theirs.scale)
    ours.disable_observer()
    theirs.disable_observer()
    assert same_bits(ours(x * 2), theirs(x * 2))
    back = _quiet(tfq.default_per_channel_weight_fake_quant)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.zero_point, theirs.zero_point)
    clone = pickle.loads(pickle.dumps(ours))
    assert torch.equal(clone.scale, ours.scale) and type(clone) is ff.FakeQuantize


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("grad_scaling", [False, True])
def test_learnable_fake_quant_matches_torch_ao(per_channel, grad_scaling):
    kw = dict(quant_min=0, quant_max=15, channel_len=4 if per_channel else -1, use_grad_scaling=grad_scaling,
              scale=0.1, zero_point=3.3)
    if per_channel:
        kw.update(ch_axis=1, qscheme=torch.per_channel_affine)
        ours = ff.LearnableFakeQuantize(fo.MovingAveragePerChannelMinMaxObserver, **kw)
        theirs = tlsq._LearnableFakeQuantize(tobs.MovingAveragePerChannelMinMaxObserver, **kw)
    else:
        ours = ff.LearnableFakeQuantize(fo.MovingAverageMinMaxObserver, **kw)
        theirs = tlsq._LearnableFakeQuantize(tobs.MovingAverageMinMaxObserver, **kw)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g)
    assert same_bits(_quiet(ours, x), _quiet(theirs, x))  # static estimate
    for fq in (ours, theirs):
        fq.enable_param_learning()
    for step in range(3):
        xs = [x * (step + 1) * 0.7, None]
        xs[1] = xs[0].clone()
        xs[0].requires_grad_()
        xs[1].requires_grad_()
        out = [ours(xs[0]), theirs(xs[1])]
        assert same_bits(out[0], out[1])
        weights = torch.randn(out[0].shape, generator=g)
        for o in out:
            (o * weights).sum().backward()
        assert torch.equal(xs[0].grad, xs[1].grad)
        torch.testing.assert_close(ours.scale.grad, theirs.scale.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.zero_point.grad, theirs.zero_point.grad, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # a training step; then both continue from the same (torch.ao's) parameters
            theirs.scale -= 0.01 * theirs.scale.grad
            theirs.zero_point -= 0.5 * theirs.zero_point.grad
            ours.scale.copy_(theirs.scale)
            ours.zero_point.copy_(theirs.zero_point)
            for fq in (ours, theirs):
                fq.scale.grad = fq.zero_point.grad = None
    assert torch.equal(ours.calculate_qparams()[1], theirs.calculate_qparams()[1])


def test_learnable_fake_quant_toggles():
    fq = ff._LearnableFakeQuantize(fo.MovingAverageMinMaxObserver, quant_min=0, quant_max=255)
    assert fq.enable_param_learning() is fq
    assert fq.learning_enabled.item() == 1 and fq.static_enabled.item() == 0 and fq.scale.requires_grad
    fq.enable_static_observation()
    x = torch.randn(10)
    assert torch.equal(fq(x), x) and fq.static_enabled.item() == 1
    ff.disable_observer(fq)
    assert fq.static_enabled.item() == 0
    with pytest.raises(ValueError, match="channel_len"):
        ff.LearnableFakeQuantize(fo.MovingAverageMinMaxObserver, channel_len=0)
    with pytest.raises(ValueError, match="quant_min=3 must be below"):
        ff.LearnableFakeQuantize(fo.MovingAverageMinMaxObserver, quant_min=3, quant_max=3)
