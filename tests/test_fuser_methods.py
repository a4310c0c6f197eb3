"""fxquant.fuser_method_mappings: BN folding for post-training, fused containers for QAT, clear errors."""
from __future__ import annotations

import copy
import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant.fuser_method_mappings as fmm
from fxquant.fuser_method_mappings import FusionError, FusionTypeError
from fxquant.nn import intrinsic as nni

CONVS = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}
CONVTS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _bn(cls, n, train=False):
    bn = cls(n)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.25, 4.0)
    bn.weight.data.uniform_(-1.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    return bn.train(train)


def _conv_bn(dim, cin=3, cout=4, train=False, **kw):
    conv_cls, bn_cls = CONVS[dim]
    return conv_cls(cin, cout, 3, **kw).train(train), _bn(bn_cls, cout, train)


def _x(dim, c=3, n=2, size=6):
    return torch.randn(n, c, *([size] * dim))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_post_training_conv_bn_folds_into_the_conv(dim, bias):
    torch.manual_seed(dim)
    conv, bn = _conv_bn(dim, bias=bias)
    before = copy.deepcopy(conv.state_dict())
    fused = fmm.fuse_conv_bn(False, conv, bn)
    assert type(fused) is CONVS[dim][0] and fused is not conv
    x = _x(dim)
    torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())  # inputs untouched


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_post_training_conv_bn_relu_gives_conv_relu(dim):
    torch.manual_seed(dim)
    conv, bn = _conv_bn(dim)
    relu = nn.ReLU().eval()
    fused = fmm.fuse_conv_bn_relu(False, conv, bn, relu)
    assert type(fused).__name__ == f"ConvReLU{dim}d" and fused[1] is relu
    x = _x(dim)
    torch.testing.assert_close(fused(x), torch.relu(bn(conv(x))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_qat_fusion_keeps_the_modules(dim):
    conv, bn = _conv_bn(dim, train=True)
    relu = nn.ReLU()
    pair = fmm.fuse_conv_bn(True, conv, bn)
    triple = fmm.fuse_conv_bn_relu(True, conv, bn, relu)
    assert type(pair) is getattr(nni, f"ConvBn{dim}d") and pair[0] is conv and pair[1] is bn
    assert type(triple) is getattr(nni, f"ConvBnReLU{dim}d") and triple[2] is relu


def test_linear_bn_post_training_and_qat():
    torch.manual_seed(0)
    linear, bn = nn.Linear(5, 4).eval(), _bn(nn.BatchNorm1d, 4)
    x = torch.randn(8, 5)
    fused = fmm.fuse_linear_bn(False, linear, bn)
    assert type(fused) is nn.Linear
    torch.testing.assert_close(fused(x), bn(linear(x)), rtol=1e-5, atol=1e-5)
    qat = fmm.fuse_linear_bn(True, linear.train(), bn.train())
    assert type(qat) is nni.LinearBn1d and qat[0] is linear and qat[1] is bn


def test_linear_bn_with_a_single_feature_bn_broadcasts_post_training_only():
    torch.manual_seed(0)
    linear, bn = nn.Linear(5, 4).eval(), _bn(nn.BatchNorm1d, 1)
    x = torch.randn(8, 1, 5)  # BN over the singleton dim 1: one scale for every feature
    torch.testing.assert_close(fmm.fuse_linear_bn(False, linear, bn)(x), bn(linear(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(FusionError, match="num_features=1 but Linear has 4 output channels"):
        fmm.fuse_linear_bn(True, linear.train(), bn.train())


@given(dim=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2, 4]), out_per_group=st.integers(1, 3),
       stride=st.integers(1, 2), bias=st.booleans())
@settings(max_examples=40, deadline=None)
def test_convtranspose_bn_folds_for_any_groups(dim, groups, out_per_group, stride, bias):
    torch.manual_seed(groups * 10 + out_per_group)
    cin, cout = 2 * groups, out_per_group * groups
    convt = CONVTS[dim](cin, cout, 3, stride=stride, groups=groups, bias=bias).eval()
    bn = _bn(CONVS[dim][1], cout)
    fused = fmm.fuse_convtranspose_bn(False, convt, bn)
    assert fused.weight.shape == convt.weight.shape
    x = _x(dim, c=cin, size=4)
    torch.testing.assert_close(fused(x), bn(convt(x)), rtol=1e-5, atol=1e-5)


def test_convtranspose_bn_is_not_supported_for_qat():
    with pytest.raises(NotImplementedError, match="not supported for QAT"):
        fmm.fuse_convtranspose_bn(True, nn.ConvTranspose2d(2, 4, 3), nn.BatchNorm2d(4))


def test_modules_in_different_modes_are_rejected():
    conv, bn = _conv_bn(2)
    conv.train()
    with pytest.raises(FusionError, match=r"different modes \(Conv2d=train, BatchNorm2d=eval\)"):
        fmm.fuse_conv_bn(False, conv, bn)
    with pytest.raises(AssertionError):
        fmm.fuse_conv_bn_relu(True, conv, bn, nn.ReLU())


@pytest.mark.parametrize("fuser, modules", [
    (fmm.fuse_conv_bn, lambda: _conv_bn(2, train=True)),
    (fmm.fuse_linear_bn, lambda: (nn.Linear(3, 4), _bn(nn.BatchNorm1d, 4, train=True))),
    (fmm.fuse_convtranspose_bn, lambda: (nn.ConvTranspose2d(3, 4, 3), _bn(nn.BatchNorm2d, 4, train=True))),
])
def test_post_training_folding_in_train_mode_says_to_call_eval(fuser, modules):
    with pytest.raises(FusionError, match=r"train mode.*model\.eval\(\).*prepare_qat_fx"):
        fuser(False, *modules())


@pytest.mark.parametrize("is_qat", [False, True])
def test_bn_channel_mismatch(is_qat):
    conv = nn.Conv2d(3, 5, 3).train(is_qat)
    bn = _bn(nn.BatchNorm2d, 4, train=is_qat)
    with pytest.raises(FusionError, match="BatchNorm2d has num_features=4 but Conv2d has 5 output channels"):
        fmm.fuse_conv_bn(is_qat, conv, bn)


def test_bn_of_the_wrong_dimension():
    with pytest.raises(FusionTypeError, match="expected BatchNorm2d after Conv2d, got BatchNorm1d"):
        fmm.fuse_conv_bn(False, nn.Conv2d(3, 4, 3).eval(), nn.BatchNorm1d(4).eval())


def test_not_a_conv():
    with pytest.raises(FusionTypeError, match="the conv must be one of Conv1d, Conv2d, Conv3d, got Linear"):
        fmm.fuse_conv_bn(False, nn.Linear(3, 4).eval(), nn.BatchNorm1d(4).eval())


@pytest.mark.parametrize("kwargs", [{"affine": False}, {"track_running_stats": False}])
def test_qat_needs_affine_bn_with_running_stats(kwargs):
    with pytest.raises(FusionError, match="for QAT: the BatchNorm needs affine=True and track_running_stats=True"):
        fmm.fuse_conv_bn(True, nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, **kwargs))


def test_post_training_bn_without_running_stats():
    bn = nn.BatchNorm2d(4, track_running_stats=False).eval()
    with pytest.raises(FusionError, match="no running statistics"):
        fmm.fuse_conv_bn(False, nn.Conv2d(3, 4, 3).eval(), bn)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_relu_and_bn_relu_pick_the_dimension(dim):
    conv_cls, bn_cls = CONVS[dim]
    assert type(fmm.fuse_conv_relu(False, conv_cls(2, 2, 1), nn.ReLU())) is getattr(nni, f"ConvReLU{dim}d")
    if dim > 1:
        assert type(fmm.fuse_bn_relu(True, bn_cls(2), nn.ReLU())) is getattr(nni, f"BNReLU{dim}d")
    else:
        with pytest.raises(FusionTypeError, match="one of BatchNorm2d, BatchNorm3d, got BatchNorm1d"):
            fmm.fuse_bn_relu(False, bn_cls(2), nn.ReLU())


def test_linear_wrappers():
    linear = nn.Linear(3, 4)
    assert type(fmm.fuse_linear_relu(False, linear, nn.ReLU())) is nni.LinearReLU
    assert type(fmm.fuse_linear_tanh(False, linear, nn.Tanh())) is nni.LinearTanh
    assert type(fmm.fuse_linear_leaky_relu(True, linear, nn.LeakyReLU())) is nni.LinearLeakyReLU
    with pytest.raises(FusionTypeError, match="relu must be torch.nn.ReLU, got Tanh"):
        fmm.fuse_linear_relu(False, linear, nn.Tanh())
    assert fmm.fuse_linear_relu.__name__ == "fuse_linear_relu"


def test_linear_bn_leaky_relu():
    torch.manual_seed(0)
    linear, bn, act = nn.Linear(5, 4).eval(), _bn(nn.BatchNorm1d, 4), nn.LeakyReLU(0.1).eval()
    fused = fmm.fuse_linear_bn_leaky_relu(False, linear, bn, act)
    x = torch.randn(6, 5)
    assert type(fused) is nni.LinearLeakyReLU
    torch.testing.assert_close(fused(x), act(bn(linear(x))), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError):
        fmm.fuse_linear_bn_leaky_relu(True, linear, bn, act)


@pytest.mark.parametrize("add", [torch.add, operator.add])
def test_conv_add_fusers(add):
    torch.manual_seed(0)
    conv, bn = _conv_bn(2, cin=3, cout=3, padding=1)
    relu = nn.ReLU().eval()
    x1, x2 = _x(2), _x(2)
    torch.testing.assert_close(fmm.fuse_conv_add(False, conv, add)(x1, x2), conv(x1) + x2)
    torch.testing.assert_close(fmm.fuse_conv_add_relu(False, conv, add, relu)(x1, x2), torch.relu(conv(x1) + x2))
    torch.testing.assert_close(fmm.fuse_conv_bn_add(False, conv, bn, add)(x1, x2), bn(conv(x1)) + x2,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fmm.fuse_conv_bn_add_relu(False, conv, bn, add, relu)(x1, x2),
                               torch.relu(bn(conv(x1)) + x2), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError):
        fmm.fuse_conv_bn_add(True, conv, bn, add)


def test_get_fuser_method_and_overrides():
    assert fmm.get_fuser_method((nn.Conv2d, nn.BatchNorm2d)) is fmm.fuse_conv_bn
    assert fmm.get_fuser_method([nn.Linear, nn.ReLU]) is fmm.fuse_linear_relu

    def mine(is_qat, conv, bn):
        return nn.Identity()

    assert fmm.get_fuser_method((nn.Conv2d, nn.BatchNorm2d), {(nn.Conv2d, nn.BatchNorm2d): mine}) is mine
    with pytest.raises(FusionTypeError, match="no fuser method for Conv2d \\+ BatchNorm1d; known patterns:"):
        fmm.get_fuser_method((nn.Conv2d, nn.BatchNorm1d))


@pytest.mark.torchao
@given(dim=st.sampled_from([1, 2, 3]), cout=st.integers(1, 6), groups=st.sampled_from([1, 2]),
       bias=st.booleans(), relu=st.booleans())
@settings(max_examples=40, deadline=None)
def test_folding_is_bit_identical_to_torch_ao(dim, cout, groups, bias, relu):
    import oracle

    oracle.require_torchao()
    import torch.ao.quantization.fuser_method_mappings as ao_fmm

    torch.manual_seed(cout)
    conv, bn = _conv_bn(dim, cin=2 * groups, cout=cout * groups, groups=groups, bias=bias)
    extra = (nn.ReLU().eval(),) if relu else ()
    name = "fuse_conv_bn_relu" if relu else "fuse_conv_bn"
    ours = getattr(fmm, name)(False, conv, bn, *extra)
    theirs = getattr(ao_fmm, name)(False, conv, bn, *extra)
    assert type(ours).__name__ == type(theirs).__name__
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.torchao
def test_default_table_covers_torch_ao_and_builds_the_same_types(torchao):
    import torch.ao.quantization.fuser_method_mappings as ao_fmm

    table = ao_fmm._DEFAULT_OP_LIST_TO_FUSER_METHOD
    for key in table:
        modules = tuple(_instance(cls) for cls in key)
        for is_qat in (False, True):
            for m in modules:
                m.train(is_qat)
            expected = _result_type(lambda: table[key](is_qat, *copy.deepcopy(modules)))
            got = _result_type(lambda: fmm.get_fuser_method(key)(is_qat, *copy.deepcopy(modules)))
            assert got == expected, (key, is_qat)


def _instance(cls):
    if cls in (nn.ReLU, nn.Tanh, nn.LeakyReLU):
        return cls()
    if issubclass(cls, nn.modules.batchnorm._BatchNorm):
        return cls(4)
    return cls(3, 4) if cls is nn.Linear else cls(3, 4, 1)


def _result_type(build):
    try:
        return type(build()).__name__
    except Exception:  # torch raises a bare Exception for ConvTranspose QAT; ours NotImplementedError
        return "error"
