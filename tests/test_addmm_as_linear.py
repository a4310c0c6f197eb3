"""Hugging Face's Conv1D (GPT-2): ``torch.addmm(bias, x, weight)`` with a weight stored (in, out).

prepare_fx rewrites it as ``F.linear(x, weight.t(), bias)`` (pass ``addmm_as_linear``), so every recipe quantizes it
as a linear layer -- the same model written with ``nn.Linear`` is the oracle.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import nn as fnn


class Conv1D(nn.Module):  # transformers.pytorch_utils.Conv1D, as GPT-2 uses it
    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class LinearAsConv1D(nn.Module):  # the same layer with nn.Linear and the transposed weight, viewed the same way
    def __init__(self, conv: Conv1D) -> None:
        super().__init__()
        self.nf = conv.nf
        self.linear = nn.Linear(conv.weight.shape[0], conv.nf)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.t())
            self.linear.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return self.linear(x.view(-1, x.size(-1))).view(size_out)


class MLP(nn.Module):  # GPT-2's MLP block
    def __init__(self, layer: type = Conv1D, src: "MLP | None" = None) -> None:
        super().__init__()
        if src is None:
            self.c_fc, self.c_proj = Conv1D(64, 16), Conv1D(16, 64)
        else:
            self.c_fc, self.c_proj = LinearAsConv1D(src.c_fc), LinearAsConv1D(src.c_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c_proj(F.gelu(self.c_fc(x)))


def _inputs(seed: int) -> torch.Tensor:
    return torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed))


RECIPES = {"static": lambda: fxquant.get_default_qconfig_mapping("x86"),
           "dynamic": lambda: fxquant.QConfigMapping().set_global(fxquant.default_dynamic_qconfig),
           "weight_only_fp16": lambda: fxquant.QConfigMapping().set_global(fxquant.float16_dynamic_qconfig)}


def _convert(model: nn.Module, mapping: fxquant.QConfigMapping) -> tuple[nn.Module, nn.Module, nn.Module]:
    prepared = fxquant.prepare_fx(model.eval(), mapping, (_inputs(0),))
    with torch.no_grad():
        for seed in (1, 2):
            prepared(_inputs(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = fxquant.convert_to_reference_fx(copy.deepcopy(prepared))
        return prepared, reference, fxquant.convert_fx(prepared)


def test_prepare_rewrites_addmm_of_constants_as_linear_and_stays_bit_identical() -> None:
    model = MLP().eval()
    prepared = fxquant.prepare_fx(model, RECIPES["static"](), (_inputs(0),))
    targets = [n.target for n in prepared.graph.nodes if n.op == "call_function"]
    assert torch.addmm not in targets and targets.count(F.linear) == 2
    with torch.no_grad():
        assert torch.equal(prepared(_inputs(3)), model(_inputs(3)))  # observers only: the float result, bit for bit


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_conv1d_quantizes_exactly_like_the_same_model_written_with_nn_linear(recipe: str) -> None:
    torch.manual_seed(0)
    conv = MLP()
    twin = MLP(src=conv)
    _, ref_conv, low_conv = _convert(conv, RECIPES[recipe]())
    _, ref_twin, low_twin = _convert(twin, RECIPES[recipe]())
    x = _inputs(4)
    with torch.no_grad():
        if recipe == "weight_only_fp16":  # torch.ao casts a functional linear's weight, not nn.Linear's: as here
            torch.testing.assert_close(ref_conv(x), ref_twin(x), rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(low_conv(x), ref_conv(x), rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(ref_conv(x), ref_twin(x))
            assert torch.equal(low_conv(x), low_twin(x))
        assert not torch.equal(ref_conv(x), conv(x))  # it is quantized
    kinds = {fnn.quantized.Linear, fnn.quantized.LinearDynamic, fnn.quantized.LinearWeightOnly}
    lowered = [type(m) for m in low_conv.modules() if type(m) in kinds]
    assert len(lowered) == 2, f"{recipe}: {lowered}"
    assert not any(isinstance(p, nn.Parameter) and p.dim() == 2 for p in low_conv.parameters())  # no float weight left


def test_addmm_keeps_its_own_qconfig_and_is_left_alone_without_one() -> None:
    mapping = RECIPES["static"]().set_object_type(torch.addmm, None)
    prepared = fxquant.prepare_fx(MLP().eval(), mapping, (_inputs(0),))
    assert [n.target for n in prepared.graph.nodes if n.op == "call_function"].count(torch.addmm) == 2
    mapping = RECIPES["static"]().set_object_type(F.linear, None)  # names F.linear, not the model's addmm
    _, _, lowered = _convert(MLP(), mapping)
    assert sum(type(m) is fnn.quantized.Linear for m in lowered.modules()) == 2


class NotALinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16))
        self.b = nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = torch.addmm(self.b, x, self.w, beta=0.5)  # scaled bias
        c = torch.addmm(self.b, x, y)  # an activation as the second factor
        return a + c


def test_addmm_with_scaling_or_an_activation_factor_is_not_rewritten() -> None:
    x, y = torch.randn(4, 16), torch.randn(16, 16)
    prepared = fxquant.prepare_fx(NotALinear().eval(), RECIPES["static"](), (x, y))
    assert [n.target for n in prepared.graph.nodes].count(torch.addmm) == 2
    assert F.linear not in [n.target for n in prepared.graph.nodes]


def test_qat_trains_the_conv1d_weight_through_the_rewrite() -> None:
    model = MLP().train()
    qat = fxquant.prepare_qat_fx(model, fxquant.get_default_qat_qconfig_mapping("x86"), (_inputs(0),))
    weight = qat.get_parameter("c_fc.weight")
    assert [n.target for n in qat.graph.nodes if n.op == "call_function"].count(F.linear) == 2  # rewritten in QAT too
    qat(_inputs(1)).pow(2).mean().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowered = fxquant.convert_fx(qat.eval())
    assert sum(type(m) is fnn.quantized.Linear for m in lowered.modules()) == 2


def test_dynamic_preset_quantizes_conv1d_and_functional_linears() -> None:
    from fxquant.tools.presets import qconfig_mapping_for

    _, reference, lowered = _convert(MLP(), qconfig_mapping_for("dynamic", "x86"))
    assert sum(type(m) is fnn.quantized.LinearDynamic for m in lowered.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(lowered(_inputs(5)), reference(_inputs(5)), rtol=1e-5, atol=1e-5)


def test_a_convert_time_mapping_names_addmm_as_the_user_wrote_it() -> None:
    mapping = RECIPES["static"]()
    model = MLP().eval()
    prepared = fxquant.prepare_fx(copy.deepcopy(model), mapping, (_inputs(0),))
    prepared(_inputs(1))
    convert_mapping = RECIPES["static"]().set_object_type(torch.addmm, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowered = fxquant.convert_fx(prepared, qconfig_mapping=convert_mapping)
    assert not any(type(m) is fnn.quantized.Linear for m in lowered.modules())  # both left in float
    at_prepare = fxquant.prepare_fx(copy.deepcopy(model), RECIPES["static"]().set_object_type(torch.addmm, None),
                                    (_inputs(0),))
    at_prepare(_inputs(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        at_prepare = fxquant.convert_fx(at_prepare)
    with torch.no_grad():  # the same model as when the prepare-time mapping left addmm float
        assert torch.equal(lowered(_inputs(2)), at_prepare(_inputs(2)))
