"""fxquant.tools.compare: per-layer SQNR of a quantized model against its float model, worst first."""
from __future__ import annotations

import base64
import copy
import math
import operator
import re

import pytest
import torch

import fxquant
from fxquant.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx
from fxquant.tools._capture import sqnr
from fxquant.tools.compare import CompareReport, compare
from models import MODELS

BAD_LAYER = "layer2.0.conv1"  # conv1 + bn1 + relu of the first block of stage 2 (fused, BN folded)
CONVERTS = pytest.mark.parametrize("convert", [convert_fx, convert_to_reference_fx], ids=["lowered", "reference"])


def _quantize(name: str, mapping=None, convert=convert_fx):
    spec = MODELS[name]
    model, example_inputs = spec.factory()
    recipe = spec.recipe()
    pcc = recipe.prepare_custom_config(fxquant, model, example_inputs)
    prepared = prepare_fx(model, mapping or recipe.build(fxquant), example_inputs, prepare_custom_config=pcc,
                          backend_config=recipe.get_backend_config(fxquant))
    for batch in spec.calibration_data(3):
        prepared(*batch)
    return model, convert(prepared), example_inputs


@pytest.fixture(scope="module")
def resnet():
    """The reference model (quantize -> dequantize around float ops): node names and modules as prepared."""
    model, quantized, example_inputs = _quantize("resnet18", convert=convert_to_reference_fx)
    return model, quantized, example_inputs, compare(model, quantized, example_inputs)


@pytest.fixture(scope="module")
def resnet_lowered():
    """The lowered model (int8 kernels: conv (+ relu), and add + relu as one integer kernel)."""
    model, quantized, example_inputs = _quantize("resnet18")
    return model, quantized, example_inputs, compare(model, quantized, example_inputs)


def _two_bit_mapping():
    bad = fxquant.QConfig(activation=fxquant.MinMaxObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=3),
                          weight=fxquant.default_per_channel_weight_observer)
    return fxquant.get_default_qconfig_mapping("x86").set_module_name(BAD_LAYER, bad)


def test_rows_are_sorted_worst_first_and_cover_the_quantized_layers(resnet, resnet_lowered):
    for model, quantized, _, report in (resnet, resnet_lowered):
        keys = [r.sort_key for r in report]
        assert keys == sorted(keys)
    names = {r.node for r in resnet[3]}
    explained = {r.node for r in fxquant.explain(resnet[1]) if r.quantized}
    assert explained <= names
    assert {"conv1", "fc", "layer1_0_conv2", "add"} <= names
    weighted = {n for n, m in resnet[0].named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)}
    adds = {n.name for n in resnet[1].graph.nodes if n.op == "call_function" and n.target in (operator.add,
                                                                                               operator.iadd)}
    lowered = {r.node for r in resnet_lowered[3]}
    assert len(adds) == 8 and not adds & {n.replace(".", "_") for n in weighted}
    # every conv / linear kernel by its first op, each residual add + relu kernel (each its own add), and the
    # global average pool (a float mean of the integers + Requantize)
    assert {n.replace(".", "_") for n in weighted} | adds | {"avgpool"} == lowered


def test_lowered_fused_kernel_is_compared_after_its_last_op(resnet_lowered):
    row = resnet_lowered[3].row("add_1")  # add + relu of layer1[1] in one kernel
    assert "layer1_1_relu_1" in row.note and row.act_sqnr > 25.0 and row.local_sqnr > 25.0


@CONVERTS
def test_two_bit_activation_layer_comes_first(convert):
    model, quantized, example_inputs = _quantize("resnet18", _two_bit_mapping(), convert=convert)
    report = compare(model, quantized, example_inputs)
    worst = report.rows[0]
    assert worst.node == BAD_LAYER.replace(".", "_")
    assert worst.local_sqnr < 15.0 and worst.weight_sqnr > 35.0  # its weights are fine, its output is not
    others = [r.local_sqnr for r in report.rows[1:] if r.local_sqnr is not None]
    assert min(others) > worst.local_sqnr + 10.0


def _lowered_module(quantized, first_op: str):
    for node in quantized.graph.nodes:
        if node.op == "call_module" and re.sub(r"_\d+$", "", node.name) == first_op:
            return quantized.get_submodule(str(node.target))
    raise AssertionError(f"no lowered module for {first_op}")


@pytest.mark.parametrize("which", ["resnet", "resnet_lowered"])
def test_corrupted_weight_comes_first_with_low_weight_sqnr(which, request):
    model, quantized, example_inputs, _ = request.getfixturevalue(which)
    quantized = copy.deepcopy(quantized)
    target = quantized.get_submodule("layer3.1.conv2") if which == "resnet" else \
        _lowered_module(quantized, "layer3_1_conv2")
    with torch.no_grad():
        w = target.weight_int
        w.copy_(torch.flip(w, dims=[0]))  # output channels swapped: a plausible packing bug
    report = compare(model, quantized, example_inputs)
    assert report.rows[0].node == "layer3_1_conv2"
    assert report.rows[0].weight_sqnr < 5.0
    assert all(r.weight_sqnr > 35.0 for r in report.rows[1:] if r.weight_sqnr is not None)


def test_lowered_end_to_end_number_matches_direct_computation(resnet_lowered):
    model, quantized, example_inputs, report = resnet_lowered
    with torch.no_grad():
        end_to_end = sqnr(model(*example_inputs), quantized(*example_inputs))
    assert report.row("fc").act_sqnr == pytest.approx(end_to_end, abs=0.05)
    fc = _lowered_module(quantized, "fc")
    assert report.row("fc").weight_sqnr == sqnr(model.fc.weight.detach(), fc.float_weight())


def test_numbers_match_direct_computation(resnet):
    model, quantized, example_inputs, report = resnet
    with torch.no_grad():
        end_to_end = sqnr(model(*example_inputs), quantized(*example_inputs))
    # the last layer's accumulated SQNR is the whole model's (float side BN-folded: agrees to ~0.01 dB)
    assert report.row("fc").act_sqnr == pytest.approx(end_to_end, abs=0.05)
    assert report.row("fc").weight_sqnr == sqnr(model.fc.weight.detach(), quantized.fc.get_weight().detach())

    # local: fc alone on the float model's input, through fc's own output quantize -> dequantize
    captured = {}
    handle = model.fc.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].clone()))
    with torch.no_grad():
        model(*example_inputs)
        handle.remove()
        fc_node = next(n for n in quantized.graph.nodes if n.name == "fc")
        quant = next(iter(fc_node.users))
        dequant = next(iter(quant.users))
        y = quantized.fc(captured["x"])
        q = quant.target(y, *[getattr(quantized, a.target) if isinstance(a, torch.fx.Node) else a
                              for a in quant.args[1:]])
        y_dq = dequant.target(q, *[getattr(quantized, a.target) if isinstance(a, torch.fx.Node) else a
                                   for a in dequant.args[1:]])
        expected = sqnr(model.fc(captured["x"]), y_dq)
    # (compare's float side is the BN-folded model, equal to the original up to float rounding)
    assert report.row("fc").local_sqnr == pytest.approx(expected, abs=1e-3)


def test_fused_conv_bn_weights_are_compared_after_folding(resnet):
    _, _, _, report = resnet
    row = report.row("layer1_0_conv2")  # conv + bn folded at prepare: float side folded the same way
    assert row.quantized and 35.0 < row.weight_sqnr < 60.0


@CONVERTS
def test_layer_left_in_float_says_why_and_adds_no_error(convert):
    mapping = fxquant.get_default_qconfig_mapping("x86").set_module_name("fc", None)
    model, quantized, example_inputs = _quantize("resnet18", mapping, convert=convert)
    row = compare(model, quantized, example_inputs).row("fc")
    assert not row.quantized and row.reason
    assert row.weight_sqnr is None and row.local_sqnr == math.inf


@CONVERTS
@pytest.mark.parametrize("name", ["functional", "bert_encoder", "lstm_classifier", "standalone"])
def test_other_architectures(name, convert):
    model, quantized, example_inputs = _quantize(name, convert=convert)
    report = compare(model, quantized, example_inputs)
    quantized_rows = [r for r in report if r.quantized]
    assert quantized_rows
    assert all(r.act_sqnr is not None for r in quantized_rows)
    with_weights = [r for r in quantized_rows if r.weight_sqnr is not None]
    assert with_weights and all(20.0 < r.weight_sqnr < 80.0 for r in with_weights)


def test_float_by_design_weights_have_no_weight_sqnr():
    spec = MODELS["bert_encoder"]
    mapping = spec.recipe("static_x86").build(fxquant)
    model, quantized, example_inputs = _quantize("bert_encoder", mapping, convert=convert_to_reference_fx)
    report = compare(model, quantized, example_inputs)
    norm = report.row("emb_norm")  # LayerNorm: quantized activations, float weights (as in torch.ao)
    assert norm.weight_sqnr is None and not norm.note
    assert report.row("classifier").weight_sqnr is not None


def test_layer_convert_forgot_to_quantize_is_flagged(resnet):
    model, quantized, example_inputs, _ = resnet
    quantized = copy.deepcopy(quantized)
    quantized.fc = copy.deepcopy(model.fc)  # as if convert had left the float module in place
    row = compare(model, quantized, example_inputs).row("fc")
    assert row.weight_sqnr == math.inf and "did not quantize" in row.note


def test_reference_model_compares_too():
    model, quantized, example_inputs = _quantize("functional", convert=convert_to_reference_fx)
    report = compare(model, quantized, example_inputs)
    assert report.row("linear").weight_sqnr is not None and report.row("conv2d").weight_sqnr is not None


def test_float_model_is_not_changed(resnet):
    model, quantized, example_inputs, _ = resnet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compare(model, quantized, example_inputs)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_text_table(resnet):
    report = resnet[3]
    text = report.table()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["node", "op", "quantized"]
    assert lines[1].split()[0] == report.rows[0].node
    assert len(lines) == len(report) + 2
    assert str(report) == text
    assert len(report.table(limit=3).splitlines()) == 5


def test_html_report_embeds_chart_and_table(resnet, tmp_path):
    report: CompareReport = resnet[3]
    path = report.to_html(str(tmp_path / "sub" / "report.html"))
    page = open(path, encoding="utf-8").read()
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match and base64.b64decode(match.group(1)).startswith(b"\x89PNG")
    assert all(f"<td>{r.node}</td>" in page for r in report.rows)
    assert page.index(report.rows[0].node) < page.index(report.rows[-1].node)


def test_bad_arguments(resnet):
    model, quantized, example_inputs, _ = resnet
    with pytest.raises(ValueError, match="convert_fx"):
        compare(model, model, example_inputs)
    with pytest.raises(TypeError, match="tuple"):
        compare(model, quantized, [example_inputs[0]])
    prepared = prepare_fx(copy.deepcopy(model), fxquant.get_default_qconfig_mapping("x86"), example_inputs)
    with pytest.raises(ValueError, match="still has observers"):
        compare(model, prepared, example_inputs)
    with pytest.raises(KeyError, match="no row"):
        resnet[3].row("nope")


def test_html_without_matplotlib_still_has_the_table(resnet, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    page = open(resnet[3].to_html(str(tmp_path / "r.html")), encoding="utf-8").read()
    assert "matplotlib is not installed" in page and "<table>" in page and "base64" not in page


def test_lowered_model_without_its_lowering_record_matches_the_same_layers(resnet_lowered):
    model, quantized, example_inputs, report = resnet_lowered
    bare = copy.deepcopy(quantized)
    if hasattr(bare, "_fxquant_lowering"):
        delattr(bare, "_fxquant_lowering")  # deepcopy of a GraphModule may drop plain attributes
    again = compare(model, bare, example_inputs)
    assert [(r.node, r.act_sqnr) for r in again] == [(r.node, r.act_sqnr) for r in report]


class _SqueezeExcite(torch.nn.Module):
    """EfficientNet's block: conv-bn-SiLU, a squeeze-excite gate (pool, 1x1 conv + SiLU, 1x1 conv, sigmoid, mul),
    then pooling and a classifier (torchvision's layout, written out)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.SiLU())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act, self.fc2 = torch.nn.Conv2d(16, 4, 1), torch.nn.SiLU(), torch.nn.Conv2d(4, 16, 1)
        self.gate = torch.nn.Sigmoid()
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.2),
                                        torch.nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y * self.gate(self.fc2(self.act(self.fc1(self.pool(y)))))
        return self.head(y)


def test_lowered_rows_measure_the_same_local_error_as_the_reference():
    """Folded activations (conv + SiLU), the float mean before a Requantize and requantizing tables are shadow-run
    on the right float values: each layer's local SQNR in the lowered model is close to its reference form's
    (before, a conv after a folded SiLU was fed the pre-activation values: 3.7 dB instead of 39)."""
    torch.manual_seed(0)
    model = _SqueezeExcite().eval()
    with torch.no_grad():
        model.stem[1].running_mean.uniform_(-0.5, 0.5)
        model.stem[1].running_var.uniform_(0.5, 2.0)
    example = (torch.randn(4, 3, 16, 16),)
    prepared = prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), example)
    for seed in range(3):
        prepared(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))
    reference, lowered = convert_to_reference_fx(copy.deepcopy(prepared)), convert_fx(copy.deepcopy(prepared))
    silu = [r for r in fxquant.lowering_report(lowered) if r.op == "SiLU"]
    assert len(silu) == 2 and all(r.kernel == "Conv2d" for r in silu), silu  # folded into the convs that run them
    ref_rows = {r.node: r for r in compare(model, reference, example)}
    low_rows = {r.node: r for r in compare(model, lowered, example)}
    shared = [n for n in low_rows if n in ref_rows and ref_rows[n].local_sqnr not in (None, math.inf)]
    assert len(shared) >= 5, sorted(low_rows)
    for name in shared:
        ref, low = ref_rows[name].local_sqnr, low_rows[name].local_sqnr
        assert low is not None and low > min(ref - 6.0, 25.0), (name, ref, low)


def test_sqnr_leaves_out_positions_where_the_float_value_is_not_finite():
    """An attention mask of -inf (or finfo.min, whose dequantized value may overflow to -inf) is no error, and it must
    not make the mask the worst row of a report. A NaN / inf where the float value is an ordinary number still is."""
    ref = torch.tensor([0.0, 1.0, float("-inf"), 2.0])
    assert sqnr(ref, torch.tensor([0.0, 1.0, -3.4e38, 2.0])) == float("inf")
    assert sqnr(ref, torch.tensor([0.0, 1.1, -1.0, 2.0])) == pytest.approx(10 * math.log10(5.0 / 0.01), rel=1e-4)
    assert sqnr(ref, torch.tensor([0.0, float("nan"), -3.4e38, 2.0])) == float("-inf")
    fmin = torch.finfo(torch.float32).min  # a finfo.min mask whose dequantized value overflowed to -inf
    assert sqnr(torch.tensor([0.0, fmin, 1.0]), torch.tensor([0.0, float("-inf"), 1.0])) == float("inf")
    assert sqnr(torch.tensor([0.0, -1.0, 1.0]), torch.tensor([0.0, float("-inf"), 1.0])) < -300.0
