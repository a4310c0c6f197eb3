"""Lowering rules one at a time, on small hand-written models: what each rule produces, and that it computes what
the reference model computes (within one step of each quantized output; exactly where the rule is exact)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
import oracle
from fxquant.kernels import uint8, x86
from fxquant.passes.lower_build import lowering_report
from fxquant.passes.verify import VerificationError


def _convert(model: nn.Module, *inputs: torch.Tensor, mapping=None):
    """(reference, lowered) fxquant models of ``model`` calibrated on ``inputs`` (x86 default mapping)."""
    mapping = mapping or fxquant.get_default_qconfig_mapping("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare_fx(copy.deepcopy(model).eval(), mapping, inputs)
        with torch.no_grad():
            for k in range(3):
                prepared(*[t * (1 + 0.1 * k) for t in inputs])
        ref = fxquant.convert_to_reference_fx(copy.deepcopy(prepared))
        low = fxquant.convert_fx(prepared)
    return ref, low


def _steps(ref: nn.Module, low: nn.Module, *inputs: torch.Tensor) -> float:
    scale = [float(m.scale) for m in low.modules() if isinstance(m, fxquant.nn.quantized.DeQuantize)][-1]
    with torch.no_grad():
        return float(((ref(*inputs) - low(*inputs)).abs() / scale).max()) - 1e-3  # (float32 division noise)


def _counts(low: nn.Module) -> dict[str, int]:
    return oracle.node_count_dict(low)


def _image(c: int = 4, size: int = 8, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, c, size, size, generator=torch.Generator().manual_seed(seed))


class ConvAddRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.conv1, self.conv2 = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
            nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.conv0(x))
        return F.relu(self.conv2(F.relu(self.conv1(y))) + y)


def test_conv_add_relu_keeps_the_conv_outputs_own_quantization():
    x = _image()
    ref, low = _convert(ConvAddRelu(), x)
    posts = sorted(m.post_op for m in low.modules() if isinstance(m, fxquant.nn.quantized.Conv2d))
    assert posts == ["none", "relu", "relu"]
    counts = _counts(low)
    assert counts.get("quantized.QuantizedBinary") == 1 and "add" not in counts and "relu" not in counts, counts
    # inside and well outside the calibration range (where the conv output is clamped to its observed range)
    assert _steps(ref, low, x) <= 1.0 and _steps(ref, low, x * 6) <= 1.0
    rows = {r.node: r for r in lowering_report(low)}
    assert rows["conv2"].lowered and rows["add"].lowered and rows["add"].rule != "weighted_add_relu", rows


def test_fusing_the_add_into_the_conv_is_opt_in_and_skips_the_clamp(monkeypatch):
    from fxquant.passes import lower_rules

    x = _image()
    monkeypatch.setattr(lower_rules, "FUSE_ADD_ACROSS_QUANTIZE", True)
    ref, low = _convert(ConvAddRelu(), x)
    posts = sorted(m.post_op for m in low.modules() if isinstance(m, fxquant.nn.quantized.Conv2d))
    assert posts == ["add_relu", "relu", "relu"]
    rows = {r.node: r for r in lowering_report(low)}
    assert rows["add"].rule == "weighted_add_relu" and rows["add"].lowered
    assert _steps(ref, low, x) <= 1.0  # in range: only the conv output's rounding is skipped
    assert _steps(ref, low, x * 6) > 1.0  # out of range: the skipped clamp shows (why it is off by default)


class ShapeOps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.pool(F.relu(self.conv(x)))
        a, b = y.chunk(2, dim=1)
        z = torch.cat([a, self.head(b)], dim=1)
        z = z.view(z.size(0), 2, 4, 4, 4).transpose(1, 2).contiguous().view(z.size(0), -1, 4, 4)
        return torch.flatten(F.interpolate(z, scale_factor=2.0), 1)


def test_shape_ops_pooling_chunk_and_cat_run_on_integers():
    x = _image()
    ref, low = _convert(ShapeOps(), x)
    counts = _counts(low)
    assert counts.get("quantized.DeQuantize") == 1 and counts.get("quantized.Quantize") == 1, counts
    seen: dict[str, torch.dtype] = {}
    with torch.no_grad():  # every value between the input quantize and the output dequantize is an integer tensor
        interp = torch.fx.Interpreter(low)
        orig = interp.run_node

        def run_node(node):
            out = orig(node)
            if isinstance(out, torch.Tensor):
                seen[node.name] = out.dtype
            return out
        interp.run_node = run_node
        interp.run(x)
    integer_nodes = [n for n in low.graph.nodes if n.op not in ("placeholder", "output") and n.name in seen
                     and "dequantize" not in n.name]
    assert integer_nodes and all(seen[n.name] == torch.uint8 for n in integer_nodes), seen
    assert _steps(ref, low, x) <= 1.0


class ConvHardswish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.act = nn.Hardswish()

    def forward(self, x):
        return self.act(self.conv(x))


def test_hardswish_after_a_conv_is_fused_into_it():
    x = _image()
    ref, low = _convert(ConvHardswish(), x)
    convs = [m for m in low.modules() if isinstance(m, fxquant.nn.quantized.Conv2d)]
    assert [c.post_op for c in convs] == ["hardswish"] and "quantized.LookupTable" not in _counts(low)
    assert _steps(ref, low, x) <= 1.0  # the fused activation skips the conv output's own rounding


class Elementwise(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x) * x + torch.tanh(x)


def test_activations_become_tables_and_binary_ops_integer_kernels():
    x = _image()
    ref, low = _convert(Elementwise(), x)
    counts = _counts(low)
    assert counts.get("quantized.LookupTable") == 2 and counts.get("quantized.QuantizedBinary") == 2, counts
    assert _steps(ref, low, x) <= 1.0


def test_lookup_table_equals_the_reference_ops_bit_for_bit():
    class Chain(nn.Module):
        def forward(self, x):
            return torch.tanh(F.hardsigmoid(x) * 3.0 - 1.0)

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3)) * 3
    mapping = fxquant.QConfigMapping().set_global(fxquant.default_qconfig)
    ref, low = _convert(Chain(), x, mapping=mapping)
    assert _counts(low).get("quantized.LookupTable", 0) >= 1
    with torch.no_grad():
        assert torch.equal(ref(x), low(x))


@pytest.mark.parametrize("padding,include,functional,divisor", [(0, True, False, None), (1, True, False, None),
                                                                (1, False, False, None), (1, True, True, None),
                                                                (1, True, False, 3)])
def test_average_pool_runs_on_integers(padding, include, functional, divisor):
    """Average pools of any padding run on the integers (padded with zeros that count: on ``q - zp``, inception's
    F.avg_pool2d(x, 3, 1, 1)); a divisor_override (weights no longer summing to one) stays in reference form."""
    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.pool = nn.AvgPool2d(3, 1, padding=padding, count_include_pad=include, divisor_override=divisor)

        def forward(self, x):
            y = self.conv(x)
            return F.avg_pool2d(y, 3, 1, padding) if functional else self.pool(y)

    x = _image()
    ref, low = _convert(Pool(), x)
    rows = {r.node: r for r in lowering_report(low) if "pool" in r.node}
    assert len(rows) == 1
    row = next(iter(rows.values()))
    assert row.lowered is (divisor is None), row
    assert _steps(ref, low, x) <= 1.0
    beyond = x * 3 + 1  # the zero point shift matters most where values are far from zero
    assert _steps(ref, low, beyond) <= 1.0


def test_float_ops_without_a_rule_stay_in_reference_form_and_are_reported():
    class Act(nn.Module):  # PReLU with one slope per channel: not one table, no rule
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(16, 16), nn.PReLU(16), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    ref, low = _convert(Act(), x)
    rows = {r.node: r for r in lowering_report(low)}
    assert not rows["act"].lowered and "no lowering rule" in rows["act"].reason
    assert rows["fc1"].lowered and rows["fc2"].lowered
    assert _steps(ref, low, x) <= 1.0


def test_functional_conv_with_keyword_arguments_lowers():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.2)
            self.b = nn.Parameter(torch.randn(8) * 0.1)

        def forward(self, x):
            return F.relu(F.conv2d(x, self.w, bias=self.b, stride=2, padding=1))

    x = _image()
    ref, low = _convert(Functional(), x)
    convs = [m for m in low.modules() if isinstance(m, fxquant.nn.quantized.Conv2d)]
    assert len(convs) == 1 and convs[0].stride == (2, 2) and convs[0].post_op == "relu"
    assert _steps(ref, low, x) <= 1.0


def test_verify_lowered_rejects_an_unrecorded_reference_module():
    x = _image()
    ref, _ = _convert(ConvAddRelu(), x)
    from fxquant.passes.lower import verify_lowered
    from fxquant.pipeline import Context

    ref._fxquant_lowering = []
    with pytest.raises(VerificationError, match="neither lowered nor recorded"):
        verify_lowered(ref, Context())


def test_kernel_plans_are_per_batch_size_and_match_the_generic_kernels():
    x = _image(batch=1)
    _, low = _convert(ConvAddRelu(), torch.cat([x, x * 0.5]))
    convs = [m for m in low.modules() if isinstance(m, fxquant.nn.quantized.Conv2d)]
    with torch.no_grad():
        small, big = low(x), low(torch.cat([x] * 16))
    assert {k for c in convs for k in c._kernel_cache if isinstance(k, tuple)} >= {(1, True), (16, True)}
    assert torch.equal(big[:1], small)  # each sample is computed alike whichever kernel the batch size picked


def test_small_convs_at_batch_one_pick_the_folded_float_kernel():
    small = x86.Facts(rows=1, macs=2**16, onednn_ok=True, input_7bit=True)
    assert x86.choose("conv", small) == "float"
    assert x86.choose("conv", x86.Facts(rows=16, macs=2**16, onednn_ok=True, input_7bit=True)) in ("onednn", "float")
    assert x86.choose("conv", x86.Facts(rows=1, macs=2**16, depthwise=True, onednn_ok=True, input_7bit=True)) != \
        "float" or not x86.onednn_available()
    assert x86.choose("conv", x86.Facts(rows=1, macs=2**16, binary=True, onednn_ok=True, input_7bit=True)) == \
        "float"  # a residual add is one more op in float, a slower onednn variant
    assert x86.choose("conv", x86.Facts(rows=1, macs=2**20, onednn_ok=True, input_7bit=True)) == \
        ("onednn" if x86.onednn_available() else "float")


def test_integer_kernels_round_like_the_reference():
    y = torch.tensor([0.5, 1.5, 2.5, -0.5, 254.5, 300.0])
    got = uint8.round_to(y.clone(), 1.0, uint8.offset(0.0), 0, 255, torch.uint8)
    assert got.tolist() == [0, 2, 2, 0, 254, 255]  # half to even, clamped
    a = torch.randint(0, 256, (64,), dtype=torch.uint8)
    b = torch.randint(0, 256, (64,), dtype=torch.uint8)
    qa, qb, qo = (0.02, 3), (0.05, 10), (0.07, 20)
    for op, fn in (("add", torch.add), ("mul", torch.mul)):
        consts = uint8.binary_consts(op, qa, qb, qo, torch.uint8)
        got = uint8.binary(op, a, b, consts, 0, 0, 255, torch.uint8)
        exact = fn((a.double() - qa[1]) * qa[0], (b.double() - qb[1]) * qb[0]) / qo[0] + qo[1]
        assert (got.double() - exact.round().clamp(0, 255)).abs().max() <= 1


def test_shape_read_from_a_quantized_value_does_not_dequantize_it():
    """``b, t, c = y.shape`` on a quantized value (transformers' attention code) reads the integer tensor's shape:
    no dequantize is computed only for it."""
    class Reshape(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            y = self.fc1(x)
            b, t, c = y.shape
            return self.fc2(y.view(b * t, c)).view(b, t, c)

    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    ref, low = _convert(Reshape(), x)
    rows = {r.node: r for r in lowering_report(low)}
    assert any(r.rule == "shape_attribute" for r in rows.values()), rows
    assert _counts(low).get("quantized.DeQuantize", 0) == 1  # the output's only
    assert _steps(ref, low, x) <= 1.0


def test_float32_upcast_of_a_dequantized_value_vanishes():
    """``y.to(torch.float32)`` / ``y.float()`` of a dequantized float32 value (an RMSNorm's upcast) is a no-op: the
    lowered graph keeps integers through it; a cast to another dtype stays."""
    class Upcast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            y = self.fc1(x).to(torch.float32)
            return self.fc2(torch.relu(y.float()))

    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    ref, low = _convert(Upcast(), x)
    rows = {r.node: r for r in lowering_report(low)}
    assert rows["to"].rule == rows["float_1"].rule == "drop_identity", rows
    assert not any(n.op == "call_method" and n.target in ("to", "float") for n in low.graph.nodes)
    assert _steps(ref, low, x) <= 1.0


class _ConvAddBlock(nn.Module):
    """The onednn backend fuses conv + add (+ relu) into ConvAdd2d / ConvAddReLU2d taking the added value."""

    def __init__(self, relu: bool) -> None:
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        z = self.bn(self.c2(y)) + y
        return torch.relu(z) if self.relu else z


@pytest.mark.parametrize("relu", (False, True))
@pytest.mark.parametrize("size", (8, 40))  # float and onednn kernels
def test_onednn_backend_conv_add_fusions_keep_their_added_input(relu, size):
    # found on torchvision's resnet18 with the onednn backend: ConvAddReLU2d was lowered as conv + relu without
    # its add (lowered local SQNR ~3 dB against 40 dB in reference form)
    from fxquant.tools.presets import backend_config_for, qconfig_mapping_for

    torch.manual_seed(0)
    model = _ConvAddBlock(relu).eval()
    model.bn.running_mean.uniform_(-0.3, 0.3)
    bc = backend_config_for("onednn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare_fx(model, qconfig_mapping_for("default", "onednn"), (torch.randn(1, 16, size, size),),
                                      backend_config=bc)
        with torch.no_grad():
            for seed in range(3):
                prepared(torch.randn(1, 16, size, size, generator=torch.Generator().manual_seed(seed)))
        reference = fxquant.convert_to_reference_fx(copy.deepcopy(prepared), backend_config=bc)
        lowered = fxquant.convert_fx(prepared, backend_config=bc)
    fused = [type(m).__name__ for m in reference.modules()]
    assert ("ConvAddReLU2d" if relu else "ConvAdd2d") in fused
    modules = dict(lowered.named_modules())
    posts = [getattr(modules[str(n.target)], "post_op", None) for n in lowered.graph.nodes if n.op == "call_module"]
    assert ("add_relu" if relu else "add") in posts
    x = torch.randn(2, 16, size, size, generator=torch.Generator().manual_seed(9)) * 1.5  # beyond calibration too
    out_node = [n for n in reference.graph.nodes if "quantize_per_tensor" in str(n.target)][-1]
    scale = float(getattr(reference, str(out_node.args[1].target)))
    with torch.no_grad():
        diff = (lowered(x) - reference(x)).abs() / scale
    # one step per quantized output: c1's may differ by one (float rounding at ties), which c2 can carry to two
    assert diff.max().item() <= 2.001 and (diff > 0.5).float().mean().item() < 0.01
