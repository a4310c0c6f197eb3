"""QConfigMapping API (setters, validation, dict form, repr) and the default mappings, entry by entry vs torch.ao."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant.qconfig as qc
from fxquant import observer as obs
from fxquant.qconfig_mapping import (QConfigMapping, _get_symmetric_qnnpack_qat_qconfig_mapping,
                                     _get_symmetric_qnnpack_qconfig_mapping, get_default_qat_qconfig_mapping,
                                     get_default_qconfig_mapping)
from qconfig_oracle import qconfig_spec

BACKENDS = ["x86", "fbgemm", "qnnpack", "onednn"]
Q1 = qc.default_qconfig
Q2 = qc.default_per_channel_qconfig
DICT_KEYS = ["", "object_type", "module_name_regex", "module_name", "module_name_object_type_order"]


def _sample():
    return (QConfigMapping().set_global(Q1).set_object_type(nn.Linear, Q2).set_object_type(F.relu, None)
            .set_object_type("reshape", qc.default_reuse_input_qconfig).set_module_name_regex("foo.*", Q2)
            .set_module_name("head", None).set_module_name_object_type_order("blk", F.linear, 1, Q2))


def test_setters_store_entries_and_chain():
    m = _sample()
    assert m.global_qconfig is Q1
    assert list(m.object_type_qconfigs.items()) == [(nn.Linear, Q2), (F.relu, None),
                                                    ("reshape", qc.default_reuse_input_qconfig)]
    assert dict(m.module_name_regex_qconfigs) == {"foo.*": Q2} and dict(m.module_name_qconfigs) == {"head": None}
    assert dict(m.module_name_object_type_order_qconfigs) == {("blk", F.linear, 1): Q2}
    m.set_object_type(nn.Linear, None)
    assert list(m.object_type_qconfigs)[0] is nn.Linear and m.object_type_qconfigs[nn.Linear] is None


def test_to_dict_has_torch_ao_keys_and_round_trips():
    m = _sample()
    d = m.to_dict()
    assert list(d) == DICT_KEYS
    assert d["module_name_object_type_order"] == [("blk", F.linear, 1, Q2)]
    again = QConfigMapping.from_dict(d)
    assert again.to_dict() == d
    assert QConfigMapping.from_dict({}).to_dict() == QConfigMapping().to_dict()


def test_to_dict_matches_torch_ao_structure():
    ao = pytest.importorskip("torch.ao.quantization")
    tag = ao.QConfig(nn.Identity, nn.Identity)
    theirs = (ao.QConfigMapping().set_global(tag).set_object_type(nn.Linear, None).set_module_name_regex("a", tag)
              .set_module_name("b", None).set_module_name_object_type_order("c", F.linear, 0, tag)).to_dict()
    ours = (QConfigMapping().set_global(Q1).set_object_type(nn.Linear, None).set_module_name_regex("a", Q1)
            .set_module_name("b", None).set_module_name_object_type_order("c", F.linear, 0, Q1)).to_dict()
    swap = {id(tag): Q1}
    assert list(ours) == list(theirs)
    converted = {k: (swap.get(id(v), v) if k == "" else
                     [tuple(swap.get(id(x), x) for x in row) for row in v]) for k, v in theirs.items()}
    assert converted == ours


@pytest.mark.parametrize("bad,exc,match", [
    ({"object_types": []}, ValueError, "unknown key 'object_types'.*'module_name_regex'"),
    ({"object_type": [(nn.Linear,)]}, ValueError, "tuples of 2"),
    ({"module_name_object_type_order": [("a", F.linear, Q1)]}, ValueError, "tuples of 4"),
    ([("", Q1)], TypeError, "expected a dict"),
])
def test_from_dict_errors(bad, exc, match):
    with pytest.raises(exc, match=match):
        QConfigMapping.from_dict(bad)


@pytest.mark.parametrize("call,exc,match", [
    (lambda m: m.set_object_type(3, Q1), TypeError, "module class, a function or a method name"),
    (lambda m: m.set_object_type(nn.Linear, "qconfig"), TypeError, "expected a QConfig"),
    (lambda m: m.set_object_type(nn.Linear, (obs.MinMaxObserver, None)), TypeError, "expected a QConfig"),
    (lambda m: m.set_global(obs.MinMaxObserver), TypeError, "set_global"),
    (lambda m: m.set_module_name_regex("conv[", Q1), ValueError, "not a valid regular expression"),
    (lambda m: m.set_module_name_regex(3, Q1), TypeError, "regex must be a str"),
    (lambda m: m.set_module_name(nn.Linear, Q1), TypeError, "module name must be a str"),
    (lambda m: m.set_module_name_object_type_order("a", "relu", 0, Q1), ValueError, "method calls"),
    (lambda m: m.set_module_name_object_type_order("a", F.relu, -1, Q1), ValueError, "index"),
    (lambda m: m.set_module_name_object_type_order("a", F.relu, True, Q1), ValueError, "index"),
])
def test_setter_validation_names_the_entry(call, exc, match):
    with pytest.raises(exc, match=match):
        call(QConfigMapping())


def test_torch_ao_qconfig_is_rejected_with_migration_hint():
    ao = pytest.importorskip("torch.ao.quantization")
    with pytest.raises(TypeError, match="from_torch_ao"):
        QConfigMapping().set_global(ao.default_qconfig)


def test_empty_module_name_warns():
    with pytest.warns(UserWarning, match="set_global"):
        QConfigMapping().set_module_name("", Q1)


def test_repr_lists_every_section_and_entry():
    text = repr(_sample())
    for part in ("global_qconfig", "object_type_qconfigs", "module_name_regex_qconfigs", "module_name_qconfigs",
                 "module_name_object_type_order_qconfigs", "torch.nn.modules.linear.Linear", "'reshape'",
                 "'foo.*'", "'head': None", "torch.nn.functional.linear", "MinMaxObserver"):
        assert part in text, part


def test_copy_is_independent():
    m = _sample()
    c = m.copy()
    c.set_object_type(nn.Conv2d, Q1).set_global(None)
    assert nn.Conv2d not in m.object_type_qconfigs and m.global_qconfig is Q1
    assert c.to_dict()["object_type"][:3] == m.to_dict()["object_type"]


# ------------------------------------------------------------------------------------ default mappings vs torch.ao

def _key_name(key):
    return key if isinstance(key, str) else f"{key.__module__}.{key.__qualname__}"


def _assert_same_mapping(ours, theirs):
    assert qconfig_spec(ours.global_qconfig) == qconfig_spec(theirs.global_qconfig)
    assert [_key_name(k) for k in ours.object_type_qconfigs] == [_key_name(k) for k in theirs.object_type_qconfigs]
    for key, theirs_q in theirs.object_type_qconfigs.items():
        ours_q = ours.object_type_qconfigs[key]
        assert qconfig_spec(ours_q, instances=False) == qconfig_spec(theirs_q, instances=False), key
        assert qconfig_spec(ours_q) == qconfig_spec(theirs_q), key
    for attr in ("module_name_regex_qconfigs", "module_name_qconfigs", "module_name_object_type_order_qconfigs"):
        assert len(getattr(ours, attr)) == len(getattr(theirs, attr)) == 0


@pytest.fixture(scope="module")
def ao():
    return pytest.importorskip("torch.ao.quantization")


@pytest.fixture(scope="module")
def fake_quantize():
    return pytest.importorskip("fxquant.fake_quantize")


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_qconfig_mapping_matches_torch_ao(backend, ao):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same_mapping(get_default_qconfig_mapping(backend), ao.get_default_qconfig_mapping(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("version", [0, 1])
def test_default_qat_qconfig_mapping_matches_torch_ao(backend, version, ao, fake_quantize):
    _assert_same_mapping(get_default_qat_qconfig_mapping(backend, version),
                         ao.get_default_qat_qconfig_mapping(backend, version))


def test_symmetric_qnnpack_mappings_match_torch_ao(ao, fake_quantize):
    from torch.ao.quantization import qconfig_mapping as ao_mapping
    _assert_same_mapping(_get_symmetric_qnnpack_qconfig_mapping(), ao_mapping._get_symmetric_qnnpack_qconfig_mapping())
    _assert_same_mapping(_get_symmetric_qnnpack_qat_qconfig_mapping(),
                         ao_mapping._get_symmetric_qnnpack_qat_qconfig_mapping())


def test_default_mapping_special_entries_follow_the_contract():
    m = get_default_qconfig_mapping("x86")
    types = m.object_type_qconfigs
    sigmoid = types[torch.sigmoid].activation()
    assert (float(sigmoid.scale), int(sigmoid.zero_point)) == (1 / 256, 0)
    tanh = types["tanh_"].activation()
    assert (float(tanh.scale), int(tanh.zero_point)) == (2 / 256, 128)
    assert types[nn.Softmax] is types[nn.Sigmoid]
    assert qc.is_reuse_input_qconfig(types["reshape"])
    assert types[nn.LayerNorm].weight is obs.default_placeholder_observer
    assert types[nn.ConvTranspose2d].weight().qscheme == torch.per_tensor_symmetric
    assert get_default_qconfig_mapping("qnnpack").object_type_qconfigs[nn.ConvTranspose2d] == (
        qc.get_default_qconfig("qnnpack"))
    assert types[nn.PReLU].weight().dtype == torch.uint8


def test_default_mapping_bad_backend():
    with pytest.raises(ValueError, match="backend 'tpu'"):
        get_default_qconfig_mapping("tpu")


def test_default_mapping_dict_round_trip_pickle_and_deepcopy(fake_quantize):
    import copy
    import pickle
    for m in (get_default_qconfig_mapping("fbgemm"), get_default_qat_qconfig_mapping("x86")):
        assert QConfigMapping.from_dict(m.to_dict()).to_dict() == m.to_dict()
        for again in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
            assert list(again.object_type_qconfigs) == list(m.object_type_qconfigs)
            assert all(qc.qconfig_equals(again.object_type_qconfigs[k], q) for k, q in m.object_type_qconfigs.items())
