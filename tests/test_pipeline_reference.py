"""convert_to_reference_fx against torch.ao: the reference model's output is bit-identical on the model zoo."""
import copy
import pickle
import warnings

import pytest
import torch

import oracle
from models import MODELS
from test_pipeline_prepare import CASES, KNOWN_DELTAS


def _reference_pair(name, recipe_name):
    spec = MODELS[name]
    recipe = spec.recipe(recipe_name)
    model, ex = spec.factory()
    data = spec.calibration_data()
    ours = oracle.quantize(oracle.fxquant_lib(), model, recipe, ex, data, stages=("reference",))
    theirs = oracle.quantize(oracle.torchao_lib(), model, recipe, ex, data, stages=("reference",))
    return spec, ours, theirs


@pytest.mark.torchao
@pytest.mark.parametrize("name,recipe_name", CASES)
def test_reference_output_bit_identical_to_torchao(name, recipe_name):
    if (name, recipe_name) in KNOWN_DELTAS:
        pytest.skip("observer placement differs on purpose (see test_pipeline_prepare.KNOWN_DELTAS)")
    spec, ours, theirs = _reference_pair(name, recipe_name)
    for batch in spec.calibration_data(n_batches=2, seed=7):
        with torch.no_grad():
            a, b = ours.reference(*batch), theirs.reference(*batch)
        if spec.recipe(recipe_name).kind == "dynamic":
            # torch.ao's dynamic quantization picks qparams in float64 (ATen's ChooseQuantizationParams);
            # ours are float32 like every observer: the dequantized activations can differ by one float32 ulp.
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        else:
            oracle.assert_bit_identical(a, b, f"{name}/{recipe_name}")


@pytest.mark.parametrize("name", ["resnet18", "bert_encoder", "lstm_classifier", "standalone", "branchy"])
def test_reference_model_is_close_to_float_and_has_no_observers(name):
    spec = MODELS[name]
    model, ex = spec.factory()
    res = oracle.quantize(oracle.fxquant_lib(), model, spec.recipe(), ex, spec.calibration_data(),
                          stages=("reference",))
    counts = oracle.node_count_dict(res.reference)
    assert not any(k.startswith("activation_post_process") for k in counts)
    with torch.no_grad():
        ref, fp = res.reference(*ex), model(*ex)
    ref, fp = (ref[0], fp[0]) if isinstance(ref, tuple) else (ref, fp)
    err = (ref - fp).pow(2).mean() / fp.pow(2).mean().clamp_min(1e-12)
    assert err < 0.05, f"{name}: relative MSE {err:.4f} of the reference model vs float"


def test_reference_model_pickles_and_deepcopies(tmp_path):
    spec = MODELS["resnet18"]
    model, ex = spec.factory()
    res = oracle.quantize(oracle.fxquant_lib(), model, spec.recipe(), ex, spec.calibration_data(),
                          stages=("reference",))
    twin = copy.deepcopy(res.reference)
    loaded = pickle.loads(pickle.dumps(res.reference))
    path = tmp_path / "sd.pt"
    torch.save(res.reference.state_dict(), path)
    state = torch.load(path, weights_only=True)
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    assert tensors and not any(v.is_quantized for v in tensors)
    assert {v.dtype for v in tensors} >= {torch.int8, torch.float32}
    with torch.no_grad():
        out = res.reference(*ex)
        oracle.assert_bit_identical(twin(*ex), out)
        oracle.assert_bit_identical(loaded(*ex), out)


def test_convert_rejects_a_model_not_made_by_prepare():
    import fxquant

    model, _ = MODELS["resnet18"].factory()
    with pytest.raises(ValueError, match="prepare_fx"):
        fxquant.convert_fx(torch.fx.symbolic_trace(model))


def test_observers_without_data_warn_once_listing_them():
    import fxquant

    model, ex = MODELS["resnet18"].factory()
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), ex)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxquant.convert_to_reference_fx(prepared)
    ours = [w for w in caught if "saw no data" in str(w.message)]
    assert len(ours) == 1 and "activation_post_process_0" in str(ours[0].message)
