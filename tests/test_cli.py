"""The fxquant command line: demo, quantize, explain; user mistakes exit 2 with a one- or two-line message."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fxquant
from fxquant.cli import main
from fxquant.tools.serialize import load, unregister_safe

USER_CODE = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()
            self.head = nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.head(torch.flatten(self.relu(self.bn(self.conv(x))), 1))

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace this
                return self.fc(x)
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Conv2d(3, 8, 3, padding=1)
            self.gate = Gate()

        def forward(self, x):
            return self.gate(self.pre(x))

    def build():
        torch.manual_seed(0)
        return Net()

    def build_with_inputs():
        return build(), (torch.zeros(1, 3, 8, 8),)

    def build_outer():
        torch.manual_seed(0)
        return Outer()

    def batches():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(4)]

    TUPLE_BATCHES = [(torch.randn(2, 3, 8, 8),), (torch.randn(2, 3, 8, 8),)]

    def wrong_shape():
        return [torch.randn(4, 3, 16, 16)]

    def empty():
        return []

    def broken():
        raise RuntimeError("database offline")
''')

_counter = itertools.count()


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """A fresh importable module of the user's code (unique name: imports are cached per process)."""
    name = f"user_models_{next(_counter)}"
    (tmp_path / f"{name}.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return name


def _quantize(pkg, *extra):
    return main(["quantize", "--model", f"{pkg}:build", "--calib", f"{pkg}:batches", "--no-progress", *extra])


def test_quantize_saves_reports_and_explains(user_pkg, tmp_path, capsys):
    out, report = tmp_path / "m.fxq", tmp_path / "r.html"
    assert _quantize(user_pkg, "--out", str(out), "--report", str(report)) == 0
    text = capsys.readouterr().out
    assert "3 of 3 ops quantized" in text and "weight dB" in text
    model = load(out)
    assert [r.node for r in fxquant.explain(model) if r.quantized] == ["conv", "flatten", "head"]
    mod = sys.modules[user_pkg]
    float_model = mod.build().eval()
    x = mod.batches()[0]
    assert torch.allclose(model(x), float_model(x), atol=0.2)  # int8 close to float
    assert "data:image/png;base64," in report.read_text()
    assert main(["explain", str(out)]) == 0
    assert "3 of 3 ops quantized" in capsys.readouterr().out


def test_skip_and_presets(user_pkg, tmp_path, capsys):
    out = tmp_path / "m.fxq"
    assert _quantize(user_pkg, "--skip", "he.d", "--qconfig", "per-tensor", "--out", str(out)) == 0
    assert "leaving in float: head" in capsys.readouterr().out
    rows = {r.node: r for r in fxquant.explain(load(out))}
    assert not rows["head"].quantized and rows["conv"].quantized
    quantized = load(out)  # per-tensor weights: one scale, zero point 0 (reference or lowered module alike)
    scales = [(m.weight_scale, m.weight_zero_point) for m in quantized.modules()
              if isinstance(getattr(m, "weight_scale", None), torch.Tensor)]
    assert len(scales) == 1 and scales[0][0].numel() == 1 and int(scales[0][1]) == 0
    assert main(["explain", str(out), "--only-float"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("head") for line in lines) and not any(line.startswith("conv") for line in lines)


@pytest.mark.parametrize("preset,quantized", [("dynamic", {"head"}), ("weight-only", set()), ("histogram", None)])
def test_other_presets_run(user_pkg, tmp_path, capsys, preset, quantized):
    out = tmp_path / "m.fxq"
    assert _quantize(user_pkg, "--qconfig", preset, "--backend", "x86", "--out", str(out)) == 0
    got = {r.node for r in fxquant.explain(load(out)) if r.quantized}
    assert got == (quantized if quantized is not None else {"conv", "flatten", "head"})


def test_factory_with_example_inputs_and_tuple_batches(user_pkg, capsys):
    assert main(["quantize", "--model", f"{user_pkg}:build_with_inputs", "--calib", f"{user_pkg}:TUPLE_BATCHES",
                 "--no-progress", "--calib-batches", "1"]) == 0


def test_non_traceable_module(user_pkg, tmp_path, capsys):
    args = ["quantize", "--model", f"{user_pkg}:build_outer", "--calib", f"{user_pkg}:batches", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot be traced" in err and "'gate'" in err and "--non-traceable" in err and "Traceback" not in err
    out = tmp_path / "o.fxq"
    gate_cls = sys.modules[user_pkg].Gate
    try:
        assert main(args + ["--non-traceable", "gate", "--out", str(out)]) == 0
        unregister_safe(gate_cls)  # a new process would not have it registered
        assert main(["explain", str(out)]) == 2
        assert "--trust" in capsys.readouterr().err
        assert main(["explain", str(out), "--trust", f"{user_pkg}:Gate"]) == 0
        assert "gate" in capsys.readouterr().out
    finally:
        unregister_safe(gate_cls)


@pytest.mark.parametrize("model,calib,extra,message", [
    ("{pkg}:nope", "{pkg}:batches", [], "has no attribute 'nope'"),
    ("no_such_pkg_xyz:build", "{pkg}:batches", [], "cannot import module 'no_such_pkg_xyz'"),
    ("{pkg}", "{pkg}:batches", [], "must look like package.module:name"),
    ("{pkg}:build", "{pkg}:wrong_shape", [], "fails on the first calibration batch"),
    ("{pkg}:build", "{pkg}:empty", [], "yielded no batches"),
    ("{pkg}:build", "{pkg}:broken", [], "database offline"),
    ("{pkg}:build", "{pkg}:batches", ["--skip", "nothing_here"], "matches no module"),
    ("{pkg}:build", "{pkg}:batches", ["--skip", "[bad"], "neither a module name nor a valid regex"),
    ("{pkg}:build", "{pkg}:batches", ["--non-traceable", "nope"], "no such module"),
    ("{pkg}:build", "{pkg}:batches", ["--out", "/no/such/dir/m.fxq"], "does not exist"),
])
def test_user_errors_exit_2_without_traceback(user_pkg, capsys, model, calib, extra, message):
    code = main(["quantize", "--model", model.format(pkg=user_pkg), "--calib", calib.format(pkg=user_pkg),
                 "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3


def test_explain_errors(tmp_path, capsys):
    assert main(["explain", str(tmp_path / "missing.fxq")]) == 2
    assert "no such file" in capsys.readouterr().err
    junk = tmp_path / "junk.fxq"
    junk.write_text("not a model")
    assert main(["explain", str(junk)]) == 2
    assert "not a readable fxquant model file" in capsys.readouterr().err


def test_bad_choices_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--model", "a:b", "--calib", "a:b", "--qconfig", "int3"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_demo_quick(capsys):
    assert main(["demo", "--quick", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    for label in ("accuracy", "model size", "latency, batch 1", "latency, batch 64", "prepare_fx", "convert_fx"):
        assert label in out
    accuracy_line = next(line for line in out.splitlines() if line.startswith("accuracy"))
    float_acc, int8_acc = [float(tok.rstrip("%")) for tok in accuracy_line.split() if tok.endswith("%")]
    assert float_acc > 70.0 and abs(float_acc - int8_acc) < 5.0


def test_python_dash_m_runs_the_cli():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "fxquant", "--help"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0
    assert all(cmd in proc.stdout for cmd in ("demo", "quantize", "explain"))
