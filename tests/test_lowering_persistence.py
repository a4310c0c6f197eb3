"""Lowered models survive state_dict round trips, torch.save / torch.load, deepcopy and torch.export, and keep
their float weights reachable with keep_original_weights=True."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import fxquant
import oracle
from fxquant.passes.lower_build import lowering_report

# one model per family of lowered kernels: fused conv+add (resnet18), lookup tables / binary ops / requantize
# (mobilenet_v3_small), integer shape ops + cat + chunk (shufflenet), dynamic linear (bert_encoder), LSTM,
# weight-only embedding bags, functional conv / linear
MODELS = ("resnet18", "mobilenet_v3_small", "shufflenet", "bert_encoder", "lstm_classifier", "embedding_bag_recsys",
          "functional")


@pytest.fixture(scope="module")
def results():
    return oracle.memoised_quantize(("lowered",))


def _run(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
    return out[0] if isinstance(out, tuple) else out


def _bytes(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_loads_into_a_freshly_converted_model(results, name):
    res = results(name)
    expected = _run(res.lowered, res.example_inputs)
    state = torch.load(_bytes(res.lowered.state_dict()), weights_only=True)  # plain tensors and strings only
    assert all(not v.is_quantized for v in state.values() if isinstance(v, torch.Tensor))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = oracle.to_lowered(oracle.fxquant_lib(), res.prepared, res.recipe)
    _run(fresh, res.example_inputs)  # kernel caches built before the load must be dropped by it
    with torch.no_grad():  # scramble what the load must restore
        for buf in fresh.buffers():
            if buf.is_floating_point():
                buf.mul_(1.5)
    fresh.load_state_dict(state)
    assert torch.equal(_run(fresh, res.example_inputs), expected)


@pytest.mark.parametrize("name", MODELS)
def test_whole_model_save_load_and_deepcopy(results, name):
    res = results(name)
    expected = _run(res.lowered, res.example_inputs)
    loaded = torch.load(_bytes(res.lowered), weights_only=False)
    assert torch.equal(_run(loaded, res.example_inputs), expected)
    assert torch.equal(_run(copy.deepcopy(res.lowered), res.example_inputs), expected)
    assert lowering_report(loaded) == lowering_report(res.lowered)


@pytest.mark.parametrize("name", ("resnet18", "mobilenet_v3_small", "shufflenet", "bert_encoder",
                                  "embedding_bag_recsys"))
def test_torch_export(results, name):
    res = results(name)
    expected = _run(res.lowered, res.example_inputs)
    exported = torch.export.export(res.lowered, res.example_inputs)
    got = exported.module()(*res.example_inputs)
    got = got[0] if isinstance(got, tuple) else got
    scales = [float(m.scale) for m in res.lowered.modules() if type(m).__name__ == "DeQuantize"]
    atol = scales[-1] if scales else 1e-5  # exported graphs run the portable kernels: within one output step
    torch.testing.assert_close(got, expected, rtol=0, atol=atol * 1.001)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "onednn" in t], "exported graphs must hold plain aten ops only"


@pytest.mark.parametrize("name", ("resnet18", "functional", "bert_encoder"))
def test_keep_original_weights(results, name):
    res = results(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = fxquant.convert_fx(copy.deepcopy(res.prepared), keep_original_weights=True)
    lookup = kept.original_weights_lookup
    lowered = {n: m for n, m in kept.named_modules() if hasattr(m, "weight_int")}
    assert set(lookup) == set(lowered)
    for path, (weight, _bias) in lookup.items():
        mod = lowered[path]
        assert weight.dtype == torch.float32 and weight.shape == mod.weight_int.shape
        assert mod.original_weight is weight
        err = (mod.float_weight() - weight).abs().amax(dim=tuple(range(1, weight.dim())))
        assert (err <= mod.weight_scale.reshape(-1) / 2 + 1e-6).all(), path  # within half a weight step
    assert set(kept.state_dict()) == set(res.lowered.state_dict())  # the float copies are not state
    assert torch.equal(_run(kept, res.example_inputs), _run(res.lowered, res.example_inputs))


def test_lowering_report_survives_deepcopy():
    import copy

    import fxquant
    import oracle

    res = oracle.quantize(oracle.fxquant_lib(), "resnet18", stages=("lowered",))
    rows = fxquant.lowering_report(res.lowered)
    twin = copy.deepcopy(res.lowered)
    assert [r.node for r in fxquant.lowering_report(twin)] == [r.node for r in rows] and rows


class _CatRelu(torch.nn.Module):
    """relu after a cat: its table is the identity when the cat's zero point is 0 (non-negative calibration data),
    else a clamp that stays in the graph, so the lowered graph depends on the calibration."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(torch.cat([x, x * 2.0], 1)))


def _converted_cat_relu(data: torch.Tensor) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = _CatRelu().eval()
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), (data,))
    with torch.no_grad():
        prepared(data)
    return prepared, fxquant.convert_fx(copy.deepcopy(prepared))


def test_a_state_dict_of_a_differently_specialised_graph_is_refused_with_the_remedy():
    gen = torch.Generator().manual_seed(0)
    _, positive = _converted_cat_relu(torch.rand(16, 4, generator=gen))
    prepared_mixed, mixed = _converted_cat_relu(torch.randn(16, 4, generator=gen))
    assert "clamp" in mixed.code and "clamp" not in positive.code  # the two calibrations gave two graphs
    saved = torch.load(_bytes(mixed.state_dict()), weights_only=True)
    with pytest.raises(RuntimeError, match="fxquant_signature") as info:
        positive.load_state_dict(saved)
    assert "prepared model's state dict" in str(info.value)
    # the remedy: the observers' statistics into a fresh prepared model, then convert: the same graph
    fresh_prepared, _ = _converted_cat_relu(torch.rand(16, 4, generator=gen))
    fresh_prepared.load_state_dict(torch.load(_bytes(prepared_mixed.state_dict()), weights_only=True))
    fresh = fxquant.convert_fx(fresh_prepared)
    fresh.load_state_dict(saved)
    x = torch.randn(5, 4, generator=gen)
    with torch.no_grad():
        assert torch.equal(fresh(x), mixed(x))
