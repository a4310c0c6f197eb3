"""Prepare/Convert/FuseCustomConfig: setters, validation, dict round trips, parity with torch.ao's dict form."""
import pickle

import pytest
import torch
from torch import nn

from fxquant.custom_config import (ConvertCustomConfig, FuseCustomConfig, PrepareCustomConfig, QuantType,
                                   StandaloneModuleConfigEntry, quant_type_from_str, quant_type_to_str)
from fxquant.qconfig_mapping import QConfigMapping


class FloatCustom(nn.Module):
    def forward(self, x):
        return x


class ObservedCustom(nn.Module):
    @classmethod
    def from_float(cls, mod):
        return cls()


class QuantizedCustom(nn.Module):
    @classmethod
    def from_observed(cls, mod):
        return cls()


class Standalone(nn.Module):
    pass


def _full_prepare_config():
    child = PrepareCustomConfig().set_preserved_attributes(["inner"])
    return (PrepareCustomConfig()
            .set_standalone_module_name("sub", QConfigMapping(), (torch.ones(1),), child, None)
            .set_standalone_module_class(Standalone, None, (torch.zeros(2),), None, None)
            .set_float_to_observed_mapping(FloatCustom, ObservedCustom)
            .set_non_traceable_module_names(["a", "b.c"])
            .set_non_traceable_module_classes([Standalone])
            .set_input_quantized_indexes([0, 2])
            .set_output_quantized_indexes([1])
            .set_preserved_attributes(["attr1", "attr2"]))


def test_quant_type_values_and_strings_match_torch_ao():
    assert [int(q) for q in (QuantType.DYNAMIC, QuantType.STATIC, QuantType.QAT, QuantType.WEIGHT_ONLY)] == [0, 1, 2, 3]
    for q in QuantType:
        assert quant_type_from_str(quant_type_to_str(q)) is q
    with pytest.raises(ValueError, match="weight_only"):
        quant_type_from_str("int8")
    ao = pytest.importorskip("torch.ao.quantization.quant_type")
    for q in ao.QuantType:
        assert QuantType[q.name] == int(q) and quant_type_to_str(QuantType(int(q))) == ao._get_quant_type_to_str(q)


def test_prepare_setters_store_and_chain():
    c = _full_prepare_config()
    entry = c.standalone_module_names["sub"]
    assert isinstance(entry, StandaloneModuleConfigEntry) and isinstance(entry.qconfig_mapping, QConfigMapping)
    assert entry.prepare_custom_config.preserved_attributes == ["inner"]
    assert c.standalone_module_classes[Standalone].qconfig_mapping is None
    assert c.float_to_observed_mapping == {QuantType.STATIC: {FloatCustom: ObservedCustom}}
    assert (c.non_traceable_module_names, c.non_traceable_module_classes) == (["a", "b.c"], [Standalone])
    assert (c.input_quantized_indexes, c.output_quantized_indexes) == ([0, 2], [1])
    assert "preserved_attributes" in repr(c) and "non_traceable_module_names" in repr(c)
    assert repr(PrepareCustomConfig()) == "PrepareCustomConfig({})"


def test_prepare_dict_round_trip():
    c = _full_prepare_config()
    d = c.to_dict()
    again = PrepareCustomConfig.from_dict(d)
    assert again.to_dict().keys() == d.keys()
    assert again.float_to_observed_mapping == c.float_to_observed_mapping
    assert again.standalone_module_names["sub"].prepare_custom_config.preserved_attributes == ["inner"]
    assert isinstance(again.standalone_module_names["sub"].qconfig_mapping, QConfigMapping)
    assert again.preserved_attributes == ["attr1", "attr2"] and again.input_quantized_indexes == [0, 2]
    assert PrepareCustomConfig().to_dict() == {}


def test_prepare_to_dict_matches_torch_ao():
    cc = pytest.importorskip("torch.ao.quantization.fx.custom_config")
    ours = (PrepareCustomConfig().set_float_to_observed_mapping(FloatCustom, ObservedCustom)
            .set_non_traceable_module_names(["a"]).set_non_traceable_module_classes([Standalone])
            .set_input_quantized_indexes([0]).set_output_quantized_indexes([0, 1]).set_preserved_attributes(["x"])
            .set_standalone_module_class(Standalone, None, (1,), None, None))
    theirs = (cc.PrepareCustomConfig().set_float_to_observed_mapping(FloatCustom, ObservedCustom)
              .set_non_traceable_module_names(["a"]).set_non_traceable_module_classes([Standalone])
              .set_input_quantized_indexes([0]).set_output_quantized_indexes([0, 1]).set_preserved_attributes(["x"])
              .set_standalone_module_class(Standalone, None, (1,), None, None))
    assert ours.to_dict() == theirs.to_dict()
    assert PrepareCustomConfig.from_dict(theirs.to_dict()).to_dict() == theirs.to_dict()
    conv_ours = ConvertCustomConfig().set_observed_to_quantized_mapping(ObservedCustom, QuantizedCustom, "dynamic")
    conv_theirs = cc.ConvertCustomConfig().set_observed_to_quantized_mapping(
        ObservedCustom, QuantizedCustom, cc.QuantType.DYNAMIC)
    assert conv_ours.set_preserved_attributes(["p"]).to_dict() == conv_theirs.set_preserved_attributes(["p"]).to_dict()
    assert FuseCustomConfig().set_preserved_attributes(["p"]).to_dict() == (
        cc.FuseCustomConfig().set_preserved_attributes(["p"]).to_dict())


@pytest.mark.parametrize("call,exc,match", [
    (lambda c: c.set_float_to_observed_mapping(FloatCustom, ObservedCustom, QuantType.DYNAMIC), ValueError, "static"),
    (lambda c: c.set_float_to_observed_mapping(FloatCustom, QuantizedCustom), TypeError, "from_float"),
    (lambda c: c.set_float_to_observed_mapping(FloatCustom(), ObservedCustom), TypeError, "expected a class"),
    (lambda c: c.set_float_to_observed_mapping(FloatCustom, ObservedCustom, "int4"), ValueError, "quant type"),
    (lambda c: c.set_standalone_module_name("sub", None, torch.ones(1), None, None), TypeError, r"\(x,\)"),
    (lambda c: c.set_standalone_module_name("", None, (), None, None), TypeError, "non-empty"),
    (lambda c: c.set_standalone_module_class("Standalone", None, (), None, None), TypeError, "expected a class"),
    (lambda c: c.set_standalone_module_name("s", 3, (), None, None), TypeError, "QConfigMapping"),
    (lambda c: c.set_standalone_module_name("s", None, (), "cfg", None), TypeError, "PrepareCustomConfig"),
    (lambda c: c.set_non_traceable_module_names("abc"), TypeError, "list of module names"),
    (lambda c: c.set_non_traceable_module_classes([nn.Linear, "x"]), TypeError, "'x' is not one"),
    (lambda c: c.set_input_quantized_indexes([-1]), TypeError, "-1"),
    (lambda c: c.set_output_quantized_indexes([True]), TypeError, "True"),
    (lambda c: c.set_preserved_attributes([1]), TypeError, "attribute names"),
])
def test_prepare_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call(PrepareCustomConfig())


def test_standalone_accepts_dict_forms():
    c = PrepareCustomConfig().set_standalone_module_name(
        "sub", {"": None}, (), {"preserved_attributes": ["a"]}, None)
    entry = c.standalone_module_names["sub"]
    assert isinstance(entry.qconfig_mapping, QConfigMapping)
    assert entry.prepare_custom_config.preserved_attributes == ["a"]


def test_torch_ao_objects_get_a_migration_hint():
    qm = pytest.importorskip("torch.ao.quantization")
    with pytest.raises(TypeError, match="from_torch_ao"):
        PrepareCustomConfig().set_standalone_module_name("s", qm.QConfigMapping(), (), None, None)


@pytest.mark.parametrize("cls", [PrepareCustomConfig, ConvertCustomConfig, FuseCustomConfig])
def test_unknown_dict_keys_are_rejected_with_the_valid_ones(cls):
    with pytest.raises(ValueError, match=r"unknown key 'preserved_attribute'.*'preserved_attributes'"):
        cls.from_dict({"preserved_attribute": ["a"]})
    with pytest.raises(TypeError, match="expected a dict"):
        cls.from_dict([("preserved_attributes", [])])


def test_prepare_from_dict_bad_standalone_entry():
    with pytest.raises(ValueError, match="5-tuples"):
        PrepareCustomConfig.from_dict({"standalone_module_name": [("sub", None, ())]})


def test_convert_config():
    c = (ConvertCustomConfig().set_observed_to_quantized_mapping(ObservedCustom, QuantizedCustom)
         .set_observed_to_quantized_mapping(FloatCustom, QuantizedCustom, QuantType.WEIGHT_ONLY)
         .set_preserved_attributes(["p"]))
    assert c.observed_to_quantized_mapping == {QuantType.STATIC: {ObservedCustom: QuantizedCustom},
                                               QuantType.WEIGHT_ONLY: {FloatCustom: QuantizedCustom}}
    d = c.to_dict()
    assert d["observed_to_quantized_custom_module_class"]["weight_only"] == {FloatCustom: QuantizedCustom}
    assert ConvertCustomConfig.from_dict(d).to_dict() == d
    with pytest.raises(TypeError, match="from_observed"):
        c.set_observed_to_quantized_mapping(ObservedCustom, ObservedCustom)
    assert ConvertCustomConfig().to_dict() == {} and "preserved" in repr(c)


def test_fuse_config():
    c = FuseCustomConfig().set_preserved_attributes(("a", "b"))
    assert c.preserved_attributes == ["a", "b"] and FuseCustomConfig.from_dict(c.to_dict()).preserved_attributes == ["a", "b"]
    assert FuseCustomConfig().to_dict() == {}


def test_setters_copy_their_lists_and_configs_pickle():
    names = ["a"]
    c = PrepareCustomConfig().set_non_traceable_module_names(names)
    names.append("b")
    assert c.non_traceable_module_names == ["a"]
    again = pickle.loads(pickle.dumps(_full_prepare_config()))
    assert again.to_dict().keys() == _full_prepare_config().to_dict().keys()
