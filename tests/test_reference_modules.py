"""Reference modules: bit-identical to torch.ao's reference modules, plain-dtype buffers, save / load / copy."""
from __future__ import annotations

import copy
import io
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant.nn.quantized.reference as R
from fxquant.nn.quantized.reference._weight import WeightSpec, dequantize_weight, quantize_weight

pytestmark = [pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions"),
              pytest.mark.filterwarnings("ignore:To copy construct from a tensor")]  # torch.ao oracle noise
QUINT8, QINT8, QUINT4X2 = (getattr(torch, n) for n in ("quint8", "qint8", "quint4x2"))  # legacy names, tests only


def _ao_reference():
    return pytest.importorskip("torch.ao.nn.quantized.reference")


# ------------------------------------------------------------------------------------------------ qparams helpers
def _per_tensor(w: torch.Tensor, dtype: torch.dtype) -> dict:
    w = w.detach()
    qmin, qmax = (0, 255) if dtype == QUINT8 else (-128, 127)
    lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
    scale = max((hi - lo) / (qmax - qmin), 1e-8)
    zp = int(min(max(qmin - round(lo / scale), qmin), qmax))
    return {"qscheme": torch.per_tensor_affine, "dtype": dtype, "scale": scale, "zero_point": zp}


def _per_channel(w: torch.Tensor, axis: int) -> dict:
    amax = w.transpose(0, axis).reshape(w.shape[axis], -1).abs().amax(1)
    return {"qscheme": torch.per_channel_affine, "dtype": QINT8, "scale": (amax / 127.5).clamp_min(1e-8),
            "zero_point": torch.zeros(w.shape[axis], dtype=torch.long), "axis": axis}


def _float_qparams(w: torch.Tensor, dtype: torch.dtype) -> dict:
    qmax = 15 if dtype == QUINT4X2 else 255
    lo, hi = w.amin(1).clamp_max(0), w.amax(1).clamp_min(0)
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    return {"qscheme": torch.per_channel_affine_float_qparams, "dtype": dtype, "scale": scale,
            "zero_point": -lo / scale, "axis": 0}


# (name, float module factory, input factory, weight axis for per-channel)
_MODULES = {
    "Linear": (lambda: nn.Linear(24, 12), lambda: torch.randn(5, 24), 0),
    "Linear_nobias": (lambda: nn.Linear(24, 12, bias=False), lambda: torch.randn(3, 7, 24), 0),
    "Conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 17), 0),
    "Conv2d": (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2, dilation=2), lambda: torch.randn(2, 4, 11, 9), 0),
    "Conv3d": (lambda: nn.Conv3d(3, 5, 2, stride=(1, 2, 1)), lambda: torch.randn(1, 3, 5, 6, 4), 0),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), lambda: torch.randn(2, 4, 9), 1),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
                        lambda: torch.randn(2, 4, 7, 6), 1),
    "ConvTranspose3d": (lambda: nn.ConvTranspose3d(2, 4, 2, dilation=2), lambda: torch.randn(1, 2, 4, 3, 4), 1),
}


def _qparams_cases(w: torch.Tensor, axis: int) -> dict[str, dict]:
    return {"per_tensor_qint8": _per_tensor(w, QINT8), "per_tensor_quint8": _per_tensor(w, QUINT8),
            "per_channel": _per_channel(w, axis)}


@pytest.mark.parametrize("scheme", ["per_tensor_qint8", "per_tensor_quint8", "per_channel"])
@pytest.mark.parametrize("name", sorted(_MODULES))
def test_bit_identical_to_torch_ao(name: str, scheme: str) -> None:
    ao = _ao_reference()
    torch.manual_seed(0)
    make, make_x, axis = _MODULES[name]
    float_mod = make()
    qparams = _qparams_cases(float_mod.weight.detach(), axis)[scheme]
    cls_name = name.split("_")[0]
    ours = getattr(R, cls_name).from_float(float_mod, qparams)
    theirs = getattr(ao, cls_name).from_float(float_mod, qparams)
    x = make_x()
    assert torch.equal(ours.get_weight(), theirs.get_weight())
    assert torch.equal(ours(x), theirs(x))
    assert ours._get_name() == theirs._get_name()
    assert ours.weight_int.dtype == (torch.uint8 if scheme == "per_tensor_quint8" else torch.int8)
    assert torch.equal(ours.weight_int.int(), theirs.get_quantized_weight().int_repr().int())


@pytest.mark.parametrize("dtype", ["quint8", "quint4x2"])
@pytest.mark.parametrize("bag", [False, True])
def test_embedding_float_qparams_bit_identical(bag: bool, dtype: str) -> None:
    ao = _ao_reference()
    torch.manual_seed(1)
    legacy = getattr(torch, dtype)
    float_mod = nn.EmbeddingBag(50, 16, mode="sum") if bag else nn.Embedding(50, 16, padding_idx=3)
    qparams = _float_qparams(float_mod.weight.detach(), legacy)
    cls = R.EmbeddingBag if bag else R.Embedding
    ours = cls.from_float(float_mod, qparams)
    theirs = (ao.EmbeddingBag if bag else ao.Embedding).from_float(float_mod, qparams)
    idx = torch.randint(0, 50, (4, 7))
    assert torch.equal(ours.get_weight(), theirs.get_weight())
    assert torch.equal(ours(idx), theirs(idx))
    assert int(ours.weight_int.max()) <= (15 if dtype == "quint4x2" else 255)
    if bag:
        flat, offsets = idx.flatten(), torch.tensor([0, 3, 10, 20])
        assert torch.equal(ours(flat, offsets), theirs(flat, offsets))


def _halfway_weights(shape: tuple[int, ...], scale: torch.Tensor, data: st.DataObject) -> torch.Tensor:
    """Weights that sit on or one ulp next to the rounding boundary k + 0.5 (where fma vs mul+add differ)."""
    k = torch.tensor(data.draw(st.lists(st.integers(-140, 140), min_size=shape[0] * shape[1],
                                        max_size=shape[0] * shape[1]))).float().reshape(shape)
    nudge = torch.tensor(data.draw(st.lists(st.integers(-1, 1), min_size=k.numel(), max_size=k.numel())))
    nudge = nudge.reshape(shape)
    w = (k + 0.5) * scale
    up, down = torch.nextafter(w, torch.full_like(w, 1e9)), torch.nextafter(w, torch.full_like(w, -1e9))
    return torch.where(nudge > 0, up, torch.where(nudge < 0, down, w))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), zp=st.integers(-20, 20), per_channel=st.booleans())
def test_quantize_weight_matches_torch_on_rounding_boundaries(data: st.DataObject, zp: int,
                                                              per_channel: bool) -> None:
    if not hasattr(torch, "quantize_per_channel"):
        pytest.skip("torch's quantized tensors (the oracle) are gone")
    scale = torch.tensor(data.draw(st.lists(st.floats(2.0 ** -13, 0.5, width=32), min_size=6, max_size=6)))
    w = _halfway_weights((6, 11), scale[:, None] if per_channel else scale[0], data)
    if per_channel:
        spec = WeightSpec("per_channel_affine", torch.int8, -128, 127, 0)
        zps = torch.full((6,), zp, dtype=torch.long)
        ours = quantize_weight(w, spec, scale, zps)
        theirs = torch.quantize_per_channel(w, scale, zps, 0, QINT8)
        assert torch.equal(dequantize_weight(ours, spec, scale, zps), theirs.dequantize())
    else:
        spec = WeightSpec("per_tensor_affine", torch.int8, -128, 127)
        ours = quantize_weight(w, spec, scale[0], torch.tensor(zp))
        theirs = torch.quantize_per_tensor(w, float(scale[0]), zp, QINT8)
        assert torch.equal(dequantize_weight(ours, spec, scale[0], torch.tensor(zp)), theirs.dequantize())
    assert torch.equal(ours, theirs.int_repr())


# ------------------------------------------------------------------------------------------------ persistence
def _all_refs() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(2)
    out = []
    for name, (make, make_x, axis) in sorted(_MODULES.items()):
        float_mod = make()
        out.append((name, getattr(R, name.split("_")[0]).from_float(float_mod, _per_channel(float_mod.weight, axis)),
                    make_x()))
    emb = nn.EmbeddingBag(30, 8)
    out.append(("EmbeddingBag", R.EmbeddingBag.from_float(emb, _float_qparams(emb.weight.detach(), QUINT8)),
                torch.randint(0, 30, (3, 4))))
    return out


def _fresh_like(ref: nn.Module) -> nn.Module:
    """A freshly constructed module of the same class and geometry, with placeholder (per-tensor) qparams."""
    if isinstance(ref, nn.Linear):
        return type(ref)(ref.in_features, ref.out_features, ref.bias is not None)
    if isinstance(ref, nn.EmbeddingBag):
        return type(ref)(ref.num_embeddings, ref.embedding_dim, mode=ref.mode)
    fields = type(ref)._CTOR_FIELDS
    return type(ref)(**{f: getattr(ref, f) for f in fields}, bias=ref.bias is not None)


@pytest.mark.parametrize("case", _all_refs(), ids=lambda c: c[0])
def test_state_dict_loads_into_fresh_module_weights_only(case) -> None:
    _, ref, x = case
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert all(isinstance(v, torch.Tensor) and v.dtype in (torch.int8, torch.uint8, torch.float32, torch.int64)
               for k, v in state.items() if k != "_extra_state")
    fresh = _fresh_like(ref)
    assert not torch.equal(fresh(x), ref(x))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), ref(x))
    assert fresh.weight_qscheme == ref.weight_qscheme and fresh.weight_axis == ref.weight_axis


@pytest.mark.parametrize("case", _all_refs(), ids=lambda c: c[0])
def test_deepcopy_and_pickle_whole_module(case) -> None:
    _, ref, x = case
    clone = copy.deepcopy(ref)
    clone.weight_int.zero_()
    assert not torch.equal(ref.weight_int, clone.weight_int)
    buf = io.BytesIO()
    torch.save(ref, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(ref) and torch.equal(loaded(x), ref(x))
    assert "Reference" in repr(loaded) and "per_channel" in repr(loaded)


def test_keep_original_weights_and_weight_property() -> None:
    lin = nn.Linear(8, 4)
    ref = R.Linear.from_float(lin, _per_tensor(lin.weight.detach(), QINT8), keep_original_weights=True)
    assert torch.equal(ref.original_weight, lin.weight.detach())
    assert "weight" not in dict(ref.named_parameters())
    assert torch.equal(ref.weight, ref.get_weight())
    assert 0 < float((ref.weight - lin.weight.detach()).abs().max()) <= float(ref.weight_scale) / 2 + 1e-7
    assert "original_weight" not in R.Linear.from_float(lin, _per_tensor(lin.weight, QINT8)).state_dict()


def test_unquantized_and_float_target_weights() -> None:
    lin = nn.Linear(8, 4)
    plain = R.Linear.from_float(lin, {"qscheme": None, "dtype": torch.float16})
    x = torch.randn(2, 8)
    assert torch.equal(plain(x), lin(x))  # torch.ao keeps qscheme=None weights untouched
    fp8 = R.Linear.from_float(lin, {"qscheme": torch.per_tensor_affine, "dtype": torch.float8_e4m3fn,
                                    "scale": 0.01, "zero_point": 0})
    assert fp8.weight_int.dtype == torch.float8_e4m3fn
    assert torch.equal(fp8.get_weight(), (lin.weight / 0.01).to(torch.float8_e4m3fn).float() * 0.01)


def test_padding_mode_and_output_size_work() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    ref = R.Conv2d.from_float(conv, _per_channel(conv.weight.detach(), 0))
    x = torch.randn(1, 3, 6, 6)
    expected = nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), ref.get_weight(), conv.bias)
    assert torch.equal(ref(x), expected)
    convt = nn.ConvTranspose2d(3, 2, 3, stride=2)
    reft = R.ConvTranspose2d.from_float(convt, _per_tensor(convt.weight.detach(), QINT8))
    assert reft(torch.randn(1, 3, 5, 5), output_size=[12, 12]).shape == (1, 2, 12, 12)


@pytest.mark.parametrize("qparams, match", [
    ({"qscheme": torch.per_channel_affine, "dtype": QINT8, "scale": torch.ones(4), "zero_point": torch.zeros(4)},
     "axis"),
    ({"qscheme": torch.per_channel_affine, "dtype": QINT8, "scale": torch.ones(3), "zero_point": torch.zeros(3),
      "axis": 0}, r"shape \(4,\)"),
    ({"qscheme": torch.per_tensor_affine, "dtype": torch.int64, "scale": 1.0, "zero_point": 0}, "not a quantized"),
    ({"qscheme": "bogus", "dtype": QINT8, "scale": 1.0, "zero_point": 0}, "qscheme"),
    ({"qscheme": torch.per_tensor_affine, "dtype": QINT8, "zero_point": 0}, "'scale'"),
    ([1, 2], "must be a dict"),
])
def test_bad_qparams_are_clear_errors(qparams, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match) as info:
        R.Linear.from_float(nn.Linear(5, 4), qparams)
    assert "QuantizedLinear(Reference)" in str(info.value) or isinstance(qparams, list)


def test_wrong_float_module_type() -> None:
    with pytest.raises(TypeError, match="expects an nn.Conv2d"):
        R.Conv2d.from_float(nn.Linear(2, 2), _per_tensor(torch.ones(2, 2), QINT8))


def test_torch_export_of_reference_module() -> None:
    conv = nn.Conv2d(3, 4, 3)
    ref = R.Conv2d.from_float(conv, _per_channel(conv.weight.detach(), 0))
    x = torch.randn(1, 3, 8, 8)
    exported = torch.export.export(ref, (x,))
    assert torch.equal(exported.module()(x), ref(x))


# ------------------------------------------------------------------------------------------------ LSTM / GRU
def _rnn_qparams(float_rnn: nn.RNNBase, per_channel: bool) -> dict:
    out = {}
    for name, p in float_rnn.named_parameters():
        if name.startswith("weight"):
            out[name] = _per_channel(p.detach(), 0) if per_channel else _per_tensor(p.detach(), QINT8)
    return out


@pytest.mark.parametrize("cls, kwargs, per_channel", [
    ("LSTM", dict(num_layers=2, bidirectional=True), True),
    ("LSTM", dict(batch_first=True, bias=False), False),
    ("GRU", dict(num_layers=2, batch_first=True), True),
    ("GRU", dict(bidirectional=True), False),
])
def test_rnn_bit_identical_to_torch_ao(cls: str, kwargs: dict, per_channel: bool) -> None:
    ao = _ao_reference()
    torch.manual_seed(3)
    float_rnn = getattr(nn, cls)(8, 6, **kwargs)
    qparams = _rnn_qparams(float_rnn, per_channel)
    ours = getattr(R, cls).from_float(float_rnn, qparams)
    theirs = getattr(ao, cls).from_float(float_rnn, {**qparams, "is_decomposed": False})
    x = torch.randn(3, 5, 8)
    packed = nn.utils.rnn.pack_padded_sequence(x if kwargs.get("batch_first") else x.transpose(0, 1), [5, 4, 2],
                                               batch_first=bool(kwargs.get("batch_first")))
    for inp in (x, x[0], packed):
        (o1, h1), (o2, h2) = ours(inp), theirs(inp)
        o1, o2 = (o1.data, o2.data) if isinstance(inp, nn.utils.rnn.PackedSequence) else (o1, o2)
        assert torch.equal(o1, o2)
        assert all(torch.equal(a, b) for a, b in zip(h1 if cls == "LSTM" else [h1], h2 if cls == "LSTM" else [h2]))
    assert "weight_ih_l0" not in dict(ours.named_parameters()) and ours.weight_ih_l0_int.dtype == torch.int8


def test_rnn_state_dict_copy_and_pickle() -> None:
    torch.manual_seed(4)
    float_lstm = nn.LSTM(4, 5, proj_size=3)
    ref = R.LSTM.from_float(float_lstm, _rnn_qparams(float_lstm, True))
    x = torch.randn(6, 2, 4)
    expected = ref(x)[0]
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    fresh = R.LSTM(4, 5, proj_size=3)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(x)[0], expected)
    assert torch.equal(copy.deepcopy(ref)(x)[0], expected)
    buf = io.BytesIO()
    torch.save(ref, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x)[0], expected)
    with pytest.raises(ValueError, match="no entry for 'weight_hr_l0'"):
        R.LSTM.from_float(float_lstm, {k: v for k, v in _rnn_qparams(float_lstm, True).items() if "hr" not in k})
