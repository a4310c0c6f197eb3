"""prepare_fx against torch.ao on the model zoo: observers in the same places, bit-identical qparams."""
import copy

import pytest
import torch

import oracle
from models import MODELS

CASES = [(name, r.name) for name, spec in MODELS.items() for r in spec.recipes]

# Deliberate differences from torch.ao (observer count deltas, ours minus theirs), each a torch.ao bug:
# * standalone: torch.ao assumes a standalone module returns a quantized value although its output is float
#   (output_quantized_idxs is empty), so the op after it gets no input observer and runs on an unquantized input.
#   fxquant observes the standalone module's float output like any other float value.
KNOWN_DELTAS = {("standalone", "static_x86_standalone_body"): {"activation_post_process": 1,
                                                                "activation_post_process:HistogramObserver": 1}}


def _prepared_pair(name, recipe_name):
    spec = MODELS[name]
    recipe = spec.recipe(recipe_name)
    model, ex = spec.factory()
    ours = oracle.prepare(oracle.fxquant_lib(), model, recipe, ex)
    theirs = oracle.prepare(oracle.torchao_lib(), model, recipe, ex)
    return spec, ours, theirs


@pytest.mark.torchao
@pytest.mark.parametrize("name,recipe_name", CASES)
def test_observers_placed_like_torchao(name, recipe_name):
    _, ours, theirs = _prepared_pair(name, recipe_name)
    expected = oracle.node_count_dict(theirs, observers_by_class=True)
    for key, delta in KNOWN_DELTAS.get((name, recipe_name), {}).items():
        expected[key] = expected.get(key, 0) + delta
    assert oracle.node_count_dict(ours, observers_by_class=True) == expected


@pytest.mark.torchao
@pytest.mark.parametrize("name,recipe_name", CASES)
def test_calibrated_qparams_bit_identical(name, recipe_name):
    spec, ours, theirs = _prepared_pair(name, recipe_name)
    if (name, recipe_name) in KNOWN_DELTAS:
        pytest.skip("observer placement differs on purpose (see KNOWN_DELTAS); qparams compared elsewhere")
    data = spec.calibration_data()
    oracle.calibrate(ours, data)
    oracle.calibrate(theirs, data)
    oracle.assert_qparams_equal(oracle.collect_qparams(ours), oracle.collect_qparams(theirs), check_names=False)


def test_prepared_model_runs_like_float_and_pickles(tmp_path):
    import fxquant

    model, ex = MODELS["resnet18"].factory()
    prepared = fxquant.prepare_fx(copy.deepcopy(model), fxquant.get_default_qconfig_mapping("x86"), ex)
    torch.testing.assert_close(prepared(*ex), model(*ex), rtol=1e-4, atol=1e-4)  # BN folded: close, not equal
    path = tmp_path / "prepared.pt"
    torch.save(prepared, path)
    loaded = torch.load(path, weights_only=False)
    assert oracle.node_count_dict(loaded) == oracle.node_count_dict(prepared)
    torch.testing.assert_close(loaded(*ex), prepared(*ex), rtol=0, atol=0)
    twin = copy.deepcopy(prepared)
    twin.train()
    twin.eval()
    assert oracle.node_count_dict(twin) == oracle.node_count_dict(prepared)
