"""fxquant.tools.serialize: save / load of prepared and converted models, bit-identical, without pickle."""
from __future__ import annotations

import copy
import io
import json
import os
import zipfile

import pytest
import torch
from torch import nn

import fxquant
from fxquant.quantize_fx import convert_to_reference_fx, convert_fx, prepare_fx, prepare_qat_fx
from fxquant.tools import serialize
from fxquant.tools.serialize import ModelFileError, UnsafeReferenceError, load, register_safe, save, unregister_safe
from models import MODELS, BranchyNet, DataDependentGate


def _prepared(name: str, calibrate: bool = True):
    spec = MODELS[name]
    model, example_inputs = spec.factory()
    recipe = spec.recipe()
    pcc = recipe.prepare_custom_config(fxquant, model, example_inputs)
    prepared = prepare_fx(model, recipe.build(fxquant), example_inputs, prepare_custom_config=pcc,
                          backend_config=recipe.get_backend_config(fxquant))
    if calibrate:
        for batch in spec.calibration_data(3):
            prepared(*batch)
    return model, prepared, example_inputs


def _roundtrip(model: nn.Module, tmp_path) -> nn.Module:
    path = tmp_path / "m.fxq"
    save(model, path)
    return load(path)


def _assert_same_outputs(a: nn.Module, b: nn.Module, inputs: tuple) -> None:
    with torch.no_grad():
        out_a, out_b = a(*inputs), b(*inputs)
    assert out_a.dtype == out_b.dtype and torch.equal(out_a, out_b)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "bert_encoder", "functional", "standalone",
                                  "segmentation_head"])
def test_prepared_roundtrip_is_bit_identical(name, tmp_path):
    _, prepared, example_inputs = _prepared(name)
    loaded = _roundtrip(prepared, tmp_path)
    assert type(loaded).__name__ == type(prepared).__name__
    assert loaded.code == prepared.code
    _assert_same_state(prepared, loaded)
    _assert_same_outputs(prepared, loaded, example_inputs)
    assert [r.node for r in fxquant.explain(loaded)] == [r.node for r in fxquant.explain(prepared)]


@pytest.mark.parametrize("name", ["resnet18", "functional"])
def test_loaded_prepared_model_converts_like_the_original(name, tmp_path):
    _, prepared, example_inputs = _prepared(name)
    loaded = _roundtrip(prepared, tmp_path)
    ours = convert_fx(copy.deepcopy(prepared))
    theirs = convert_fx(loaded)
    _assert_same_outputs(ours, theirs, example_inputs)


@pytest.mark.parametrize("convert", [convert_fx, convert_to_reference_fx])
def test_converted_roundtrip_is_bit_identical(convert, tmp_path):
    _, prepared, example_inputs = _prepared("resnet18")
    quantized = convert(prepared)
    loaded = _roundtrip(quantized, tmp_path)
    assert loaded.code == quantized.code
    _assert_same_state(quantized, loaded)
    _assert_same_outputs(quantized, loaded, example_inputs)
    x = torch.randn(5, 3, 32, 32)
    _assert_same_outputs(quantized, loaded, (x,))


def test_qat_prepared_roundtrip_keeps_training_mode_and_fake_quant_state(tmp_path):
    model, example_inputs = MODELS["resnet18"].factory()
    prepared = prepare_qat_fx(model.train(), fxquant.get_default_qat_qconfig_mapping("x86"), example_inputs)
    prepared(*example_inputs)
    loaded = _roundtrip(prepared, tmp_path)
    assert loaded.training and [m.training for m in loaded.modules()] == [m.training for m in prepared.modules()]
    _assert_same_state(prepared, loaded)
    prepared.eval()
    loaded.eval()
    _assert_same_outputs(prepared, loaded, example_inputs)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def test_shared_objects_stay_shared(tmp_path):
    register_safe(Tied)
    try:
        loaded = _roundtrip(Tied(), tmp_path)
    finally:
        unregister_safe(Tied)
    assert loaded.a.weight is loaded.b.weight and isinstance(loaded.a.weight, nn.Parameter)
    assert loaded.a.weight.requires_grad


def test_file_holds_json_and_safe_tensors_only(tmp_path):
    _, prepared, _ = _prepared("functional")
    path = tmp_path / "m.fxq"
    save(prepared, path)
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["fxquant/header.json", "fxquant/model.json", "fxquant/tensors.pt"]
        header = json.loads(zf.read("fxquant/header.json"))
        model = json.loads(zf.read("fxquant/model.json"))
        tensors = torch.load(io.BytesIO(zf.read("fxquant/tensors.pt")), weights_only=True)
    assert header["format"] == "fxquant-model" and header["version"] == serialize.FORMAT_VERSION
    assert isinstance(tensors, list) and all(type(t) is torch.Tensor for t in tensors)
    graph_entries = [o for o in model["objects"] if "graph_module" in o]
    ops = {n["op"] for n in graph_entries[0]["graph"]}
    assert {"placeholder", "call_function", "call_module", "output"} <= ops


# ------------------------------------------------------------------------------------------------ broken files
def _rewrite(path, tmp_path, edit_model=None, edit_header=None, tensors=None, fix_checksums=True):
    """Copy the archive at ``path`` with its JSON edited (checksums recomputed, so only the edit is tested)."""
    import hashlib

    with zipfile.ZipFile(path) as zf:
        header = json.loads(zf.read("fxquant/header.json"))
        model = json.loads(zf.read("fxquant/model.json"))
        tensor_bytes = zf.read("fxquant/tensors.pt")
    if edit_model:
        edit_model(model)
    if tensors is not None:
        buf = io.BytesIO()
        torch.save(tensors, buf)
        tensor_bytes = buf.getvalue()
    model_bytes = json.dumps(model).encode()
    if fix_checksums:
        header["model_sha256"] = hashlib.sha256(model_bytes).hexdigest()
        header["tensors_sha256"] = hashlib.sha256(tensor_bytes).hexdigest()
    if edit_header:
        edit_header(header)
    out = tmp_path / "edited.fxq"
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("fxquant/header.json", json.dumps(header))
        zf.writestr("fxquant/model.json", model_bytes)
        zf.writestr("fxquant/tensors.pt", tensor_bytes)
    return out


@pytest.fixture
def saved(tmp_path):
    _, prepared, example_inputs = _prepared("functional")
    path = tmp_path / "m.fxq"
    save(prepared, path)
    return path


def test_truncated_file_is_a_clear_error(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        bad = tmp_path / f"cut{cut}.fxq"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="corrupt or truncated"):
            load(bad)


def test_corrupted_bytes_are_detected(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as zf:
        info = zf.getinfo("fxquant/tensors.pt")
    offset = info.header_offset + 30 + len(info.filename) + info.file_size // 2  # inside the stored tensor bytes
    data[offset] ^= 0xFF
    bad = tmp_path / "flipped.fxq"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt"):
        load(bad)


def test_checksum_mismatch_is_detected(saved, tmp_path):
    def edit(model):
        model["objects"].append({"cls": "torch.nn.modules.linear.Identity", "new": []})

    with pytest.raises(ModelFileError, match="checksum"):
        load(_rewrite(saved, tmp_path, edit_model=edit, fix_checksums=False))


def test_foreign_files_are_rejected(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelFileError, match="not a readable fxquant model file"):
        load(text)
    pt = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, pt)
    with pytest.raises(ModelFileError, match="not an fxquant model file"):
        load(pt)


def test_newer_format_version_says_upgrade(saved, tmp_path):
    bad = _rewrite(saved, tmp_path, edit_header=lambda h: h.update(version=serialize.FORMAT_VERSION + 1))
    with pytest.raises(ModelFileError, match="upgrade fxquant"):
        load(bad)


def test_pickled_code_in_tensor_part_is_refused(saved, tmp_path):
    bad = _rewrite(saved, tmp_path, tensors=[os.system])
    with pytest.raises(ModelFileError, match="cannot read its tensors"):
        load(bad)


# ------------------------------------------------------------------------------------------------ allow-list
def _graph_nodes(model):
    return next(o for o in model["objects"] if "graph_module" in o)["graph"]


def _first_call_function(model):
    return next(n for n in _graph_nodes(model) if n["op"] == "call_function")


def test_graph_target_outside_allow_list_is_refused(saved, tmp_path):
    for target in ("os.system", "torch.load", "builtins.eval", "torch.nn.functional.torch.load", "fxquant.cli.main"):
        bad = _rewrite(saved, tmp_path, edit_model=lambda m, t=target: _first_call_function(m).update(
            target={"$": "ref", "v": t}))
        with pytest.raises(UnsafeReferenceError, match=target.replace(".", r"\.")):
            load(bad)


def test_code_injection_through_names_is_refused(saved, tmp_path):
    edits = [lambda m: _first_call_function(m).update(name="x = __import__('os')"),
             lambda m: next(n for n in _graph_nodes(m) if n["op"] == "call_module").update(target='a")\nimport os#'),
             lambda m: _graph_nodes(m).insert(1, {"op": "call_method", "name": "evil", "target": "__class__",
                                                  "args": [{"$": "node", "v": "x"}], "kwargs": {"$": "dict", "v": []}}),
             lambda m: m["objects"].__setitem__(0, {**m["objects"][0], "graph_module": "A(nn.Module): pass\n#"})]
    for edit in edits:
        with pytest.raises(ModelFileError):
            load(_rewrite(saved, tmp_path, edit_model=edit))


def test_object_of_unknown_class_is_refused(saved, tmp_path):
    def edit(model):
        model["objects"].append({"cls": "subprocess.Popen", "call": [["ls"]]})
        model["root"] = {"$": "obj", "i": len(model["objects"]) - 1}

    with pytest.raises(UnsafeReferenceError, match="subprocess.Popen"):
        load(_rewrite(saved, tmp_path, edit_model=edit))


def test_unregistered_user_module_names_the_class_and_the_fix(tmp_path):
    _, prepared, example_inputs = _prepared("branchy")
    assert isinstance(prepared.gate, DataDependentGate)
    with pytest.raises(UnsafeReferenceError, match=r"models\.DataDependentGate.*register_safe\(DataDependentGate\)"):
        save(prepared, tmp_path / "m.fxq")
    register_safe(DataDependentGate)
    try:
        save(prepared, tmp_path / "m.fxq")
        loaded = load(tmp_path / "m.fxq")
        for batch in MODELS["branchy"].calibration_data(2, seed=5):  # both branches of the gate
            _assert_same_outputs(prepared, loaded, batch)
    finally:
        unregister_safe(DataDependentGate)
    with pytest.raises(UnsafeReferenceError, match="register_safe"):
        load(tmp_path / "m.fxq")


def test_user_classes_named_as_data_need_no_registration(tmp_path):
    """Functions traced inside a user module record its class (for qconfig resolution): saved by name only."""
    _, prepared, example_inputs = _prepared("resnet18")
    loaded = _roundtrip(prepared, tmp_path)
    state = loaded._fxquant_state
    scope_types = {rec.scope_type for rec in state.nodes.values() if rec.op == "call_function"}
    assert any(getattr(t, "__name__", "") == "BasicBlock" for t in scope_types)  # resolved: `models` is imported


def test_lambda_in_a_qconfig_cannot_be_saved(tmp_path):
    model, example_inputs = MODELS["functional"].factory()
    act = fxquant.MinMaxObserver.with_callable_args(eps=lambda: 1e-5)
    mapping = fxquant.QConfigMapping().set_global(fxquant.QConfig(activation=act,
                                                                  weight=fxquant.default_weight_observer))
    prepared = prepare_fx(model, mapping, example_inputs)
    with pytest.raises(UnsafeReferenceError, match="lambda"):
        save(prepared, tmp_path / "m.fxq")


def test_save_rejects_non_modules(tmp_path):
    with pytest.raises(TypeError, match="nn.Module"):
        save({"w": torch.ones(1)}, tmp_path / "m.fxq")


def test_save_to_a_file_object_and_back():
    _, prepared, example_inputs = _prepared("functional")
    buf = io.BytesIO()
    save(prepared, buf)
    buf.seek(0)
    _assert_same_outputs(prepared, load(buf), example_inputs)


def test_branchy_float_model_registered_class_roundtrip(tmp_path):
    register_safe(BranchyNet)
    register_safe(DataDependentGate)
    try:
        model, example_inputs = MODELS["branchy"].factory()
        _assert_same_outputs(model, _roundtrip(model, tmp_path), example_inputs)
    finally:
        unregister_safe(BranchyNet)
        unregister_safe(DataDependentGate)


def scaled_clamp(x, limit: float):
    """A user function kept as a graph leaf with torch.fx.wrap."""
    return x.clamp(-limit, limit) * 0.5


torch.fx.wrap("scaled_clamp")


class UsesWrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return scaled_clamp(self.fc(x), 1.0)


def test_wrapped_user_function_needs_registration(tmp_path):
    x = torch.randn(3, 4)
    prepared = prepare_fx(UsesWrapped().eval(), fxquant.get_default_qconfig_mapping("x86"), (x,))
    prepared(x)
    assert any(n.target is scaled_clamp for n in prepared.graph.nodes)
    with pytest.raises(UnsafeReferenceError, match=r"function test_save_load\.scaled_clamp.*register_safe"):
        save(prepared, tmp_path / "m.fxq")
    register_safe(scaled_clamp)
    try:
        loaded = _roundtrip(prepared, tmp_path)
        _assert_same_outputs(prepared, loaded, (x,))
    finally:
        unregister_safe(scaled_clamp)


class _Annotated(torch.nn.Module):
    """Annotated forward in a file with ``from __future__ import annotations`` (this one): the annotations are
    strings, which torch.fx keeps and then cannot pickle."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, scale: "float" = 1.0) -> torch.Tensor:
        return torch.relu(self.fc(x)) * scale


def test_models_with_string_annotations_pickle_at_every_stage():
    assert isinstance(_Annotated.forward.__annotations__["x"], str)
    example = (torch.randn(2, 4),)
    prepared = fxquant.prepare_fx(_Annotated().eval(), fxquant.get_default_qconfig_mapping("x86"), example)
    prepared(*example)
    placeholder = next(n for n in prepared.graph.nodes if n.op == "placeholder")
    assert placeholder.type is torch.Tensor  # resolved, not dropped
    for model in (prepared, fxquant.convert_to_reference_fx(copy.deepcopy(prepared)), fxquant.convert_fx(prepared)):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        with torch.no_grad():
            assert torch.equal(loaded(*example), model(*example))
