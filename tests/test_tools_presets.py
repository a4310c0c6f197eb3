"""fxquant.tools.presets (--qconfig / --skip) and fxquant.tools.userload (--model / --calib)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.tools.presets import BACKENDS, PRESETS, backend_config_for, qconfig_mapping_for, skip_modules
from fxquant.tools.userload import UserInputError, as_inputs, import_object


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_preset_is_the_backend_default(backend):
    ours = qconfig_mapping_for("default", backend)
    default = fxquant.get_default_qconfig_mapping(backend)
    # plus one entry: a fused Linear + Tanh gets the global qconfig (the default mapping makes it unpreparable)
    assert ours.object_type_qconfigs.pop(fxquant.nn.intrinsic.LinearTanh) is ours.global_qconfig
    assert ours.to_dict() == default.to_dict()


def test_presets_differ_where_they_say():
    per_tensor = qconfig_mapping_for("per-tensor").global_qconfig
    histogram = qconfig_mapping_for("histogram").global_qconfig
    assert per_tensor.weight().qscheme == torch.per_tensor_symmetric
    assert histogram.weight().qscheme == torch.per_channel_symmetric
    assert isinstance(histogram.activation(), fxquant.HistogramObserver)
    dynamic = qconfig_mapping_for("dynamic")
    assert dynamic.global_qconfig is None and dynamic.object_type_qconfigs[nn.Linear] is not None
    weight_only = qconfig_mapping_for("weight-only")
    assert set(weight_only.object_type_qconfigs) == {nn.Embedding, nn.EmbeddingBag}
    assert backend_config_for("qnnpack").name == fxquant.get_qnnpack_backend_config().name


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown qconfig preset 'int3'.*per-tensor"):
        qconfig_mapping_for("int3")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        qconfig_mapping_for("default", "tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        backend_config_for("tpu")
    assert set(PRESETS) == {"default", "per-tensor", "histogram", "dynamic", "weight-only"}


def test_skip_modules_by_name_and_regex():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 2))
    mapping = fxquant.QConfigMapping()
    assert skip_modules(mapping, model, ["0", r"1\..*"]) == ["0", "1.0", "1.1"]
    assert mapping.module_name_qconfigs == {"0": None}
    assert mapping.module_name_regex_qconfigs == {r"1\..*": None}
    with pytest.raises(ValueError, match="matches no module"):
        skip_modules(mapping, model, ["head"])
    with pytest.raises(ValueError, match="valid regex"):
        skip_modules(mapping, model, ["(unclosed"])


def test_import_object_and_inputs():
    assert import_object("torch.nn:Linear", "--model") is nn.Linear
    with pytest.raises(UserInputError, match="no attribute 'Nope'"):
        import_object("torch.nn:Nope", "--model")
    with pytest.raises(UserInputError, match="package.module:name"):
        import_object("torch.nn.Linear", "--model")
    x = torch.ones(1)
    assert as_inputs(x) == (x,) and as_inputs([x, x]) == (x, x)
    with pytest.raises(UserInputError, match="tensor or a tuple"):
        as_inputs({"x": x})


def test_dynamic_preset_quantizes_a_linear_fused_with_its_relu():
    # found on Hugging Face's T5: its feed-forward is Linear -> ReLU, which prepare_fx fuses before it reads the
    # qconfigs; the preset named only nn.Linear, and the fused LinearReLU then had parts with different qconfigs
    class FeedForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wi, self.wo = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.wo(torch.relu(self.wi(x)))

    torch.manual_seed(0)
    model = FeedForward().eval()
    x = torch.randn(4, 16)
    prepared = fxquant.prepare_fx(model, qconfig_mapping_for("dynamic"), (x,))
    prepared(x)
    lowered = fxquant.convert_fx(prepared)
    names = [type(m).__name__ for m in lowered.modules()]
    assert names.count("LinearDynamic") == 2, names
    with torch.no_grad():
        err = (lowered(x) - model(x)).pow(2).mean() / model(x).pow(2).mean()
    assert err < 1e-3


class _LinearTanh(nn.Module):  # BERT's pooler
    def __init__(self) -> None:
        super().__init__()
        self.dense, self.act = nn.Linear(8, 8), nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


@pytest.mark.parametrize("preset", ["default", "per-tensor", "histogram"])
def test_onednn_presets_prepare_a_fused_linear_tanh_that_the_default_mapping_refuses(preset: str) -> None:
    x = torch.randn(4, 8)
    backend = backend_config_for("onednn")
    with pytest.raises(LookupError, match="LinearTanh"):  # torch.ao's default mapping: as torch.ao does
        fxquant.prepare_fx(_LinearTanh().eval(), fxquant.get_default_qconfig_mapping("onednn"), (x,),
                           backend_config=backend)
    prepared = fxquant.prepare_fx(_LinearTanh().eval(), qconfig_mapping_for(preset, "onednn"), (x,),
                                  backend_config=backend)
    prepared(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = fxquant.convert_to_reference_fx(copy.deepcopy(prepared), backend_config=backend)
        lowered = fxquant.convert_fx(prepared, backend_config=backend)
    with torch.no_grad():
        assert torch.allclose(lowered(x), reference(x), atol=1e-6)
