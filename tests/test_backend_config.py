"""Tests for fxquant.backend_config: the data model, the built-in backends (against torch.ao's built-ins of
the same name), qconfig / DTypeConfig matching (against torch.ao's prepare-time decision) and the table."""
from __future__ import annotations

import collections
import itertools
import operator
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxquant._dtypes import normalize_dtype
from fxquant.backend_config import (ACTIVATION_ROLES, ALL_BACKENDS, ALL_ROLES, BackendConfig, BackendPatternConfig,
                                    DTypeConfig, DTypeWithConstraints, MatchAllNode, ObservationType,
                                    find_dtype_config, get_backend_config, get_native_backend_config,
                                    get_native_backend_config_dict, get_x86_backend_config, missing_references,
                                    patterns_table, patterns_table_markdown, qconfig_matches_dtype_config)
from fxquant.backend_config.utils import (complex_format_fuser_method, get_fuser_method_mapping,
                                          get_root_module_to_quantized_reference_module)

QUINT8, QINT8 = getattr(torch, "quint8"), getattr(torch, "qint8")
DIFF = ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT
SHARE = ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT
WEIGHTED = DTypeConfig(QUINT8, QUINT8, QINT8, torch.float)


# ----------------------------------------------------------------------------------------------- data model
def test_dtype_config_normalises_legacy_dtypes_and_exposes_properties():
    dc = DTypeConfig(input_dtype=QUINT8, output_dtype=DTypeWithConstraints(QUINT8, 0, 127), weight_dtype=QINT8,
                     bias_dtype=torch.float, is_dynamic=False)
    assert (dc.input_dtype, dc.output_dtype, dc.weight_dtype) == (torch.uint8, torch.uint8, torch.int8)
    assert dc.output_dtype_with_constraints.quant_max_upper_bound == 127
    assert dc == DTypeConfig(torch.uint8, DTypeWithConstraints(torch.uint8, 0, 127), torch.int8, torch.float32, False)
    assert hash(dc) == hash(DTypeConfig.from_dict(dc.to_dict()))
    assert dc.short_str() == "in=uint8 out=uint8[qmin>=0,qmax<=127] w=int8 b=float32"


def test_dtype_config_dict_round_trip_and_unknown_keys():
    d = {"input_dtype": QUINT8, "weight_dtype": DTypeWithConstraints(QINT8, scale_min_lower_bound=2**-12),
         "is_dynamic": True}
    dc = DTypeConfig.from_dict(d)
    assert dc.to_dict() == {"input_dtype": torch.uint8, "weight_dtype": DTypeWithConstraints(torch.int8, None, None,
                                                                                             2**-12),
                            "is_dynamic": True}
    with pytest.raises(ValueError, match=r"unknown DTypeConfig keys \['bias_type'\].*valid keys"):
        DTypeConfig.from_dict({"bias_type": torch.float})
    with pytest.raises(TypeError, match="input_dtype must be a torch.dtype"):
        DTypeConfig(input_dtype="uint8")


@pytest.mark.parametrize("kwargs, message", [
    ({"quant_min_lower_bound": 10, "quant_max_upper_bound": 5}, "quant_min_lower_bound"),
    ({"scale_exact_match": 0.5}, "both scale_exact_match and zero_point_exact_match"),
    ({"zero_point_exact_match": 1.5, "scale_exact_match": 0.1}, "zero_point_exact_match must be an int"),
    ({"scale_min_lower_bound": "x"}, "scale_min_lower_bound must be a number"),
])
def test_dtype_with_constraints_rejects_inconsistent_values(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DTypeWithConstraints(torch.uint8, **kwargs)


def test_pattern_config_chaining_to_dict_and_from_dict():
    def fuser(is_qat, linear, relu):
        return nn.Sequential(linear, relu)

    conf = (BackendPatternConfig((nn.Linear, nn.ReLU)).set_observation_type(SHARE).add_dtype_config(WEIGHTED)
            .set_root_module(nn.Linear).set_fuser_method(fuser)._set_input_type_to_index({"weight": 1})
            ._set_num_tensor_args_to_observation_type({1: SHARE})._set_input_output_observed(False))
    d = conf.to_dict()
    assert d["pattern"] == (nn.Linear, nn.ReLU) and d["observation_type"] is SHARE
    assert d["dtype_configs"] == [WEIGHTED.to_dict()] and d["input_output_observed"] is False
    back = BackendPatternConfig.from_dict(d)
    assert back.to_dict() == d
    assert back.complex_format_pattern == (nn.ReLU, nn.Linear)
    with pytest.raises(ValueError, match=r"unknown BackendPatternConfig keys \['patern'\].*'pattern'"):
        BackendPatternConfig.from_dict({"patern": nn.Linear})


@pytest.mark.parametrize("pattern, message", [
    ((nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU), "has 4 ops"),
    ([nn.Conv2d, nn.ReLU], "is a list"),
    ((nn.Conv2d, 3), "is not an op"),
    ((nn.ReLU, (nn.BatchNorm2d, nn.Conv2d)), "complex"),
    ("not a name", "not a valid identifier"),
    (MatchAllNode, "MatchAllNode alone"),
])
def test_bad_patterns_are_rejected_with_the_reason(pattern, message):
    with pytest.raises(ValueError, match=message):
        BackendPatternConfig(pattern)


def test_pattern_and_complex_pattern_are_exclusive_and_setters_check_types():
    with pytest.raises(ValueError, match="set only one"):
        BackendPatternConfig(nn.Linear)._set_pattern_complex_format((nn.ReLU, nn.Linear))
    with pytest.raises(ValueError, match="must start with the op"):
        BackendPatternConfig()._set_pattern_complex_format((MatchAllNode, nn.Linear))
    with pytest.raises(TypeError, match="class, not an instance"):
        BackendPatternConfig(nn.Linear).set_root_module(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="ObservationType"):
        BackendPatternConfig(nn.Linear).set_observation_type(1)
    with pytest.raises(TypeError, match="add_dtype_config for one"):
        BackendPatternConfig(nn.Linear).set_dtype_configs(WEIGHTED)
    with pytest.raises(ValueError, match="has no pattern"):
        BackendConfig().set_backend_pattern_config(BackendPatternConfig())


def test_user_backend_config_replaces_same_pattern_in_place():
    linear = BackendPatternConfig(nn.Linear).add_dtype_config(WEIGHTED)
    relu = BackendPatternConfig((nn.Linear, nn.ReLU)).add_dtype_config(WEIGHTED)
    cat = BackendPatternConfig(torch.cat).set_observation_type(SHARE)
    bc = BackendConfig("mine").set_backend_pattern_configs([linear, relu, cat])
    assert [c.pattern for c in bc.configs] == [nn.Linear, (nn.Linear, nn.ReLU), torch.cat]
    new_relu = BackendPatternConfig((nn.Linear, nn.ReLU)).set_observation_type(SHARE)
    bc.set_backend_pattern_config(new_relu)
    assert bc.configs[1] is new_relu and len(bc) == 3
    assert bc.get_config((nn.Linear, nn.ReLU)) is new_relu and (nn.ReLU, nn.Linear) not in bc
    assert bc.get_config((nn.ReLU, nn.Linear), complex_format=True) is new_relu
    assert list(bc.complex_format_to_config) == [nn.Linear, (nn.ReLU, nn.Linear), torch.cat]
    with pytest.raises(TypeError):
        bc.complex_format_to_config[nn.Conv2d] = linear  # read-only view


def test_backend_config_from_dict_accepts_mixed_entries_and_rejects_unknown_keys():
    d = {"name": "b", "configs": [{"pattern": torch.add, "dtype_configs": [{"input_dtype": QUINT8}]},
                                  BackendPatternConfig(nn.ReLU)]}
    bc = BackendConfig.from_dict(d)
    assert bc.name == "b" and [c.pattern for c in bc.configs] == [torch.add, nn.ReLU]
    assert bc.configs[0].dtype_configs == [DTypeConfig(input_dtype=torch.uint8)]
    with pytest.raises(ValueError, match=r"unknown BackendConfig keys \['config'\].*'configs'"):
        BackendConfig.from_dict({"config": []})
    with pytest.raises(TypeError, match=r"\['configs'\]\[0\]"):
        BackendConfig.from_dict({"configs": [3]})


def test_observation_type_accepts_torch_ao_enum_by_name():
    ao_bc = pytest.importorskip("torch.ao.quantization.backend_config")
    conf = BackendPatternConfig(torch.cat).set_observation_type(ao_bc.ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT)
    assert conf.observation_type is SHARE


# ------------------------------------------------------------------------------- comparison with torch.ao
def _name(obj):
    """Name an op / class / function the same way for torch.ao's objects and ours."""
    if isinstance(obj, tuple):
        return tuple(_name(o) for o in obj)
    if isinstance(obj, type) and obj.__name__ == "MatchAllNode":
        return "MatchAllNode"
    from fxquant.backend_config.pattern import op_name
    return None if obj is None else op_name(obj)


def _spec(s):
    return (normalize_dtype(s.dtype), s.quant_min_lower_bound, s.quant_max_upper_bound, s.scale_min_lower_bound,
            s.scale_max_upper_bound, s.scale_exact_match, s.zero_point_exact_match)


def _dtype_record(dc):
    return (_spec(dc.input_dtype_with_constraints), _spec(dc.output_dtype_with_constraints),
            _spec(dc.weight_dtype_with_constraints), normalize_dtype(dc.bias_dtype), dc.is_dynamic)


def _record(conf):
    return {
        "observation_type": conf.observation_type.name,
        "dtype_configs": [_dtype_record(dc) for dc in conf.dtype_configs],
        "root_module": _name(conf.root_module), "qat_module": _name(conf.qat_module),
        "reference": _name(conf.reference_quantized_module), "fused_module": _name(conf.fused_module),
        "has_fuser": conf.fuser_method is not None, "input_type_to_index": dict(conf._input_type_to_index),
        "num_tensor_args": {k: v.name for k, v in conf._num_tensor_args_to_observation_type.items()},
        "has_root_node_getter": conf._root_node_getter is not None,
        "has_extra_inputs_getter": conf._extra_inputs_getter is not None,
    }


def _records(bc):
    return [(_name(k), _record(c)) for k, c in bc._pattern_complex_format_to_config.items()]


def _ao_getters():
    pytest.importorskip("torch.ao.quantization")
    import torch.ao.quantization.backend_config as ao
    import torch.ao.quantization.backend_config.utils  # noqa: F401  (torch.ao needs it imported)
    from torch.ao.quantization.backend_config.x86 import get_x86_backend_config as ao_x86
    return {"native": ao.get_native_backend_config, "x86": ao_x86, "fbgemm": ao.get_fbgemm_backend_config,
            "qnnpack": ao.get_qnnpack_backend_config, "onednn": ao.get_onednn_backend_config,
            "executorch": ao.get_executorch_backend_config, "tensorrt": ao.get_tensorrt_backend_config}


# Classes other engineers have not written yet: our configs leave the field None until they exist.
PENDING = {f"fxquant.nn.quantized.reference.{n}" for n in ("GRU", "GRUCell", "LSTM", "LSTMCell", "RNNCell")}


def test_missing_references_are_only_the_known_pending_ones():
    assert set(missing_references()) <= PENDING


@pytest.mark.parametrize("backend", sorted(ALL_BACKENDS))
def test_builtin_matches_torch_ao(backend):
    ao_records = _records(_ao_getters()[backend]())
    ours = _records(ALL_BACKENDS[backend]())
    missing = {m.rsplit(".", 1)[1] for m in missing_references()}
    for (_key, rec), (_ao_key, ao_rec) in zip(ours, ao_records):
        if rec["reference"] is None and ao_rec["reference"] and ao_rec["reference"].split(".")[-1] in missing:
            rec["reference"] = ao_rec["reference"]  # pending class (see PENDING), not a data difference
    assert [k for k, _ in ours] == [k for k, _ in ao_records]  # same patterns in the same order
    for (key, rec), (_, ao_rec) in zip(ours, ao_records):
        assert rec == ao_rec, key


@pytest.mark.parametrize("backend", ["native", "onednn"])
def test_from_dict_reads_torch_ao_dict_form(backend):
    ao_bc = _ao_getters()[backend]()
    ours = BackendConfig.from_dict(ao_bc.to_dict())  # torch.ao's enums, DTypeConfigs and constraints coerced
    assert _records(ours) == _records(ao_bc)
    assert all(isinstance(dc, DTypeConfig) for c in ours.configs for dc in c.dtype_configs)


def _nested_names(pattern):
    """A node pattern shaped like ``pattern`` whose leaves are distinct strings."""
    counter = itertools.count()

    def build(p):
        return tuple(build(x) for x in p) if isinstance(p, tuple) else f"n{next(counter)}"

    return build(pattern)


@pytest.mark.parametrize("backend", sorted(ALL_BACKENDS))
def test_root_and_extra_input_getters_pick_the_same_nodes_as_torch_ao(backend):
    ao_configs = _ao_getters()[backend]()._pattern_complex_format_to_config
    for ours, theirs in zip(ALL_BACKENDS[backend]().configs, ao_configs.values()):
        nodes = _nested_names(ours.complex_format_pattern)
        for attr in ("_root_node_getter", "_extra_inputs_getter"):
            if getattr(theirs, attr) is not None:
                assert getattr(ours, attr)(nodes) == getattr(theirs, attr)(nodes)


def test_builtin_dict_round_trip_and_pickle():
    for backend, getter in ALL_BACKENDS.items():
        bc = getter()
        again = BackendConfig.from_dict(bc.to_dict())
        assert again.name == backend and _records(again) == _records(bc)
        assert _records(pickle.loads(pickle.dumps(bc))) == _records(bc)
    assert get_native_backend_config_dict()["name"] == "native"
    with pytest.raises(ValueError, match="built-in backends"):
        get_backend_config("tpu")


def test_sequential_fusers_build_their_fused_module_and_complex_fusers_fold_bn():
    bc = get_x86_backend_config()
    conf = bc.get_config((nn.Conv2d, nn.ReLU))
    fused = conf.fuser_method(False, nn.Conv2d(2, 2, 1), nn.ReLU())
    assert type(fused) is conf.fused_module and type(fused).__name__ == "ConvReLU2d"
    reversed_fuser = complex_format_fuser_method(bc.get_config((nn.Conv2d, nn.BatchNorm2d, nn.ReLU)))
    conv, bn = nn.Conv2d(2, 2, 1).eval(), nn.BatchNorm2d(2).eval()
    assert type(reversed_fuser(False, nn.ReLU().eval(), (bn, conv))).__name__ == "ConvReLU2d"
    onednn = get_backend_config("onednn")
    pattern = (nn.ReLU, (operator.add, MatchAllNode, (nn.BatchNorm2d, nn.Conv2d)))
    conf = onednn.get_config(pattern, complex_format=True)
    bn.running_mean.fill_(0.5)
    fused = conf.fuser_method(False, nn.ReLU().eval(), (operator.add, MatchAllNode, (bn, conv)))
    assert type(fused) is conf.fused_module and type(fused).__name__ == "ConvAddReLU2d"
    x = torch.randn(1, 2, 3, 3)
    assert torch.allclose(fused[0](x), bn(conv(x)), atol=1e-6)
    assert pattern in get_fuser_method_mapping(onednn)


def test_reference_module_mapping_and_fixed_qparams_constraints():
    bc = get_native_backend_config()
    mapping = get_root_module_to_quantized_reference_module(bc)
    assert mapping[nn.Linear].__module__.startswith("fxquant.nn.quantized.reference")
    sigmoid, tanh = bc.get_config(torch.sigmoid), bc.get_config("tanh")
    assert sigmoid.dtype_configs[0].output_dtype_with_constraints.scale_exact_match == 1 / 256
    assert tanh.dtype_configs[0].input_dtype_with_constraints.zero_point_exact_match == 128
    assert bc.get_config("reshape").observation_type is SHARE
    assert bc.get_config("shape").observation_type is ObservationType.INPUT_OUTPUT_NOT_OBSERVED


# ----------------------------------------------------------------------------------------------- matching
QConfig = collections.namedtuple("QConfig", ["activation", "weight"])  # stand-in until fxquant.qconfig exists


class _Obs(nn.Module):
    """A minimal observer: only the attributes the matcher reads."""

    def __init__(self, dtype=torch.uint8, quant_min=0, quant_max=255, eps=2.0**-23, is_dynamic=False):
        super().__init__()
        self.dtype, self.quant_min, self.quant_max, self.is_dynamic = dtype, quant_min, quant_max, is_dynamic
        self.register_buffer("eps", torch.tensor([eps]))

    @classmethod
    def make(cls, **kwargs):
        return lambda: cls(**kwargs)


class FixedQParamsObserver(_Obs):  # matched by class name, as fxquant's and torch.ao's are
    def __init__(self, scale, zero_point, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("scale", torch.tensor([scale]))
        self.register_buffer("zero_point", torch.tensor([zero_point]))


class _FakeQuant(nn.Module):
    def __init__(self, observer):
        super().__init__()
        self.activation_post_process = observer()
        self.dtype = self.activation_post_process.dtype


U8_W8 = QConfig(_Obs.make(quant_min=0, quant_max=127), _Obs.make(dtype=torch.int8, quant_min=-128, quant_max=127))


@pytest.mark.parametrize("qconfig, dc, roles, expected", [
    (U8_W8, WEIGHTED, ALL_ROLES, ""),
    (U8_W8, DTypeConfig(QINT8, QINT8), ALL_ROLES, "input: activation observer _Obs gives uint8 (static), "
                                                  "the backend takes int8 (static)"),
    (U8_W8, DTypeConfig(QUINT8, torch.float, QINT8, torch.float, is_dynamic=True), ALL_ROLES, "(static)"),
    (U8_W8, DTypeConfig(QUINT8, QUINT8, QUINT8), ALL_ROLES, "weight: weight observer _Obs gives int8"),
    (U8_W8, DTypeConfig(QUINT8, QUINT8, QUINT8), ACTIVATION_ROLES, ""),
    (U8_W8, DTypeConfig(QUINT8, QUINT8, QINT8, torch.float16), ALL_ROLES, "bias: the qconfig implies float32"),
    (U8_W8, DTypeConfig(DTypeWithConstraints(QUINT8, 0, 100)), ALL_ROLES, "quant range 0..127 is outside"),
    (U8_W8, DTypeConfig(DTypeWithConstraints(QUINT8, scale_min_lower_bound=1e-3)), ALL_ROLES,
     "eps 1.19209"),
    (QConfig(_Obs.make(is_dynamic=True), None), DTypeConfig(QUINT8, torch.float, is_dynamic=True), ALL_ROLES, ""),
    (QConfig(_Obs.make(is_dynamic=True), None), DTypeConfig(QUINT8, QUINT8, is_dynamic=True), ALL_ROLES,
     "output: activation observer _Obs gives float32, the backend produces uint8"),
    (QConfig(nn.Identity, nn.Identity), DTypeConfig(torch.float, torch.float, torch.float), ALL_ROLES, ""),
])
def test_match_decisions_and_reasons(qconfig, dc, roles, expected):
    ok, why = qconfig_matches_dtype_config(qconfig, dc, roles=roles)
    assert ok == (expected == "")
    assert expected in why


def test_fixed_qparams_need_the_exact_observer_and_warn_when_asked():
    sigmoid_dc = get_native_backend_config().get_config(torch.sigmoid).dtype_configs[0]
    fixed = QConfig(lambda: FixedQParamsObserver(1 / 256, 0), None)
    assert qconfig_matches_dtype_config(fixed, sigmoid_dc) == (True, "")
    tanh_like = QConfig(lambda: FixedQParamsObserver(2 / 256, 128), None)
    ok, why = qconfig_matches_dtype_config(tanh_like, sigmoid_dc)
    assert not ok and "fixed scale 0.0078125 / zero point 128 differ" in why
    with pytest.warns(UserWarning, match="FixedQParamsObserver / FixedQParamsFakeQuantize"):
        ok, why = qconfig_matches_dtype_config(U8_W8, sigmoid_dc, warn=True)
    assert not ok
    qat = QConfig(lambda: _FakeQuant(lambda: FixedQParamsObserver(1 / 256, 0)), None)
    ok, why = qconfig_matches_dtype_config(qat, sigmoid_dc, is_qat=True)
    assert not ok and "activation fake quant _FakeQuant is not a FixedQParamsObserver" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain dtype mismatch does not warn
        assert not qconfig_matches_dtype_config(QConfig(_Obs.make(dtype=torch.int8), None), sigmoid_dc, warn=True)[0]


def test_find_dtype_config_returns_first_match_with_reasons_for_the_rest():
    dcs = get_native_backend_config().get_config(nn.Linear).dtype_configs
    dynamic = QConfig(_Obs.make(is_dynamic=True), _Obs.make(dtype=torch.int8, quant_min=-128, quant_max=127))
    dc, reasons = find_dtype_config(dynamic, dcs)
    assert dc is dcs[1] and len(reasons) == 1 and reasons[0].startswith("[in=uint8 out=uint8 w=int8 b=float32]")
    assert find_dtype_config(None, dcs) == (None, ["qconfig is None: the pattern stays in float"])
    assert qconfig_matches_dtype_config(None, dcs[0])[0] is False
    with pytest.raises(ValueError, match="roles must be"):
        qconfig_matches_dtype_config(U8_W8, dcs[0], roles=("inputs",))
    with pytest.raises(TypeError, match="constructor"):
        qconfig_matches_dtype_config(QConfig(_Obs(), None), dcs[0])


# --- differential: our decision == torch.ao's prepare-time decision (torch.ao internals as the oracle)
_ACTIVATIONS = [
    ("MinMaxObserver", {"dtype": "quint8", "quant_min": 0, "quant_max": 127}),
    ("HistogramObserver", {"dtype": "quint8", "reduce_range": True}),
    ("MinMaxObserver", {"dtype": "quint8"}),
    ("MinMaxObserver", {"dtype": "qint8", "qscheme": torch.per_tensor_symmetric, "eps": 2**-12}),
    ("MinMaxObserver", {"dtype": "qint8", "eps": 1e-5}),
    ("PlaceholderObserver", {"dtype": "quint8", "is_dynamic": True}),
    ("PlaceholderObserver", {"dtype": torch.float16, "is_dynamic": True}),
    ("PlaceholderObserver", {"dtype": torch.float16}),
    ("PlaceholderObserver", {"dtype": torch.float32}),
    ("FixedQParamsObserver", {"scale": 1 / 256, "zero_point": 0, "dtype": "quint8", "quant_min": 0, "quant_max": 255}),
    ("FixedQParamsObserver", {"scale": 2 / 256, "zero_point": 128, "dtype": "quint8", "quant_min": 0,
                              "quant_max": 255}),
]
_WEIGHTS = [
    ("MinMaxObserver", {"dtype": "qint8", "qscheme": torch.per_tensor_symmetric}),
    ("MinMaxObserver", {"dtype": "qint8", "qscheme": torch.per_tensor_symmetric, "quant_min": -127,
                        "quant_max": 127, "eps": 2**-12}),
    ("PlaceholderObserver", {"dtype": torch.float16}),
    ("MinMaxObserver", {"dtype": "quint8"}),
    ("PerChannelMinMaxObserver", {"dtype": "qint8", "qscheme": torch.per_channel_symmetric}),
]


def _all_builtin_dtype_configs():
    seen = {}
    for getter in ALL_BACKENDS.values():
        for conf in getter().configs:
            for dc in conf.dtype_configs:
                seen.setdefault(dc, None)
    seen[DTypeConfig(DTypeWithConstraints(QUINT8, 0, 127), DTypeWithConstraints(QUINT8, 0, 127), QINT8)] = None
    seen[DTypeConfig(QUINT8, QUINT8, DTypeWithConstraints(QINT8, -127, 127))] = None
    return list(seen)


_DTYPE_CONFIGS = _all_builtin_dtype_configs()


def _ctor(module, spec):
    name, kwargs = spec
    kwargs = {k: getattr(torch, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    return getattr(module, name).with_args(**kwargs)


def _ao_dtype_config(ao_bc, dc):
    def spec(s):
        legacy = {torch.uint8: "quint8", torch.int8: "qint8"}
        dtype = getattr(torch, legacy[s.dtype]) if s.dtype in legacy else s.dtype
        return ao_bc.DTypeWithConstraints(dtype, *(getattr(s, f) for f in (
            "quant_min_lower_bound", "quant_max_upper_bound", "scale_min_lower_bound", "scale_max_upper_bound",
            "scale_exact_match", "zero_point_exact_match")))

    return ao_bc.DTypeConfig(spec(dc.input_dtype_with_constraints), spec(dc.output_dtype_with_constraints),
                             spec(dc.weight_dtype_with_constraints), dc.bias_dtype, dc.is_dynamic)


class _FunctionalLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3))

    def forward(self, x):
        return F.linear(x, self.w, self.b)


@pytest.fixture(scope="module")
def ao_oracle():
    pytest.importorskip("torch.ao.quantization")
    import torch.ao.quantization.backend_config as ao_bc
    import torch.ao.quantization.backend_config.utils  # noqa: F401
    import torch.ao.quantization.observer as ao_obs
    from torch.ao.quantization.fx.prepare import (_get_target_activation_dtype_for_node,
                                                  _is_pattern_dtype_config_and_qconfig_supported_by_backend)
    traced = {}
    for functional, model, pattern in ((True, _FunctionalLinear(), F.linear),
                                       (False, nn.Sequential(nn.Linear(3, 3)), nn.Linear)):
        gm = torch.fx.symbolic_trace(model)
        node = next(n for n in gm.graph.nodes if n.op in ("call_function", "call_module"))
        traced[functional] = (gm, node, pattern)

    def decide(qconfig, dc, functional):
        gm, node, pattern = traced[functional]
        conf = ao_bc.BackendPatternConfig(pattern).add_dtype_config(_ao_dtype_config(ao_bc, dc))
        if functional:
            conf._set_input_type_to_index({"weight": 1, "bias": 2})
        bc = ao_bc.BackendConfig().set_backend_pattern_config(conf)
        node.meta["target_dtype_info"] = _get_target_activation_dtype_for_node(
            node, qconfig, None, dict(gm.named_modules()), bc, {})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _is_pattern_dtype_config_and_qconfig_supported_by_backend(pattern, [node], qconfig, bc)

    return ao_obs, decide


@settings(max_examples=200, deadline=None)
@given(act=st.sampled_from(_ACTIVATIONS), weight=st.sampled_from(_WEIGHTS), dc=st.sampled_from(_DTYPE_CONFIGS),
       functional=st.booleans())
def test_match_decision_equals_torch_ao(ao_oracle, act, weight, dc, functional):
    import fxquant.observer as fxq_obs

    ao_obs, decide = ao_oracle
    ao_qconfig = QConfig(_ctor(ao_obs, act), _ctor(ao_obs, weight))
    expected = decide(ao_qconfig, dc, functional)
    roles = ALL_ROLES if functional else ACTIVATION_ROLES
    # torch.ao's own observers (read by attribute) and fxquant's give torch.ao's decision
    for qconfig in (ao_qconfig, QConfig(_ctor(fxq_obs, act), _ctor(fxq_obs, weight))):
        ok, why = qconfig_matches_dtype_config(qconfig, dc, roles=roles)
        assert ok == expected, why
        assert ok == (why == "")


# ----------------------------------------------------------------------------------------------- table
def test_patterns_table_rows_and_markdown():
    bc = get_backend_config("onednn")
    rows = patterns_table(bc)
    assert len(rows) == len(bc)
    by_pattern = {r.pattern: r for r in rows}
    conv_relu = by_pattern["(nn.Conv2d, nn.ReLU)"]
    assert conv_relu.observation == "own output qparams" and conv_relu.modules == "fuses to nni.ConvReLU2d"
    assert conv_relu.dtype_configs == ("in=uint8 out=uint8 w=int8 b=float32",)
    assert by_pattern["torch.cat"].observation == "shares input qparams"
    assert by_pattern["F.max_pool2d"].observation == "shares input qparams"
    assert by_pattern["'reshape'"].dtype_configs == ("in=uint8 out=uint8",)
    assert by_pattern["torch.sigmoid"].dtype_configs == (
        "in=uint8[qmin>=0,qmax<=255,scale=0.00390625,zp=0] out=uint8[qmin>=0,qmax<=255,scale=0.00390625,zp=0]",)
    assert "complex: (nn.ReLU, (operator.add, MatchAllNode, (nn.BatchNorm2d, nn.Conv2d)))" in by_pattern
    assert by_pattern["nn.Linear"].dtype_configs[1] == "in=uint8 out=float32 w=int8 b=float32 dynamic"
    md = patterns_table_markdown(bc).splitlines()
    assert md[0] == "### onednn" and len(md) == len(rows) + 4 and md[4].startswith("| nn.Conv1d | ")
