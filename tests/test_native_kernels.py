"""Native kernels (fxquant.kernels.native): FBGEMM's int8 convolution and the one-pass add / gate product on plain
uint8 tensors, against float references; their place in the kernel rules, the exact fallback for input beyond 7
bits, and the switch-off paths (FXQUANT_NATIVE=0, no library) that leave the onednn / aten kernels."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.kernels import native, uint8, x86
from fxquant.nn import quantized as Q
from fxquant.nn.quantized import conv as qconv

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_case(dims: int, batch: int, cin: int, cout: int, size: int, k: int, stride: int, groups: int,
               relu: bool, per_channel: bool, low: int, high: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-127, 128, (cout, cin // groups) + (k,) * dims, generator=g).to(torch.int8)
    ws = torch.rand(cout if per_channel else 1, generator=g) * 0.01 + 0.002
    b = torch.randn(cout, generator=g)
    x = torch.randint(0, 128, (batch, cin) + (size,) * dims, generator=g).to(torch.uint8)
    xs, xz = 0.04, 5
    wf = w.float() * ws.reshape(-1, *([1] * (dims + 1)))
    yf = _CONV[dims]((x.float() - xz) * xs, wf, b, stride, k // 2, 1, groups)
    yf = yf.relu() if relu else yf
    ys, yz = float(yf.abs().max()) / 90, 40
    ref = torch.clamp(torch.round(yf / ys) + yz, max(low, yz) if relu else low, high)
    plan = native.ConvPlan(w, ws, b, [stride] * dims, [k // 2] * dims, [1] * dims, groups, (xs, xz), (ys, yz),
                           relu, low, high)
    return plan, x, ref


@needs_native
@pytest.mark.parametrize("dims,batch,cin,cout,size,k,stride,groups", [
    (2, 1, 16, 24, 9, 3, 2, 1), (2, 3, 32, 32, 7, 3, 1, 32), (2, 2, 64, 32, 5, 1, 1, 1), (2, 1, 16, 16, 6, 3, 1, 8),
    (2, 1, 576, 144, 1, 1, 1, 1), (1, 2, 8, 16, 20, 3, 1, 1), (3, 1, 8, 8, 6, 3, 1, 8), (3, 2, 4, 8, 5, 3, 2, 1)])
@pytest.mark.parametrize("relu,per_channel,low,high", [(False, True, 0, 255), (True, True, 0, 127),
                                                        (True, False, 50, 200), (False, False, 0, 127)])
def test_conv_plan_matches_the_float_convolution(dims, batch, cin, cout, size, k, stride, groups, relu,
                                                 per_channel, low, high):
    plan, x, ref = _conv_case(dims, batch, cin, cout, size, k, stride, groups, relu, per_channel, low, high)
    y = plan(x)
    assert y is not None and y.shape == ref.shape and y.dtype == torch.uint8
    assert (y.float() - ref).abs().max().item() <= 1  # float32 rounding of the requantization
    assert (y.float() != ref).float().mean().item() < 0.01


@needs_native
def test_conv_plan_runs_on_several_threads_with_the_same_result():
    plan, x, _ = _conv_case(2, 4, 32, 64, 14, 3, 1, 1, True, True, 0, 255)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = plan(x)
        torch.set_num_threads(2)
        two = plan(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_native
def test_conv_plan_refuses_input_that_could_saturate_only_when_asked():
    w = torch.randint(-127, 128, (8, 4, 3, 3), dtype=torch.int8)
    w[0, 0, 0, :2] = 127  # two full-scale weights of one sign in one channel: 32767 // 254 = 129
    args = (w, torch.full((8,), 0.01), None, [1, 1], [1, 1], [1, 1], 1, (0.05, 3), (0.1, 10), False, 0, 255)
    x = torch.randint(0, 128, (1, 4, 6, 6), dtype=torch.uint8)
    checked, unchecked = native.ConvPlan(*args, check_7bit=True), native.ConvPlan(*args, check_7bit=False)
    assert checked.input_limit == 129 and unchecked.input_limit == 255
    assert checked(x) is not None
    x[0, 2, 3, 3] = 129
    assert checked(x) is not None
    x[0, 2, 3, 3] = 200
    assert checked(x) is None
    assert unchecked(x) is not None
    # the zero point pads the image: one above the limit refuses every input
    padded = native.ConvPlan(*args[:7], (0.05, 200), *args[8:], check_7bit=True)
    assert padded(x // 2) is None


@needs_native
def test_input_limit_follows_the_largest_same_signed_weight_pair():
    w = torch.zeros(4, 6, 1, 1, dtype=torch.int8)
    w[0, :3, 0, 0] = torch.tensor([127, -127, 60])  # pairs: 127 + 60 (positive), 127 (negative alone)
    w[1, :2, 0, 0] = torch.tensor([-90, -40])  # 130
    plan = native.ConvPlan(w, torch.full((4,), 0.01), None, [1, 1], [0, 0], [1, 1], 1, (0.05, 0), (0.07, 0), False,
                           0, 255)
    assert plan.input_limit == 32767 // 187
    # at the limit the FBGEMM result equals the float reference (no saturation)
    x = torch.full((1, 6, 3, 3), plan.input_limit, dtype=torch.uint8)
    ref = torch.clamp(torch.round(F.conv2d(x.float() * 0.05, w.float() * 0.01) / 0.07), 0, 255)
    assert torch.equal(plan(x).float(), ref)


@needs_native
def test_conv_plan_applies_an_activation_table_after_rounding():
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-127, 128, (16, 16, 3, 3), generator=g).to(torch.int8)
    x = torch.randint(0, 128, (2, 16, 6, 6), generator=g).to(torch.uint8)
    table = torch.randint(0, 256, (256,), generator=g).to(torch.uint8)
    args = (w, torch.full((16,), 0.003), torch.randn(16, generator=g), [1, 1], [1, 1], [1, 1], 1, (0.04, 5),
            (0.2, 100), False, 20, 230)
    plain, with_table = native.ConvPlan(*args), native.ConvPlan(*args, table=table)
    rounded = plain(x)
    assert rounded.min() >= 20 and rounded.max() <= 230  # the range applies before the table
    assert torch.equal(with_table(x), table[rounded.long()])
    with pytest.raises(ValueError, match="256 uint8"):
        native.ConvPlan(*args, table=torch.zeros(10, dtype=torch.uint8))


@needs_native
def test_conv_plan_cannot_be_pickled_or_copied():
    plan, _, _ = _conv_case(2, 1, 8, 8, 4, 3, 1, 1, False, True, 0, 255)
    with pytest.raises(TypeError, match="rebuild it"):
        pickle.dumps(plan)
    with pytest.raises(TypeError, match="rebuild it"):
        copy.deepcopy(plan)


@needs_native
@pytest.mark.parametrize("layout", (torch.contiguous_format, torch.channels_last))
def test_add_matches_the_reference_like_the_aten_kernel(layout):
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randint(0, 256, (2, 16, 7, 9), generator=g).to(torch.uint8).contiguous(memory_format=layout)
            for _ in range(2))
    (sa, za), (sb, zb), (so, zo) = qa, qb, qo = (0.03, 100), (0.05, 20), (0.06, 64)
    consts = uint8.binary_consts("add", qa, qb, qo, torch.uint8)
    exact = ((a.double() - za) * sa + (b.double() - zb) * sb) / so + zo
    for relu_min in (0, 64):
        ref = torch.clamp(torch.round(exact), relu_min, 255)
        aten = uint8.binary("add", a, b, consts, relu_min, 0, 255, torch.uint8)
        ka, kb, c = consts
        got = native.add(a, b, ka, kb, float(c), relu_min, 255)
        assert got.is_contiguous(memory_format=layout)
        assert (got.double() - ref).abs().max().item() <= 1  # (float32 rounding: ties land either way)
        # as often off the exact value as the aten kernel (both round ties of float32 sums)
        assert (got.double() != ref).double().mean() <= 2 * (aten.double() != ref).double().mean() + 0.01


@needs_native
@pytest.mark.parametrize("layout", (torch.contiguous_format, torch.channels_last))
def test_gate_product_matches_the_reference(layout):
    g = torch.Generator().manual_seed(3)
    big = torch.randint(0, 256, (2, 24, 5, 6), generator=g).to(torch.uint8).contiguous(memory_format=layout)
    gate = torch.randint(0, 256, (2, 24, 1, 1), generator=g).to(torch.uint8)
    (sb, zb), (sg, zg), (so, zo) = (0.02, 7), (0.004, 0), (0.01, 3)
    ref = torch.clamp(torch.round((big.float() - zb) * sb * (gate.float() - zg) * sg / so) + zo, 0, 255)
    got = native.mul_gate(big, gate, sb * sg / so, zb, zg, float(zo), 0, 255)
    assert got.is_contiguous(memory_format=layout)
    assert (got.float() - ref).abs().max().item() <= 1


class _SmallNet(nn.Module):
    """Small convs (the native kernel's range at batch 1), a residual add and a squeeze-excite gate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU())
        self.pw = nn.Conv2d(16, 16, 1)
        self.fc1, self.fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.pw(self.dw(y))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return y * s


def _lowered(model: nn.Module, shape: tuple) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    data = [torch.randn(*shape) for _ in range(3)]
    prepared = fxquant.prepare_fx(model.eval(), fxquant.get_default_qconfig_mapping("x86"), (data[0],))
    with torch.no_grad():
        for d in data:
            prepared(d)
    return fxquant.convert_to_reference_fx(copy.deepcopy(prepared)), fxquant.convert_fx(prepared)


def _plans(lowered: nn.Module) -> list[str]:
    return sorted({run.__qualname__.split(".")[0] for m in lowered.modules() if isinstance(m, qconv._QuantizedConvNd)
                   for key, run in m._kernel_cache.items() if isinstance(key, tuple)})


@needs_native
def test_lowered_model_runs_its_small_convs_natively_within_one_step():
    reference, lowered = _lowered(_SmallNet(), (1, 3, 16, 16))
    step = float([m.scale for m in lowered.modules() if isinstance(m, Q.DeQuantize)][-1])
    for x in (torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16) * 3 + 0.5):  # (beyond the calibration range)
        with torch.no_grad():
            got, expected = lowered(x), reference(x)
        assert (got - expected).abs().max().item() <= step * 1.001
    assert "_fbgemm_plan" in _plans(lowered)
    # the lowered model still copies, saves and loads (the packed weights are dropped and rebuilt)
    again = copy.deepcopy(lowered)
    buffer = io.BytesIO()
    torch.save(lowered, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(x), got) and torch.equal(loaded(x), got)


class _HardswishNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.d = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.p = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.p(F.hardswish(self.d(F.hardswish(self.c(x)))))


@needs_native
def test_conv_with_a_folded_hardswish_rounds_its_own_output_like_the_reference():
    """onednn applies the folded activation before its one rounding (a step off the reference); the native
    kernel rounds at the conv's own qparams, then applies the activation's table: the reference's integers, in
    and beyond the calibration range (there through the exact float fallback)."""
    reference, lowered = _lowered(_HardswishNet(), (1, 3, 16, 16))
    convs = [m for m in lowered.modules() if isinstance(m, Q.Conv2d)]
    assert [m.post_op for m in convs] == ["hardswish", "hardswish", "none"]
    assert all(m.activation_table is not None for m in convs[:2])
    step = float([m.scale for m in lowered.modules() if isinstance(m, Q.DeQuantize)][-1])
    for x in (torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16) * 3 + 0.5):
        with torch.no_grad():
            assert (lowered(x) - reference(x)).abs().max().item() <= step * 1e-3
    assert _plans(lowered) == ["_fbgemm_plan"]
    # the table and the conv's own qparams are state: saved, loaded with weights_only, kept by a fresh module
    state = lowered.state_dict()
    assert {"c.activation_table", "c.pre_activation_scale", "d.pre_activation_zero_point"} <= set(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    again = copy.deepcopy(lowered)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        assert torch.equal(again(x), lowered(x))
    bare = Q.Conv2d({})
    bare.load_state_dict({k.removeprefix("c."): v for k, v in state.items() if k.startswith("c.")})
    assert bare.pre_activation_range == convs[0].pre_activation_range


def test_without_the_native_library_the_rules_choose_onednn_or_float(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    facts = x86.Facts(rows=1, onednn_ok=True, input_7bit=True, native_ok=True, outputs=1000, macs=10**6)
    assert x86.choose("conv", facts) == "onednn"
    assert x86.choose("add", x86.Facts(native_ok=True, macs=10)) == "aten"
    reference, lowered = _lowered(_SmallNet(), (1, 3, 16, 16))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        got, expected = lowered(x), reference(x)
    step = float([m.scale for m in lowered.modules() if isinstance(m, Q.DeQuantize)][-1])
    assert (got - expected).abs().max().item() <= step * 1.001
    assert "_fbgemm_plan" not in _plans(lowered)


@needs_native
def test_native_rule_needs_small_outputs_and_a_fitting_module():
    base = dict(rows=1, onednn_ok=True, input_7bit=True, native_ok=True, macs=10**6)
    assert x86.choose("conv", x86.Facts(**base, outputs=2**16)) == "fbgemm"
    assert x86.choose("conv", x86.Facts(**base, outputs=2**20)) != "fbgemm"  # large maps: onednn measured faster
    # ... unless each output sums >= 1024 products (3x3 from 128 channels: FBGEMM measured 1.02-1.18x onednn)
    big = {**base, "outputs": 256 * 56 * 56, "positions": 56 * 56}
    assert x86.choose("conv", x86.Facts(**{**big, "macs": 256 * 56 * 56 * 2304})) == "fbgemm"
    assert x86.choose("conv", x86.Facts(**{**big, "macs": 256 * 56 * 56 * 576})) != "fbgemm"  # 64 channels
    assert x86.choose("conv", x86.Facts(**{**big, "macs": 256 * 56 * 56 * 2304, "pointwise": True})) != "fbgemm"
    assert x86.choose("conv", x86.Facts(**{**base, "native_ok": False}, outputs=2**16)) != "fbgemm"
    assert x86.choose("conv", x86.Facts(**{**base, "input_7bit": False}, outputs=2**16)) != "fbgemm" or \
        x86.cpu_has_vnni()


def test_switched_off_by_the_environment(monkeypatch):
    saved = dict(native._state)
    monkeypatch.setenv("FXQUANT_NATIVE", "0")
    try:
        assert "FXQUANT_NATIVE=0" in native.build()
        assert not native.available()
        with pytest.raises(RuntimeError, match="unavailable"):
            native.ConvPlan(torch.ones(1, 1, 1, 1, dtype=torch.int8), torch.ones(1), None, [1, 1], [0, 0], [1, 1],
                            1, (1.0, 0), (1.0, 0), False, 0, 255)
    finally:
        native._state.clear()
        native._state.update(saved)


def test_a_failed_build_reports_the_compiler_message(monkeypatch, tmp_path):
    saved = dict(native._state)
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    monkeypatch.setenv("FXQUANT_NATIVE_DIR", str(tmp_path / "cache"))
    try:
        reason = native.build()
        assert not native.available()
        assert "failed" in reason or "compiler" in reason or "x86-64" in reason, reason
        if "failed" in reason:  # the failure is cached: the next process does not compile again
            assert native.library_path().with_suffix(".failed").exists()
            assert "cached" in native.build()
            assert "cached" not in native.build(force=True)  # --rebuild compiles again
    finally:
        native._state.clear()
        native._state.update(saved)


@needs_native
@pytest.mark.parametrize("rows,k,n", [(1, 64, 32), (7, 96, 40), (130, 48, 200)])
@pytest.mark.parametrize("relu,per_channel", [(False, True), (True, False)])
def test_dynamic_linear_plan_matches_the_fake_quantized_reference(rows, k, n, relu, per_channel):
    from fxquant.kernels import dynamic
    g = torch.Generator().manual_seed(rows + k)
    w = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
    ws = torch.rand(n if per_channel else 1, generator=g) * 0.01 + 0.001
    b = torch.randn(n, generator=g)
    x = torch.randn(rows, k, generator=g) * 3
    lo, hi = torch.aminmax(x)
    scale, zp = dynamic.affine_qparams(float(lo), float(hi), 0, 127)
    ref = F.linear(torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 127), w.float() * ws.reshape(-1, 1), b)
    ref = ref.relu() if relu else ref
    got = native.DynamicLinearPlan(w, ws, b, relu)(x, scale, zp)
    # exact int32 products, one float scaling: float32 rounding of the reference's float GEMM apart
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max()))
    with pytest.raises(TypeError, match="rebuild it"):
        pickle.dumps(native.DynamicLinearPlan(w, ws, None, False))


@needs_native
def test_lowered_dynamic_linear_runs_fbgemm_within_the_reference_tolerance():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    mapping = fxquant.QConfigMapping().set_global(fxquant.default_dynamic_qconfig)
    x = torch.randn(5, 64)
    prepared = fxquant.prepare_fx(model, mapping, (x,))
    reference = fxquant.convert_to_reference_fx(copy.deepcopy(prepared))
    lowered = fxquant.convert_fx(prepared)
    with torch.no_grad():
        got, expected = lowered(x), reference(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    linears = [m for m in lowered.modules() if isinstance(m, Q.LinearDynamic)]
    assert linears and all("fbgemm_dynamic" in m._kernel_cache for m in linears)
    again = copy.deepcopy(lowered)  # the packed weights are dropped and rebuilt
    with torch.no_grad():
        assert torch.equal(again(x), got)


def test_command_line_reports_the_native_kernels(capsys, monkeypatch):
    from fxquant import cli
    saved = dict(native._state)
    try:
        status = cli.main(["native"])
        out = capsys.readouterr().out
        if native.available():
            assert status == 0 and "available" in out and str(native.library_path()) in out
        else:
            assert status == 1 and native.status() in out
        monkeypatch.setenv("FXQUANT_NATIVE", "0")
        assert cli.main(["native"]) == 1
        assert "FXQUANT_NATIVE=0" in capsys.readouterr().out
    finally:
        native._state.clear()
        native._state.update(saved)


class _PooledGate(nn.Module):
    """A squeeze-excite block as torchvision writes it: a global average pool, two 1x1 convs, the gate product."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.pool, self.fc1, self.fc2 = nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.out = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = self.stem(x)
        return self.out(y * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(y))))))


def test_global_average_pool_lowers_to_one_requantize_of_the_integer_image(monkeypatch):
    reference, lowered = _lowered(_PooledGate(), (2, 3, 12, 12))
    assert not [n for n in lowered.graph.nodes if n.target is torch.mean]
    (pooled,) = [m for m in lowered.modules() if isinstance(m, Q.Requantize)]
    assert pooled.global_mean
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    step = float([m.scale for m in lowered.modules() if isinstance(m, Q.DeQuantize)][-1])
    with torch.no_grad():
        got, expected = lowered(x), reference(x)
        assert (got - expected).abs().max().item() <= step * 1.001
        # the module alone: native pass and aten's mean + requantize agree
        image = torch.randint(0, 256, (2, 16, 7, 9), dtype=torch.uint8)
        for layout in (torch.contiguous_format, torch.channels_last):
            q = image.contiguous(memory_format=layout)
            fresh = copy.deepcopy(pooled)
            monkeypatch.setattr(native, "available", lambda: False)
            slow = fresh(q)
            monkeypatch.undo()
            fast = copy.deepcopy(pooled)(q)
            assert fast.shape == slow.shape == (2, 16, 1, 1)
            assert (fast.int() - slow.int()).abs().max().item() <= 1
    # persistence: the flag is extra state; torch.export traces the aten form
    bare = Q.Requantize(1.0, 0, 1.0, 0)
    bare.load_state_dict(pooled.state_dict())
    assert bare.global_mean
    exported = torch.export.export(lowered, (x,))
    with torch.no_grad():
        assert (exported.module()(x) - got).abs().max().item() <= step * 1.001


def test_a_convolution_fbgemm_cannot_pack_takes_the_fallback_on_every_call(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("FBGEMM could not pack this convolution")
    monkeypatch.setattr(native, "ConvPlan", refuse)
    reference, lowered = _lowered(_HardswishNet(), (1, 3, 16, 16))
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    step = float([m.scale for m in lowered.modules() if isinstance(m, Q.DeQuantize)][-1])
    with torch.no_grad():
        # the folded hardswish keeps the reference's order in the fallback too (onednn or float conv, then table)
        assert (lowered(x) - reference(x)).abs().max().item() <= step * 1e-3


@needs_native
@pytest.mark.parametrize("dtype,lo,hi", [(torch.uint8, 0, 255), (torch.uint8, 0, 127), (torch.int8, -128, 127)])
@pytest.mark.parametrize("layout", (torch.contiguous_format, torch.channels_last))
def test_quantize_module_native_pass_matches_the_aten_kernel(dtype, lo, hi, layout, monkeypatch):
    x = (torch.randn(2, 8, 9, 11, generator=torch.Generator().manual_seed(6)) * 4).contiguous(memory_format=layout)
    x[0, 0, 0, :3] = torch.tensor([float("inf"), float("-inf"), 1e30])
    mod = Q.Quantize(0.03, 7 if dtype == torch.uint8 else -3, dtype, lo, hi)
    fast = copy.deepcopy(mod)(x)
    monkeypatch.setattr(native, "available", lambda: False)
    slow = copy.deepcopy(mod)(x)
    assert fast.dtype == slow.dtype == dtype and fast.is_contiguous(memory_format=layout)
    assert (fast.int() - slow.int()).abs().max().item() <= 1
    assert (fast != slow).float().mean().item() < 0.001  # (ties only: float32 rounding of zp + x / scale)
    assert fast[0, 0, 0, :3].tolist() == [hi, lo, hi]


def _fbgemm_linear_reference(x, w, w_scale, bias, in_q, out_q, relu, low, high):
    """FBGEMM's ReQuantizeOutput in float32 on the exact int32 accumulators (a float64 product of small integers)."""
    acc = (x.double() - in_q[1]) @ w.double().t()
    ws = w_scale.float().reshape(-1)
    in_times_w = torch.tensor(in_q[0], dtype=torch.float32) * ws
    mult = in_times_w / torch.tensor(out_q[0], dtype=torch.float32)
    raw = acc.float()
    if bias is not None:
        raw = raw + bias.float() / in_times_w.expand(bias.numel())
    q = torch.round(raw * mult) + out_q[1]
    q = q.clamp(out_q[1] if relu else 0, 255)
    return q.clamp(max(low, out_q[1]) if relu else low, high).to(torch.uint8)


@needs_native
@pytest.mark.parametrize("rows,k,n,relu,per_channel,bias", [
    (1, 8, 16, False, True, True), (4, 64, 10, True, False, True), (33, 256, 96, True, True, False),
    (1, 512, 1000, False, True, True)])
def test_static_linear_plan_requantizes_like_fbgemm_on_exact_sums(rows, k, n, relu, per_channel, bias):
    g = torch.Generator().manual_seed(rows * 7 + k)
    w = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
    ws = torch.rand(n if per_channel else 1, generator=g) * 0.004 + 0.001
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randint(0, 128, (rows, k), generator=g).to(torch.uint8)
    in_q, out_q = (0.03, 61), (0.2 * k ** 0.5 / 8, 70)
    plan = native.StaticLinearPlan(w, ws, b, in_q, out_q, relu, 5, 120)
    want = _fbgemm_linear_reference(x, w, ws, b, in_q, out_q, relu, 5, 120)
    assert torch.equal(plan(x), want)
    assert torch.equal(plan(x.reshape(1, rows, k)), want.reshape(1, rows, n))  # leading dims kept
    # and within one step of the float reference (the float product rounds differently at ties only)
    yf = F.linear((x.float() - in_q[1]) * in_q[0], w.float() * ws.reshape(-1, 1), b)
    yf = yf.relu() if relu else yf
    ref = torch.clamp(torch.round(yf / out_q[0]) + out_q[1], 5, 120)
    assert (plan(x).int() - ref.int()).abs().max().item() <= 1


@needs_native
def test_static_linear_plan_refuses_input_that_could_saturate():
    w = torch.randint(-127, 128, (6, 16), dtype=torch.int8)
    w[0, :2] = 127  # limit 32767 // 254 = 129
    plan = native.StaticLinearPlan(w, torch.full((6,), 0.01), None, (0.05, 3), (0.1, 10), False, 0, 255)
    x = torch.randint(0, 128, (2, 16), dtype=torch.uint8)
    assert plan(x) is not None
    x[1, 5] = 200
    assert plan(x) is None
    assert native.StaticLinearPlan(w, torch.full((6,), 0.01), None, (0.05, 3), (0.1, 10), False, 0, 255,
                                   check_7bit=False)(x) is not None
    assert native.StaticLinearPlan(w, torch.full((6,), 0.01), None, (0.05, 200), (0.1, 10), False, 0,
                                   255)(x // 2) is None  # a zero point above the limit


@needs_native
def test_lowered_linear_runs_fbgemm_and_falls_back_beyond_the_limit():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    mapping = fxquant.get_default_qconfig_mapping("x86")
    example = (torch.randn(4, 32),)
    prepared = fxquant.quantize_fx.prepare_fx(model, mapping, example)
    with torch.no_grad():
        for _ in range(4):
            prepared(torch.randn(4, 32))
    reference = fxquant.quantize_fx.convert_to_reference_fx(copy.deepcopy(prepared))
    lowered = fxquant.quantize_fx.convert_fx(prepared)
    x = torch.randn(4, 32)
    step = float([m.scale for m in lowered.modules() if isinstance(m, Q.DeQuantize)][-1])
    with torch.no_grad():
        assert (lowered(x) - reference(x)).abs().max().item() <= step * 1.001
        plans = [m._kernel_cache[(4, True)] for m in lowered.modules() if type(m) is Q.Linear]
        assert plans and all("_fbgemm_plan" in p.__qualname__ for p in plans)
        # far beyond the calibrated range: the first layer's input saturates at 255, above the int16-safe limit
        # on CPUs without VNNI: that call runs the rules' other kernel, still within a step of the reference
        big = x * 50
        assert (lowered(big) - reference(big)).abs().max().item() <= step * 1.001
    assert x86.choose("linear", x86.Facts(rows=1, onednn_ok=True, input_7bit=True, native_ok=True,
                                          macs=10**6)) == "fbgemm"


@needs_native
@pytest.mark.skipif(x86.cpu_has_vnni(), reason="with VNNI no input is refused")
def test_beyond_the_limit_fbgemm_runs_unchecked_only_where_the_fallback_would_saturate_too(monkeypatch):
    """An ungrouped conv whose other kernel is onednn (pairs its products in int16 like FBGEMM) runs the unchecked
    FBGEMM plan on input beyond the int16-safe limit; a depthwise one keeps onednn's exact depthwise kernel."""
    import fxquant.nn.quantized.reference as R

    def lowered(groups: int) -> Q.Conv2d:
        conv = nn.Conv2d(64, 64, 3, padding=1, groups=groups)
        ref = R.Conv2d.from_float(conv, {"qscheme": torch.per_channel_affine, "dtype": torch.int8,
                                         "scale": torch.rand(64) * 0.01 + 1e-3,
                                         "zero_point": torch.zeros(64, dtype=torch.long), "axis": 0})
        return Q.Conv2d.from_reference(ref, 0.02, 60, 0.05, 64, input_quant_max=127)
    x = torch.randint(0, 256, (1, 64, 14, 14), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    onednn_calls = []
    real_op = torch.ops.onednn.qconv_pointwise.default

    class Counting:
        default = staticmethod(lambda *a: onednn_calls.append(1) or real_op(*a))
    monkeypatch.setattr(torch.ops.onednn, "qconv_pointwise", Counting)
    dense = lowered(1)
    facts = dense._facts(x, compiling=False, native_ok=False)
    assert x86.choose("conv", facts) in x86.SATURATING
    unchecked = native.ConvPlan(dense.weight_int, dense.weight_scale, dense.bias, dense.stride, dense.padding,
                                dense.dilation, 1, (0.02, 60), (0.05, 64), False, 0, 255, check_7bit=False)
    assert torch.equal(dense(x), unchecked(x)) and not onednn_calls
    depthwise = lowered(64)
    depthwise(x)
    assert onednn_calls  # its fallback is exact: kept


@needs_native
@pytest.mark.skipif(x86.cpu_has_vnni(), reason="with VNNI no input is refused")
def test_beyond_the_limit_a_linear_whose_fallback_is_onednn_runs_fbgemm_unchecked(monkeypatch):
    import fxquant.nn.quantized.reference as R
    lin = nn.Linear(256, 512)
    ref = R.Linear.from_float(lin, {"qscheme": torch.per_channel_affine, "dtype": torch.int8,
                                    "scale": lin.weight.detach().abs().amax(dim=1) / 127,
                                    "zero_point": torch.zeros(512, dtype=torch.long), "axis": 0})
    mod = Q.Linear.from_reference(ref, 0.02, 60, 0.05, 64, input_quant_max=127)
    x = torch.randint(0, 256, (32, 256), dtype=torch.uint8)
    facts = x86.Facts(rows=32, macs=32 * 256 * 512, onednn_ok=mod._onednn_ok(), input_7bit=True)
    assert x86.choose("linear", facts) in x86.SATURATING
    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", None)  # any onednn call would fail
    unchecked = native.StaticLinearPlan(mod.weight_int, mod.weight_scale, mod.bias, (0.02, 60), (0.05, 64), False,
                                        0, 255, check_7bit=False)
    assert torch.equal(mod(x), unchecked(x))
