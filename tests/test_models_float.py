"""The differential-test harness itself: the model zoo (tests/models.py) and the oracle helpers (tests/oracle.py).

* every model builds deterministically, runs, holds the ops it is meant to exercise, and traces with torch.fx
  exactly where it should;
* recipes are plain data that build any library's configs from its namespace;
* torch.ao (the oracle) prepares / calibrates / converts every recipe, with known torch.ao failures pinned;
* node_count_dict / collect_qparams / assert_bit_identical / assert_qparams_equal catch what they must.
"""
from __future__ import annotations

import functools
import math
import operator
import types

import pytest
import torch
import torch.fx
import torch.nn as nn

import oracle
from models import MODELS, Recipe, capture_submodule_inputs, lookup, model_names
from oracle import (QParams, assert_bit_identical, assert_qparams_equal, collect_qparams, collect_weight_qparams,
                    module_key, node_count_dict, normalize_target)

NAMES = model_names()
PAIRS = [(n, r.name) for n in NAMES for r in MODELS[n].recipes]


def _float_out(model, inputs):
    with torch.no_grad():
        return model(*inputs)


# ----------------------------------------------------------------------------------------------------------------
# the zoo
# ----------------------------------------------------------------------------------------------------------------

def test_registry_has_the_promised_architectures():
    promised = {"resnet18", "mobilenet_v2", "mobilenet_v3_small", "bert_encoder", "lstm_classifier",
                "embedding_bag_recsys", "functional", "branchy", "standalone", "shufflenet", "segmentation_head"}
    assert promised <= set(NAMES)
    kinds = {r.kind for n in NAMES for r in MODELS[n].recipes}
    assert kinds == {"static", "dynamic", "weight_only"}


@pytest.mark.parametrize("name", NAMES)
def test_factory_is_deterministic_eval_and_leaves_global_rng(name):
    spec = MODELS[name]
    rng = torch.random.get_rng_state()
    m1, x1 = spec.factory()
    assert torch.equal(torch.random.get_rng_state(), rng), "factory must not consume the global RNG"
    m2, x2 = spec.factory()
    m3, _ = spec.factory(seed=1)
    assert not any(m.training for m in m1.modules())
    assert_bit_identical(x1, x2)
    assert_bit_identical(dict(m1.state_dict()), dict(m2.state_dict()))
    assert any(not torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values())
               if a.is_floating_point()), "another seed must give other weights"
    y1, y2 = _float_out(m1, x1), _float_out(m2, x2)
    assert_bit_identical(y1, y2)
    assert y1.dtype == torch.float32 and bool(torch.isfinite(y1).all()) and y1.abs().max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_calibration_data_is_seeded_and_runs(name):
    spec = MODELS[name]
    model, example = spec.factory()
    batches = spec.calibration_data(n_batches=3)
    assert len(batches) == 3
    assert_bit_identical(batches, spec.calibration_data(n_batches=3))
    other = spec.calibration_data(n_batches=3, seed=7)
    assert oracle._mismatch(batches, other, "b") is not None, "another seed must give other data"
    for batch in batches:
        assert len(batch) == len(example)
        for a, b in zip(batch, example):
            assert a.dtype == b.dtype and a.dim() == b.dim()
        assert torch.isfinite(_float_out(model, batch)).all()


# what each architecture must contain, as node_count_dict keys of its traced float graph (at least 1 each)
FEATURES = {
    "resnet18": {"Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "add", "AdaptiveAvgPool2d", "flatten", "Linear"},
    "mobilenet_v2": {"Conv2d", "BatchNorm2d", "ReLU6", "add", "adaptive_avg_pool2d", "flatten", "Dropout", "Linear"},
    "mobilenet_v3_small": {"Hardswish", "Hardsigmoid", "ReLU", "mul", "add", "AdaptiveAvgPool2d", "Linear"},
    "bert_encoder": {"Embedding", "Linear", "matmul", "softmax", "LayerNorm", "GELU", "add", "view", "reshape",
                     "permute", "transpose", "contiguous", "truediv", "Tanh", "getitem"},
    "lstm_classifier": {"Embedding", "LSTM", "getitem", "Linear"},
    "embedding_bag_recsys": {"EmbeddingBag", "Linear", "ReLU", "cat", "sigmoid"},
    "functional": {"conv2d", "relu", "linear", "adaptive_avg_pool2d", "flatten"},
    "functional_positional": {"conv2d", "relu", "linear", "adaptive_avg_pool2d", "flatten"},
    "branchy": {"Linear", "DataDependentGate"},
    "standalone": {"Conv2d", "BatchNorm2d", "add", "relu", "AdaptiveAvgPool2d", "Linear"},
    "shufflenet": {"chunk", "cat", "view", "transpose", "contiguous", "size", "mean", "Conv2d", "MaxPool2d"},
    "segmentation_head": {"Upsample", "cat", "interpolate", "Conv2d", "BatchNorm2d"},
}


@pytest.mark.parametrize("name", NAMES)
def test_traced_graph_holds_the_advertised_ops(name):
    spec = MODELS[name]
    model, _ = spec.factory()
    counts = node_count_dict(spec.trace(model))
    missing = FEATURES[name] - {k for k, v in counts.items() if v > 0}
    assert not missing, f"{name} lacks {missing}; has {counts}"


def test_depthwise_and_functional_spellings_are_really_there():
    m, _ = MODELS["mobilenet_v2"].factory()
    assert any(isinstance(c, nn.Conv2d) and c.groups == c.in_channels > 1 for c in m.modules())
    gm = torch.fx.symbolic_trace(MODELS["functional"].factory()[0])
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and normalize_target(n.target) in ("conv2d", "linear")]
    assert [normalize_target(n.target) for n in calls] == ["conv2d", "conv2d", "linear"]
    assert calls[0].kwargs == {"padding": 1}
    assert calls[1].kwargs.get("stride") == 2 and "bias" in calls[1].kwargs
    assert calls[2].args == () and set(calls[2].kwargs) == {"input", "weight", "bias"}


@pytest.mark.parametrize("name", NAMES)
def test_symbolic_traceability_is_as_declared(name):
    spec = MODELS[name]
    model, example = spec.factory()
    if spec.fx_traceable:
        gm = torch.fx.symbolic_trace(model)
    else:
        with pytest.raises((torch.fx.proxy.TraceError, RuntimeError, TypeError)):
            torch.fx.symbolic_trace(model)
        gm = spec.trace(model)
    for batch in [example] + spec.calibration_data(2):
        assert_bit_identical(_float_out(gm, batch), _float_out(model, batch))


def test_branchy_calibration_takes_both_branches():
    spec = MODELS["branchy"]
    model, _ = spec.factory()
    signs = set()
    hook = model.gate.register_forward_pre_hook(lambda mod, args: signs.add(bool(args[0].mean() > 0)))
    for batch in spec.calibration_data(6):
        _float_out(model, batch)
    hook.remove()
    assert signs == {True, False}


# ----------------------------------------------------------------------------------------------------------------
# recipes: plain data, built from any namespace
# ----------------------------------------------------------------------------------------------------------------

class _RecordingMapping:
    def __init__(self, log, origin):
        self.log = log
        log.append(origin)

    def __getattr__(self, attr):
        if not attr.startswith("set_"):
            raise AttributeError(attr)

        def setter(*args):
            self.log.append((attr, *args))
            return self
        return setter


def _fake_namespace(log):
    ns = types.SimpleNamespace(
        QConfigMapping=lambda: _RecordingMapping(log, "QConfigMapping()"),
        get_default_qconfig_mapping=lambda backend: _RecordingMapping(log, f"default({backend})"),
        PrepareCustomConfig=lambda: _RecordingMapping(log, "PrepareCustomConfig()"),
        get_qnnpack_backend_config=lambda: "qnnpack-bc",
    )
    for n in ("default_dynamic_qconfig", "float_qparams_weight_only_qconfig"):
        setattr(ns, n, f"<{n}>")
    return ns


@pytest.mark.parametrize("name,recipe_name", PAIRS)
def test_recipe_builds_from_any_namespace(name, recipe_name):
    spec = MODELS[name]
    recipe = spec.recipe(recipe_name)
    log: list = []
    mapping = recipe.build(_fake_namespace(log))
    assert isinstance(mapping, _RecordingMapping)
    assert log[0] == (f"default({recipe.backend})" if recipe.default_mapping else "QConfigMapping()")
    expected = [("set_object_type", obj, f"<{ref}>") for obj, ref in recipe.object_types]
    assert [e for e in log if isinstance(e, tuple) and e[0] == "set_object_type"] == expected
    if recipe.kind != "static":
        assert not recipe.default_mapping and recipe.object_types
    log.clear()
    model, example = spec.factory()
    pcc = recipe.prepare_custom_config(_fake_namespace(log), model, example)
    if not (recipe.non_traceable_module_names or recipe.standalone_module_names):
        assert pcc is None and log == []
    else:
        assert log[0] == "PrepareCustomConfig()"
        for n in recipe.standalone_module_names:
            entry = next(e for e in log if isinstance(e, tuple) and e[:2] == ("set_standalone_module_name", n))
            assert isinstance(entry[3], tuple) and isinstance(entry[3][0], torch.Tensor)
        if recipe.non_traceable_module_names:
            assert ("set_non_traceable_module_names", list(recipe.non_traceable_module_names)) in log
    bc = recipe.get_backend_config(_fake_namespace([]))
    assert bc == ("qnnpack-bc" if recipe.backend_config else None)


def test_recipe_validation_and_lookup_errors():
    with pytest.raises(ValueError, match="static/dynamic/weight_only"):
        Recipe("bad", kind="int4")
    with pytest.raises(KeyError, match="has no recipe"):
        MODELS["resnet18"].recipe("nope")
    with pytest.raises(AttributeError, match="no_such_qconfig"):
        lookup(types.SimpleNamespace(), "no_such_qconfig")
    with pytest.raises(ValueError, match="standalone"):
        MODELS["standalone"].recipe().prepare_custom_config(_fake_namespace([]))


def test_capture_submodule_inputs():
    model, example = MODELS["standalone"].factory()
    got = capture_submodule_inputs(model, example, ["body", "head"])
    stem_out = _float_out(model.stem, example)
    assert_bit_identical(got["body"], (stem_out,))
    assert got["head"][0].shape == stem_out.shape
    model.add_module("unused", nn.Identity())
    with pytest.raises(ValueError, match="never called"):
        capture_submodule_inputs(model, example, ["body", "unused"])


@pytest.mark.torchao
def test_lookup_finds_torchao_names_in_submodules(torchao):
    assert lookup(torchao, "QConfigMapping") is torchao.QConfigMapping
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
    assert lookup(torchao, "PrepareCustomConfig") is PrepareCustomConfig
    from torch.ao.quantization.backend_config import get_qnnpack_backend_config
    assert lookup(torchao, "get_qnnpack_backend_config") is get_qnnpack_backend_config
    mapping = MODELS["lstm_classifier"].recipe().build(torchao)
    assert isinstance(mapping, torchao.QConfigMapping)
    assert mapping.object_type_qconfigs[nn.LSTM] is torchao.default_dynamic_qconfig


# ----------------------------------------------------------------------------------------------------------------
# torch.ao, the oracle, on every recipe
# ----------------------------------------------------------------------------------------------------------------

# lowered (convert_fx) runs are slow on the big conv nets; these cover every recipe kind and the known failure
LOWER = {"functional", "functional_positional", "lstm_classifier", "embedding_bag_recsys", "branchy", "standalone",
         "segmentation_head", "bert_encoder"}


@functools.lru_cache(maxsize=None)
def _torchao_calibrated(name: str, recipe_name: str):
    """(model, example, prepared + calibrated on 2 batches) by torch.ao; shared by the tests below."""
    spec = MODELS[name]
    recipe = spec.recipe(recipe_name)
    model, example = spec.factory()
    prepared = _expect_known_failure(spec, recipe, "prepare",
                                     lambda: oracle.prepare(oracle.torchao_lib(), model, recipe, example))
    return model, example, oracle.calibrate(prepared, spec.calibration_data(2))


def _expect_known_failure(spec, recipe, stage, fn):
    known = spec.torchao_known_failures.get(recipe.name)
    if known is None or known[0] != stage:
        return fn()
    with pytest.raises(Exception):
        fn()
    pytest.xfail(f"known torch.ao failure at {stage}: {known[1]}")


@pytest.mark.torchao
@pytest.mark.parametrize("name,recipe_name", PAIRS)
def test_torchao_runs_the_recipe(torchao_lib, name, recipe_name):
    spec = MODELS[name]
    recipe = spec.recipe(recipe_name)
    lib = torchao_lib
    model, example, prepared = _torchao_calibrated(name, recipe_name)
    reference = _expect_known_failure(spec, recipe, "reference", lambda: oracle.to_reference(lib, prepared, recipe))

    y = _float_out(model, example)
    yr = _float_out(reference, example)
    assert yr.shape == y.shape and yr.dtype == y.dtype and bool(torch.isfinite(yr).all())
    assert not torch.equal(yr, y), "the recipe quantized nothing"
    assert ((yr - y).abs().max() / y.abs().max()).item() < 0.5

    prepared_counts, ref_counts = node_count_dict(prepared), node_count_dict(reference)
    acts = collect_qparams(prepared)
    # observers in the prepared model and quantize nodes in the reference model: the same list, bit for bit
    assert_qparams_equal(collect_qparams(reference), acts)
    assert len(acts) == prepared_counts.get("activation_post_process", 0)
    if recipe.kind == "static":
        assert acts and all(q.scale is not None for q in acts)
        assert ref_counts.get("quantize_per_tensor", 0) == len(acts)
    elif recipe.kind == "dynamic":
        assert acts and all(q.scale is None for q in acts)
        assert ref_counts.get("quantize_per_tensor_dynamic", 0) == len(acts)
    else:
        assert not acts and "quantize_per_tensor" not in ref_counts
    assert any(k.startswith("quantized.reference.") for k in ref_counts) or ref_counts.get("quantize_per_channel")
    for q in collect_weight_qparams(reference):
        assert q.scale.dtype == torch.float32 and bool((q.scale > 0).all())
    for leaf in recipe.non_traceable_module_names:
        assert type(spec.factory()[0].get_submodule(leaf)).__name__ in ref_counts
    for sub in recipe.standalone_module_names:
        assert isinstance(prepared.get_submodule(sub), torch.fx.GraphModule)

    if name in LOWER:
        lowered = _expect_known_failure(spec, recipe, "lowered", lambda: oracle.to_lowered(lib, prepared, recipe))
        yl = _float_out(lowered, example)
        assert yl.shape == y.shape and ((yl - y).abs().max() / y.abs().max()).item() < 0.5
        assert "activation_post_process" not in node_count_dict(lowered)
    assert spec.torchao_known_failures.get(recipe.name) is None, "a known torch.ao failure did not happen"


@pytest.mark.torchao
def test_quantize_driver_and_shared_observers(torchao_lib):
    model, example, prepared = _torchao_calibrated("resnet18", "static_x86")
    res = oracle.quantize(torchao_lib, model, MODELS["resnet18"].recipe(), example_inputs=example, calibration=[],
                          stages=())
    assert res.reference is None and res.lowered is None and res.calibration == []
    assert node_count_dict(res.prepared) == node_count_dict(prepared)
    res.prepared, res.reference = prepared, oracle.to_reference(torchao_lib, prepared, res.recipe)
    acts = collect_qparams(res.prepared)
    # ResNet: input, 20 convs (BN/ReLU fused), maxpool, 8 add+relu, avgpool, flatten, fc -> 33 observer calls;
    # maxpool / avgpool / flatten share their input's observer object, so named_modules() alone would undercount
    assert len(acts) == 33
    by_name = {q.node: q for q in acts}
    assert_qparams_equal([by_name["maxpool"]], [QParams("maxpool", by_name["conv1"].scale,
                                                        by_name["conv1"].zero_point)])
    assert len({id(m) for m in res.prepared.modules() if oracle.is_observer(m)}) < len(acts)
    counts = node_count_dict(res.reference)
    assert counts["quantize_per_tensor"] == counts["dequantize"] == 33
    # BN folded everywhere; conv1 of each block (and the stem) fused with its ReLU, conv2 / downsample alone
    assert counts["intrinsic.ConvReLU2d"] == 9 and counts["quantized.reference.Conv2d"] == 11
    assert counts["add"] == counts["ReLU"] == 8 and "BatchNorm2d" not in counts
    assert len(collect_weight_qparams(res.reference)) == 21
    with pytest.raises(ValueError, match="unknown stages"):
        oracle.quantize(torchao_lib, "resnet18", stages=("lowerd",))


@pytest.mark.torchao
def test_node_count_dict_on_lowered_torchao(torchao_lib):
    res = oracle.quantize(torchao_lib, "branchy", stages=("lowered",))
    counts = node_count_dict(res.lowered)
    assert counts == {"quantize_per_tensor": 2, "dequantize": 2, "quantized.Linear": 2, "DataDependentGate": 1}
    lowered_qp = collect_qparams(res.lowered)
    prepared_qp = {q.node: q for q in collect_qparams(res.prepared)}
    assert [q.node for q in lowered_qp] == ["x", "fc_in", "gate", "fc_out"]
    assert_qparams_equal(lowered_qp, [prepared_qp[q.node] for q in lowered_qp])


# ----------------------------------------------------------------------------------------------------------------
# oracle helpers, without torch.ao
# ----------------------------------------------------------------------------------------------------------------

def test_normalize_target_spellings():
    assert normalize_target(torch.quantize_per_tensor) == "quantize_per_tensor"
    assert normalize_target(torch.quantize_per_channel) == "quantize_per_channel"
    assert normalize_target(operator.add) == normalize_target(torch.add) == normalize_target("add_") == "add"
    assert normalize_target(operator.iadd) == "add"
    assert normalize_target(torch.ops.aten.add.Tensor) == normalize_target(torch.ops.aten.add) == "add"
    assert normalize_target("dequantize") == "dequantize"
    assert normalize_target(torch.ops.quantized.add_relu) == "quantized.add_relu"
    assert normalize_target(torch.nn.functional.relu) == normalize_target("relu_") == "relu"
    assert normalize_target("__getitem__") == "__getitem__"


def test_normalize_target_custom_op_namespaces(monkeypatch):
    lib = torch.library.Library("fxq_harness_test", "DEF")
    lib.define("quantize_per_tensor(Tensor x, float scale, int zp) -> Tensor")
    lib.define("dequantize_per_tensor(Tensor x, float scale, int zp) -> Tensor")
    op = torch.ops.fxq_harness_test
    assert normalize_target(op.quantize_per_tensor.default) == "fxq_harness_test.quantize_per_tensor"
    monkeypatch.setattr(oracle, "TRANSPARENT_NAMESPACES", oracle.TRANSPARENT_NAMESPACES | {"fxq_harness_test"})
    assert normalize_target(op.quantize_per_tensor.default) == "quantize_per_tensor"
    assert normalize_target(op.quantize_per_tensor) == "quantize_per_tensor"
    assert normalize_target(op.dequantize_per_tensor.default) == "dequantize"


def test_normalize_target_fxquant_ops_when_present():
    pytest.importorskip("fxquant.ops")
    if not hasattr(torch.ops.fxquant, "quantize_per_tensor"):
        pytest.skip("torch.ops.fxquant.quantize_per_tensor not registered yet")
    assert normalize_target(torch.ops.fxquant.quantize_per_tensor.default) == "quantize_per_tensor"
    assert normalize_target(torch.ops.fxquant.dequantize_per_tensor.default) == "dequantize"


def _fake_class(module_path, name, base=nn.Module):
    return type(name, (base,), {"__module__": module_path})


def test_module_key_qualifies_by_kind():
    assert module_key(nn.Linear(2, 2)) == "Linear"
    pairs = [("torch.ao.nn.quantized.reference.modules.linear", "fxquant.nn.quantized.reference.linear",
              "Linear", "quantized.reference.Linear"),
             ("torch.ao.nn.intrinsic.quantized.modules.conv_relu", "fxquant.nn.intrinsic.quantized",
              "ConvReLU2d", "intrinsic.quantized.ConvReLU2d"),
             ("torch.ao.nn.quantized.dynamic.modules.rnn", "fxquant.nn.quantized.dynamic.rnn",
              "LSTM", "quantized.dynamic.LSTM"),
             ("torch.ao.nn.intrinsic.modules.fused", "fxquant.nn.intrinsic", "LinearReLU", "intrinsic.LinearReLU")]
    for theirs, ours, cls, key in pairs:
        assert module_key(_fake_class(theirs, cls)()) == module_key(_fake_class(ours, cls)()) == key
    assert module_key(torch.fx.symbolic_trace(nn.ReLU())) == "GraphModule"


class _ToyObserver(nn.Module):
    """Duck-typed observer: min/max affine uint8 qparams, like an observer of either library."""

    def __init__(self):
        super().__init__()
        self.lo, self.hi = torch.tensor(0.0), torch.tensor(0.0)

    def forward(self, x):
        self.lo, self.hi = torch.minimum(self.lo, x.min()), torch.maximum(self.hi, x.max())
        return x

    def calculate_qparams(self):
        scale = ((self.hi - self.lo) / 255).clamp_min(torch.finfo(torch.float32).eps)
        return scale.reshape(1), (-torch.round(self.lo / scale)).to(torch.int64).reshape(1)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        y = torch.relu(self.fc(x))
        return torch.nn.functional.linear(y.reshape(-1, 4), self.w)


def _observe_toy():
    """A hand-made 'prepared' graph: observers on x, fc, relu (shared with reshape), the weight w and linear."""
    gm = torch.fx.symbolic_trace(_Toy())
    shared = _ToyObserver()
    for i, mod in enumerate([_ToyObserver(), _ToyObserver(), shared, shared, _ToyObserver(), _ToyObserver()]):
        gm.add_submodule(f"activation_post_process_{i}", mod)
    g = gm.graph
    targets = [n for n in g.nodes if n.op in ("placeholder", "call_module", "call_function", "call_method", "get_attr")]
    for i, node in enumerate(targets):
        with g.inserting_after(node):
            obs = g.call_module(f"activation_post_process_{i}", (node,))
        node.replace_all_uses_with(obs, delete_user_cb=lambda u, o=obs: u is not o)
    gm.recompile()
    return gm


def test_node_count_dict_counts_shared_and_weight_observers():
    gm = _observe_toy()
    counts = node_count_dict(gm, observers_by_class=True)
    assert counts == {"activation_post_process": 5, "activation_post_process:_ToyObserver": 5,
                      "weight_post_process": 1, "weight_post_process:_ToyObserver": 1,
                      "Linear": 1, "relu": 1, "reshape": 1, "linear": 1}


def test_collect_qparams_on_prepared_graph():
    gm = _observe_toy()
    x = torch.randn(3, 4) * 3
    gm(x)
    acts = collect_qparams(gm)
    assert [q.node for q in acts] == ["x", "fc", "relu", "reshape", "linear"]
    assert [q.node for q in collect_qparams(gm, weights=True)] == ["x", "fc", "relu", "reshape", "w", "linear"]
    assert_qparams_equal([acts[2]], [acts[3]], check_names=False)  # shared observer
    lo = min(0.0, x.min().item())
    assert acts[0].scale.item() == pytest.approx((max(0.0, x.max().item()) - lo) / 255, rel=1e-6)


def test_collect_qparams_on_qdq_graph():
    """A reference-style graph, built but never run: constants via get_attr, Python numbers, or computed (dynamic)."""
    root = nn.Module()
    root.register_buffer("s0", torch.tensor(0.05))
    root.register_buffer("z0", torch.tensor(3, dtype=torch.int32))
    g = torch.fx.Graph()
    x = g.placeholder("x")
    w = g.get_attr("s0")  # also a 'weight' for the weight-role check below
    q0 = g.call_function(torch.quantize_per_tensor, (x, g.get_attr("s0"), g.get_attr("z0"), torch.uint8))
    d0 = g.call_method("dequantize", (q0,))
    relu = g.call_function(torch.relu, (d0,))
    q1 = g.call_function(torch.quantize_per_tensor, (relu, 0.25, 7, torch.uint8))
    d1 = g.call_method("dequantize", (q1,))
    dyn = g.call_function(torch.quantize_per_tensor_dynamic, (d1, torch.uint8, False))
    qw = g.call_function(torch.quantize_per_tensor, (w, 0.5, 0, torch.int8))
    g.output((dyn, qw))
    gm = torch.fx.GraphModule(root, g)
    got = collect_qparams(gm)
    assert [q.node for q in got] == ["x", "relu", "dequantize_1"]
    assert_qparams_equal(got, [QParams("x", torch.tensor(0.05), torch.tensor(3)),
                               QParams("relu", torch.tensor(0.25), torch.tensor(7)),
                               QParams("dequantize_1", None, None)])
    assert [q.node for q in collect_qparams(gm, weights=True)] == ["x", "relu", "dequantize_1", "s0"]
    assert node_count_dict(gm) == {"quantize_per_tensor": 3, "dequantize": 2, "relu": 1,
                                   "quantize_per_tensor_dynamic": 1}


def test_assert_qparams_equal_is_bit_exact():
    s = torch.tensor(0.1)
    a = [QParams("x", s, torch.tensor(5, dtype=torch.int32))]
    assert_qparams_equal(a, [QParams("x", s.clone(), torch.tensor(5))])  # int32 vs int64 zero point: same
    ulp = torch.nextafter(s, torch.tensor(1.0))
    with pytest.raises(AssertionError, match="scale"):
        assert_qparams_equal(a, [QParams("x", ulp, torch.tensor(5))])
    with pytest.raises(AssertionError, match="zero_point"):
        assert_qparams_equal(a, [QParams("x", s, torch.tensor(6))])
    with pytest.raises(AssertionError, match="node 'x' vs 'y'"):
        assert_qparams_equal(a, [QParams("y", s, torch.tensor(5))])
    assert_qparams_equal(a, [QParams("y", s, torch.tensor(5))], check_names=False)
    with pytest.raises(AssertionError, match="1 entries vs 2"):
        assert_qparams_equal(a, a + a)
    with pytest.raises(AssertionError, match="scale"):
        assert_qparams_equal(a, [QParams("x", None, torch.tensor(5))])


def test_assert_bit_identical():
    t = torch.randn(4, 5)
    assert_bit_identical((t, {"a": [t.clone(), 1, 2.5]}), (t.clone(), {"a": [t.clone(), 1, 2.5]}))
    nan = torch.tensor([float("nan"), 1.0])
    assert_bit_identical(nan, nan.clone())
    with pytest.raises(AssertionError, match="1 of 1 elements differ"):
        assert_bit_identical(torch.tensor([0.0]), torch.tensor([-0.0]))
    u = t.clone()
    u[2, 3] = torch.nextafter(u[2, 3], torch.tensor(math.inf))
    with pytest.raises(AssertionError, match=r"first at \(2, 3\).*max abs diff"):
        assert_bit_identical(t, u)
    with pytest.raises(AssertionError, match="dtype"):
        assert_bit_identical(t, t.double())
    with pytest.raises(AssertionError, match="shape"):
        assert_bit_identical(t, t.reshape(5, 4))
    with pytest.raises(AssertionError, match="keys"):
        assert_bit_identical({"a": t}, {"b": t})
    with pytest.raises(AssertionError, match=r"output\[1\]"):
        assert_bit_identical((t, 1), (t, 2))
    with pytest.raises(AssertionError, match="tuple of 1 vs list of 1"):
        assert_bit_identical((t,), [t])
    with pytest.raises(AssertionError):
        assert_bit_identical(0.0, -0.0)
    q = torch.tensor([1, -2, 3], dtype=torch.int8)
    assert_bit_identical(q, q.clone())
    with pytest.raises(AssertionError, match="int8 vs torch.uint8"):
        assert_bit_identical(q, q.to(torch.uint8))
    assert_bit_identical(t.to(torch.bfloat16), t.to(torch.bfloat16))
    assert_bit_identical(t.to(torch.float8_e4m3fn), t.to(torch.float8_e4m3fn))


def test_no_torchao_env_skips_cleanly(monkeypatch):
    monkeypatch.setenv("FXQUANT_NO_TORCHAO", "1")
    assert not oracle.have_torchao()
    with pytest.raises(pytest.skip.Exception):
        oracle.torchao_lib()
    with pytest.raises(pytest.skip.Exception):
        oracle.run_torchao("branchy")
