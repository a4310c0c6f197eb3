"""from_torch_ao: real torch.ao config objects converted to fxquant's, checked against fxquant's own equivalents."""
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant.qconfig as qc
from fxquant import fake_quantize as fxfq
from fxquant import observer as fxobs
from fxquant.custom_config import ConvertCustomConfig, FuseCustomConfig, PrepareCustomConfig, QuantType
from fxquant.migrate import from_torch_ao, is_torch_ao_object
from fxquant.qconfig_mapping import QConfigMapping, get_default_qat_qconfig_mapping, get_default_qconfig_mapping
from qconfig_oracle import qconfig_spec
from test_qconfig import NAMED, NAMED_QAT, PACKED_4BIT

ao = pytest.importorskip("torch.ao.quantization")
import torch.ao.nn.intrinsic as ao_nni  # noqa: E402
import torch.ao.nn.qat as ao_nnqat  # noqa: E402
import torch.ao.nn.quantized.reference as ao_nnqr  # noqa: E402
import torch.ao.quantization.backend_config.utils  # noqa: E402,F401  (torch.ao needs it imported first)
from torch.ao.quantization import backend_config as ao_bc  # noqa: E402
from torch.ao.quantization import fuser_method_mappings as ao_fuse  # noqa: E402
from torch.ao.quantization import observer as ao_obs  # noqa: E402
from torch.ao.quantization.fx import custom_config as ao_cc  # noqa: E402
from torch.ao.quantization.qconfig import __dict__ as AO_QCONFIGS  # noqa: E402

BACKENDS = ["x86", "fbgemm", "qnnpack", "onednn"]


@pytest.mark.parametrize("name", NAMED + NAMED_QAT)
def test_named_qconfigs_convert_to_fxquants(name):
    ours = from_torch_ao(AO_QCONFIGS[name])
    assert isinstance(ours, qc.QConfig)
    assert qconfig_spec(ours) == qconfig_spec(getattr(qc, name))
    if name not in PACKED_4BIT:
        assert qc.qconfig_equals(ours, getattr(qc, name))


def _same_mapping(a, b):
    assert qc.qconfig_equals(a.global_qconfig, b.global_qconfig)
    assert list(a.object_type_qconfigs) == list(b.object_type_qconfigs)
    for key, q in b.object_type_qconfigs.items():
        assert qc.qconfig_equals(a.object_type_qconfigs[key], q), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_mappings_convert_to_fxquants(backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _same_mapping(from_torch_ao(ao.get_default_qconfig_mapping(backend)), get_default_qconfig_mapping(backend))
    _same_mapping(from_torch_ao(ao.get_default_qat_qconfig_mapping(backend)), get_default_qat_qconfig_mapping(backend))


def test_mapping_keys_and_every_section_convert():
    import fxquant.nn.intrinsic as nni
    m = (ao.QConfigMapping().set_global(None).set_object_type(ao_nni.LinearReLU, ao.default_qconfig)
         .set_object_type(F.relu, None).set_module_name_regex("a.*", ao.default_per_channel_qconfig)
         .set_module_name("", ao.default_qconfig).set_module_name("b.c", None)
         .set_module_name_object_type_order("b", ao_nni.LinearReLU, 2, ao.default_qconfig))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # '' is legal in torch.ao: no warning when migrating it
        ours = from_torch_ao(m)
    assert isinstance(ours, QConfigMapping) and ours.global_qconfig is None
    assert list(ours.object_type_qconfigs) == [nni.LinearReLU, F.relu]
    assert qc.qconfig_equals(ours.object_type_qconfigs[nni.LinearReLU], qc.default_qconfig)
    assert qc.qconfig_equals(ours.module_name_regex_qconfigs["a.*"], qc.default_per_channel_qconfig)
    assert list(ours.module_name_qconfigs.items())[1] == ("b.c", None)
    assert list(ours.module_name_object_type_order_qconfigs) == [("b", nni.LinearReLU, 2)]


def test_observer_classes_and_constructors():
    assert from_torch_ao(ao_obs.HistogramObserver) is fxobs.HistogramObserver
    ctor = from_torch_ao(ao_obs.MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine))
    assert ctor.func is fxobs.MinMaxObserver and ctor.keywords["dtype"] is torch.uint8
    nested = from_torch_ao(ao.FakeQuantize.with_args(observer=ao_obs.MovingAverageMinMaxObserver, quant_min=0,
                                                     quant_max=255, dtype=torch.quint8))
    assert nested.func is fxfq.FakeQuantize and nested.keywords["observer"] is fxobs.MovingAverageMinMaxObserver
    assert isinstance(nested().activation_post_process, fxobs.MovingAverageMinMaxObserver)


def test_packed_dtype_keeps_its_range():
    ctor = from_torch_ao(ao_obs.PerChannelMinMaxObserver.with_args(
        dtype=torch.quint4x2, qscheme=torch.per_channel_affine_float_qparams))
    assert ctor.keywords["dtype"] is torch.uint8 and (ctor.keywords["quant_min"], ctor.keywords["quant_max"]) == (0, 15)
    built = ctor()
    assert (built.quant_min, built.quant_max) == (0, 15)


def test_callable_args_survive():
    calls = []

    def make():
        calls.append(1)
        return 0.5

    theirs = ao_obs.MovingAverageMinMaxObserver.with_callable_args(averaging_constant=make)
    ours = from_torch_ao(theirs)
    assert ours().averaging_constant == 0.5 and calls == [1]


def test_migrated_observer_computes_torch_aos_qparams():
    x = torch.randn(64, 8) * 3 + 1
    theirs = ao_obs.MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=True)
    o_ours, o_theirs = from_torch_ao(theirs)(), theirs()
    o_ours(x)
    o_theirs(x)
    (s1, z1), (s2, z2) = o_ours.calculate_qparams(), o_theirs.calculate_qparams()
    assert torch.equal(s1, s2) and torch.equal(z1, z2)


def test_custom_configs():
    class Float(nn.Module):
        pass

    class Observed(nn.Module):
        @classmethod
        def from_float(cls, m):
            return cls()

    class Quantized(nn.Module):
        @classmethod
        def from_observed(cls, m):
            return cls()

    child = ao_cc.PrepareCustomConfig().set_preserved_attributes(["x"])
    theirs = (ao_cc.PrepareCustomConfig()
              .set_standalone_module_name("sub", ao.QConfigMapping().set_global(ao.default_qconfig), (1,), child,
                                          ao_bc.get_executorch_backend_config())
              .set_standalone_module_class(Float, None, (2,), None, None)
              .set_float_to_observed_mapping(Float, Observed).set_non_traceable_module_names(["n"])
              .set_non_traceable_module_classes([Float]).set_input_quantized_indexes([0])
              .set_output_quantized_indexes([1]).set_preserved_attributes(["p"]))
    ours = from_torch_ao(theirs)
    assert isinstance(ours, PrepareCustomConfig)
    entry = ours.standalone_module_names["sub"]
    assert qc.qconfig_equals(entry.qconfig_mapping.global_qconfig, qc.default_qconfig)
    assert isinstance(entry.prepare_custom_config, PrepareCustomConfig) and entry.example_inputs == (1,)
    assert type(entry.backend_config).__module__.startswith("fxquant.backend_config")
    assert ours.float_to_observed_mapping == {QuantType.STATIC: {Float: Observed}}
    assert (ours.non_traceable_module_names, ours.non_traceable_module_classes) == (["n"], [Float])
    assert (ours.input_quantized_indexes, ours.output_quantized_indexes, ours.preserved_attributes) == ([0], [1], ["p"])
    conv = from_torch_ao(ao_cc.ConvertCustomConfig().set_observed_to_quantized_mapping(
        Observed, Quantized, ao_cc.QuantType.WEIGHT_ONLY).set_preserved_attributes(["q"]))
    assert isinstance(conv, ConvertCustomConfig)
    assert conv.observed_to_quantized_mapping == {QuantType.WEIGHT_ONLY: {Observed: Quantized}}
    fuse = from_torch_ao(ao_cc.FuseCustomConfig().set_preserved_attributes(["f"]))
    assert isinstance(fuse, FuseCustomConfig) and fuse.preserved_attributes == ["f"]


def test_backend_config_classes_and_fuser_methods_convert():
    import fxquant.nn.intrinsic as nni
    import fxquant.nn.qat as nnqat
    import fxquant.nn.quantized.reference as nnqr
    dc = ao_bc.DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8, weight_dtype=torch.qint8,
                           bias_dtype=torch.float)
    linear_relu = (ao_bc.BackendPatternConfig((nn.Linear, nn.ReLU)).set_dtype_configs([dc])
                   .set_fuser_method(ao_fuse._sequential_wrapper2(ao_nni.LinearReLU))
                   .set_fused_module(ao_nni.LinearReLU).set_root_module(nn.Linear)
                   .set_qat_module(ao_nnqat.Linear).set_reference_quantized_module(ao_nnqr.Linear))
    relu_linear = (ao_bc.BackendPatternConfig((nn.ReLU, nn.Linear)).set_dtype_configs([dc])
                   .set_fuser_method(ao_fuse._reverse2(ao_fuse._sequential_wrapper2(ao_nni.LinearReLU))))
    conv_bn = (ao_bc.BackendPatternConfig((nn.Conv2d, nn.BatchNorm2d)).set_dtype_configs([dc])
               .set_fuser_method(ao_fuse.fuse_conv_bn).set_fused_module(ao_nni.ConvBn2d))
    ours = from_torch_ao(ao_bc.BackendConfig("mine").set_backend_pattern_configs([linear_relu, relu_linear, conv_bn]))
    assert ours.name == "mine"
    by_pattern = {c.pattern: c for c in ours.configs}
    lr = by_pattern[(nn.Linear, nn.ReLU)]
    assert (lr.fused_module, lr.qat_module, lr.reference_quantized_module) == (nni.LinearReLU, nnqat.Linear, nnqr.Linear)
    assert isinstance(lr.fuser_method(False, nn.Linear(2, 2), nn.ReLU()), nni.LinearReLU)
    reversed_fuser = by_pattern[(nn.ReLU, nn.Linear)].fuser_method
    assert isinstance(reversed_fuser(False, nn.ReLU(), nn.Linear(2, 2)), nni.LinearReLU)
    reversed_bn = from_torch_ao(ao_fuse._reverse2(ao_fuse.fuse_linear_bn))
    again = pickle.loads(pickle.dumps(reversed_bn))  # the reversing wrapper itself pickles
    assert isinstance(again(False, nn.BatchNorm1d(2).eval(), nn.Linear(2, 2).eval()), nn.Linear)
    fused = by_pattern[(nn.Conv2d, nn.BatchNorm2d)].fuser_method(False, nn.Conv2d(2, 2, 1).eval(),
                                                                  nn.BatchNorm2d(2).eval())
    assert not type(fused).__module__.startswith("torch.ao")


def test_builtin_backend_config_converts():
    ours = from_torch_ao(ao_bc.get_executorch_backend_config())
    assert len(ours.configs) == len(ao_bc.get_executorch_backend_config().configs)
    for c in ours.configs:
        for field in (c.root_module, c.qat_module, c.reference_quantized_module, c.fused_module, c.fuser_method):
            assert field is None or not is_torch_ao_object(field)


def test_unknown_torch_ao_class_names_the_class():
    fake = type("NoSuchModule", (nn.Module,), {"__module__": "torch.ao.nn.quantized.reference.modules.fake"})
    with pytest.raises(TypeError, match="NoSuchModule has no fxquant equivalent"):
        from_torch_ao(fake)
    bad = ao_bc.BackendConfig("b").set_backend_pattern_config(
        ao_bc.BackendPatternConfig(nn.Linear).set_reference_quantized_module(fake))
    with pytest.raises(TypeError, match="pattern .*Linear.*get_<name>_backend_config"):
        from_torch_ao(bad)


@pytest.mark.parametrize("obj,match", [
    (ao_obs.MinMaxObserver(), "instance of .*MinMaxObserver"),
    ({"": None}, "from_dict"),
    ("x86", "not a torch.ao quantization object"),
])
def test_bad_inputs(obj, match):
    with pytest.raises(TypeError, match=match):
        from_torch_ao(obj)


def test_none_and_fxquant_objects_pass_through():
    assert from_torch_ao(None) is None
    for obj in (qc.default_qconfig, fxobs.default_observer, fxobs.MinMaxObserver, QConfigMapping(),
                PrepareCustomConfig()):
        assert from_torch_ao(obj) is obj
    assert is_torch_ao_object(ao.default_qconfig) and not is_torch_ao_object(qc.default_qconfig)
