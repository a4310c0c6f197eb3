"""The static Linear's few-row plan with its weight integers in float16 (fxquant.kernels.fp16_gemm): exact weights,
the reference's result within one output step, chosen by the rules for large single rows only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxquant.kernels import fp16_gemm, x86
from fxquant.nn import quantized as Q
from fxquant.nn.quantized import linear as linear_mod
from fxquant.nn.quantized import reference as R

needs_fp16_gemm = pytest.mark.skipif(not fp16_gemm.available(), reason="fbgemm's fp16 GEMM not in this torch build")


def _reference(out_features: int, in_features: int, per_channel: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features)
    w = lin.weight.detach()
    if per_channel:
        scale, zp = (w.abs().amax(1) / 127.5).clamp_min(1e-8), torch.zeros(out_features, dtype=torch.long)
        qparams = {"qscheme": torch.per_channel_affine, "scale": scale, "zero_point": zp, "axis": 0}
    else:  # affine per-tensor: a non-zero weight zero point
        qparams = {"qscheme": torch.per_tensor_affine, "scale": torch.tensor(float(w.abs().max()) / 120),
                   "zero_point": torch.tensor(3)}
    return R.Linear.from_float(lin, {"dtype": torch.int8, "quant_min": -128, "quant_max": 127, **qparams})


@needs_fp16_gemm
def test_integer_weights_are_exact_in_float16() -> None:
    w = torch.randint(-255, 256, (300, 200)).float()
    x = torch.randint(0, 256, (1, 200)).float()
    got = fp16_gemm.linear(x, fp16_gemm.pack(w), torch.zeros(300))
    assert torch.equal(got, (x.double() @ w.double().t()).float())  # sums below 2^24: float32 is exact too


@needs_fp16_gemm
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("post_op", ["none", "relu"])
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 2)])
def test_fp16_plan_matches_the_reference_within_one_step(per_channel: bool, post_op: str, rows: tuple) -> None:
    ref = _reference(700, 640, per_channel)
    x_q = torch.randint(0, 128, (*rows, 640), dtype=torch.uint8)
    with torch.no_grad():
        y = ref((x_q.float() - 60) * 0.02)
    y = F.relu(y) if post_op == "relu" else y
    lo = min(float(y.min()), 0.0)
    scale = (float(y.max()) - lo) / 255
    zp = int(round(-lo / scale))
    mod = Q.Linear.from_reference(ref, 0.02, 60, scale, zp, post_op=post_op, input_quant_max=127)
    got = linear_mod._fp16_gemm_plan(mod)(x_q, None)
    expected = torch.clamp(torch.round(y / scale) + zp, 0, 255)
    assert got.dtype == torch.uint8 and got.shape == expected.shape
    assert float((got.float() - expected).abs().max()) <= 1.0
    floated = linear_mod._float_plan(mod)(x_q, None)  # the plan it replaces: the same integers but for ties
    assert float((got.float() - floated.float()).abs().max()) <= 1.0
    f32_out = Q.Linear.from_reference(ref, 0.02, 60, output_dtype=torch.float32, post_op=post_op, input_quant_max=127)
    torch.testing.assert_close(linear_mod._fp16_gemm_plan(f32_out)(x_q, None), y, rtol=1e-4, atol=1e-4)


@needs_fp16_gemm
def test_rules_send_large_single_rows_to_fp16_gemm_and_the_module_runs_it() -> None:
    facts = dict(onednn_ok=True, input_7bit=True)
    assert x86.choose("linear", x86.Facts(rows=1, macs=1280 * 1000, **facts)) == "fp16_gemm"
    assert x86.choose("linear", x86.Facts(rows=1, macs=64 * 64, **facts)) == "float"  # one op more than it saves
    assert x86.choose("linear", x86.Facts(rows=1, macs=1280 * 1000, compiling=True, **facts)) == "float"
    assert x86.choose("linear", x86.Facts(rows=64, macs=64 * 1280 * 1000, **facts)) != "fp16_gemm"
    mod = Q.Linear.from_reference(_reference(1000, 1280, True), 0.02, 60, 0.05, 128, input_quant_max=127)
    x_q = torch.randint(0, 128, (1, 1280), dtype=torch.uint8)
    got = mod(x_q)
    assert torch.equal(got, linear_mod._fp16_gemm_plan(mod)(x_q, None))
    assert "fp16_gemm" in mod._kernel_cache  # the packed weight: a cache, outside the state dict
    assert not any("fp16" in k for k in mod.state_dict())


@needs_fp16_gemm
@pytest.mark.parametrize("shape", [(1, 1280), (2, 3, 1280)])
def test_weight_only_linear_at_few_rows_uses_fp16_gemm_and_matches_the_reference(shape: tuple) -> None:
    ref = _reference(1000, 1280, per_channel=True)
    mod = Q.LinearWeightOnly.from_reference(ref, post_op="relu")
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = F.relu(ref(x))
    got = mod(x)
    assert "fp16_gemm" in mod._kernel_cache
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(mod.float_weight(), ref.get_weight())  # the lowered module holds the reference's weight


@needs_fp16_gemm
@pytest.mark.parametrize("shape", [(1, 1280), (2, 3, 1280)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_linear_at_few_rows_uses_fp16_gemm_and_matches_the_reference_graph(shape: tuple,
                                                                                     per_channel: bool) -> None:
    from fxquant.kernels import dynamic

    ref = _reference(1000, 1280, per_channel)
    mod = Q.LinearDynamic.from_reference(ref, quant_min=0, quant_max=255, post_op="relu")
    x = torch.randn(*shape) * 3 + 1
    lo, hi = (float(v) for v in torch.aminmax(x))
    scale, zp = dynamic.affine_qparams(lo, hi, 0, 255)
    with torch.no_grad():  # the reference graph: fake quantization, then the reference linear
        expected = F.relu(ref(torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)))
    got = mod(x)
    assert mod._kernel_cache[("dynamic", x.numel() // 1280)] == "fp16_gemm"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@needs_fp16_gemm
def test_full_range_input_at_many_rows_runs_fp16_gemm_within_one_step() -> None:
    ref = _reference(700, 640, per_channel=True, seed=3)
    x_q = torch.randint(0, 256, (130, 640), dtype=torch.uint8)  # 8-bit input: onednn would need the split
    with torch.no_grad():
        y = ref((x_q.float() - 128) * 0.01)
    lo = min(float(y.min()), 0.0)
    scale = (float(y.max()) - lo) / 255
    zp = int(round(-lo / scale))
    mod = Q.Linear.from_reference(ref, 0.01, 128, scale, zp, input_quant_max=255)
    got = mod(x_q)
    assert mod._kernel_cache[(130, True)].__qualname__.startswith("_fp16_gemm_plan")
    expected = torch.clamp(torch.round(y / scale) + zp, 0, 255)
    diff = (got.float() - expected).abs()
    assert float(diff.max()) <= 1.0 and float((diff > 0).float().mean()) < 0.01


@needs_fp16_gemm
@pytest.mark.parametrize("rows", [1, 64])
def test_float16_weight_only_linear_reads_its_float16_weight_through_fbgemm(rows: int) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(512, 384)
    with torch.no_grad():  # a functional linear's weight under a float16 recipe: rounded by the reference graph
        lin.weight.copy_(lin.weight.half().float())
    ref = R.Linear.from_float(lin, {"qscheme": None, "dtype": torch.float16})
    mod = Q.LinearWeightOnly.from_reference(ref)
    x = torch.randn(rows, 512).to(torch.float16).to(torch.float32)  # as the reference graph casts it
    with torch.no_grad():
        expected = ref(x)
    got = mod(x)
    assert mod._kernel_cache[("weight_only", rows, torch.float32, "cpu")] == "fp16_gemm_half"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    unrounded = Q.LinearWeightOnly.from_reference(R.Linear.from_float(nn.Linear(512, 384),
                                                                      {"qscheme": None, "dtype": torch.float16}))
    unrounded(x)  # nn.Linear under a float16 recipe: torch.ao's reference keeps float32 weights -> the float path
    assert unrounded._kernel_cache[("weight_only", rows, torch.float32, "cpu")] == "float"
