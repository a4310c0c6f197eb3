"""fxquant.observer: bit-identity with torch.ao, NaN / inf handling, constructors, defaults, state dicts."""
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant.observer as fo
from _observer_data import batch_lists, same_bits

tao = pytest.importorskip("torch.ao.quantization.observer")
pytestmark = pytest.mark.torchao
SETTINGS = settings(max_examples=60, deadline=None)
LEGACY = {torch.uint8: torch.quint8, torch.int8: torch.qint8, torch.int32: torch.qint32}


def _pair(name, **kw):
    """(fxquant observer, torch.ao observer) built from the same arguments (torch.ao gets legacy dtypes)."""
    t_kw = {**kw, "dtype": LEGACY.get(kw["dtype"], kw["dtype"])} if "dtype" in kw else kw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(fo, name)(**kw), getattr(tao, name)(**t_kw)


def _assert_same(ours, theirs, buffers=("min_val", "max_val")):
    for b in buffers:
        assert same_bits(getattr(ours, b), getattr(theirs, b)), b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (s, z), (ts, tz) = ours.calculate_qparams(), theirs.calculate_qparams()
    assert same_bits(s, ts), (s, ts)
    assert torch.equal(z, tz.to(z.dtype)), (z, tz)


PER_TENSOR_CFGS = [dict(), dict(reduce_range=True), dict(quant_min=0, quant_max=127),
                   dict(dtype=torch.int8, qscheme=torch.per_tensor_symmetric),
                   dict(dtype=torch.int8, qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127,
                        eps=2**-12),
                   dict(dtype=torch.uint8, qscheme=torch.per_tensor_symmetric),
                   dict(dtype=torch.uint8, qscheme=torch.per_tensor_symmetric, quant_min=0, quant_max=200),
                   dict(dtype=torch.int8, quant_min=-8, quant_max=7),
                   dict(dtype=torch.int32, qscheme=torch.per_tensor_symmetric)]  # int32 affine: torch.ao overflows


@SETTINGS
@given(data=batch_lists(), cfg=st.sampled_from(PER_TENSOR_CFGS),
       cls=st.sampled_from(["MinMaxObserver", "MovingAverageMinMaxObserver"]), c=st.sampled_from([0.01, 0.5, 1]))
def test_min_max_observers_match_torch_ao(data, cfg, cls, c):
    kw = dict(cfg, averaging_constant=c) if cls.startswith("Moving") else cfg
    ours, theirs = _pair(cls, **kw)
    for x in data:
        assert ours(x) is x
        theirs(x)
    if bool(theirs.min_val > theirs.max_val):  # moving averages one ulp apart: torch.ao's qparams assert fails
        assert bool(ours.min_val <= ours.max_val) and torch.equal(ours.max_val, theirs.max_val)
        scale, _ = ours.calculate_qparams()
        assert bool(scale > 0)
        return
    _assert_same(ours, theirs)


def test_moving_average_of_constant_data_keeps_min_at_most_max():
    """Constant batches after others: both averages reach the constant, but with different rounding (found by
    hypothesis: min 0.37000012 > max 0.37000000, where torch.ao's calculate_qparams fails its assertion)."""
    for cls in ("MovingAverageMinMaxObserver", "MovingAveragePerChannelMinMaxObserver"):
        ours = getattr(fo, cls)(averaging_constant=1)
        ours(torch.tensor([[-1.9985, -2.0003, -2.0022, -1.9994, -2.0011, -2.0014, -1.9996]]))
        ours(torch.full((1, 7), 0.37))
        assert bool((ours.min_val <= ours.max_val).all()), (cls, ours.min_val, ours.max_val)
        scale, _ = ours.calculate_qparams()
        assert bool((scale > 0).all())


PER_CHANNEL_CFGS = [dict(), dict(dtype=torch.int8, qscheme=torch.per_channel_symmetric),
                    dict(dtype=torch.int8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127,
                         eps=2**-12),
                    dict(qscheme=torch.per_channel_affine_float_qparams), dict(reduce_range=True),
                    dict(qscheme=torch.per_channel_affine_float_qparams, quant_min=0, quant_max=15)]


@SETTINGS
@given(data=batch_lists(shape=(3, 4, 2, 2)), cfg=st.sampled_from(PER_CHANNEL_CFGS), axis=st.sampled_from([0, 1, 3, -1]),
       cls=st.sampled_from(["PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver"]))
def test_per_channel_observers_match_torch_ao(data, cfg, axis, cls):
    ours, theirs = _pair(cls, ch_axis=axis, **cfg)
    for x in data:
        ours(x)
        theirs(x)
    _assert_same(ours, theirs)
    assert ours.calculate_qparams()[0].shape == (data[0].shape[axis],)


HIST_CFGS = [dict(), dict(bins=128, reduce_range=True), dict(bins=256, quant_min=0, quant_max=127), dict(bins=256),
             dict(bins=64, dtype=torch.int8, qscheme=torch.per_tensor_symmetric), dict(bins=7)]


@settings(max_examples=40, deadline=None)  # torch.ao's search takes 10 ms .. 3 s per call
@given(data=batch_lists(shape=(16, 64), max_batches=5,
                        kinds=["normal", "relu", "lognormal", "heavy", "constant", "zeros", "uniform"]),
       cfg=st.sampled_from(HIST_CFGS))
def test_histogram_observer_matches_torch_ao(data, cfg):
    ours, theirs = _pair("HistogramObserver", **cfg)
    for x in data:
        ours(x)
        theirs(x)
        assert same_bits(ours.histogram, theirs.histogram)
    _assert_same(ours, theirs, buffers=("min_val", "max_val", "histogram"))


def test_histogram_identical_over_many_growing_batches():
    ours, theirs = _pair("HistogramObserver")
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        x = torch.randn(3000, generator=g) * (1 + step % 7) + (step % 5 - 2) * 0.3
        if step % 9 == 4:
            x = torch.full((50,), float(step))  # a single value outside the range so far
        ours(x)
        theirs(x)
        assert same_bits(ours.histogram, theirs.histogram), step
        assert same_bits(ours.min_val, theirs.min_val) and same_bits(ours.max_val, theirs.max_val)
    _assert_same(ours, theirs, buffers=("histogram",))


@pytest.mark.parametrize("make", [
    lambda: torch.tensor([0.0, 1.0] * 500),                      # two spikes: torch.ao walks ~50k steps
    lambda: torch.full((100,), -3.0),                            # a single value
    lambda: torch.cat([torch.relu(torch.randn(20000, generator=torch.Generator().manual_seed(1))),
                       torch.tensor([300.0])]),                  # one big outlier
    lambda: torch.randn(20000, generator=torch.Generator().manual_seed(2)).mul(3).exp(),
])
def test_histogram_search_on_hard_distributions(make):
    ours, theirs = _pair("HistogramObserver", bins=512)
    x = make()
    ours(x)
    theirs(x)
    _assert_same(ours, theirs, buffers=("histogram",))


def test_quantile_walk_table_is_a_sequential_sum():
    from fxquant._histogram import _quantile_walk
    alphas, betas = _quantile_walk()
    a, b = 0.0, 1.0
    for k in range(1, 30001):
        a, b = a + 1e-5, b - 1e-5
        assert alphas[k] == a and betas[k] == b


ALL_MINMAX = ["MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver", "PerChannelMinMaxObserver",
              "MovingAveragePerChannelMinMaxObserver"]


@pytest.mark.parametrize("name", ALL_MINMAX)
def test_nan_and_inf_are_ignored_with_one_warning(name):
    g = torch.Generator().manual_seed(3)
    dirty = [torch.randn(4, 6, generator=g) for _ in range(3)]
    dirty[0][0, 1], dirty[1][2, 3], dirty[2][1, 0] = float("nan"), float("inf"), float("-inf")
    obs = getattr(fo, name)()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for d in dirty:
            assert obs(d) is d
    assert sum("NaN or infinite" in str(w.message) for w in caught) == 1
    scale, zp = obs.calculate_qparams()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    if name == "HistogramObserver":
        assert obs.histogram.sum().item() == sum(d.numel() - 1 for d in dirty)
        return
    # reference: each bad value replaced by its row's finite minimum leaves every min / max unchanged
    ref = getattr(fo, name)()
    for d in dirty:
        ok = torch.isfinite(d)
        ref(torch.where(ok, d, torch.where(ok, d, float("inf")).amin(dim=1, keepdim=True)))
    _assert_same(obs, ref)


def test_histogram_with_inf_matches_torch_ao():
    """torch.ao drops +-inf too (and warns every batch): the histograms agree."""
    ours, theirs = _pair("HistogramObserver", bins=128)
    for k in range(3):
        x = torch.randn(500, generator=torch.Generator().manual_seed(k))
        x[k::50] = float("inf") if k % 2 else float("-inf")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours(x)
            theirs(x)
    _assert_same(ours, theirs, buffers=("histogram", "min_val", "max_val"))


@pytest.mark.parametrize("name", ALL_MINMAX)
def test_batch_with_no_finite_value_changes_nothing(name):
    obs = getattr(fo, name)()
    with pytest.warns(UserWarning, match="before the observer saw any data"):
        scale, zp = obs.calculate_qparams()
    assert scale.tolist() == [1.0] and zp.tolist() == [0]
    with pytest.warns(RuntimeWarning):
        obs(torch.full((2, 3), float("nan")))
    obs(torch.empty(0, 3))
    if name.startswith(("MinMax", "Moving", "Hist")) and "PerChannel" not in name:
        with pytest.warns(UserWarning, match="before the observer saw any data"):
            assert obs.calculate_qparams()[0].tolist() == [1.0]


def test_per_channel_channel_without_finite_data():
    obs = fo.MovingAveragePerChannelMinMaxObserver(averaging_constant=0.5)
    x = torch.tensor([[1.0, -2.0], [float("nan"), float("inf")], [0.5, 3.0]])
    with pytest.warns(RuntimeWarning):
        obs(x)
    with pytest.warns(UserWarning, match=r"channels \[1\] saw no finite data"):
        scale, zp = obs.calculate_qparams()
    ref = fo.MovingAveragePerChannelMinMaxObserver(averaging_constant=0.5)
    ref(x[[0, 2]])
    assert scale[1] == 1.0 and zp[1] == 0
    assert torch.equal(scale[[0, 2]], ref.calculate_qparams()[0])
    obs(torch.tensor([[3.0, 3.0], [2.0, 4.0], [float("nan"), 1.0]]))  # channel 1 appears, channel 2 half-bad
    assert obs.min_val.tolist() == [-2.0 + 0.5 * (3.0 + 2.0), 2.0, 0.5 + 0.5 * (1.0 - 0.5)]
    assert torch.isfinite(obs.calculate_qparams()[0]).all()


@pytest.mark.parametrize("cls", ["PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver"])
def test_per_channel_observer_of_a_1d_tensor_treats_each_value_as_a_channel(cls):
    """A norm's weight (F.group_norm / F.layer_norm weight argument) is 1-d: one value per channel. torch.ao's
    observers fail on it (flatten from dim 1); fxquant's give the same qparams as for the (C, 1) matrix."""
    w = torch.tensor([0.5, -1.25, 2.0, 0.0])
    one_d, two_d = getattr(fo, cls)(), getattr(fo, cls)()
    one_d(w), one_d(w * 0.5)
    two_d(w[:, None]), two_d(w[:, None] * 0.5)
    assert torch.equal(one_d.min_val, two_d.min_val) and torch.equal(one_d.max_val, two_d.max_val)
    assert all(torch.equal(a, b) for a, b in zip(one_d.calculate_qparams(), two_d.calculate_qparams()))


def test_observer_validation_errors():
    cases = [
        (lambda: fo.MinMaxObserver(qscheme=torch.per_channel_affine), "PerChannelMinMaxObserver"),
        (lambda: fo.PerChannelMinMaxObserver(qscheme=torch.per_tensor_affine), "per-channel qscheme"),
        (lambda: fo.MinMaxObserver(qscheme=torch.per_tensor_symmetric, reduce_range=True), "zero point at 128"),
        (lambda: fo.HistogramObserver(qscheme=torch.per_tensor_symmetric, reduce_range=True), "zero point"),
        (lambda: fo.MinMaxObserver(dtype=torch.float32), "dtype torch.float32 is not supported"),
        (lambda: fo.MinMaxObserver(quant_min=0), "both"),
        (lambda: fo.MinMaxObserver(quant_min=3, quant_max=10), "include 0"),
        (lambda: fo.MinMaxObserver(dtype=torch.int8, quant_min=-1, quant_max=200), "too wide"),
        (lambda: fo.PerChannelMinMaxObserver(is_dynamic=True), "dynamic"),
        (lambda: fo.HistogramObserver(is_dynamic=True), "dynamic"),
        (lambda: fo.HistogramObserver(bins=0), "bins"),
        (lambda: fo.MovingAverageMinMaxObserver(is_dynamic=True), "averaging_constant=1"),
        (lambda: fo.FixedQParamsObserver(scale=0.0, zero_point=0), "positive"),
        (lambda: fo.FixedQParamsObserver(scale=0.1, zero_point=300), "zero_point=300"),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match):
            make()
    obs = fo.PerChannelMinMaxObserver(ch_axis=2)
    with pytest.raises(ValueError, match="ch_axis=2 is out of range"):
        obs(torch.randn(3, 4))
    obs = fo.PerChannelMinMaxObserver()
    obs(torch.randn(3, 4))
    with pytest.raises(ValueError, match="5 channels.*earlier inputs had 3"):
        obs(torch.randn(5, 4))
    assert fo.MovingAverageMinMaxObserver(averaging_constant=1, is_dynamic=True).is_dynamic


def test_legacy_dtypes_are_normalised_and_float_inputs_accepted():
    obs = fo.MinMaxObserver(dtype=torch.quint8)
    assert obs.dtype == torch.uint8 and (obs.quant_min, obs.quant_max) == (0, 255)
    assert fo.PerChannelMinMaxObserver(dtype=torch.qint8).dtype == torch.int8
    assert fo.MinMaxObserver(dtype=torch.quint4x2).quant_max == 15
    obs(torch.tensor([-1.0, 2.0], dtype=torch.float16))
    assert obs.min_val.dtype == torch.float32 and obs.min_val.item() == -1.0


def test_with_args_constructors():
    ctor = fo.MinMaxObserver.with_args(dtype=torch.int8).with_args(qscheme=torch.per_tensor_symmetric)
    a, b = ctor(), ctor()
    assert a is not b and a.dtype == torch.int8 and a.qscheme == torch.per_tensor_symmetric
    assert repr(ctor) == "MinMaxObserver.with_args(dtype=torch.int8, qscheme=torch.per_tensor_symmetric)"
    assert ctor == fo.MinMaxObserver.with_args(qscheme=torch.per_tensor_symmetric, dtype=torch.int8)
    assert hash(ctor) == hash(fo.MinMaxObserver.with_args(qscheme=torch.per_tensor_symmetric, dtype=torch.int8))
    assert ctor != fo.MinMaxObserver.with_args(dtype=torch.uint8)
    assert ctor(dtype=torch.uint8).dtype == torch.uint8  # explicit arguments win
    assert pickle.loads(pickle.dumps(ctor)) == ctor
    calls = []
    lazy = fo.MinMaxObserver.with_callable_args(eps=lambda: calls.append(1) or 0.5).with_args(dtype=torch.int8)
    assert lazy().eps.item() == 0.5 and lazy().eps.item() == 0.5 and len(calls) == 2
    assert "with_callable_args(eps=" in repr(lazy)
    assert lazy.with_args(eps=0.25)().eps.item() == 0.25 and len(calls) == 2  # last setting wins
    with pytest.raises(TypeError, match="zero-argument callable"):
        fo.MinMaxObserver.with_callable_args(eps=0.5)


def test_is_observer_constructor():
    assert fo.is_observer_constructor(fo.MinMaxObserver)
    assert fo.is_observer_constructor(fo.default_weight_observer)
    assert fo.is_observer_constructor(tao.default_weight_observer)  # torch.ao's partial wrapper
    assert not fo.is_observer_constructor(fo.MinMaxObserver())
    assert not fo.is_observer_constructor(int) and not fo.is_observer_constructor(None)


def _attrs(obs):
    names = ("qscheme", "quant_min", "quant_max", "is_dynamic", "ch_axis", "averaging_constant", "bins",
             "reduce_range", "has_customized_qrange")
    out = {n: getattr(obs, n) for n in names if hasattr(obs, n)}
    out["class"] = type(obs).__name__
    out["dtype"] = str(obs.dtype).replace("torch.quint4x2", "torch.uint8").replace("torch.quint8", "torch.uint8") \
        .replace("torch.qint8", "torch.int8")
    for n in ("eps", "scale", "zero_point"):
        if hasattr(obs, n):
            out[n] = torch.as_tensor(getattr(obs, n)).float().tolist()
    return out


def test_default_observers_match_torch_ao():
    names = [n for n in tao.__all__ if n.startswith(("default_", "per_channel_weight", "weight_observer"))
             and n.endswith(("observer", "observer_4bit", "neg_127_to_127"))]
    assert len(names) == 16
    for name in names:
        ours, theirs = getattr(fo, name)(), getattr(tao, name)()
        expected = _attrs(theirs)
        if name == "default_float_qparams_observer_4bit":
            expected["has_customized_qrange"] = True  # spelled as uint8 with range 0..15
        assert _attrs(ours) == expected, name


def test_state_dict_round_trips_with_torch_ao():
    g = torch.Generator().manual_seed(5)
    for name, kw in [("MinMaxObserver", {}), ("PerChannelMinMaxObserver", dict(ch_axis=1)),
                     ("HistogramObserver", dict(bins=64)), ("MovingAverageMinMaxObserver", {})]:
        ours, theirs = _pair(name, **kw)
        for _ in range(2):
            theirs(torch.randn(3, 5, generator=g))
        fresh = getattr(fo, name)(**kw)
        fresh.load_state_dict(theirs.state_dict())
        _assert_same(fresh, theirs)
        for _ in range(2):
            ours(torch.randn(3, 5, generator=g))
        back = getattr(tao, name)(**kw)
        back.load_state_dict(ours.state_dict())
        _assert_same(ours, back)
        assert set(ours.state_dict()) == set(theirs.state_dict())


def test_legacy_state_dict_versions():
    obs = fo.PerChannelMinMaxObserver()
    sd = {"min_vals": torch.tensor([-1.0, -2.0]), "max_vals": torch.tensor([1.0, 3.0])}
    obs._load_from_state_dict(sd, "", {"version": 2}, True, [], [], [])
    assert obs.min_val.tolist() == [-1.0, -2.0] and obs.max_val.tolist() == [1.0, 3.0]
    hist = fo.HistogramObserver(bins=4)
    sd = {"min_val": torch.tensor([]), "max_val": torch.tensor([]), "histogram": torch.zeros(4)}
    hist._load_from_state_dict(sd, "", {"version": 2}, True, [], [], [])
    assert hist.min_val.item() == float("inf") and hist.min_val.dim() == 0
    mm = fo.MinMaxObserver()
    missing = []
    mm._load_from_state_dict({"min_val": torch.tensor(-1.0), "max_val": torch.tensor(1.0)}, "", {"version": 1},
                             True, missing, [], [])
    assert not missing and mm.eps.item() == torch.finfo(torch.float32).eps


def test_reset_and_simple_observers():
    for obs in (fo.MinMaxObserver(), fo.PerChannelMinMaxObserver(), fo.HistogramObserver(bins=8)):
        obs(torch.randn(2, 3))
        obs.reset_min_max_vals()
        with pytest.warns(UserWarning, match="saw any data"):
            obs.calculate_qparams()
    fixed = fo.default_fixed_qparams_range_neg1to1_observer()
    assert fixed(torch.ones(2)).tolist() == [1.0, 1.0]
    scale, zp = fixed.calculate_qparams()
    assert scale.tolist() == [2.0 / 256.0] and zp.tolist() == [128] and fixed.dtype == torch.uint8
    rec = fo.RecordingObserver()
    x = torch.randn(3)
    rec(x)
    assert len(rec.get_tensor_value()) == 1 and torch.equal(rec.get_tensor_value()[0], x)
    for obs in (fo.PlaceholderObserver(), rec, fo.NoopObserver(), fo.ReuseInputObserver()):
        with pytest.raises(RuntimeError, match="calculate_qparams should not be called"):
            obs.calculate_qparams()
    with pytest.warns(DeprecationWarning):
        assert fo.PlaceholderObserver(compute_dtype=torch.uint8).is_dynamic
    assert fo.float16_dynamic_placeholder_observer().dtype == torch.float16
    assert fo.NoopObserver().dtype == torch.float16 and fo.ReuseInputObserver().dtype == torch.uint8


def test_observer_state_dict_helpers():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    model.activation_post_process_0 = fo.PerChannelMinMaxObserver()
    model.activation_post_process_0(torch.randn(4, 3))
    saved = fo.get_observer_state_dict(model)
    assert set(saved) == {"activation_post_process_0.eps", "activation_post_process_0.min_val",
                          "activation_post_process_0.max_val"}
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    other.activation_post_process_0 = fo.PerChannelMinMaxObserver()
    fo.load_observer_state_dict(other, saved)
    assert torch.equal(other.activation_post_process_0.min_val, model.activation_post_process_0.min_val)
    with pytest.raises(KeyError, match="activation_post_process_0.min_val"):
        fo.load_observer_state_dict(other, {"activation_post_process_0.eps": torch.tensor([1e-7])})


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(-(2.0**100), 2.0**100, width=32), min_size=1, max_size=300),
       bins=st.sampled_from([1, 2, 7, 256, 2048, 3001]), widen=st.sampled_from([0.0, 0.5, 3.0]),
       edges=st.booleans())
def test_own_binning_equals_torch_histc(values, bins, widen, edges):
    from fxquant._histogram import histc
    x = torch.tensor(values, dtype=torch.float32)
    lo, hi = x.min().item(), x.max().item()
    lo, hi = lo - widen * abs(lo), hi + widen * abs(hi)
    lo, hi = float(torch.tensor(lo)), float(torch.tensor(hi))  # float32 values, like the observer's buffers
    if edges:  # values exactly on (float32-rounded) bin edges
        x = torch.cat([x, torch.linspace(lo, hi, bins + 1)])
    assert torch.equal(histc(x, bins, lo, hi), torch.histc(x, bins, min=lo, max=hi))


@pytest.mark.parametrize("values,bins", [([-3e38, 3e38, 0.0, 1e38], 7), ([-3e38, 3e38, 0.0], 2048),
                                         ([0.0, 1e38, 3e38], 7), ([0.0, 1e30, 3e34], 2048), ([2.0**25] * 3, 5),
                                         ([1e-44, 3e-44, 0.0], 2048), ([5.0, 5.0], 1)])
def test_own_binning_at_float32_extremes(values, bins):
    from fxquant._histogram import histc
    x = torch.tensor(values, dtype=torch.float32)
    lo, hi = x.min().item(), x.max().item()
    assert torch.equal(histc(x, bins, lo, hi), torch.histc(x, bins, min=lo, max=hi))
    strided = torch.stack([x, x], dim=1)[:, 0]  # a non-contiguous view of the same values
    assert torch.equal(histc(strided, bins, lo, hi), torch.histc(x, bins, min=lo, max=hi))
