"""Dynamic LSTM / GRU (fxquant.nn.quantized.DynamicLSTM / DynamicGRU): torch.ao's converted numerics (the input
and each step's hidden state quantized at run time) through the native FBGEMM recurrence and through the aten
fallback, against torch.ao's dynamic modules (the oracle), on padded, packed, unbatched and bidirectional input;
state dict, pickling, copies and torch.export; what stays on the float recurrence."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fxquant
from fxquant.kernels import native
from fxquant.nn import quantized as Q
from fxquant.nn.quantized import reference as ref

import oracle

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")
PATHS = [pytest.param("native", marks=needs_native), "aten"]
_FLOAT = {"lstm": nn.LSTM, "gru": nn.GRU}
_REF = {"lstm": ref.LSTM, "gru": ref.GRU}
_DYNAMIC = {"lstm": Q.DynamicLSTM, "gru": Q.DynamicGRU}


def _weight_qparams(module: nn.Module, per_channel: bool) -> dict:
    qparams = {}
    for name, p in module.named_parameters():
        if not name.startswith("weight"):
            continue
        if per_channel:
            obs = fxquant.PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        else:
            obs = fxquant.MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        obs(p.detach())
        scale, zero_point = obs.calculate_qparams()
        qparams[name] = {"qscheme": obs.qscheme, "dtype": torch.qint8, "scale": scale, "zero_point": zero_point,
                         "axis": 0}
    return qparams


def _build(kind: str, path: str, per_channel: bool = False, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    float_mod = _FLOAT[kind](**kwargs).eval()
    dyn = _DYNAMIC[kind].from_reference(_REF[kind].from_float(float_mod, _weight_qparams(float_mod, per_channel)))
    _force(dyn, path)
    return float_mod, dyn


def _force(module: nn.Module, path: str) -> None:
    for m in module.modules():
        if isinstance(m, (Q.DynamicLSTM, Q.DynamicGRU)):
            m._kernel_cache["path"] = path


def _torchao(kind: str, float_mod: nn.Module, per_channel: bool) -> nn.Module:
    tq = oracle.require_torchao()
    import torch.ao.nn.quantized.dynamic as nnqd

    float_mod = copy.deepcopy(float_mod)
    float_mod.qconfig = tq.per_channel_dynamic_qconfig if per_channel else tq.default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (nnqd.LSTM if kind == "lstm" else nnqd.GRU).from_float(float_mod)


def _flat(out):
    if isinstance(out, nn.utils.rnn.PackedSequence):  # (a tuple too: first)
        return [out.data]
    if isinstance(out, tuple):
        return [t for o in out for t in _flat(o)]
    return [out]


def _assert_same(a, b, atol=2e-6):
    for x, y in zip(_flat(a), _flat(b), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,bias,per_channel", [
    (1, False, False, True, False), (2, False, True, True, False), (2, True, True, True, True),
    (1, True, False, False, False), (3, False, False, True, True)])
def test_matches_torchao_dynamic_module(path, kind, layers, bidirectional, batch_first, bias, per_channel):
    float_mod, dyn = _build(kind, path, per_channel, input_size=12, hidden_size=24, num_layers=layers,
                            bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    if bias:
        ao = _torchao(kind, float_mod, per_channel)
    else:  # (torch.ao's dynamic RNNs require biases: the other path is the check)
        ao = copy.deepcopy(dyn)
        _force(ao, "aten" if path == "native" else "native")
        if not native.available():
            pytest.skip("no bias: torch.ao has no such module and the native path is unavailable")
    g = torch.Generator().manual_seed(1)
    x = torch.randn((3, 9, 12) if batch_first else (9, 3, 12), generator=g)
    h0 = torch.randn(layers * (2 if bidirectional else 1), 3, 24, generator=g) * 0.5
    hx = (h0, torch.randn(h0.shape, generator=g) * 0.5) if kind == "lstm" else h0
    with torch.no_grad():
        for args in ((x,), (x, hx)):
            _assert_same(dyn(*args), ao(*args))
            # and it is not the float recurrence: the hidden state's rounding shows
            assert not torch.equal(dyn(*args)[0], float_mod(*args)[0])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequences_match_torchao(path, kind, bidirectional):
    float_mod, dyn = _build(kind, path, input_size=8, hidden_size=16, num_layers=2, bidirectional=bidirectional)
    ao = _torchao(kind, float_mod, False)
    x = torch.randn(7, 4, 8, generator=torch.Generator().manual_seed(2))
    packed = pack_padded_sequence(x, torch.tensor([5, 7, 2, 4]), enforce_sorted=False)
    with torch.no_grad():
        out, ao_out = dyn(packed), ao(packed)
    _assert_same(out, ao_out)
    assert torch.equal(out[0].batch_sizes, ao_out[0].batch_sizes)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_unbatched_input_matches_torchao(path, kind):
    float_mod, dyn = _build(kind, path, input_size=6, hidden_size=10, num_layers=2)
    ao = _torchao(kind, float_mod, False)
    x = torch.randn(5, 6)
    h0 = torch.randn(2, 10) * 0.5
    hx = (h0, h0.flip(1)) if kind == "lstm" else h0
    with torch.no_grad():
        for args in ((x,), (x, hx)):
            out = dyn(*args)
            ao_args = (x.unsqueeze(1),) + (() if len(args) == 1 else (
                (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if kind == "lstm" else hx.unsqueeze(1),))
            ao_out = ao(*ao_args)  # (torch.ao's modules take batched input only)
            _assert_same(out[0], ao_out[0].squeeze(1))
            _assert_same(out[1], tuple(t.squeeze(1) for t in ao_out[1]) if kind == "lstm" else ao_out[1].squeeze(1))
            assert out[0].shape == (5, 10)


@needs_native
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("batch", [1, 16])
def test_native_and_aten_paths_agree_at_a_realistic_size(kind, batch):
    _, native_mod = _build(kind, "native", input_size=64, hidden_size=128, num_layers=2, batch_first=True)
    aten_mod = copy.deepcopy(native_mod)
    _force(aten_mod, "aten")
    x = torch.randn(batch, 20, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = native_mod(x), aten_mod(x)
    # the gates' sigmoid / tanh differ in the last bit, which may flip one hidden value's rounding in a long run
    _assert_same(a, b, atol=1e-4)


def test_lowered_model_equals_torchao_converted_model():
    oracle.require_torchao()
    for recipe in ("dynamic", "dynamic_weight_only_embedding"):
        ours = oracle.quantize(oracle.fxquant_lib(), "lstm_classifier", recipe, stages=("lowered",))
        ao = oracle.quantize(oracle.torchao_lib(), "lstm_classifier", recipe, stages=("lowered",))
        counts = oracle.node_count_dict(ours.lowered)
        assert counts.get("quantized.DynamicLSTM") == 1, counts
        for batch in ours.spec.calibration_data(n_batches=2, seed=7):
            with torch.no_grad():
                torch.testing.assert_close(ours.lowered(*batch), ao.lowered(*batch), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("packed", [False, True])
def test_without_the_native_kernel_eager_calls_run_the_reference_float_recurrence(kind, packed):
    # (the step-by-step aten form costs 3-30x fp32's time: eager calls without the native library take the
    # reference graph's arithmetic instead -- the input fake-quantized at run time, the float recurrence)
    float_mod, dyn = _build(kind, "float", input_size=8, hidden_size=16, num_layers=2, bidirectional=True)
    ref_mod = _REF[kind].from_float(float_mod, _weight_qparams(float_mod, False))
    fake_quant = Q.FakeQuantizeDynamic(0, 127)
    x = torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        if packed:
            seq = pack_padded_sequence(x, torch.tensor([6, 4, 3]))
            want = ref_mod(nn.utils.rnn.PackedSequence(fake_quant(seq.data), seq.batch_sizes))
            got = dyn(seq)
        else:
            want, got = ref_mod(fake_quant(x)), dyn(x)
    for a, b in zip(_flat(got), _flat(want), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert dyn._path(x) == "float" and not torch.equal(_flat(dyn(x))[0], _flat(_build(
            kind, "aten", input_size=8, hidden_size=16, num_layers=2, bidirectional=True)[1](x))[0])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_state_dict_pickle_copy_and_export(kind):
    _, dyn = _build(kind, "native" if native.available() else "aten", input_size=8, hidden_size=16, num_layers=2,
                    batch_first=True)
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        want = dyn(x)[0]
        fresh = _build(kind, "aten", seed=5, input_size=8, hidden_size=16, num_layers=2, batch_first=True)[1]
        assert not torch.equal(fresh(x)[0], want)
        fresh.load_state_dict(dyn.state_dict())
        _assert_same(fresh(x)[0], want, atol=1e-5)
        buffer = io.BytesIO()
        torch.save(dyn, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(loaded(x)[0], want) and loaded.quant_max == dyn.quant_max
        assert torch.equal(copy.deepcopy(dyn)(x)[0], want)
        buffer = io.BytesIO()
        torch.save(dyn.state_dict(), buffer)
        buffer.seek(0)
        assert set(torch.load(buffer, weights_only=True)) == set(dyn.state_dict())
    exported = torch.export.export(dyn, (x,))
    with torch.no_grad():
        _assert_same(exported.module()(x)[0], want, atol=1e-5)


def test_what_stays_on_the_float_recurrence():
    lstm = nn.LSTM(8, 16, proj_size=4).eval()
    r = ref.LSTM.from_float(lstm, _weight_qparams(lstm, False))
    assert "proj_size" in Q.rnn_dynamic.supports(r)
    with pytest.raises(ValueError, match="proj_size"):
        Q.DynamicLSTM.from_reference(r)
    with pytest.raises(TypeError, match="expects"):
        Q.DynamicGRU.from_reference(r)
    gru = nn.GRU(8, 16).eval()
    with pytest.raises(ValueError, match="uint8"):
        Q.DynamicGRU.from_reference(ref.GRU.from_float(gru, _weight_qparams(gru, False)), quant_min=-128,
                                    quant_max=127)
    # through the pipeline: an LSTM with projections keeps the reference's float recurrence
    model = nn.Sequential(nn.LSTM(8, 16, proj_size=4)).eval()
    example = (torch.randn(5, 2, 8),)
    mapping = fxquant.QConfigMapping().set_global(fxquant.default_dynamic_qconfig)
    prepared = fxquant.quantize_fx.prepare_fx(model, mapping, example)
    prepared(*example)
    counts = oracle.node_count_dict(fxquant.quantize_fx.convert_fx(prepared))
    assert counts.get("quantized.LSTM") == 1 and not counts.get("quantized.DynamicLSTM"), counts


@needs_native
def test_recurrence_checks_its_arguments():
    w = torch.randint(-127, 128, (64, 16), dtype=torch.int8)
    plan = native.DynamicLinearPlan(w, torch.full((64,), 0.01), None, False)
    gx, out = torch.zeros(12, 64), torch.zeros(12, 16)
    h, c = torch.zeros(3, 16), torch.zeros(3, 16)
    sizes = torch.full((4,), 3, dtype=torch.int32)
    native.rnn_recurrence(plan, False, gx, 0, sizes, False, h, c, out, 0, 0, 127)
    with pytest.raises(ValueError, match="shapes"):
        native.rnn_recurrence(plan, False, gx[:6], 0, sizes, False, h, c, out, 0, 0, 127)
    with pytest.raises(ValueError, match="int32"):
        native.rnn_recurrence(plan, False, gx, 0, sizes.long(), False, h, c, out, 0, 0, 127)
    with pytest.raises(ValueError, match="float32"):
        native.rnn_recurrence(plan, False, gx.double(), 0, sizes, False, h, c, out, 0, 0, 127)
    with pytest.raises(ValueError, match="shapes"):  # a GRU has 3 gates: this plan has 4 x 16 outputs
        native.rnn_recurrence(plan, True, gx, 0, sizes, False, h, None, out, 0, 0, 127)


@needs_native
def test_packed_batches_of_many_lengths_do_not_grow_the_kernel_cache():
    _, dyn = _build("lstm", "native", input_size=4, hidden_size=8, num_layers=1)
    g = torch.Generator().manual_seed(6)
    sizes = []
    with torch.no_grad():
        for length in range(3, 12):
            x = torch.randn(length, 3, 4, generator=g)
            dyn(pack_padded_sequence(x, torch.tensor([length, max(1, length - 2), 1])))
            sizes.append(len(dyn._kernel_cache))
    assert sizes[-1] == sizes[0], sizes
