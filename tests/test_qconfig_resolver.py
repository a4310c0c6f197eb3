"""resolve_qconfig / QConfigResolver: precedence rules, caching, and a differential test against torch.ao."""
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxquant.qconfig_mapping import QConfigMapping, build_qconfig_resolver, resolve_qconfig

# A QConfig-like tag: the resolver only needs .activation / .weight, and tags keep these tests independent of
# the observer module. Tag i has weight class TAGS[i] so torch.ao's results can be mapped back.
Tag = namedtuple("Tag", ["activation", "weight"])
TAG_CLASSES = [type(f"Tag{i}", (nn.Identity,), {}) for i in range(4)]
TAGS = [Tag(c, c) for c in TAG_CLASSES]
A, B, C, D = TAGS


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.fc2, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        x = F.linear(F.linear(self.fc(x), self.w), self.w)
        x = torch.sigmoid(x).reshape(-1, 4)
        return self.act(self.fc2(x)).relu()


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks, self.sub, self.head = nn.Sequential(Inner(), Inner()), Inner(), nn.Linear(4, 4)

    def forward(self, x):
        x = torch.add(F.relu(self.sub(self.blocks(x))), 1).view(-1, 4)
        return self.head(x) + F.linear(x, self.head.weight)


def test_module_precedence_each_layer_overrides_the_one_below():
    m = QConfigMapping().set_global(A)
    assert resolve_qconfig(m, "blocks.0.fc", nn.Linear) is A
    m.set_object_type(nn.Linear, B)
    assert resolve_qconfig(m, "blocks.0.fc", nn.Linear) is B
    m.set_module_name_regex(r"blocks\.0\..*", C)
    assert resolve_qconfig(m, "blocks.0.fc", nn.Linear) is C
    m.set_module_name("blocks", D)  # nearest named ancestor
    assert resolve_qconfig(m, "blocks.0.fc", nn.Linear) is D
    m.set_module_name("blocks.0.fc", None)
    assert resolve_qconfig(m, "blocks.0.fc", nn.Linear) is None
    m.set_module_name_object_type_order("blocks.0", nn.Linear, 0, A)
    assert resolve_qconfig(m, "blocks.0.fc", nn.Linear, ("blocks.0", nn.Linear, 0)) is A
    assert resolve_qconfig(m, "blocks.0.fc", nn.Linear, ("blocks.0", nn.Linear, 1)) is None


def test_regex_first_registered_match_wins_and_reset_keeps_position():
    m = QConfigMapping().set_module_name_regex("foo.*bar.*conv[0-9]+", A).set_module_name_regex("foo.*bar.*", B)
    m.set_module_name_regex("foo.*", C)
    assert [resolve_qconfig(m, n, nn.Conv2d) for n in ("foo.bar.conv0", "foo.bar.linear", "foo.baz.relu")] == [A, B, C]
    m.set_module_name_regex("foo.*", D)
    assert list(m.module_name_regex_qconfigs) == ["foo.*bar.*conv[0-9]+", "foo.*bar.*", "foo.*"]
    assert resolve_qconfig(m, "xfoo", nn.Conv2d) is None  # re.match anchors at the start


def test_function_quirk_scope_entries_override_function_entry():
    m = QConfigMapping().set_global(A).set_object_type(F.linear, B)
    assert resolve_qconfig(m, "blk", F.linear, scope_type=Inner) is B
    m.set_object_type(Inner, C)  # the enclosing module's type beats the function's entry
    assert resolve_qconfig(m, "blk", F.linear, scope_type=Inner) is C
    assert resolve_qconfig(m, "blk", torch.add, scope_type=Inner) is C
    m.set_module_name("blk", None)
    assert resolve_qconfig(m, "blk.x", "reshape", scope_type=Inner) is None


def test_root_scope_type_is_ignored_and_empty_module_name_never_matches():
    with pytest.warns(UserWarning, match="never matched"):
        m = QConfigMapping().set_global(A).set_object_type(Outer, B).set_module_name("", C)
    assert resolve_qconfig(m, "", F.linear, scope_type=Outer) is A
    assert resolve_qconfig(m, "", Outer) is B  # a module query (get_attr at the root) sees its type
    m.set_module_name_regex(".*", D)  # a regex can match the root path
    assert resolve_qconfig(m, "", torch.add) is D


def test_explicit_none_entry_is_a_match_not_a_fallthrough():
    m = QConfigMapping().set_global(A).set_object_type(nn.ReLU, None)
    assert resolve_qconfig(m, "act", nn.ReLU) is None
    assert resolve_qconfig(QConfigMapping(), "act", nn.ReLU) is None  # no global: float


def test_no_subclass_matching():
    sub = type("MyLinear", (nn.Linear,), {})
    m = QConfigMapping().set_object_type(nn.Linear, A)
    assert resolve_qconfig(m, "fc", sub) is None


@pytest.mark.parametrize("args,exc,match", [
    (("fc", None), TypeError, "object_type"),
    ((3, nn.Linear), TypeError, "module_path"),
])
def test_bad_queries(args, exc, match):
    with pytest.raises(exc, match=match):
        resolve_qconfig(QConfigMapping(), *args)


def test_bad_mapping_argument():
    with pytest.raises(TypeError, match="from_dict"):
        resolve_qconfig({"": A}, "fc", nn.Linear)


def test_resolver_snapshot_and_per_path_cache():
    m = QConfigMapping().set_global(A).set_module_name_regex(r"layers\.1[0-9]*\.", B)
    resolver = build_qconfig_resolver(m)
    m.set_global(C)  # later edits are not seen
    n = 800
    got = [resolver.for_module(f"layers.{i}.fc", nn.Linear) for i in range(n)]
    got += [resolver.for_module(f"layers.{i}.fc", nn.Linear) for i in range(n)]  # same paths again
    assert resolver.cache_info() == {"paths": n}
    expected = [B if str(i).startswith("1") else A for i in range(n)]
    assert got == expected * 2


def test_for_methods_count_order_per_scope():
    m = QConfigMapping().set_module_name_object_type_order("blk", F.linear, 1, B)
    m.set_module_name_object_type_order("", nn.Linear, 1, C)
    r = build_qconfig_resolver(m)
    assert [r.for_function("blk", Inner, F.linear) for _ in range(3)] == [None, B, None]
    assert r.for_function("other", Inner, F.linear) is None  # counted separately per scope
    assert [r.for_module(n, nn.Linear) for n in ("a", "b", "blk.fc")] == [None, C, None]
    assert r.for_method("blk", Inner, "linear") is None


# ---------------------------------------------------------------- differential test against torch.ao

OBJECT_TYPES = [nn.Linear, nn.ReLU, Inner, Outer, nn.Sequential, F.linear, torch.sigmoid, F.relu, torch.add,
                "reshape", "relu", "view"]
REGEXES = ["blocks.*", r"blocks\.0.*", ".*fc", "sub", ".*", "head", r"blocks\.1\.fc2", ""]
NAMES = ["blocks", "blocks.0", "blocks.1.fc", "sub", "head", "sub.act", "blocks.0.fc2"]
ORDERS = [("blocks.0", F.linear, 0), ("blocks.0", F.linear, 1), ("blocks.0", nn.Linear, 1), ("", nn.Linear, 0),
          ("sub", F.linear, 1), ("", F.linear, 0), ("blocks", Inner, 1), ("sub", nn.Linear, 0)]
VALUE = st.sampled_from([*range(len(TAGS)), None])


def _pairs(keys):
    return st.lists(st.tuples(st.sampled_from(keys), VALUE), max_size=4)


SPEC = st.fixed_dictionaries({"global": VALUE, "types": _pairs(OBJECT_TYPES), "regex": _pairs(REGEXES),
                              "names": _pairs(NAMES), "orders": _pairs(ORDERS)})


def _build(mapping, qconfig_of, spec):
    mapping.set_global(qconfig_of(spec["global"]))
    for key, value in spec["types"]:
        mapping.set_object_type(key, qconfig_of(value))
    for key, value in spec["regex"]:
        mapping.set_module_name_regex(key, qconfig_of(value))
    for key, value in spec["names"]:
        mapping.set_module_name(key, qconfig_of(value))
    for key, value in spec["orders"]:
        mapping.set_module_name_object_type_order(*key, qconfig_of(value))
    return mapping


@pytest.fixture(scope="module")
def traced():
    tracer_mod = pytest.importorskip("torch.ao.quantization.fx.tracer")
    model = Outer()
    tracer = tracer_mod.QuantizationTracer([], [])
    gm = torch.fx.GraphModule(model, tracer.trace(model))
    return gm, dict(tracer.node_name_to_scope)


def _ours(gm, scopes, mapping, root_scope_type):
    resolver, modules, out = build_qconfig_resolver(mapping), dict(gm.named_modules()), {}
    for node in gm.graph.nodes:
        path, scope_type = scopes.get(node.name, ("", None))
        scope_type = root_scope_type if path == "" else scope_type
        handlers = {
            "call_module": lambda: resolver.for_module(node.target, type(modules[node.target])),
            "call_function": lambda: resolver.for_function(path, scope_type, node.target),
            "call_method": lambda: resolver.for_method(path, scope_type, node.target),
            "get_attr": lambda: resolver.for_attribute(node.target.rpartition(".")[0],
                                                       type(modules[node.target.rpartition(".")[0]])),
        }
        out[node.name] = handlers[node.op]() if node.op in handlers else None
    return out


@settings(max_examples=150, deadline=None)
@given(spec=SPEC, root_type=st.sampled_from([None, Outer]))
def test_matches_torch_ao_node_qconfigs(traced, spec, root_type):
    from torch.ao.quantization import QConfig as AOQConfig
    from torch.ao.quantization import QConfigMapping as AOMapping
    from torch.ao.quantization.fx.qconfig_mapping_utils import _generate_node_name_to_qconfig
    gm, scopes = traced
    ao_tags = [AOQConfig(c, c) for c in TAG_CLASSES]
    ours = _ours(gm, scopes, _build(QConfigMapping(), lambda i: None if i is None else TAGS[i], spec), root_type)
    ao_mapping = _build(AOMapping(), lambda i: None if i is None else ao_tags[i], spec)
    theirs = _generate_node_name_to_qconfig(gm, dict(gm.named_modules()), gm.graph, ao_mapping, scopes)
    assert set(ours) == set(theirs)
    for name, q in theirs.items():
        expected = None if q is None else TAGS[TAG_CLASSES.index(q.weight)]
        assert ours[name] == expected, name



# ---------------------------------------------------------------- fusion / QAT / convert-time helpers
from fxquant import qconfig as qc  # noqa: E402
from fxquant.qconfig_resolver import (check_convert_qconfig_mapping, with_fused_module_types,  # noqa: E402
                                      with_qat_module_types)

LinearReLU = type("LinearReLU", (nn.Sequential,), {})
FUSED = {LinearReLU: [nn.Linear, nn.ReLU]}


def test_fused_type_gets_the_parts_qconfig():
    m = QConfigMapping().set_global(A).set_object_type(nn.Linear, qc.default_qconfig)
    m.set_object_type(nn.ReLU, qc.QConfig(qc.default_qconfig.activation, qc.default_qconfig.weight))
    fused = with_fused_module_types(m, FUSED)
    assert fused.object_type_qconfigs[LinearReLU] is qc.default_qconfig
    assert LinearReLU not in m.object_type_qconfigs  # the input is not modified
    assert resolve_qconfig(fused, "fc", LinearReLU) is qc.default_qconfig


def test_fused_parts_with_different_qconfigs_raise():
    m = QConfigMapping().set_object_type(nn.Linear, qc.default_qconfig).set_object_type(nn.ReLU, None)
    with pytest.raises(LookupError, match="LinearReLU.*Linear.*ReLU"):
        with_fused_module_types(m, FUSED)


def test_fused_explicit_entries_are_kept_and_explicit_none_propagates():
    m = QConfigMapping().set_global(A).set_object_type(nn.Linear, None)
    assert resolve_qconfig(with_fused_module_types(m, FUSED), "fc", LinearReLU) is None
    assert resolve_qconfig(with_fused_module_types(QConfigMapping().set_global(A), FUSED), "fc", LinearReLU) is A
    m = QConfigMapping().set_object_type(nn.Linear, qc.default_qconfig).set_object_type(LinearReLU, B)
    m.set_object_type(nn.ReLU, qc.default_qconfig)
    assert with_fused_module_types(m, FUSED).object_type_qconfigs[LinearReLU] is B


def test_fused_agrees_with_torch_ao_where_torch_ao_is_not_wrong():
    utils = pytest.importorskip("torch.ao.quantization.fx.qconfig_mapping_utils")
    import torch.ao.nn.intrinsic as nni
    from torch.ao.quantization import QConfigMapping as AOMapping
    from torch.ao.quantization import default_qconfig as ao_q
    fused_types = {nni.LinearReLU: [nn.Linear, nn.ReLU]}
    for linear, relu in [(True, True), (True, False), (False, True), (False, False)]:
        ao_map, ours = AOMapping(), QConfigMapping()
        for cls, on in ((nn.Linear, linear), (nn.ReLU, relu)):
            if on:
                ao_map.set_object_type(cls, ao_q)
                ours.set_object_type(cls, qc.default_qconfig)
        try:
            utils._update_qconfig_for_fusion(_leaf_gm(nni.LinearReLU), ao_map)
            expected = nni.LinearReLU in ao_map.object_type_qconfigs
        except LookupError:
            expected = LookupError
        try:
            got = nni.LinearReLU in with_fused_module_types(ours, fused_types).object_type_qconfigs
        except LookupError:
            got = LookupError
        assert got == expected, (linear, relu)


def _leaf_gm(fused_cls):
    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, fused_cls) or super().is_leaf_module(m, name)

    root = nn.Sequential(fused_cls(nn.Linear(2, 2), nn.ReLU()))
    return torch.fx.GraphModule(root, Tracer().trace(root))


def test_qat_types_inherit_float_entries():
    QatLinear = type("QatLinear", (nn.Linear,), {})
    m = QConfigMapping().set_object_type(nn.Linear, A).set_object_type(nn.Conv2d, B)
    out = with_qat_module_types(m, {nn.Linear: QatLinear, nn.ReLU: nn.ReLU})
    assert out.object_type_qconfigs[QatLinear] is A and QatLinear not in m.object_type_qconfigs
    assert with_qat_module_types(m.set_object_type(QatLinear, C), {nn.Linear: QatLinear}).object_type_qconfigs[
        QatLinear] is C


def test_check_convert_qconfig_mapping():
    prepared = (QConfigMapping().set_global(qc.default_qconfig).set_object_type(nn.Linear, qc.default_qconfig)
                .set_module_name("head", qc.default_per_channel_qconfig))
    same = prepared.copy().set_module_name("head", None)  # None: skip those nodes
    check_convert_qconfig_mapping(prepared, same)
    with pytest.raises(ValueError, match="missing module_name entry 'head'"):
        check_convert_qconfig_mapping(prepared, QConfigMapping().set_global(qc.default_qconfig)
                                      .set_object_type(nn.Linear, None))
    with pytest.raises(ValueError, match="global qconfig"):
        check_convert_qconfig_mapping(prepared, prepared.copy().set_global(qc.default_per_channel_qconfig))
    with pytest.raises(ValueError, match="object_type entry .*Linear.* was"):
        check_convert_qconfig_mapping(prepared, prepared.copy().set_object_type(nn.Linear, qc.default_debug_qconfig))
