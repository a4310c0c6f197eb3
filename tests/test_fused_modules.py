"""fxquant.nn.intrinsic: fused float modules compute their parts in sequence and check their part types."""
from __future__ import annotations

import copy
import io
import operator
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import fxquant.nn as fnn
from fxquant.nn import intrinsic as nni
from fxquant.nn.intrinsic import FusedModule, FusionTypeError

# class name -> factory of its parts and an input
SPECS = {
    "ConvReLU1d": (lambda: (nn.Conv1d(3, 4, 3), nn.ReLU()), (2, 3, 9)),
    "ConvReLU2d": (lambda: (nn.Conv2d(3, 4, 3), nn.ReLU()), (2, 3, 7, 7)),
    "ConvReLU3d": (lambda: (nn.Conv3d(3, 4, 3), nn.ReLU()), (2, 3, 5, 5, 5)),
    "ConvBn1d": (lambda: (nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4)), (2, 3, 9)),
    "ConvBn2d": (lambda: (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), (2, 3, 7, 7)),
    "ConvBn3d": (lambda: (nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4)), (2, 3, 5, 5, 5)),
    "ConvBnReLU1d": (lambda: (nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU()), (2, 3, 9)),
    "ConvBnReLU2d": (lambda: (nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), (2, 3, 7, 7)),
    "ConvBnReLU3d": (lambda: (nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4), nn.ReLU()), (2, 3, 5, 5, 5)),
    "LinearReLU": (lambda: (nn.Linear(5, 4), nn.ReLU()), (6, 5)),
    "LinearBn1d": (lambda: (nn.Linear(5, 4), nn.BatchNorm1d(4)), (6, 5)),
    "BNReLU2d": (lambda: (nn.BatchNorm2d(3), nn.ReLU()), (2, 3, 4, 4)),
    "BNReLU3d": (lambda: (nn.BatchNorm3d(3), nn.ReLU()), (2, 3, 4, 4, 4)),
    "LinearLeakyReLU": (lambda: (nn.Linear(5, 4), nn.LeakyReLU(0.2)), (6, 5)),
    "LinearTanh": (lambda: (nn.Linear(5, 4), nn.Tanh()), (6, 5)),
}


def _randomize_bn(modules):
    for m in modules:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)


def _build(name):
    factory, shape = SPECS[name]
    parts = factory()
    _randomize_bn(parts)
    return getattr(nni, name)(*parts), parts, torch.randn(shape)


def test_package_exports_every_class():
    assert set(SPECS) | {"ConvAdd2d", "ConvAddReLU2d"} <= set(nni.__all__)
    assert fnn.intrinsic is nni
    assert fnn.intrinsic.qat.ConvBn2d.__name__ == "ConvBn2d"


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("train", [True, False])
def test_forward_is_parts_in_sequence(name, train):
    torch.manual_seed(0)
    fused, parts, x = _build(name)
    reference = nn.Sequential(*copy.deepcopy(parts))
    fused.train(train)
    reference.train(train)
    assert isinstance(fused, FusedModule) and isinstance(fused, nn.Sequential)
    assert [type(m) for m in fused] == [type(p) for p in parts]
    assert all(a is b for a, b in zip(fused, parts))
    torch.testing.assert_close(fused(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_wrong_part_type_is_a_clear_error(name):
    factory, _ = SPECS[name]
    parts = list(factory())
    parts[0] = nn.Identity()
    with pytest.raises(FusionTypeError, match=rf"{name}.*must be torch\.nn\.\w+, got Identity"):
        getattr(nni, name)(*parts)
    with pytest.raises(AssertionError):  # torch.ao raises AssertionError; migrated code may catch it
        getattr(nni, name)(*parts)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_wrong_number_of_parts(name):
    parts = SPECS[name][0]()
    with pytest.raises(FusionTypeError, match=rf"{name}\(.*needs {len(parts)} modules, got {len(parts) - 1}"):
        getattr(nni, name)(*parts[:-1])
    with pytest.raises(FusionTypeError, match="unexpected"):
        getattr(nni, name)(*parts, nn.ReLU())


def test_parts_can_be_passed_by_role_name():
    conv, bn, relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
    fused = nni.ConvBnReLU2d(conv, relu=relu, bn=bn)
    assert fused[0] is conv and fused[1] is bn and fused[2] is relu
    with pytest.raises(FusionTypeError, match="unexpected"):
        nni.ConvBnReLU2d(conv, bn, relu, batchnorm=bn)


def test_subclass_of_a_part_type_is_rejected():
    class MyConv(nn.Conv2d):
        pass

    with pytest.raises(FusionTypeError, match="conv must be torch.nn.Conv2d, got MyConv"):
        nni.ConvReLU2d(MyConv(3, 4, 3), nn.ReLU())


def test_swapped_parts_are_rejected():
    with pytest.raises(FusionTypeError, match="conv must be torch.nn.Conv2d, got BatchNorm2d"):
        nni.ConvBn2d(nn.BatchNorm2d(4), nn.Conv2d(3, 4, 3))


def test_non_module_part_is_rejected():
    with pytest.raises(FusionTypeError, match="relu must be torch.nn.ReLU, got function"):
        nni.LinearReLU(nn.Linear(2, 2), torch.nn.functional.relu)


class _Double(nn.Module):
    def forward(self, w):
        return w * 2


def test_parametrized_part_is_accepted_by_its_original_type():
    conv = nn.Conv2d(3, 4, 3)
    parametrize.register_parametrization(conv, "weight", _Double())
    fused = nni.ConvReLU2d(conv, nn.ReLU())
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(fused(x), torch.relu(conv(x)), rtol=0, atol=0)


@pytest.mark.parametrize("add", [torch.add, operator.add])
def test_conv_add_and_conv_add_relu(add):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x1, x2 = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    fused_add = nni.ConvAdd2d(conv, add)
    fused_add_relu = nni.ConvAddReLU2d(conv, add, nn.ReLU())
    torch.testing.assert_close(fused_add(x1, x2), conv(x1) + x2, rtol=0, atol=0)
    torch.testing.assert_close(fused_add_relu(x1, x2), torch.relu(conv(x1) + x2), rtol=0, atol=0)
    assert fused_add[0] is conv and fused_add.add is add and isinstance(fused_add_relu.relu, nn.ReLU)


def test_conv_add_checks_its_parts():
    with pytest.raises(FusionTypeError, match="ConvAdd2d.*add must be a callable"):
        nni.ConvAdd2d(nn.Conv2d(3, 4, 3), "add")
    with pytest.raises(FusionTypeError, match="conv must be torch.nn.Conv2d, got Conv1d"):
        nni.ConvAdd2d(nn.Conv1d(3, 4, 3), torch.add)
    with pytest.raises(FusionTypeError, match="relu must be torch.nn.ReLU, got Tanh"):
        nni.ConvAddReLU2d(nn.Conv2d(3, 4, 3), torch.add, nn.Tanh())


@pytest.mark.parametrize("name", ["ConvBnReLU2d", "LinearBn1d", "LinearTanh"])
def test_deepcopy_pickle_and_torch_save(name):
    torch.manual_seed(0)
    fused, _, x = _build(name)
    fused.eval()
    buf = io.BytesIO()
    torch.save(fused, buf)
    buf.seek(0)
    clones = [copy.deepcopy(fused), pickle.loads(pickle.dumps(fused)), torch.load(buf, weights_only=False)]
    for clone in clones:
        assert type(clone) is type(fused)
        torch.testing.assert_close(clone(x), fused(x), rtol=0, atol=0)


def test_conv_add_relu_pickles_with_torch_add():
    fused = nni.ConvAddReLU2d(nn.Conv2d(3, 4, 3, padding=1), torch.add, nn.ReLU())
    clone = pickle.loads(pickle.dumps(fused))
    x1, x2 = torch.randn(1, 3, 4, 4), torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(clone(x1, x2), fused(x1, x2), rtol=0, atol=0)


def test_fx_trace_keeps_fused_module_as_a_leaf():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nni.ConvReLU2d(nn.Conv2d(3, 4, 3), nn.ReLU())

        def forward(self, x):
            return self.block(x)

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, FusedModule) or super().is_leaf_module(m, name)

    graph = Tracer().trace(M())
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["block"]


@pytest.mark.torchao
@pytest.mark.parametrize("name", sorted(SPECS))
def test_matches_torch_ao_fused_modules(name, torchao):
    import torch.ao.nn.intrinsic as ao_nni

    torch.manual_seed(0)
    ours, parts, x = _build(name)
    theirs = getattr(ao_nni, name)(*copy.deepcopy(parts))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for mode in (True, False):
        ours.train(mode)
        theirs.train(mode)
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
