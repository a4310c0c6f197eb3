"""Quantized model inputs / outputs (PrepareCustomConfig input/output_quantized_indexes): integers in and out with the
qparams of fxquant.boundary_qparams, bit-identical to torch.ao fed quantized tensors of the same qparams."""
import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

import fxquant
import oracle
from fxquant.tools.serialize import load, save


class TwoInOut(nn.Module):
    """Quantized input x, float input y; returns (conv-relu, (fc, lin), float sum)."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.pool = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2)
        self.fc, self.lin = nn.Linear(36, 5), nn.Linear(6, 5)

    def forward(self, x, y):
        a = self.relu(self.conv(x))
        f = self.fc(torch.flatten(self.pool(a), 1))
        g = self.lin(y)
        return a, (f, g), g.sum(dim=1)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        yield


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 6, generator=g)) for _ in range(n)]


def _model():
    torch.manual_seed(0)
    return TwoInOut().eval()


def _prepare(ns, fx, model, backend, ins=(0,), outs=(0, 1), qat=False, data=None):
    cfg = ns.fx.custom_config.PrepareCustomConfig() if ns is not fxquant else fxquant.PrepareCustomConfig()
    cfg.set_input_quantized_indexes(list(ins)).set_output_quantized_indexes(list(outs))
    mapping = (ns.get_default_qat_qconfig_mapping if qat else ns.get_default_qconfig_mapping)(backend)
    prepare = fx.prepare_qat_fx if qat else fx.prepare_fx
    prepared = prepare(copy.deepcopy(model).train(qat), mapping, _data(1)[0], prepare_custom_config=cfg)
    return oracle.calibrate(prepared, data or _data())


def _ours(backend="x86", **kw):
    return _prepare(fxquant, fxquant, _model(), backend, **kw)


def _ints(out, io):
    """Our (int) outputs as float via the boundary qparams, to compare lowered with reference."""
    return io.outputs[0].dequantize(out[0]), io.outputs[(1, 0)].dequantize(out[1][0])


@pytest.mark.torchao
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_reference_is_bit_identical_to_torchao_fed_quantized_tensors(backend):
    ao = oracle.require_torchao()
    from torch.ao.quantization import quantize_fx as aofx

    with _quiet():
        theirs = aofx.convert_to_reference_fx(_prepare(ao, aofx, _model(), backend))
    ours = fxquant.convert_to_reference_fx(_ours(backend))
    io = fxquant.boundary_qparams(ours)
    assert set(io.inputs) == {0} and set(io.outputs) == {0, (1, 0), (1, 1)}
    x_info = io.inputs[0]
    for x, y in _data(3, seed=1):
        qx = torch.quantize_per_tensor(x, x_info.scale, x_info.zero_point, torch.quint8)
        assert torch.equal(x_info.quantize(x), qx.int_repr())
        a, (f, g), s = ours(qx.int_repr(), y)
        ta, (tf, tg), ts = theirs(qx, y)
        for key, mine, their in ((0, a, ta), ((1, 0), f, tf), ((1, 1), g, tg)):
            assert mine.dtype == torch.uint8 and their.is_quantized
            assert torch.equal(mine, their.int_repr()), key
            assert (io.outputs[key].scale, io.outputs[key].zero_point) == (their.q_scale(), their.q_zero_point())
        oracle.assert_bit_identical(s, ts, "float output")


@pytest.mark.torchao
def test_prepared_graph_has_one_observer_more_per_quantized_input_than_torchao():
    ao = oracle.require_torchao()
    from torch.ao.quantization import quantize_fx as aofx

    with _quiet():
        theirs = _prepare(ao, aofx, _model(), "x86", ins=(0, 1))
    ours = _ours(ins=(0, 1))
    expected = oracle.node_count_dict(theirs, observers_by_class=True)
    for key in ("activation_post_process", "activation_post_process:HistogramObserver"):
        expected[key] += 2  # fxquant observes each quantized input: its range is the input's scale
    assert oracle.node_count_dict(ours, observers_by_class=True) == expected


def test_lowered_is_within_one_step_of_reference():
    prepared = _ours()
    ref, low = fxquant.convert_to_reference_fx(copy.deepcopy(prepared)), fxquant.convert_fx(copy.deepcopy(prepared))
    io = fxquant.boundary_qparams(ref)
    assert fxquant.boundary_qparams(low) == io
    for x, y in _data(3, seed=2):
        qx = io.inputs[0].quantize(x)
        r, lo = ref(qx, y), low(qx, y)
        for mine, theirs in ((lo[0], r[0]), (lo[1][0], r[1][0]), (lo[1][1], r[1][1])):
            assert mine.dtype == theirs.dtype == torch.uint8
            assert (mine.int() - theirs.int()).abs().max() <= 1
        torch.testing.assert_close(lo[2], r[2], atol=5 * io.outputs[(1, 1)].scale, rtol=0)


@pytest.mark.parametrize("stage", ["reference", "lowered"])
def test_qparams_survive_state_dict_save_load_and_deepcopy(stage, tmp_path):
    convert = fxquant.convert_to_reference_fx if stage == "reference" else fxquant.convert_fx
    model = convert(_ours())
    io = fxquant.boundary_qparams(model)
    x, y = _data(1, seed=3)[0]
    qx = io.inputs[0].quantize(x)
    expected = model(qx, y)
    assert "fxquant_boundaries.input_0_scale" in model.state_dict()
    other = convert(_prepare(fxquant, fxquant, _model(), "x86", data=_data(2, seed=9)))  # other qparams
    assert fxquant.boundary_qparams(other) != io
    other.load_state_dict(model.state_dict())
    save(model, tmp_path / "m.fxq")
    for again in (other, load(tmp_path / "m.fxq"), copy.deepcopy(model)):
        assert fxquant.boundary_qparams(again) == io
        oracle.assert_bit_identical(again(qx, y), expected)


def test_prepared_save_load_then_convert_and_export(tmp_path):
    prepared = _ours()
    save(prepared, tmp_path / "prepared.fxq")
    again = fxquant.convert_to_reference_fx(load(tmp_path / "prepared.fxq"))
    ref = fxquant.convert_to_reference_fx(prepared)
    x, y = _data(1, seed=7)[0]
    qx = fxquant.boundary_qparams(ref).inputs[0].quantize(x)
    oracle.assert_bit_identical(again(qx, y), ref(qx, y))
    exported = torch.export.export(ref, (qx, y)).module()
    oracle.assert_bit_identical(exported(qx, y), ref(qx, y))


def test_single_tensor_and_dict_outputs():
    class Single(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return {"out": self.fc(x), "n": x.shape[0]}

    ex = (torch.randn(2, 4),)
    cfg = fxquant.PrepareCustomConfig().set_input_quantized_indexes([0]).set_output_quantized_indexes([0])
    model = Single().eval()
    prepared = oracle.calibrate(fxquant.prepare_fx(copy.deepcopy(model), fxquant.get_default_qconfig_mapping(), ex,
                                                   prepare_custom_config=cfg), [ex])
    low = fxquant.convert_fx(prepared)
    io = fxquant.boundary_qparams(low)
    out = low(io.inputs[0].quantize(ex[0]))
    assert set(io.outputs) == {"out"} and out["out"].dtype == torch.uint8 and out["n"] == 2
    torch.testing.assert_close(io.outputs["out"].dequantize(out["out"]), model(*ex)["out"],
                               atol=3 * io.outputs["out"].scale + 3 * io.inputs[0].scale, rtol=0)


def test_float_input_to_a_quantized_input_is_refused():
    for convert in (fxquant.convert_to_reference_fx, fxquant.convert_fx):
        model = convert(_ours())
        x, y = _data(1)[0]
        with pytest.raises(TypeError, match=r"input 0 \('x'\).*torch.uint8.*boundary_qparams\(model\).inputs\[0\]"):
            model(x, y)


def test_prepare_errors_name_the_node_and_the_fix():
    mapping = fxquant.get_default_qconfig_mapping().set_object_type(nn.Linear, None)
    cfg = fxquant.PrepareCustomConfig().set_input_quantized_indexes([1])
    with pytest.raises(ValueError, match=r"input 1 \('y'\) has no quantized consumer.*read by lin"):
        fxquant.prepare_fx(_model(), mapping, _data(1)[0], prepare_custom_config=cfg)
    with pytest.raises(ValueError, match=r"output 2 .*'sum_1'.*not quantized"):
        _ours(outs=(2,))
    with pytest.raises(ValueError, match="input_quantized_indexes has 5, but the model takes 2"):
        _ours(ins=(5,))
    with pytest.raises(ValueError, match="output_quantized_indexes has 3, but the model returns 3 values"):
        _ours(outs=(3,))
    with pytest.raises(ValueError, match="prepared, not converted"):
        fxquant.boundary_qparams(_ours())
    assert fxquant.boundary_qparams(nn.Linear(2, 2)) == fxquant.BoundaryQParams()


@pytest.mark.parametrize("qconfig,why", [(fxquant.default_dynamic_qconfig, "dynamic"),
                                         (fxquant.float16_dynamic_qconfig, "dynamic"),
                                         (fxquant.float16_static_qconfig, "float type")])
def test_dynamic_and_fp16_at_a_quantized_index_are_refused(qconfig, why):
    from fxquant.backend_config.native import get_test_only_legacy_native_backend_config

    mapping = fxquant.QConfigMapping().set_object_type(nn.Linear, qconfig)
    cfg = fxquant.PrepareCustomConfig().set_input_quantized_indexes([1])
    with pytest.raises(ValueError, match=rf"input 1 \('y'\) is declared quantized, but .*{why}"):
        fxquant.prepare_fx(_model(), mapping, _data(1)[0], prepare_custom_config=cfg,
                           backend_config=get_test_only_legacy_native_backend_config())


def test_qat_prepared_model_converts_to_integer_boundaries():
    prepared = _ours(qat=True)
    prepared.eval()
    model = fxquant.convert_fx(copy.deepcopy(prepared))
    io = fxquant.boundary_qparams(model)
    x, y = _data(1, seed=4)[0]
    out = model(io.inputs[0].quantize(x), y)
    simulated = prepared(x, y)
    torch.testing.assert_close(io.outputs[(1, 0)].dequantize(out[1][0]), simulated[1][0],
                               atol=2 * io.outputs[(1, 0)].scale, rtol=0)



class Body(nn.Module):
    def __init__(self, pair=False):
        super().__init__()
        self.pair = pair
        self.conv, self.relu, self.side = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = self.relu(self.conv(x))
        return (a, self.side(a)) if self.pair else a


class Parent(nn.Module):
    """``body`` (standalone) returns one tensor, as torch.ao requires, or a pair (fxquant only)."""

    def __init__(self, pair=False):
        super().__init__()
        self.pair = pair
        self.stem, self.body, self.head = nn.Conv2d(3, 4, 3), Body(pair), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        out = self.body(self.stem(x))
        return torch.cat((self.head(out[0]), out[1]), 1) if self.pair else self.head(out)


def _standalone(ns, fx, backend, pair=False):
    custom = ns.fx.custom_config.PrepareCustomConfig if ns is not fxquant else fxquant.PrepareCustomConfig
    child = custom().set_input_quantized_indexes([0]).set_output_quantized_indexes([0, 1] if pair else [0])
    cfg = custom().set_standalone_module_name("body", None, (torch.randn(2, 4, 8, 8),), child, None)
    torch.manual_seed(0)
    model = Parent(pair).eval()
    prepared = fx.prepare_fx(model, ns.get_default_qconfig_mapping(backend), (torch.randn(2, 3, 10, 10),),
                             prepare_custom_config=cfg)
    return oracle.calibrate(prepared, [(torch.randn(2, 3, 10, 10),) for _ in range(3)])


def _output_scale(ref):
    """Scale of the final dequantize of a reference model returning one float tensor."""
    dq = next(n for n in ref.graph.nodes if n.op == "output").args[0]
    return float(getattr(ref, dq.args[1].target))


def _check_standalone(prepared, expected_outputs, oracle_model=None):
    ref, low = fxquant.convert_to_reference_fx(copy.deepcopy(prepared)), fxquant.convert_fx(copy.deepcopy(prepared))
    io = fxquant.boundary_qparams(ref.body)
    assert set(io.inputs) == {0} and set(io.outputs) == expected_outputs and fxquant.boundary_qparams(ref).inputs == {}
    assert ref.body_input_0_scale is ref.body.fxquant_boundaries.input_0_scale  # the parent quantizes with it
    assert fxquant.boundary_qparams(low.body) == io
    for _ in range(3):
        x = torch.randn(2, 3, 10, 10)
        if oracle_model is not None:
            oracle.assert_bit_identical(ref(x), oracle_model(x), "reference vs torch.ao")
        torch.testing.assert_close(low(x), ref(x), atol=_output_scale(ref) * 1.01, rtol=0)  # one step


@pytest.mark.torchao
@pytest.mark.parametrize("backend", ["x86", "qnnpack"])
def test_standalone_module_with_quantized_boundary_matches_torchao(backend):
    ao = oracle.require_torchao()
    from torch.ao.quantization import quantize_fx as aofx

    with _quiet():
        theirs = aofx.convert_to_reference_fx(_standalone(ao, aofx, backend))
    _check_standalone(_standalone(fxquant, fxquant, backend), {0}, theirs)


def test_standalone_module_returning_a_tuple_of_quantized_values():
    _check_standalone(_standalone(fxquant, fxquant, "x86", pair=True), {0, 1})
