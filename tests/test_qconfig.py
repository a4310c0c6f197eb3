"""QConfig, the named qconfigs (vs torch.ao), per-backend defaults, equality and inspection helpers."""
import pickle
import warnings

import pytest
import torch
from torch import nn

import fxquant.qconfig as qc
from fxquant import observer as obs
from qconfig_oracle import ctor_spec, qconfig_spec

NAMED = ["default_qconfig", "default_debug_qconfig", "default_per_channel_qconfig", "default_dynamic_qconfig",
         "float16_dynamic_qconfig", "float16_static_qconfig", "per_channel_dynamic_qconfig",
         "float_qparams_weight_only_qconfig", "float_qparams_weight_only_qconfig_4bit", "default_quint8_weight_qconfig",
         "default_reuse_input_qconfig", "default_symmetric_qnnpack_qconfig",
         "default_per_channel_symmetric_qnnpack_qconfig", "_default_fp32_placeholder_qconfig",
         "_default_quint8_placeholder_qconfig"]
NAMED_QAT = ["default_qat_qconfig", "default_dynamic_qat_qconfig", "default_weight_only_qconfig",
             "default_activation_only_qconfig", "default_qat_qconfig_v2", "default_symmetric_qnnpack_qat_qconfig",
             "default_per_channel_symmetric_qnnpack_qat_qconfig", "default_embedding_qat_qconfig",
             "default_embedding_qat_qconfig_4bit"]
BACKENDS = ["x86", "fbgemm", "qnnpack", "onednn"]
# torch.ao says dtype=quint4x2; fxquant's observer says uint8 with range 0..15 (no plain 4-bit dtype): the built
# observers must still agree.
PACKED_4BIT = {"float_qparams_weight_only_qconfig_4bit", "default_embedding_qat_qconfig_4bit"}


@pytest.fixture(scope="module")
def ao_qconfig():
    return pytest.importorskip("torch.ao.quantization.qconfig")


@pytest.fixture(scope="module")
def fake_quantize():
    return pytest.importorskip("fxquant.fake_quantize")


def _ours(name):
    return getattr(qc, name)


@pytest.mark.parametrize("name", NAMED)
def test_named_qconfig_matches_torch_ao(name, ao_qconfig):
    ours, theirs = _ours(name), getattr(ao_qconfig, name)
    assert isinstance(ours, qc.QConfig)
    if name not in PACKED_4BIT:
        assert qconfig_spec(ours, instances=False) == qconfig_spec(theirs, instances=False)
    assert qconfig_spec(ours) == qconfig_spec(theirs)


@pytest.mark.parametrize("name", NAMED_QAT)
def test_named_qat_qconfig_matches_torch_ao(name, ao_qconfig, fake_quantize):
    ours, theirs = _ours(name), getattr(ao_qconfig, name)
    assert ours is _ours(name)  # built once, then cached
    if name not in PACKED_4BIT:
        assert qconfig_spec(ours, instances=False) == qconfig_spec(theirs, instances=False)
    assert qconfig_spec(ours) == qconfig_spec(theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_qconfig_per_backend_matches_torch_ao(backend, ao_qconfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onednn warns without VNNI, in both libraries
        ours, theirs = qc.get_default_qconfig(backend), ao_qconfig.get_default_qconfig(backend)
    assert qconfig_spec(ours, instances=False) == qconfig_spec(theirs, instances=False)
    assert qconfig_spec(ours) == qconfig_spec(theirs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("version", [0, 1])
def test_default_qat_qconfig_per_backend_matches_torch_ao(backend, version, ao_qconfig, fake_quantize):
    ours, theirs = qc.get_default_qat_qconfig(backend, version), ao_qconfig.get_default_qat_qconfig(backend, version)
    assert qconfig_spec(ours, instances=False) == qconfig_spec(theirs, instances=False)
    assert qconfig_spec(ours) == qconfig_spec(theirs)


def test_default_qconfig_ranges_follow_the_contract():
    x86 = qc.get_default_qconfig("x86").activation()
    assert (x86.quant_min, x86.quant_max, x86.dtype) == (0, 127, torch.uint8)
    qnnpack = qc.get_default_qconfig("qnnpack")
    assert (qnnpack.activation().quant_max, qnnpack.weight().qscheme) == (255, torch.per_tensor_symmetric)
    assert qc.get_default_qconfig("fbgemm").weight().qscheme == torch.per_channel_symmetric


@pytest.mark.parametrize("call,match", [
    (lambda: qc.get_default_qconfig("arm"), "'arm' is not supported.*x86"),
    (lambda: qc.get_default_qconfig("x86", 1), "version 1"),
    (lambda: qc.get_default_qat_qconfig("cuda"), "'cuda'"),
    (lambda: qc.get_default_qat_qconfig("x86", 2), "version 2"),
])
def test_bad_backend_or_version(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_qconfig_rejects_instances_and_non_constructors():
    with pytest.raises(ValueError, match="instance.*with_args"):
        qc.QConfig(activation=obs.MinMaxObserver(), weight=obs.default_weight_observer)
    with pytest.raises(ValueError, match="weight"):
        qc.QConfig(activation=obs.MinMaxObserver, weight=obs.MinMaxObserver())
    with pytest.raises(TypeError, match="activation must be"):
        qc.QConfig(activation=torch.uint8, weight=None)


def test_qconfig_rejects_torch_ao_constructors_with_hint(ao_qconfig):
    from torch.ao.quantization import observer as ao_obs
    for bad in (ao_obs.MinMaxObserver, ao_obs.default_weight_observer):
        with pytest.raises(TypeError, match="from_torch_ao"):
            qc.QConfig(activation=obs.MinMaxObserver, weight=bad)


def test_qconfig_accepts_classes_partials_callables_and_none():
    q = qc.QConfig(activation=lambda: obs.MinMaxObserver(), weight=None)
    assert isinstance(q.activation(), obs.MinMaxObserver) and q.weight is None
    assert qc.QConfig(nn.Identity, obs.MinMaxObserver.with_args(dtype=torch.int8)).activation is nn.Identity
    assert q._fields == ("activation", "weight")


def test_qconfig_dynamic_is_deprecated_but_works():
    with pytest.warns(FutureWarning, match="QConfig"):
        q = qc.QConfigDynamic(weight=obs.default_weight_observer)
    assert q.activation is nn.Identity and q.weight is obs.default_weight_observer
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="instance"):
        qc.QConfigDynamic(weight=obs.MinMaxObserver())


def test_qconfig_equals():
    a = qc.QConfig(obs.MinMaxObserver.with_args(dtype=torch.uint8), obs.default_weight_observer)
    b = qc.QConfig(obs.MinMaxObserver.with_args(dtype=torch.quint8), obs.default_weight_observer)
    assert a is not b and qc.qconfig_equals(a, b)  # legacy dtypes normalised
    assert not qc.qconfig_equals(a, qc.QConfig(obs.MinMaxObserver.with_args(dtype=torch.int8),
                                               obs.default_weight_observer))
    assert not qc.qconfig_equals(a, qc.QConfig(obs.MovingAverageMinMaxObserver.with_args(dtype=torch.uint8),
                                               obs.default_weight_observer))
    assert not qc.qconfig_equals(a, qc.QConfig(obs.MinMaxObserver.with_args(dtype=torch.uint8, eps=1e-3),
                                               obs.default_weight_observer))
    assert qc.qconfig_equals(None, None) and not qc.qconfig_equals(a, None) and not qc.qconfig_equals(None, a)
    assert qc.qconfig_equals(qc.default_qconfig, qc.QConfig(obs.default_observer, obs.default_weight_observer))
    with_device = qc.qconfig_on_module_device(qc.default_qconfig, nn.Linear(2, 2))
    assert qc.qconfig_equals(with_device, qc.default_qconfig)  # callable args are ignored, as in torch.ao


def test_qconfig_equals_nested_observer(fake_quantize):
    fq = fake_quantize
    one = qc.QConfig(fq.FakeQuantize.with_args(observer=obs.MinMaxObserver.with_args(dtype=torch.quint8)), None)
    two = qc.QConfig(fq.FakeQuantize.with_args(observer=obs.MinMaxObserver.with_args(dtype=torch.uint8)), None)
    three = qc.QConfig(fq.FakeQuantize.with_args(observer=obs.MinMaxObserver.with_args(dtype=torch.int8)), None)
    assert qc.qconfig_equals(one, two) and not qc.qconfig_equals(one, three)


def test_check_qconfig_for_module_conv_transpose():
    deconv = nn.ConvTranspose2d(2, 2, 3)
    with pytest.raises(ValueError, match="ConvTranspose2d.*per-channel"):
        qc.check_qconfig_for_module(qc.default_per_channel_qconfig, deconv)
    qc.check_qconfig_for_module(qc.default_qconfig, deconv)
    qc.check_qconfig_for_module(qc.default_per_channel_qconfig, nn.Conv2d(2, 2, 3))
    qc.check_qconfig_for_module(None, deconv)
    qc.check_qconfig_for_module(qc._default_quint8_placeholder_qconfig, deconv)


def test_check_qconfig_for_module_sees_through_fake_quants(fake_quantize):
    with pytest.raises(ValueError, match="per-channel"):
        qc.check_qconfig_for_module(qc.get_default_qat_qconfig("x86"), nn.ConvTranspose1d(2, 2, 3))


def test_is_reuse_input_qconfig_and_memoryless():
    assert qc.is_reuse_input_qconfig(qc.default_reuse_input_qconfig)
    assert not qc.is_reuse_input_qconfig(qc.default_qconfig) and not qc.is_reuse_input_qconfig(None)
    memoryless = qc.QConfig(obs.MovingAverageMinMaxObserver.with_args(averaging_constant=1), None)
    assert qc.activation_is_memoryless(memoryless)
    assert not qc.activation_is_memoryless(qc.QConfig(obs.MovingAverageMinMaxObserver, None))
    assert not qc.activation_is_memoryless(qc.default_qconfig)


def test_qconfig_on_module_device_builds_on_the_module_device():
    lin = nn.Linear(2, 2).to(torch.float64)
    q = qc.qconfig_on_module_device(qc.default_qconfig, lin)
    assert q.activation().min_val.device == torch.device("cpu")
    assert "factory_kwargs" in repr(q.activation)
    keep = qc.QConfig(nn.Identity, obs.PlaceholderObserver)  # no factory_kwargs: kept as is
    assert qc.qconfig_on_module_device(keep, lin) == keep
    assert qc.qconfig_on_module_device(None, lin) is None and qc.qconfig_on_module_device(keep, None) is keep
    again = pickle.loads(pickle.dumps(q))  # no closures: prepared models holding it still pickle
    assert again.activation().min_val.device == torch.device("cpu")
    assert qc.qconfig_on_module_device(qc.default_qconfig, nn.ReLU()).activation().min_val.device.type == "cpu"


def test_qconfig_dict_helpers_are_deprecated(fake_quantize):
    with pytest.warns(FutureWarning):
        d = qc.get_default_qconfig_dict("qnnpack")
    assert set(d) == {"", "object_type", "module_name_regex", "module_name", "module_name_object_type_order"}
    with pytest.warns(FutureWarning):
        assert qc.get_default_qat_qconfig_dict()["object_type"]


def test_qconfigs_pickle_and_unknown_attribute():
    again = pickle.loads(pickle.dumps(qc.get_default_qconfig("x86")))
    assert qc.qconfig_equals(again, qc.get_default_qconfig("x86"))
    with pytest.raises(AttributeError, match="no attribute 'default_qconfig_typo'"):
        qc.default_qconfig_typo  # noqa: B018
    assert ctor_spec(qc.default_qconfig.activation)[0] == "MinMaxObserver"
