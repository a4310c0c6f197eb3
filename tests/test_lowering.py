"""convert_fx lowering on the model zoo: the lowered model equals our reference model, with the expected kernels.

Tolerance (stated once): static models are compared in steps of the output quantizer (the final DeQuantize's
scale). Each lowered op is within one step of its own output: the int8 kernels reproduce the reference arithmetic,
quantizing float data rounds half up (ties differ by one step), and a residual add or an activation fused into
the conv (onednn post-ops) skips the rounding of the conv's own output. Through a network that reaches at most
2 steps of the final output (resnet18, with 8 fused residual adds; on at most 10 % of the values) and 1 step
elsewhere. Dynamic and weight-only models (float outputs) agree to float32 rounding (1e-5 relative).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import oracle
from models import MODELS

# model -> (node counts the lowered graph must have, max steps, max fraction of values more than 1 step off)
EXPECTED: dict[str, tuple[dict[str, int], float, float]] = {
    "resnet18": ({"quantized.Conv2d": 20, "quantized.Linear": 1, "quantized.Quantize": 1, "quantized.DeQuantize": 1,
                  "max_pool2d": 1, "quantized.QuantizedBinary": 8}, 1, 0.0),
    "mobilenet_v2": ({"quantized.Conv2d": 19, "quantized.Linear": 1, "quantized.Quantize": 1,
                      "quantized.DeQuantize": 1}, 1, 0.0),
    "mobilenet_v3_small": ({"quantized.Conv2d": 27, "quantized.Linear": 2, "quantized.LookupTable": 5,
                            "quantized.QuantizedBinary": 6}, 1, 0.0),
    "bert_encoder": ({"quantized.LinearDynamic": 14}, 0, 0.0),
    "lstm_classifier": ({"quantized.DynamicLSTM": 1, "quantized.LinearDynamic": 1}, 0, 0.0),
    "embedding_bag_recsys": ({"quantized.EmbeddingBag": 2}, 0, 0.0),
    "functional": ({"quantized.Conv2d": 2, "quantized.Linear": 1}, 0, 0.0),
    "functional_positional": ({"quantized.Conv2d": 2, "quantized.Linear": 1}, 0, 0.0),
    "branchy": ({"quantized.Linear": 2, "quantized.Quantize": 2, "quantized.DeQuantize": 2}, 0, 0.0),
    "standalone": ({"quantized.Conv2d": 2, "quantized.Linear": 1}, 1, 0.0),
    "shufflenet": ({"quantized.Conv2d": 21, "quantized.Linear": 1, "cat": 5, "chunk": 3}, 1, 0.0),
    "segmentation_head": ({"quantized.Conv2d": 4, "cat": 1}, 1, 0.0),
}
# lowered models that round more than their reference: a dynamic LSTM quantizes its hidden state at every step, as
# torch.ao's converted one does (its reference keeps the recurrence float; test_rnn_dynamic.py checks the lowered
# model against torch.ao's): compared by signal-to-noise ratio
ROUNDS_MORE = {"lstm_classifier": 30.0}
# reference-form ops nothing may leave behind in a lowered graph
_REFERENCE_OPS = ("quantize_per_tensor", "dequantize", "quantized.reference.Conv2d", "quantized.reference.Linear",
                  "choose_qparams_per_tensor")


@pytest.fixture(scope="module")
def results():
    return oracle.memoised_quantize(("reference", "lowered"))


def _output_scale(model: torch.nn.Module) -> float | None:
    scales = [float(m.scale) for m in model.modules() if type(m).__name__ == "DeQuantize"]
    return scales[-1] if scales else None


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def test_every_zoo_model_has_an_expectation():
    assert set(EXPECTED) == set(MODELS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_lowered_graph_has_the_expected_kernels(results, name):
    res = results(name)
    counts = oracle.node_count_dict(res.lowered)
    expected, _, _ = EXPECTED[name]
    assert {k: counts.get(k, 0) for k in expected} == expected, counts
    assert not [k for k in _REFERENCE_OPS if counts.get(k)], counts


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_lowered_output_matches_reference(results, name):
    res = results(name)
    _, max_steps, max_frac = EXPECTED[name]
    scale = _output_scale(res.lowered)
    for batch in res.spec.calibration_data(n_batches=2, seed=7):
        with torch.no_grad():
            ref, low = _first(res.reference(*batch)), _first(res.lowered(*batch))
        assert ref.shape == low.shape and low.dtype == ref.dtype
        diff = (ref - low).abs()
        if name in ROUNDS_MORE:
            _assert_sqnr(low, ref, ROUNDS_MORE[name])
            continue
        if scale is None or res.spec.recipe().kind != "static":
            torch.testing.assert_close(low, ref, rtol=1e-5, atol=1e-6)
            continue
        steps = diff / scale
        assert steps.max().item() <= max_steps + 1e-3, f"{name}: {steps.max().item():.2f} steps"
        assert (steps > 1.001).float().mean().item() <= max_frac, f"{name}: {(steps > 1.001).float().mean():.3f}"


@pytest.mark.parametrize("name", ["resnet18", "segmentation_head", "branchy", "functional"])
def test_quantize_read_only_by_convs_gives_channels_last(results, name):
    """A Quantize whose every reader is a lowered 2-d conv writes the channels-last layout their int8 kernels read
    (one native pass instead of quantize + copy); any other reader keeps the input's layout."""
    gm = results(name).lowered
    seen = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(gm.get_submodule(node.target)).__name__ != "Quantize":
            continue
        seen += 1
        readers = {type(gm.get_submodule(u.target)).__name__ if u.op == "call_module" else u.op for u in node.users}
        assert gm.get_submodule(node.target).channels_last == (readers == {"Conv2d"}), (node.name, readers)
    assert seen
    if name in ("resnet18", "segmentation_head"):
        batch = results(name).spec.calibration_data(n_batches=1, seed=3)[0]
        quant = gm.get_submodule("x_quantize")
        assert quant.channels_last and quant(batch[0]).is_contiguous(memory_format=torch.channels_last)


def _assert_sqnr(low: torch.Tensor, ref: torch.Tensor, min_db: float) -> None:
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - low).pow(2).sum().clamp(min=1e-30)).item()
    assert sqnr >= min_db, f"lowered vs reference: {sqnr:.1f} dB < {min_db} dB"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_op_left_in_reference_form_is_reported_with_a_reason(results, name):
    from fxquant.passes.lower_build import lowering_report

    rows = lowering_report(results(name).lowered)
    assert all(r.reason for r in rows if not r.lowered), [r for r in rows if not r.lowered and not r.reason]
    assert all(r.kernel for r in rows if r.lowered)


# other recipes: full-range uint8 activations (qnnpack: no 7-bit guarantee, so exact split / float kernels),
# static BERT (layer norm, softmax and matmul stay in reference form), dynamic linear next to weight-only bags,
# weight-only embedding feeding a dynamic LSTM
OTHER_RECIPES = [("resnet18", "static_qnnpack", {"quantized.Conv2d": 20}, 1),
                 ("bert_encoder", "static_x86", {"quantized.Linear": 14, "quantized.Embedding": 2}, 1),
                 ("embedding_bag_recsys", "weight_only_dynamic_linear", {"quantized.LinearDynamic": 3,
                                                                         "quantized.EmbeddingBag": 2}, 0),
                 ("lstm_classifier", "dynamic_weight_only_embedding", {"quantized.Embedding": 1,
                                                                       "quantized.DynamicLSTM": 1}, 0)]


@pytest.mark.parametrize("name,recipe,expected,max_steps", OTHER_RECIPES)
def test_other_recipes_lower_and_match_reference(name, recipe, expected, max_steps):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = oracle.quantize(oracle.fxquant_lib(), name, recipe, stages=("reference", "lowered"))
    counts = oracle.node_count_dict(res.lowered)
    assert {k: counts.get(k, 0) for k in expected} == expected, counts
    scale = _output_scale(res.lowered)
    batch = res.spec.calibration_data(n_batches=1, seed=7)[0]
    with torch.no_grad():
        ref, low = _first(res.reference(*batch)), _first(res.lowered(*batch))
    if name in ROUNDS_MORE:
        _assert_sqnr(low, ref, ROUNDS_MORE[name])
    elif max_steps == 0:
        torch.testing.assert_close(low, ref, rtol=1e-5, atol=1e-6)
    else:
        assert ((ref - low).abs() / scale).max().item() <= max_steps + 1e-3
