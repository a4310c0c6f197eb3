"""Conversion's shortcuts give exactly what the long way gives: qparams without tensor ops, weight qparams from one
reused observer, reference modules built without ``__init__``, cheap graph nodes, linear-time submodule deletion."""
import copy
import operator
import random
import warnings

import pytest
import torch
from torch import fx, nn

import fxquant
from fxquant import observer as fo
from fxquant._qparams_fast import per_channel_qparams, per_tensor_qparams
from fxquant.nn.quantized.reference import Conv2d as RefConv2d
from fxquant.nn.quantized.reference import Linear as RefLinear
from fxquant.passes.convert_builder import node_name
from fxquant.passes.convert_weights import WeightQParams, weight_qparams_of
from fxquant.passes.common import delete_unused_submodules
from fxquant.qparams import _FORMULAS, symmetric_zero_point

RANGES = [(torch.uint8, (0, 255)), (torch.uint8, (0, 127)), (torch.uint8, (3, 250)), (torch.int8, (-128, 127)),
          (torch.int8, (-8, 7)), (torch.int32, (-(2**31), 2**31 - 1)), (torch.int16, (-(2**15), 2**15 - 1))]
EPS = [torch.finfo(torch.float32).eps, 2**-12, 1e-30, 1e-45]


def _values(rng: random.Random, n: int) -> torch.Tensor:
    pick = rng.random()
    if pick < 0.3:
        return torch.randn(n) * 10 ** rng.uniform(-30, 30)
    if pick < 0.5:
        return torch.tensor([rng.choice([0.0, -0.0, 1.0, -1e-45, 3.4e38, -3.4e38, 2.5, -7.5]) for _ in range(n)])
    return (torch.rand(n) - rng.random()) * 10 ** rng.uniform(-8, 8)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("per_channel", [False, True])
def test_fast_qparams_equal_the_tensor_formula(per_channel):
    rng = random.Random(per_channel)
    torch.manual_seed(int(per_channel))
    schemes = ([torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams]
               if per_channel else [torch.per_tensor_affine, torch.per_tensor_symmetric])
    checked = 0
    for _ in range(3000):
        dtype, (qmin, qmax) = rng.choice(RANGES)
        qscheme, eps, custom = rng.choice(schemes), rng.choice(EPS), rng.random() < 0.5
        a, b = _values(rng, 8 if per_channel else 1), _values(rng, 8 if per_channel else 1)
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        try:
            zp = symmetric_zero_point(dtype, qmin, qmax, custom)
        except ValueError:
            zp = None
        if per_channel:
            fast = per_channel_qparams(lo, hi, qmin, qmax, qscheme, eps, zp)
        else:
            one = per_tensor_qparams(float(lo[0]), float(hi[0]), qmin, qmax, qscheme, eps, zp)
            fast = None if one is None else (torch.tensor([one[0]]), torch.tensor([one[1]]))
        if fast is None:
            continue
        if zp is None and qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric):
            pytest.fail("a symmetric range without a valid zero point must take the tensor path")
        scale, zero_point = (torch.as_tensor(v) for v in fast)
        ref_scale, ref_zp = _FORMULAS[qscheme](lo, hi, qmin, qmax, torch.tensor(eps, dtype=torch.float32), dtype,
                                               custom)
        assert scale.dtype == ref_scale.dtype and zero_point.dtype == ref_zp.dtype
        assert torch.equal(_bits(scale), _bits(ref_scale)) and torch.equal(_bits(zero_point), _bits(ref_zp))
        checked += 1
    assert checked > 2000


WEIGHT_OBSERVERS = [
    fo.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    fo.PerChannelMinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_channel_affine, ch_axis=1),
    fo.MovingAveragePerChannelMinMaxObserver.with_args(qscheme=torch.per_channel_affine_float_qparams),
    fo.MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
    fo.MovingAverageMinMaxObserver.with_args(reduce_range=True),
    fo.HistogramObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
]


@pytest.mark.parametrize("make", WEIGHT_OBSERVERS, ids=lambda m: m.func.__name__)
def test_reused_weight_observer_equals_a_fresh_one(make):
    torch.manual_seed(0)
    wq = WeightQParams()
    weights = [torch.randn(6, 4, 3), torch.randn(6, 4, 3) * 1e-3, torch.zeros(6, 4, 3)]
    with_nan = torch.randn(6, 4, 3)
    with_nan[1, 2, 0] = float("nan")
    for w in [*weights, with_nan]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = wq(make, w)
            obs = make()
            obs(w)
            want = weight_qparams_of(obs)
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), key
            else:
                assert got[key] == value, key


@pytest.mark.parametrize("float_module", [nn.Linear(5, 3), nn.Linear(5, 3, bias=False),
                                          nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
                                          nn.Conv2d(4, 4, 3, padding="same", groups=2, padding_mode="reflect")])
def test_reference_module_built_without_init_equals_the_constructed_one(float_module):
    torch.manual_seed(0)
    ref_cls = RefLinear if isinstance(float_module, nn.Linear) else RefConv2d
    qparams = WeightQParams()(fo.PerChannelMinMaxObserver.with_args(dtype=torch.qint8), float_module.weight)
    first = ref_cls.from_float(float_module, qparams)  # builds through __init__ (or reuses a cached layout)
    float_module.qconfig = "attributes fxquant puts on the float module are not copied"
    second = ref_cls.from_float(copy.deepcopy(float_module), qparams)
    for ref in (first, second):
        assert not hasattr(ref, "qconfig")
        assert {k for k in vars(ref) if not k.startswith("_")} == {k for k in vars(first) if not k.startswith("_")}
        assert list(ref.state_dict()) == list(first.state_dict())
        assert list(ref._parameters) == list(first._parameters) and ref.training == first.training
    for name, value in first.state_dict().items():
        other = second.state_dict()[name]
        assert other == value if not isinstance(value, torch.Tensor) else torch.equal(other, value)
    x = torch.randn(2, 5) if isinstance(float_module, nn.Linear) else torch.randn(1, 4, 8, 8)
    assert torch.equal(first(x), second(x))


def test_node_names_are_torch_fx_names():
    graph = fx.Graph()
    for target in (torch.ops.fxquant.quantize_per_tensor.default, torch.ops.fxquant.dequantize_per_channel.default,
                   torch.ops.fxquant.choose_qparams_per_tensor.default, operator.getitem):
        assert node_name(target) == graph._target_to_str(target)


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        self.unused = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
        self.holder = nn.Module()
        self.holder.p = nn.Parameter(torch.ones(2))
        self.holder.child = nn.ReLU()

    def forward(self, x):
        return self.used(x) + self.holder.p


def test_linear_time_deletion_equals_torch_fx():
    ours, theirs = fx.symbolic_trace(_Unused()), fx.symbolic_trace(_Unused())
    delete_unused_submodules(ours)
    theirs.delete_all_unused_submodules()
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert "unused" not in dict(ours.named_modules())


def test_converted_linear_model_matches_between_runs():
    """Two conversions of one calibrated model (the second reuses every cache) give the same model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    prepared = fxquant.prepare_fx(model.eval(), fxquant.get_default_qconfig_mapping("x86"), (torch.randn(2, 4),))
    prepared(torch.randn(8, 4))
    a = fxquant.convert_to_reference_fx(copy.deepcopy(prepared))
    b = fxquant.convert_to_reference_fx(copy.deepcopy(prepared))
    assert a.code == b.code
    for (na, va), (nb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and (va == vb if not isinstance(va, torch.Tensor) else torch.equal(va, vb))
