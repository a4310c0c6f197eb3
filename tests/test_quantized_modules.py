"""Lowered modules: every kernel equals the reference math (dequantize -> ref op -> quantize) within one step;
plain-tensor state dicts, copy / pickle / export."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant.nn.quantized as Q
import fxquant.nn.quantized.reference as R
from fxquant.kernels import onednn, x86
from fxquant.nn.quantized import conv as conv_mod
from fxquant.nn.quantized import linear as linear_mod

ONEDNN = x86.onednn_available()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="onednn int8 ops not available")


def _per_channel_ref(cls, float_mod: nn.Module, axis: int = 0):
    w = float_mod.weight.detach()
    amax = w.transpose(0, axis).reshape(w.shape[axis], -1).abs().amax(1)
    return cls.from_float(float_mod, {"qscheme": torch.per_channel_affine, "dtype": torch.int8,
                                      "scale": (amax / 127.5).clamp_min(1e-8),
                                      "zero_point": torch.zeros(w.shape[axis], dtype=torch.long), "axis": axis})


def _expected(ref: nn.Module, x_q: torch.Tensor, x_scale: float, x_zp: int, post_op: str,
              other: tuple[torch.Tensor, float, int] | None) -> torch.Tensor:
    """The reference graph in float: dequantize -> reference module -> post-op."""
    with torch.no_grad():
        y = ref((x_q.float() - x_zp) * x_scale)
    if post_op in ("add", "add_relu"):
        y = y + (other[0].float() - other[2]) * other[1]
    return {"none": y, "relu": F.relu(y), "gelu": F.gelu(y), "add": y, "add_relu": F.relu(y)}[post_op]


def _assert_within_one_step(got: torch.Tensor, expected_float: torch.Tensor, scale: float, zp: int,
                            qmin: int = 0, qmax: int = 255) -> None:
    assert got.dtype == torch.uint8 and got.shape == expected_float.shape
    expected = torch.clamp(torch.round(expected_float / scale) + zp, qmin, qmax)
    diff = (got.float() - expected).abs()
    assert float(diff.max()) <= 1.0
    assert float((diff > 0).float().mean()) < 0.05  # off-by-one only on rounding ties / float noise


def _out_qparams(y: torch.Tensor) -> tuple[float, int]:
    lo, hi = min(float(y.min()), 0.0), max(float(y.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    return scale, int(round(-lo / scale))


# ---------------------------------------------------------------------------------------------------- Linear
LINEAR_KERNELS = ["float"] + (["onednn", "onednn_split"] if ONEDNN else [])


@pytest.mark.parametrize("kernel", LINEAR_KERNELS)
@pytest.mark.parametrize("post_op", ["none", "relu", "gelu", "add_relu"])
@pytest.mark.parametrize("input_qmax", [127, 255])
def test_linear_kernels_match_reference(kernel: str, post_op: str, input_qmax: int) -> None:
    if kernel == "onednn" and input_qmax == 255 and not x86.cpu_has_vnni():
        pytest.skip("onednn u8*s8 saturates full-range input without VNNI (that is what onednn_split is for)")
    torch.manual_seed(0)
    ref = _per_channel_ref(R.Linear, nn.Linear(48, 24))
    x_q = torch.randint(0, input_qmax + 1, (2, 9, 48), dtype=torch.uint8)
    other = (torch.randint(0, 256, (2, 9, 24), dtype=torch.uint8), 0.04, 120)
    x_zp = input_qmax // 2
    exp = _expected(ref, x_q, 0.03, x_zp, post_op, other)
    out_scale, out_zp = _out_qparams(exp)
    mod = Q.Linear.from_reference(ref, 0.03, x_zp, out_scale, out_zp, post_op=post_op, input_quant_max=input_qmax,
                                  other_scale=0.04, other_zero_point=120)
    got = linear_mod._STATIC_KERNELS[kernel](mod, x_q, mod._other(other[0]), mod._act)
    _assert_within_one_step(got, exp, out_scale, out_zp)
    _assert_within_one_step(mod(x_q, other[0]), exp, out_scale, out_zp)  # whatever the rules pick


@pytest.mark.parametrize("kernel", LINEAR_KERNELS)
def test_linear_float_output_and_narrow_output_range(kernel: str) -> None:
    torch.manual_seed(1)
    ref = _per_channel_ref(R.Linear, nn.Linear(32, 16))
    x_q = torch.randint(0, 128, (20, 32), dtype=torch.uint8)
    exp = _expected(ref, x_q, 0.05, 64, "relu", None)
    mod = Q.Linear.from_reference(ref, 0.05, 64, output_dtype=torch.float32, post_op="relu", input_quant_max=127)
    got = linear_mod._STATIC_KERNELS[kernel](mod, x_q, None, mod._act)
    assert got.dtype == torch.float32 and torch.allclose(got, exp, rtol=1e-5, atol=1e-5)
    scale, zp = float(exp.max()) / 127, 0
    narrow = Q.Linear.from_reference(ref, 0.05, 64, scale / 2, zp, post_op="relu", input_quant_max=127,
                                     output_quant_min=0, output_quant_max=127)
    got = linear_mod._STATIC_KERNELS[kernel](narrow, x_q, None, narrow._act)
    assert int(got.max()) == 127  # saturates at the module's range, not the dtype's
    _assert_within_one_step(got, exp, scale / 2, zp, 0, 127)


def test_linear_rules_pick_float_for_single_rows_and_onednn_for_batches() -> None:
    facts = dict(onednn_ok=True, input_7bit=True)
    assert x86.choose("linear", x86.Facts(rows=1, **facts)) == "float"
    assert x86.choose("linear", x86.Facts(rows=64, **facts)) == ("onednn" if ONEDNN else "float")
    assert x86.choose("linear", x86.Facts(rows=64, compiling=True, **facts)) == "float"
    assert x86.choose("linear", x86.Facts(rows=64, device="cuda", **facts)) == "float"
    full = dict(onednn_ok=True, input_7bit=False)
    big, small = x86.Facts(rows=512, macs=2**29, **full), x86.Facts(rows=512, macs=2**20, **full)
    if ONEDNN and not x86.cpu_has_vnni():
        from fxquant.kernels import fp16_gemm

        # full-range input: the fp16-weight GEMM where torch has it (faster than the exact split), else the split
        expected = ("fp16_gemm", "fp16_gemm") if fp16_gemm.available() else ("onednn_split", "float")
        assert (x86.choose("linear", big), x86.choose("linear", small)) == expected
        assert x86.choose("linear", x86.Facts(rows=512, macs=2**19, **full)) == "float"
        assert x86.choose("conv", x86.Facts(pointwise=True, **full)) == "onednn_split"
        assert x86.choose("conv", x86.Facts(pointwise=False, **full)) == "float"
        assert x86.choose("conv", x86.Facts(input_7bit=True, onednn_ok=True, fused_ok=False)) == "onednn_unfused"
    with pytest.raises(KeyError, match="no kernel rules"):
        x86.choose("softmax", x86.Facts())


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
@pytest.mark.parametrize("rows", [1, 200])
def test_dynamic_linear_matches_reference_graph(granularity: str, rows: int) -> None:
    torch.manual_seed(2)
    ref = _per_channel_ref(R.Linear, nn.Linear(64, 32))
    mod = Q.LinearDynamic.from_reference(ref, torch.uint8, 0, 127, granularity, post_op="relu")
    x = torch.randn(rows, 64) * 3
    lo, hi = (x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)) if granularity == "per_token" else (x.min(), x.max())
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo) / 127
    zp = (-torch.round(lo / scale)).clamp(0, 127)
    xq = torch.clamp(torch.round(x / scale) + zp, 0, 127)
    expected = F.relu(ref((xq - zp) * scale))
    assert torch.allclose(mod(x), expected, rtol=1e-4, atol=1e-4)


def test_weight_only_linear_equals_reference() -> None:
    torch.manual_seed(3)
    ref = _per_channel_ref(R.Linear, nn.Linear(40, 12))
    mod = Q.LinearWeightOnly.from_reference(ref)
    x = torch.randn(3, 5, 40)
    assert torch.equal(mod(x), ref(x))  # float kernel: exactly the reference math
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, 40), mod.weight_int, mod.weight_scale) + mod.bias
    assert torch.allclose(y.reshape(3, 5, 12), ref(x), rtol=1e-4, atol=1e-4)  # the AVX512 kernel's math


# ---------------------------------------------------------------------------------------------------- Conv
CONV_KERNELS = ["float"] + (["onednn", "onednn_unfused", "onednn_split"] if ONEDNN else [])
_CONVS = {
    "Conv1d": (lambda: nn.Conv1d(6, 8, 3, stride=2, padding=1), (2, 6, 11)),
    "Conv2d": (lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2), (2, 6, 7, 6)),
    "Conv3d": (lambda: nn.Conv3d(3, 4, 2, padding=1), (1, 3, 4, 5, 3)),
}


@pytest.mark.parametrize("kernel", CONV_KERNELS)
@pytest.mark.parametrize("post_op", ["none", "relu", "add_relu"])
@pytest.mark.parametrize("name", sorted(_CONVS))
def test_conv_kernels_match_reference(name: str, post_op: str, kernel: str) -> None:
    fused = post_op in onednn.CONV_FUSED[int(name[4])]
    if kernel == "onednn" and not fused:
        pytest.skip(f"onednn does not fuse {post_op} into {name} (the rules pick onednn_unfused)")
    torch.manual_seed(4)
    make, shape = _CONVS[name]
    ref = _per_channel_ref(getattr(R, name), make())
    x_q = torch.randint(0, 256 if kernel in ("float", "onednn_split") else 128, shape, dtype=torch.uint8)
    x_zp = 100 if kernel in ("float", "onednn_split") else 60
    exp0 = _expected(ref, x_q, 0.02, x_zp, "none", None)
    other = (torch.randint(0, 256, exp0.shape, dtype=torch.uint8), 0.03, 90)
    exp = _expected(ref, x_q, 0.02, x_zp, post_op, other)
    out_scale, out_zp = _out_qparams(exp)
    mod = getattr(Q, name).from_reference(ref, 0.02, x_zp, out_scale, out_zp, post_op=post_op,
                                          other_scale=0.03, other_zero_point=90)
    got = conv_mod._KERNELS[kernel](mod, x_q, mod._other(other[0]))
    _assert_within_one_step(got, exp, out_scale, out_zp)
    _assert_within_one_step(mod(x_q, other[0]), exp, out_scale, out_zp)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (1, 4, 6, 6)),  # depthwise, full-range input
    (lambda: nn.Conv2d(3, 5, 3, padding=2, padding_mode="reflect"), (1, 3, 7, 7)),
    (lambda: nn.Conv2d(3, 5, 3, padding="same"), (1, 3, 6, 6)),
    (lambda: nn.ConvTranspose2d(4, 3, 3, stride=2, output_padding=1), (2, 4, 5, 5)),
    (lambda: nn.ConvTranspose1d(4, 3, 2), (2, 4, 5)),
])
def test_conv_special_geometries(make, shape) -> None:
    torch.manual_seed(5)
    float_mod = make()
    transposed = isinstance(float_mod, nn.modules.conv._ConvTransposeNd)
    ref = _per_channel_ref(getattr(R, type(float_mod).__name__), float_mod, axis=1 if transposed else 0)
    x_q = torch.randint(0, 256, shape, dtype=torch.uint8)
    exp = _expected(ref, x_q, 0.02, 128, "relu", None)
    out_scale, out_zp = _out_qparams(exp)
    mod = getattr(Q, type(float_mod).__name__).from_reference(ref, 0.02, 128, out_scale, out_zp, post_op="relu")
    _assert_within_one_step(mod(x_q), exp, out_scale, out_zp)


def test_from_reference_errors_are_clear() -> None:
    ref = _per_channel_ref(R.Conv2d, nn.Conv2d(2, 2, 1))
    with pytest.raises(TypeError, match="not the matching reference"):
        Q.Conv1d.from_reference(ref, 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match="post_op 'swish'"):
        Q.Conv2d.from_reference(ref, 0.1, 0, 0.1, 0, post_op="swish")
    with pytest.raises(ValueError, match="needs output_scale"):
        Q.Conv2d.from_reference(ref, 0.1, 0)
    with pytest.raises(TypeError, match="unknown option"):
        Q.Conv2d.from_reference(ref, 0.1, 0, 0.1, 0, input_qmax=127)
    with pytest.raises(TypeError, match="fxquant reference module"):
        Q.Linear.from_reference(nn.Linear(2, 2), 0.1, 0, 0.1, 0)
    with pytest.raises(ValueError, match="other_scale is required"):
        Q.Conv2d.from_reference(ref, 0.1, 0, 0.1, 0, post_op="add")
    mod = Q.Conv2d.from_reference(ref, 0.1, 0, 0.1, 0, post_op="add", other_scale=0.1, other_zero_point=0)
    with pytest.raises(ValueError, match=r"forward\(x, other\)"):
        mod(torch.zeros(1, 2, 3, 3, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------- Embedding
def _float_qparams_ref(cls, float_mod: nn.Module, qmax: int):
    w = float_mod.weight.detach()
    lo, hi = w.amin(1).clamp_max(0), w.amax(1).clamp_min(0)
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    dtype = getattr(torch, "quint4x2" if qmax == 15 else "quint8")  # torch.ao's names for 4 / 8-bit rows
    return cls.from_float(float_mod, {"qscheme": torch.per_channel_affine_float_qparams, "dtype": dtype,
                                      "scale": scale, "zero_point": -lo / scale, "axis": 0})


@pytest.mark.parametrize("qmax", [255, 15])
def test_embeddings_equal_reference(qmax: int) -> None:
    torch.manual_seed(6)
    emb_ref = _float_qparams_ref(R.Embedding, nn.Embedding(30, 7), qmax)
    emb = Q.Embedding.from_reference(emb_ref)
    idx = torch.randint(0, 30, (4, 5))
    assert emb.bits == (4 if qmax == 15 else 8) and emb.weight_packed.shape[1] == (4 if qmax == 15 else 7)
    assert torch.equal(emb(idx), emb_ref(idx))
    for mode in ("sum", "mean", "max"):
        bag_ref = _float_qparams_ref(R.EmbeddingBag, nn.EmbeddingBag(30, 7, mode=mode, padding_idx=3), qmax)
        bag = Q.EmbeddingBag.from_reference(bag_ref)
        flat, offsets = torch.cat([idx.flatten(), torch.tensor([3, 3])]), torch.tensor([0, 5, 5, 20, 21])
        assert torch.allclose(bag(flat, offsets), bag_ref(flat, offsets), atol=1e-6)
        assert torch.allclose(bag(idx), bag_ref(idx), atol=1e-6)
    weights = torch.rand(20)
    bag_ref = _float_qparams_ref(R.EmbeddingBag, nn.EmbeddingBag(30, 7, mode="sum"), qmax)
    got = Q.EmbeddingBag.from_reference(bag_ref)(idx.flatten(), torch.tensor([0, 7]), weights)
    assert torch.allclose(got, bag_ref(idx.flatten(), torch.tensor([0, 7]), weights), atol=1e-6)


def test_embedding_rejects_per_tensor_tables() -> None:
    emb = nn.Embedding(4, 3)
    ref = R.Embedding.from_float(emb, {"qscheme": torch.per_tensor_affine, "dtype": torch.uint8, "scale": 0.1,
                                       "zero_point": 128})
    with pytest.raises(TypeError, match="quantized per row"):
        Q.Embedding.from_reference(ref)


# ---------------------------------------------------------------------------------------------------- persistence
def _built_modules() -> list[tuple[str, nn.Module, tuple, nn.Module]]:
    """(name, built module, example inputs, bare module of the same class for load_state_dict)."""
    torch.manual_seed(7)
    lin_ref = _per_channel_ref(R.Linear, nn.Linear(16, 8))
    conv_ref = _per_channel_ref(R.Conv2d, nn.Conv2d(4, 6, 3, padding=1))
    x_lin = torch.randint(0, 128, (40, 16), dtype=torch.uint8)
    x_conv = torch.randint(0, 128, (2, 4, 6, 6), dtype=torch.uint8)
    bag_ref = _float_qparams_ref(R.EmbeddingBag, nn.EmbeddingBag(20, 5, mode="sum"), 15)
    return [
        ("Linear", Q.Linear.from_reference(lin_ref, 0.05, 64, 0.2, 100, post_op="relu", input_quant_max=127),
         (x_lin,), Q.Linear(16, 8)),
        ("Conv2d", Q.Conv2d.from_reference(conv_ref, 0.05, 64, 0.1, 128, input_quant_max=127), (x_conv,),
         Q.Conv2d({name: getattr(conv_ref, name) for name in conv_mod._GEOMETRY})),
        ("LinearDynamic", Q.LinearDynamic.from_reference(lin_ref, quant_max=127), (torch.randn(70, 16),),
         Q.LinearDynamic(16, 8)),
        ("LinearWeightOnly", Q.LinearWeightOnly.from_reference(lin_ref), (torch.randn(3, 16),),
         Q.LinearWeightOnly(16, 8)),
        ("EmbeddingBag", Q.EmbeddingBag.from_reference(bag_ref), (torch.randint(0, 20, (3, 4)),),
         Q.EmbeddingBag(20, 5, bits=4, mode="max")),
    ]


@pytest.mark.parametrize("case", _built_modules(), ids=lambda c: c[0])
def test_state_dict_is_plain_and_loads_into_a_bare_module(case) -> None:
    _, mod, inputs, bare = case
    expected = mod(*inputs)  # runs the kernels, so onednn weights are packed and cached
    buf = io.BytesIO()
    torch.save(mod.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert all(type(v) is torch.Tensor and not v.is_mkldnn for k, v in state.items() if k != "_extra_state")
    bare.load_state_dict(state)
    assert torch.equal(bare(*inputs), expected)
    assert "Quantized" in repr(bare) and "not built" not in repr(bare)


@pytest.mark.parametrize("case", _built_modules(), ids=lambda c: c[0])
def test_deepcopy_and_pickle_after_kernels_ran(case) -> None:
    _, mod, inputs, _ = case
    expected = mod(*inputs)
    clone = copy.deepcopy(mod)
    assert torch.equal(clone(*inputs), expected)
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(*inputs), expected)


def test_loading_new_weights_drops_the_packed_cache() -> None:
    case = _built_modules()[0]
    mod, x = case[1], case[2][0]
    before = mod(x)
    state = mod.state_dict()
    state["weight_int"] = -state["weight_int"].clamp(min=-127)
    mod.load_state_dict(state)
    assert not torch.equal(mod(x), before)


@pytest.mark.parametrize("case", _built_modules(), ids=lambda c: c[0])
def test_torch_export_runs_the_float_path(case) -> None:
    name, mod, inputs, _ = case
    exported = torch.export.export(mod, inputs)
    graph = str(exported.graph)
    assert "onednn" not in graph and "quantized." not in graph
    got, eager = exported.module()(*inputs), mod(*inputs)
    if eager.dtype == torch.uint8:
        assert float((got.float() - eager.float()).abs().max()) <= 1.0
    else:
        assert torch.allclose(got, eager, rtol=1e-4, atol=1e-4)
