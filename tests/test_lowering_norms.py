"""Lowered normalizations (LayerNorm / GroupNorm / InstanceNorm), softmax, matmul / bmm and scalar arithmetic:
each runs as one module on the integer tensors, within one output step of the reference model (inputs beyond the
calibration range included), and the new modules survive save / load, state dicts, deepcopy and torch.export."""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxquant
import models
from fxquant.nn import quantized as Q
from fxquant.passes.lower_build import lowering_report

BACKENDS = ("x86", "qnnpack")
NEW_MODULES = (Q.QuantizedNorm, Q.QuantizedSoftmax, Q.QuantizedMatmul)


def _convert(model: nn.Module, inputs: tuple, backend: str = "x86") -> tuple[fx.GraphModule, fx.GraphModule]:
    """(reference, lowered) of ``model`` prepared with the static ``backend`` mapping, calibrated on ``inputs``."""
    mapping = fxquant.get_default_qconfig_mapping(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare_fx(copy.deepcopy(model).eval(), mapping, inputs)
        with torch.no_grad():
            for k in range(3):
                prepared(*[t * (1 + 0.1 * k) if t.is_floating_point() else t for t in inputs])
        ref = fxquant.convert_to_reference_fx(copy.deepcopy(prepared))
        low = fxquant.convert_fx(prepared)
    return ref, low


def _beyond(inputs: tuple) -> tuple:
    """The inputs stretched and shifted past the calibration range."""
    return tuple(t * 3 + 0.5 if t.is_floating_point() else t for t in inputs)


def _steps(ref: nn.Module, low: nn.Module, inputs: tuple, scale: float | None = None, index: int = 0) -> float:
    """Largest difference of output ``index`` (of a tuple; else the output) in steps of ``scale`` (default: the
    last DeQuantize's)."""
    if scale is None:
        scale = [float(m.scale) for m in low.modules() if isinstance(m, Q.DeQuantize)][-1]
    with torch.no_grad():
        got, expected = low(*inputs), ref(*inputs)
    if isinstance(got, tuple):
        got, expected = got[index], expected[index]
    return float(((expected - got).abs() / scale).max()) - 1e-3  # (float32 division noise)


class _Tap(nn.Module):
    """``(post(y), y.flatten())`` for ``y = inner(x)``: the layer after it makes the mappings quantize ``y`` (an op
    at a model's output stays float), and the flattened ``y`` (the same integers) is the output compared."""

    def __init__(self, inner: nn.Module, post: int | nn.Module) -> None:
        super().__init__()
        self.inner, self.post = inner, nn.Linear(post, 4) if isinstance(post, int) else post

    def forward(self, x):
        y = self.inner(x)
        return self.post(y), y.flatten()


def _no_qdq_around_ops(low: fx.GraphModule) -> None:
    """Quantize modules read only model inputs, one DeQuantize module feeds the output: every op between runs on
    integer tensors."""
    mods = dict(low.named_modules())
    for node in low.graph.nodes:
        mod = mods.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(mod, Q.Quantize):
            assert all(a.op == "placeholder" for a in node.all_input_nodes), node.format_node()
        if isinstance(mod, Q.DeQuantize):
            assert [u.op for u in node.users] == ["output"], node.format_node()
        assert not (node.op == "call_function" and "quantize" in str(node.target)), node.format_node()


def _check(model: nn.Module, post: int | nn.Module, inputs: tuple, backend: str, lowered_ops: set[str],
           kernel: type) -> nn.Module:
    """Convert ``_Tap(model)``, then: the named ops are lowered into one ``kernel`` module, nothing stays in
    reference form, the graph has no quantize / dequantize around it, and its output is within one step of the
    reference for the calibration inputs and for inputs beyond their range. Returns the ``kernel`` module."""
    ref, low = _convert(_Tap(model, post), inputs, backend)
    rows = {r.node: r for r in lowering_report(low)}
    assert [r for r in rows.values() if not r.lowered] == []
    for name in lowered_ops:
        assert rows[name].lowered and rows[name].kernel == kernel.__name__, rows[name]
    _no_qdq_around_ops(low)
    (mod,) = [m for m in low.modules() if isinstance(m, kernel)]
    for trial in (inputs, _beyond(inputs)):
        assert _steps(ref, low, trial, float(mod.out_scale), index=1) <= 1.0
    return mod


# --------------------------------------------------------------------------------------------------- norms
class _Pre(nn.Module):
    """A conv / linear (its output has a non-zero zero point) followed by ``norm``."""

    def __init__(self, rank: int, norm: nn.Module | None = None, channels: int = 8) -> None:
        super().__init__()
        self.pre = {0: nn.Linear(16, 16), 1: nn.Conv1d(3, channels, 3), 2: nn.Conv2d(3, channels, 3),
                    3: nn.Conv3d(3, channels, 3)}[rank]
        self.norm = norm

    def forward(self, x):
        return self.norm(self.pre(x))


def _post(rank: int) -> nn.Module:
    """A layer reading the norm's output (so the mappings quantize it)."""
    return nn.Linear(16, 4) if rank == 0 else (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1](8, 4, 1)


def _input(rank: int, seed: int = 0) -> tuple:
    shape = {0: (4, 6, 16), 1: (2, 3, 12), 2: (2, 3, 8, 8), 3: (2, 3, 5, 6, 6)}[rank]
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)),)


def _randomized(mod: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
    return mod


class _Functional(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.w, self.b = nn.Parameter(torch.randn(16) + 1), nn.Parameter(torch.randn(16))

    def forward(self, x):
        if self.kind == "layer_norm":
            return F.layer_norm(x, (16,), self.w, self.b, 1e-6)
        if self.kind == "group_norm":
            return F.group_norm(x, 2, eps=1e-4)
        return F.instance_norm(x)


NORMS = {
    "LayerNorm": (0, lambda: _randomized(nn.LayerNorm(16))),
    "LayerNorm_2d_shape_no_affine": (0, lambda: nn.LayerNorm((6, 16), elementwise_affine=False)),
    "LayerNorm_no_bias": (0, lambda: _randomized(nn.LayerNorm(16, bias=False))),
    "F.layer_norm": (0, lambda: _Functional("layer_norm")),
    "GroupNorm": (2, lambda: _randomized(nn.GroupNorm(4, 8))),
    "GroupNorm_no_affine": (1, lambda: nn.GroupNorm(2, 8, affine=False)),
    "F.group_norm": (2, lambda: _Functional("group_norm")),
    "InstanceNorm1d": (1, lambda: _randomized(nn.InstanceNorm1d(8, affine=True))),
    "InstanceNorm2d": (2, lambda: nn.InstanceNorm2d(8)),
    "InstanceNorm3d": (3, lambda: _randomized(nn.InstanceNorm3d(8, affine=True))),
    "F.instance_norm": (2, lambda: _Functional("instance_norm")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(NORMS))
def test_norm_lowers_to_one_module_within_one_step(name, backend):
    rank, make = NORMS[name]
    node = getattr(make(), "kind", "inner_norm")
    mod = _check(_Pre(rank, make()), _post(rank), _input(rank), backend, {node}, Q.QuantizedNorm)
    assert int(mod.in_zero_point) != 0  # the input's zero point cancels


def test_instance_norm_with_running_statistics_stays_in_reference_form():
    model = _Pre(2, nn.InstanceNorm2d(8, track_running_stats=True))
    with torch.no_grad():
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 2.0)
    ref, low = _convert(_Tap(model, _post(2)), _input(2))
    row = {r.node: r for r in lowering_report(low)}["inner_norm"]
    assert not row.lowered and "running statistics" in row.reason
    assert _steps(ref, low, _input(2), index=1) <= 1.0


def _reference_norm(q, kind, in_qp, out_qp, weight, bias, eps, dtype, **geometry):
    x = (q.float() - in_qp[1]) * in_qp[0]
    if kind == "layer_norm":
        y = F.layer_norm(x, geometry["normalized_shape"], weight, bias, eps)
    elif kind == "group_norm":
        y = F.group_norm(x, geometry["num_groups"], weight, bias, eps)
    else:
        y = F.instance_norm(x, weight=weight, bias=bias, eps=eps)
    lo, hi = (0, 255) if dtype == torch.uint8 else (-128, 127)
    return fxquant.ops.quantize_per_tensor(y, out_qp[0], out_qp[1], lo, hi, dtype)


@pytest.mark.parametrize("dtype", (torch.uint8, torch.int8))
@pytest.mark.parametrize("in_scale", (1e-4, 0.02, 0.5))  # small scales: eps / s**2 dominates the variance
@pytest.mark.parametrize("kind", ("layer_norm", "group_norm", "instance_norm"))
def test_quantized_norm_module_against_the_reference_math(kind, in_scale, dtype):
    g = torch.Generator().manual_seed(3)
    lo, hi = (0, 255) if dtype == torch.uint8 else (-128, 127)
    q = torch.randint(lo, hi + 1, (3, 8, 5, 4), generator=g).to(dtype)
    q[0, :4] = q[0, :4] // 16 + 3  # low-variance rows, where eps matters
    geometry = {"normalized_shape": (5, 4), "num_groups": 4}
    shape = (5, 4) if kind == "layer_norm" else (8,)
    weight, bias = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    in_qp, out_qp = (in_scale, 17 if dtype == torch.uint8 else -9), (0.02, 100 if dtype == torch.uint8 else 3)
    for affine in (True, False):
        w, b = (weight, bias) if affine else (None, None)
        mod = Q.QuantizedNorm(kind, *in_qp, *out_qp, w, b, 1e-5, dtype=dtype, quant_min=lo, quant_max=hi,
                              **geometry)
        expected = _reference_norm(q, kind, in_qp, out_qp, w, b, 1e-5, dtype, **geometry)
        got = mod(q)
        assert got.dtype == dtype and got.shape == q.shape
        assert (got.int() - expected.int()).abs().max() <= 1
        assert (got == expected).float().mean() > 0.99


def test_unbatched_instance_norm_1d():
    norm = nn.InstanceNorm1d(8, affine=True)
    mod = Q.QuantizedNorm("instance_norm", 0.1, 5, 0.05, 128, norm.weight, norm.bias, norm.eps,
                          no_batch_dim=norm._get_no_batch_dim())
    q = torch.randint(0, 256, (8, 12), dtype=torch.uint8)
    assert torch.equal(mod(q), mod(q.unsqueeze(0)).squeeze(0))


# --------------------------------------------------------------------------------------------------- softmax
class _Softmax(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form, self.fc, self.sm = form, nn.Linear(16, 16), nn.Softmax(dim=1)
        self.register_buffer("c", torch.tensor(0.7))

    def forward(self, x):
        y = self.fc(x)
        if self.form == "module":
            return self.sm(y)
        if self.form == "scaled":
            return F.softmax(y / math.sqrt(8.0), dim=-1)
        if self.form == "constant":
            return torch.softmax(torch.div(y, self.c) - 2.0, 0)
        return (3.0 - y * 2).softmax(-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ("module", "scaled", "constant", "method"))
def test_softmax_lowers_to_one_module_within_one_step(form, backend):
    node = "inner_sm" if form == "module" else "softmax"
    x = (torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(1)),)
    _check(_Softmax(form), 16, x, backend, {node}, Q.QuantizedSoftmax)


# --------------------------------------------------------------------------------------------------- matmul
class _Matmul(nn.Module):
    def __init__(self, form: str, k: int = 16) -> None:
        super().__init__()
        self.form, self.a, self.b = form, nn.Linear(16, k), nn.Linear(16, k)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.form == "matmul":
            return torch.matmul(a, b.transpose(-1, -2))
        if self.form == "operator":
            return a.transpose(-1, -2) @ b  # K = tokens
        if self.form == "bmm":
            return torch.bmm(a, b.transpose(1, 2))
        return torch.softmax(torch.bmm(a, b.transpose(1, 2)) / 4.0, dim=-1)  # "bmm_softmax"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ("matmul", "operator", "bmm", "bmm_softmax"))
def test_matmul_lowers_to_one_module_within_one_step(form, backend):
    x = (torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(2)),)
    node = "bmm" if form.startswith("bmm") else "matmul"
    mod = _check(_Matmul(form), 16 if form == "operator" else 10, x, backend, {node}, Q.QuantizedMatmul)
    assert (mod.softmax_dim is not None) == (form == "bmm_softmax")


@pytest.mark.parametrize("k", (64, 1024))
def test_matmul_with_long_inner_dimension_stays_within_one_step(k):
    """K * 255 * 255 passes 2**24 for K > 258: the float32 sums are then rounded, still within one step."""
    x = (torch.randn(2, k, 16, generator=torch.Generator().manual_seed(4)),)
    _check(_Matmul("operator", 8), 8, x, "qnnpack", {"matmul"}, Q.QuantizedMatmul)


def test_quantized_matmul_module_with_full_range_operands():
    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, 256, (3, 7, 600), generator=g, dtype=torch.uint8)
    b = torch.randint(-128, 128, (600, 5), generator=g, dtype=torch.int8)
    mod = Q.QuantizedMatmul((0.02, 3), (0.01, -7), (0.3, 10), torch.int8, -128, 127)
    fa, fb = (a.float() - 3) * 0.02, (b.float() + 7) * 0.01
    expected = fxquant.ops.quantize_per_tensor(fa @ fb, 0.3, 10, -128, 127, torch.int8)
    got = mod(a, b)
    assert got.dtype == torch.int8 and (got.int() - expected.int()).abs().max() <= 1
    assert (got == expected).float().mean() > 0.99


@pytest.mark.parametrize("a_scale", (0.05, 4e34))
def test_matmul_softmax_module_shifts_huge_logit_scales_exactly(a_scale):
    """A logits operand with a huge range (a finfo.min mask folded into it) keeps its zero point exact: the folded
    shift would be ~1e31 off, and softmax turns any such offset into a different distribution."""
    g = torch.Generator().manual_seed(6)
    a = torch.randint(0, 256, (2, 6, 4), generator=g, dtype=torch.uint8)
    a[:, ::2] = 127  # rows at the zero point: logits exactly 0 in the reference, a uniform softmax
    b = torch.randint(0, 256, (2, 4, 6), generator=g, dtype=torch.uint8)
    mod = Q.QuantizedMatmul((a_scale, 127), (0.01, 128), (1.0 / 256, 0), softmax_dim=-1, logit_multiplier=0.5)
    got, expected = mod(a, b), mod._reference(a, b)
    assert (got.int() - expected.int()).abs().max() <= 1


# --------------------------------------------------------------------------------------------------- scalar ops
class _ScalarArith(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)
        self.register_buffer("c", torch.tensor(2.5))

    def forward(self, x):
        return self.fc2(torch.div(self.fc1(x), self.c) - 0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_division_by_a_zero_dim_constant_joins_the_lookup_table_path(backend):
    x = (torch.randn(4, 16, generator=torch.Generator().manual_seed(6)),)
    ref, low = _convert(_ScalarArith(), x, backend)
    rows = {r.node: r for r in lowering_report(low)}
    assert rows["div"].rule == "lookup_table" and rows["sub"].rule == "lookup_table"
    assert not [r for r in rows.values() if not r.lowered]
    _no_qdq_around_ops(low)
    for trial in (x, _beyond(x)):
        assert _steps(ref, low, trial) <= 1.0


# --------------------------------------------------------------------------------------------------- models
def test_static_bert_lowers_norms_attention_and_softmax():
    model, inputs = models.bert_encoder()
    ref, low = _convert(model, inputs)
    rows = lowering_report(low)
    kinds = {(r.op, r.rule, r.kernel) for r in rows}
    assert {("LayerNorm", "norm", "QuantizedNorm"), ("matmul", "matmul", "QuantizedMatmul"),
            ("truediv", "softmax", "QuantizedSoftmax"), ("softmax", "softmax", "QuantizedSoftmax")} <= kinds
    assert {r.op for r in rows if not r.lowered} == {"Embedding"}  # float embeddings (weight-only is dynamic's)
    n = {k: sum(isinstance(m, k) for m in low.modules()) for k in NEW_MODULES}
    assert n == {Q.QuantizedNorm: 5, Q.QuantizedSoftmax: 2, Q.QuantizedMatmul: 4}
    with torch.no_grad():
        tokens = torch.randint(0, models.VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
        err = (ref(tokens) - low(tokens)).abs().max()
    scale = [float(m.scale) for m in low.modules() if isinstance(m, Q.DeQuantize)][-1]
    assert err <= 3 * scale  # one step per op, through two encoder layers


def test_compare_shadow_runs_lowered_attention_on_the_right_float_inputs():
    """The lowered matmuls read integer views (permute / transpose moved below the dequantize): tools.compare
    feeds their shadow run the float values those views stand for, so each one's own error is small."""
    from fxquant.tools.compare import compare

    model, inputs = models.bert_encoder()
    _, low = _convert(model, inputs)
    rows = {r.node: r for r in compare(model, low, inputs)}
    for name in ("matmul", "matmul_1", "matmul_2", "matmul_3", "softmax", "softmax_1", "emb_norm"):
        assert rows[name].local_sqnr > 25.0, (name, rows[name].local_sqnr)


class _Zoo(nn.Module):
    """Every new lowered module once: norms on an image, attention over its pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn, self.inorm = _randomized(nn.GroupNorm(2, 8)), nn.InstanceNorm2d(8)
        self.ln = _randomized(nn.LayerNorm(8))
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        t = self.ln(self.inorm(self.gn(self.conv(x))).flatten(2).transpose(1, 2))
        q, k, v = self.q(t), self.k(t), self.v(t)
        probs = F.softmax(torch.matmul(q, k.transpose(1, 2)) / math.sqrt(8), dim=-1)
        fused = torch.softmax(torch.bmm(q, v.transpose(1, 2)), dim=1)
        return torch.matmul(probs, v) + torch.matmul(fused, k)  # (x86 quantizes matmul, not bmm)


@pytest.fixture(scope="module")
def zoo():
    inputs = (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(8)),)
    model = _Zoo().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare_fx(model, fxquant.get_default_qconfig_mapping("x86"), inputs)
        prepared(*inputs)
    return prepared, inputs


def _lowered(zoo) -> fx.GraphModule:
    prepared, _ = zoo
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.convert_fx(copy.deepcopy(prepared))


def _bytes(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_zoo_holds_every_new_module(zoo):
    low = _lowered(zoo)
    types = {type(m) for m in low.modules()}
    assert set(NEW_MODULES) <= types
    assert sum(isinstance(m, Q.QuantizedMatmul) and m.softmax_dim is not None for m in low.modules()) == 1
    assert not [r for r in lowering_report(low) if not r.lowered]


def test_new_modules_survive_save_load_and_deepcopy(zoo):
    low, (x,) = _lowered(zoo), zoo[1]
    with torch.no_grad():
        expected = low(x)
        assert torch.equal(torch.load(_bytes(low), weights_only=False)(x), expected)
        assert torch.equal(copy.deepcopy(low)(x), expected)


def test_new_modules_state_dict_loads_into_a_fresh_conversion(zoo):
    low, (x,) = _lowered(zoo), zoo[1]
    with torch.no_grad():
        expected = low(x)
    state = torch.load(_bytes(low.state_dict()), weights_only=True)
    fresh = _lowered(zoo)
    with torch.no_grad():
        fresh(x)  # kernel caches built before the load must be dropped by it
        for mod in fresh.modules():
            if isinstance(mod, NEW_MODULES):
                for buf in mod.buffers():
                    buf.mul_(1.5) if buf.is_floating_point() else buf.add_(1)
                mod._kernel_cache = {}  # (in-place edits bypass the cache; a load drops it)
        assert not torch.equal(fresh(x), expected)
        fresh.load_state_dict(state)
        assert torch.equal(fresh(x), expected)


def test_new_modules_export_to_plain_aten_ops_within_one_step(zoo):
    low, (x,) = _lowered(zoo), zoo[1]
    inputs: dict[str, tuple] = {}

    def record(name: str):
        def hook(mod, args, out) -> None:
            inputs[name] = (mod, args, out)
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in low.named_modules() if isinstance(m, NEW_MODULES)]
    with torch.no_grad():
        low(x)
    for h in hooks:
        h.remove()
    assert len(inputs) == 8  # 3 norms, 1 softmax, 4 matmuls (one with a softmax)
    for name, (mod, args, out) in inputs.items():
        exported = torch.export.export(mod, args)
        targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        assert all(t.startswith("aten.") for t in targets), (name, targets)
        got = exported.module()(*args)
        assert got.dtype == out.dtype and (got.int() - out.int()).abs().max() <= 1, name
    whole = torch.export.export(low, (x,)).module()
    scale = [float(m.scale) for m in low.modules() if isinstance(m, Q.DeQuantize)][-1]
    with torch.no_grad():
        assert (whole(x) - low(x)).abs().max() <= 4 * scale
