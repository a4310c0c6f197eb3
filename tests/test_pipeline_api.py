"""Entry-point behaviour: configs in dict form, custom configs, errors, explain, convert-time qconfig_mapping."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
import oracle
from models import MODELS


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = y + 2.0
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return {"logits": self.fc(y), "aux": (y * 0.5, y.shape[0])}


def _small():
    torch.manual_seed(0)
    return Small().eval(), (torch.randn(2, 3, 8, 8),)


def _counts(gm):
    return oracle.node_count_dict(gm)


def test_fuse_fx_folds_bn_and_fuses_relu():
    model, ex = _small()
    fused = fxquant.fuse_fx(copy.deepcopy(model))
    assert type(fused.conv).__name__ == "ConvReLU2d"
    assert "BatchNorm2d" not in {type(m).__name__ for m in fused.modules()}
    torch.testing.assert_close(fused(*ex)["logits"], model(*ex)["logits"], rtol=1e-4, atol=1e-5)


def test_dict_forms_are_accepted():
    model, ex = _small()
    mapping = fxquant.get_default_qconfig_mapping("x86").to_dict()
    p1 = fxquant.prepare_fx(copy.deepcopy(model), mapping, ex,
                            prepare_custom_config={"preserved_attributes": ["marker"]},
                            backend_config=fxquant.get_native_backend_config().to_dict())
    p2 = fxquant.prepare_fx(copy.deepcopy(model), fxquant.get_default_qconfig_mapping("x86"), ex)
    assert _counts(p1) == _counts(p2)


def test_preserved_attributes_survive_prepare():
    model, ex = _small()
    model.marker = "keep me"
    cfg = fxquant.PrepareCustomConfig().set_preserved_attributes(["marker"])
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(), ex, prepare_custom_config=cfg)
    assert prepared.marker == "keep me"


def test_untraceable_model_error_names_module_line_and_fix():
    spec = MODELS["branchy"]
    model, ex = spec.factory()
    with pytest.raises(RuntimeError) as info:
        fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(), ex)
    msg = str(info.value)
    assert "'gate'" in msg and "models.py" in msg and "set_non_traceable_module_names" in msg


def test_example_inputs_must_be_a_tuple():
    model, ex = _small()
    with pytest.raises(TypeError, match="tuple"):
        fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(), ex[0])


def test_unsupported_qconfig_leaves_pattern_float_and_explain_says_why():
    model, ex = _small()
    odd = fxquant.QConfig(activation=fxquant.MinMaxObserver.with_args(dtype=torch.int16),
                          weight=fxquant.default_weight_observer)
    mapping = fxquant.get_default_qconfig_mapping().set_object_type(nn.Linear, odd)
    with pytest.warns(UserWarning) if False else _nullcontext():
        prepared = fxquant.prepare_fx(model, mapping, ex)
    rows = {r.node: r for r in fxquant.explain(prepared)}
    assert not rows["fc"].quantized and "int16" in rows["fc"].reason
    assert rows["conv"].quantized
    text = fxquant.format_explain(list(rows.values()))
    assert "fc" in text and "ops quantized" in text


def test_explain_says_a_torch_nn_container_runs_whole_with_its_linears_in_float():
    # found trying nn.Transformer: one row "no pattern for Transformer" hid that its Linear layers stay float too
    # (nn.Transformer* are traced into now; nn.MultiheadAttention still runs whole)
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(x, x, x)[0])

    prepared = fxquant.prepare_fx(Model().eval(), fxquant.get_default_qconfig_mapping(), (torch.randn(2, 5, 16),))
    rows = {r.node: r for r in fxquant.explain(prepared)}
    assert rows["head"].quantized and not rows["enc"].quantized
    assert "Linear" in rows["enc"].reason and "stay float" in rows["enc"].reason, rows["enc"].reason


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_prepared_output_structure_is_kept():
    model, ex = _small()
    prepared = fxquant.prepare_fx(copy.deepcopy(model), fxquant.get_default_qconfig_mapping(), ex)
    out = prepared(*ex)
    assert set(out) == {"logits", "aux"} and out["aux"][1] == 2


def test_convert_time_mapping_can_skip_a_module():
    model, ex = _small()
    mapping = fxquant.get_default_qconfig_mapping()
    prepared = fxquant.prepare_fx(copy.deepcopy(model), mapping, ex)
    prepared(*ex)
    convert_mapping = fxquant.get_default_qconfig_mapping().set_object_type(nn.Linear, None)
    ref = fxquant.convert_to_reference_fx(copy.deepcopy(prepared), qconfig_mapping=convert_mapping)
    assert type(ref.fc) is nn.Linear
    assert type(ref.conv[0]).__module__.startswith("fxquant.nn.quantized.reference")
    bad = fxquant.QConfigMapping().set_global(fxquant.default_qconfig)
    with pytest.raises(ValueError, match="global"):
        fxquant.convert_to_reference_fx(copy.deepcopy(prepared), qconfig_mapping=bad)


def test_remove_qconfig_flag():
    model, ex = _small()
    prepared = fxquant.prepare_fx(copy.deepcopy(model), fxquant.get_default_qconfig_mapping(), ex)
    prepared(*ex)
    kept = fxquant.convert_to_reference_fx(copy.deepcopy(prepared), _remove_qconfig=False)
    removed = fxquant.convert_to_reference_fx(copy.deepcopy(prepared))
    assert any(hasattr(m, "qconfig") for m in kept.modules())
    assert not any("qconfig" in m.__dict__ for m in removed.modules())


def test_scalar_add_shares_qparams_with_its_input():
    model, ex = _small()
    prepared = fxquant.prepare_fx(copy.deepcopy(model), fxquant.get_default_qconfig_mapping(), ex)
    mods = dict(prepared.named_modules(remove_duplicate=False))
    add = next(n for n in prepared.graph.nodes if n.op == "call_function" and n.target.__name__ == "add")
    obs_in, obs_out = add.args[0], next(iter(add.users))
    assert mods[obs_in.target] is mods[obs_out.target]


def test_quantized_model_output_of_a_dict_model():
    """output_quantized_indexes=[0] on a dict output: every quantized tensor in it is returned as integers, the
    shape stays an int (more in test_quantized_boundaries.py)."""
    model, ex = _small()
    cfg = fxquant.PrepareCustomConfig().set_output_quantized_indexes([0])
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(), ex, prepare_custom_config=cfg)
    prepared(*ex)
    out = fxquant.convert_fx(prepared)(*ex)
    assert list(fxquant.boundary_qparams(prepared).outputs) == ["logits", ("aux", 0)]
    assert out["logits"].dtype == out["aux"][0].dtype == torch.uint8 and out["aux"][1] == 2


class _Doubler(nn.Module):
    def forward(self, x):
        return x * 2


class _ObservedDoubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = 0

    @classmethod
    def from_float(cls, mod):
        assert mod.qconfig is not None
        return cls()

    def forward(self, x):
        self.seen += 1
        return x * 2


class _QuantizedDoubler(nn.Module):
    @classmethod
    def from_observed(cls, mod):
        out = cls()
        out.calls_seen_while_observing = mod.seen
        return out

    def forward(self, x):
        return x * 2


class _WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.custom = _Doubler()

    def forward(self, x):
        return self.custom(self.fc(x))


def test_custom_module_is_observed_and_swapped():
    model, ex = _WithCustom().eval(), (torch.randn(2, 4),)
    pcc = fxquant.PrepareCustomConfig().set_float_to_observed_mapping(_Doubler, _ObservedDoubler)
    prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping(), ex, prepare_custom_config=pcc)
    assert isinstance(prepared.custom, _ObservedDoubler)
    custom = next(n for n in prepared.graph.nodes if n.target == "custom")
    assert str(custom.args[0].target).startswith("activation_post_process")
    assert str(next(iter(custom.users)).target).startswith("activation_post_process")
    prepared(*ex)
    ccc = fxquant.ConvertCustomConfig().set_observed_to_quantized_mapping(_ObservedDoubler, _QuantizedDoubler)
    ref = fxquant.convert_to_reference_fx(prepared, convert_custom_config=ccc)
    assert isinstance(ref.custom, _QuantizedDoubler) and ref.custom.calls_seen_while_observing == 1
    torch.testing.assert_close(ref(*ex), model(*ex), atol=0.05, rtol=0.05)


def test_narrow_weight_range_is_respected_after_convert():
    torch.manual_seed(0)
    model, ex = nn.Sequential(nn.Linear(16, 8)).eval(), (torch.randn(4, 16),)
    four_bit = fxquant.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                          quant_min=-8, quant_max=7)
    qconfig = fxquant.QConfig(activation=fxquant.default_observer, weight=four_bit)
    prepared = fxquant.prepare_fx(model, fxquant.QConfigMapping().set_global(qconfig), ex)
    prepared(*ex)
    ref = fxquant.convert_to_reference_fx(prepared)
    q = ref.get_submodule("0").weight_int
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert int(q.max()) == 7 or int(q.min()) == -8  # the range is used, not a narrower one


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("half", ("model", "inputs"))
def test_half_precision_model_is_refused_with_the_fix(dtype, half):
    """A bf16 / fp16 model (Hugging Face checkpoints often load so) would fail deep in the reference model (torch.ao:
    'Quantize only works on Float Tensor'); prepare_fx names the first half-precision tensor and the fix."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    x = torch.randn(2, 8)
    if half == "model":
        model = model.to(dtype)
    else:
        x = x.to(dtype)
    expected = "parameter '0.weight'" if half == "model" else "example input '0'"
    with pytest.raises(TypeError, match=f"{expected} is {dtype}.*model.float()"):
        fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), (x,))
    with pytest.raises(TypeError, match="half-precision"):
        fxquant.prepare_qat_fx(model.train(), fxquant.get_default_qat_qconfig_mapping("x86"), (x,))
