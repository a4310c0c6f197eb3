"""Differential-test helpers: run torch.ao (the oracle) and fxquant the same way, and compare what comes out.

torch.ao is imported lazily; every entry point that needs it calls :func:`require_torchao`, which skips the calling
test cleanly when torch.ao is absent (or when ``FXQUANT_NO_TORCHAO=1`` pretends it is). The comparison helpers
(:func:`node_count_dict`, :func:`collect_qparams`, :func:`assert_bit_identical`, ...) never import torch.ao.

    lib = torchao_lib()                        # or fxquant_lib()
    res = quantize(lib, "resnet18")            # prepare -> calibrate -> reference (+ lowered)
    node_count_dict(res.reference)             # {"quantize_per_tensor": 33, "dequantize": 33, ...}
    collect_qparams(res.prepared)              # [QParams("x", scale, zp), QParams("conv1", ...), ...]
    assert_qparams_equal(collect_qparams(ours.reference), collect_qparams(theirs.reference))
    assert_bit_identical(ours.reference(*x), theirs.reference(*x))
"""
from __future__ import annotations

import copy
import importlib
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import pytest
import torch
import torch.fx

from models import ModelSpec, Recipe, get_spec, lookup

__all__ = [
    "have_torchao", "require_torchao", "have_fxquant_fx", "require_fxquant_fx",
    "Lib", "torchao_lib", "fxquant_lib", "QuantResult", "prepare", "calibrate", "to_reference", "to_lowered",
    "quantize", "run_torchao",
    "is_observer", "normalize_target", "node_count_dict",
    "QParams", "collect_qparams", "collect_weight_qparams", "assert_qparams_equal",
    "assert_bit_identical", "tensor_bits",
]


# ----------------------------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------------------------

def have_torchao() -> bool:
    """True when torch.ao FX quantization imports (and FXQUANT_NO_TORCHAO is not set)."""
    if os.environ.get("FXQUANT_NO_TORCHAO", "") not in ("", "0"):
        return False
    try:
        importlib.import_module("torch.ao.quantization.quantize_fx")
    except Exception:  # ImportError, or a torch build where it fails to import
        return False
    return True


def require_torchao():
    """``torch.ao.quantization``, or skip the calling test."""
    if not have_torchao():
        pytest.skip("torch.ao.quantization (the oracle) is not available")
    return importlib.import_module("torch.ao.quantization")


def have_fxquant_fx() -> bool:
    try:
        importlib.import_module("fxquant.quantize_fx")
    except ImportError:
        return False
    return True


def require_fxquant_fx():
    """``fxquant.quantize_fx``, or skip the calling test (the pipeline is still being written)."""
    if not have_fxquant_fx():
        pytest.skip("fxquant.quantize_fx is not there yet")
    return importlib.import_module("fxquant.quantize_fx")


# ----------------------------------------------------------------------------------------------------------------
# one driver for both libraries
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lib:
    """A quantization library spelled like torch.ao: ``ns`` holds the config names, ``fx`` the entry points."""
    name: str
    ns: Any
    fx: Any


def torchao_lib() -> Lib:
    ns = require_torchao()
    return Lib("torchao", ns, importlib.import_module("torch.ao.quantization.quantize_fx"))


def fxquant_lib() -> Lib:
    fx = require_fxquant_fx()
    return Lib("fxquant", importlib.import_module("fxquant"), fx)


@dataclass
class QuantResult:
    spec: ModelSpec | None
    recipe: Recipe
    float_model: torch.nn.Module
    example_inputs: tuple
    calibration: list = field(default_factory=list)
    prepared: torch.fx.GraphModule | None = None
    reference: torch.fx.GraphModule | None = None
    lowered: torch.fx.GraphModule | None = None


_ORACLE_NOISE = (DeprecationWarning, FutureWarning)


def _quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    for cat in _ORACLE_NOISE:
        warnings.simplefilter("ignore", cat)
    return ctx


def prepare(lib: Lib, model: torch.nn.Module, recipe: Recipe, example_inputs: tuple):
    """``lib.fx.prepare_fx`` on a deep copy of ``model`` with the recipe's configs built from ``lib.ns``."""
    model = copy.deepcopy(model)
    kwargs = {}
    pcc = recipe.prepare_custom_config(lib.ns, model, example_inputs)
    if pcc is not None:
        kwargs["prepare_custom_config"] = pcc
    bc = recipe.get_backend_config(lib.ns)
    if bc is not None:
        kwargs["backend_config"] = bc
    ctx = _quiet()
    try:
        return lib.fx.prepare_fx(model, recipe.build(lib.ns), example_inputs, **kwargs)
    finally:
        ctx.__exit__(None, None, None)


def calibrate(prepared: torch.nn.Module, batches: Iterable[tuple]) -> torch.nn.Module:
    """Run every batch through ``prepared`` (no grad); returns it."""
    with torch.no_grad():
        for batch in batches:
            prepared(*batch)
    return prepared


def _convert(lib: Lib, fn: str, prepared, recipe: Recipe):
    kwargs = {}
    bc = recipe.get_backend_config(lib.ns)
    if bc is not None:
        kwargs["backend_config"] = bc
    ctx = _quiet()
    try:
        return getattr(lib.fx, fn)(copy.deepcopy(prepared), **kwargs)
    finally:
        ctx.__exit__(None, None, None)


def to_reference(lib: Lib, prepared, recipe: Recipe):
    """``convert_to_reference_fx`` of a deep copy (``prepared`` stays usable)."""
    return _convert(lib, "convert_to_reference_fx", prepared, recipe)


def to_lowered(lib: Lib, prepared, recipe: Recipe):
    """``convert_fx`` of a deep copy."""
    return _convert(lib, "convert_fx", prepared, recipe)


def quantize(lib: Lib, model: str | torch.nn.Module, recipe: Recipe | str | None = None,
             example_inputs: tuple | None = None, calibration: list | None = None,
             stages: Sequence[str] = ("reference", "lowered")) -> QuantResult:
    """prepare -> calibrate -> the requested conversions, for a registered model name or a module.

    For a name, the model, example inputs, recipe (by name or the recommended one) and calibration batches come
    from the registry; for a module pass ``recipe`` and ``example_inputs`` (calibration defaults to them)."""
    unknown = set(stages) - {"reference", "lowered"}
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}")
    spec = None
    if isinstance(model, str):
        spec = get_spec(model)
        model, ex = spec.factory()
        example_inputs = ex if example_inputs is None else example_inputs
        recipe = recipe if isinstance(recipe, Recipe) else spec.recipe(recipe)
        calibration = spec.calibration_data() if calibration is None else calibration
    if not isinstance(recipe, Recipe) or example_inputs is None:
        raise ValueError("for a module, pass a Recipe and example_inputs")
    calibration = [example_inputs] if calibration is None else calibration
    res = QuantResult(spec, recipe, model, example_inputs, calibration)
    res.prepared = calibrate(prepare(lib, model, recipe, example_inputs), calibration)
    if "reference" in stages:
        res.reference = to_reference(lib, res.prepared, recipe)
    if "lowered" in stages:
        res.lowered = to_lowered(lib, res.prepared, recipe)
    return res


def run_torchao(model: str | torch.nn.Module, recipe: Recipe | str | None = None, **kwargs) -> QuantResult:
    """:func:`quantize` with torch.ao (skips when torch.ao is absent)."""
    return quantize(torchao_lib(), model, recipe, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# node counts under one vocabulary for both libraries
# ----------------------------------------------------------------------------------------------------------------

OBSERVER_KEY = "activation_post_process"
WEIGHT_OBSERVER_KEY = "weight_post_process"

# spelling -> canonical name (after namespace / overload / in-place suffix are stripped)
ALIASES = {
    "dequantize_per_tensor": "dequantize",
    "iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "truediv",
}
# op namespaces whose ops are the same op as their bare name (torch.ops.<ns>.<name>.<overload>)
TRANSPARENT_NAMESPACES = {"aten", "quantized_decomposed", "fxquant"}
# path components that qualify a module class name (kept in this order)
_MODULE_QUALIFIERS = ("intrinsic", "qat", "quantized", "dynamic", "reference")


def is_observer(module: Any) -> bool:
    """An observer or fake quant of either library (duck-typed: it computes qparams and is not a GraphModule)."""
    return (isinstance(module, torch.nn.Module) and callable(getattr(module, "calculate_qparams", None))
            and not isinstance(module, torch.fx.GraphModule))


def _canonical(name: str) -> str:
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return ALIASES.get(name, name)


def normalize_target(target: Any) -> str:
    """One name for a call_function / call_method target, whichever library or spelling produced it.

    ``torch.quantize_per_tensor``, ``torch.ops.quantized_decomposed.quantize_per_tensor.default`` and
    ``torch.ops.fxquant.quantize_per_tensor(.default)`` -> "quantize_per_tensor"; ``operator.add``, ``torch.add``,
    ``"add_"`` -> "add"; method ``"dequantize"`` and ``dequantize_per_tensor`` -> "dequantize"; ops of other
    namespaces keep theirs (``torch.ops.quantized.add_relu`` -> "quantized.add_relu")."""
    if isinstance(target, str):
        return _canonical(target)
    qualified = getattr(target, "_qualified_op_name", None)  # OpOverloadPacket
    schema = getattr(target, "_schema", None)  # OpOverload
    if qualified is None and schema is not None:
        qualified = schema.name
    if qualified is not None:
        ns, _, name = qualified.partition("::")
        name = _canonical(name)
        return name if ns in TRANSPARENT_NAMESPACES else f"{ns}.{name}"
    name = getattr(target, "__name__", None) or repr(target)
    return _canonical(name)


def module_key(module: torch.nn.Module) -> str:
    """Class name qualified by the kind of module: "Conv2d", "intrinsic.ConvReLU2d", "quantized.reference.Linear",
    "intrinsic.quantized.ConvReLU2d", "quantized.dynamic.LSTM" -- the same for torch.ao's and fxquant's classes."""
    if is_observer(module):
        return OBSERVER_KEY
    if isinstance(module, torch.fx.GraphModule):
        return "GraphModule"
    cls = type(module)
    parts = cls.__module__.split(".")
    if "nn" in parts:
        parts = parts[parts.index("nn") + 1:]
    quals = [q for q in _MODULE_QUALIFIERS if q in parts]
    return ".".join(quals + [cls.__name__])


def _observes_weight(node: torch.fx.Node) -> bool:
    """An observer call whose input is a parameter (functional conv / linear weights are observed in the graph)."""
    src = node.args[0] if node.args else None
    return isinstance(src, torch.fx.Node) and src.op == "get_attr"


def node_count_dict(gm: torch.fx.GraphModule, *, observers_by_class: bool = False) -> dict[str, int]:
    """Count the call_module / call_function / call_method nodes of ``gm`` by normalised name.

    Observer and fake-quant calls count by role: ``"activation_post_process"``, or ``"weight_post_process"`` when
    they observe a parameter (get_attr); with ``observers_by_class`` also as ``"<role>:<Class>"``. Other modules count
    as :func:`module_key`, functions and methods as :func:`normalize_target`. Placeholders, get_attr and output are
    not counted."""
    modules = dict(gm.named_modules(remove_duplicate=False))  # shared observers have several names
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = modules[node.target]
            key = module_key(mod)
            if key == OBSERVER_KEY and _observes_weight(node):
                key = WEIGHT_OBSERVER_KEY
            counts[key] += 1
            if observers_by_class and key in (OBSERVER_KEY, WEIGHT_OBSERVER_KEY):
                counts[f"{key}:{type(mod).__name__}"] += 1
        elif node.op in ("call_function", "call_method"):
            counts[normalize_target(node.target)] += 1
    return dict(counts)


# ----------------------------------------------------------------------------------------------------------------
# activation qparams, aligned across libraries
# ----------------------------------------------------------------------------------------------------------------

class QParams(NamedTuple):
    node: str  # name of the node whose output is observed / quantized
    scale: torch.Tensor | None  # None where the qparams are computed at run time (dynamic) or not int
    zero_point: torch.Tensor | None


_QUANTIZE_NAMES = {"quantize_per_tensor", "quantize_per_tensor_dynamic"}


def _resolve(gm: torch.nn.Module, arg: Any) -> torch.Tensor | None:
    """A constant qparam argument as a tensor (get_attr node, Python number or tensor); None if computed."""
    if isinstance(arg, torch.fx.Node):
        if arg.op != "get_attr":
            return None
        obj = gm
        for atom in str(arg.target).split("."):
            obj = getattr(obj, atom)
        return torch.as_tensor(obj)
    if isinstance(arg, (int, float, torch.Tensor)):
        return torch.as_tensor(arg)
    return None


def _observer_qparams(mod: torch.nn.Module):
    if getattr(mod, "is_dynamic", False):
        return None, None
    dtype = getattr(mod, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return None, None  # placeholder / float16 observers: nothing to compare
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "must run observer before calling calculate_qparams"
        try:
            scale, zp = mod.calculate_qparams()
        except Exception:  # PlaceholderObserver and friends refuse
            return None, None
    return scale.detach().clone(), zp.detach().clone()


def _arg(node: torch.fx.Node, i: int, name: str):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def collect_qparams(gm: torch.fx.GraphModule, *, weights: bool = False) -> list[QParams]:
    """Activation qparams in graph order, each named by the node it observes.

    * prepared model: one entry per activation observer / fake-quant call (shared observers appear once per call),
      scale and zero point from ``calculate_qparams()``;
    * reference (Q/DQ) model: one entry per quantize_per_tensor(_dynamic) node of an activation
      (``torch.quantize_per_tensor``, ``quantized_decomposed`` or ``fxquant`` ops), qparams from its arguments;
    * lowered model (best effort): quantize nodes, plus quantized modules carrying ``scale``/``zero_point`` and
      ``torch.ops.quantized.*`` calls with scale / zero point arguments, named by their own node.

    Prepared and reference models of the same calibrated model give the same list; so should torch.ao's and
    fxquant's. Dynamic / float observers give ``(name, None, None)``. Parameters observed or quantized in the graph
    (functional conv / linear weights) are left out unless ``weights=True``."""
    modules = dict(gm.named_modules(remove_duplicate=False))  # shared observers have several names
    out: list[QParams] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = modules[node.target]
            if is_observer(mod):
                if weights or not _observes_weight(node):
                    src = node.args[0]
                    out.append(QParams(getattr(src, "name", str(src)), *_observer_qparams(mod)))
            elif (isinstance(getattr(mod, "scale", None), (float, torch.Tensor))
                  and getattr(mod, "zero_point", None) is not None and not hasattr(mod, "weight_scale")
                  and "dynamic" not in module_key(mod).split(".")):
                out.append(QParams(node.name, torch.as_tensor(mod.scale), torch.as_tensor(mod.zero_point)))
        elif node.op == "call_function":
            name = normalize_target(node.target)
            if name in _QUANTIZE_NAMES or (weights and name == "quantize_per_channel"):
                src = _arg(node, 0, "input")
                if _observes_weight(node) and not weights:
                    continue
                if name == "quantize_per_tensor_dynamic":
                    out.append(QParams(getattr(src, "name", str(src)), None, None))
                else:
                    out.append(QParams(getattr(src, "name", str(src)), _resolve(gm, _arg(node, 1, "scale")),
                                       _resolve(gm, _arg(node, 2, "zero_point"))))
            elif name.startswith("quantized.") and len(node.args) >= 4:
                # torch.ao lowered binary ops: (a, b, scale, zero_point)
                s, z = _resolve(gm, node.args[2]), _resolve(gm, node.args[3])
                if s is not None and z is not None:
                    out.append(QParams(node.name, s, z))
    return out


def collect_weight_qparams(gm: torch.nn.Module) -> list[QParams]:
    """(module name, weight_scale, weight_zero_point) of every reference module (both libraries keep these buffers)."""
    return [QParams(name, m.weight_scale.detach().clone(), m.weight_zero_point.detach().clone())
            for name, m in gm.named_modules()
            if isinstance(getattr(m, "weight_scale", None), torch.Tensor)
            and isinstance(getattr(m, "weight_zero_point", None), torch.Tensor)]


def _fmt(t: torch.Tensor | None) -> str:
    if t is None:
        return "None"
    if t.numel() == 1:
        v = t.item()
        return f"{v!r}" if isinstance(v, int) else f"{v!r} ({t.float().view(torch.int32).item():#010x})"
    return f"tensor(shape={tuple(t.shape)}, dtype={t.dtype})"


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape and a.numel() == b.numel() == 1:
        a, b = a.reshape(()), b.reshape(())
    if a.is_floating_point() != b.is_floating_point():
        return False
    if a.is_floating_point():
        a, b = a.to(torch.float32), b.to(torch.float32)  # qparams are float32 in both; compare their bits
    else:
        a, b = a.to(torch.int64), b.to(torch.int64)  # zero points: int32 (torch.ao buffers) vs int64
    return a.shape == b.shape and torch.equal(tensor_bits(a), tensor_bits(b))


def assert_qparams_equal(ours: Sequence[QParams], theirs: Sequence[QParams], *, check_names: bool = True) -> None:
    """Same length, same node names (unless ``check_names=False``), bit-identical float32 scales, equal zero points
    (dtype-insensitive: int32 vs int64). The message lists every differing entry."""
    problems = []
    if len(ours) != len(theirs):
        problems.append(f"{len(ours)} entries vs {len(theirs)}: "
                        f"ours {[q.node for q in ours]} theirs {[q.node for q in theirs]}")
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if check_names and a.node != b.node:
            problems.append(f"[{i}] node {a.node!r} vs {b.node!r}")
        if not _same(a.scale, b.scale):
            problems.append(f"[{i}] {a.node}: scale {_fmt(a.scale)} vs {_fmt(b.scale)}")
        if not _same(a.zero_point, b.zero_point):
            problems.append(f"[{i}] {a.node}: zero_point {_fmt(a.zero_point)} vs {_fmt(b.zero_point)}")
    if problems:
        raise AssertionError("qparams differ (ours vs theirs):\n  " + "\n  ".join(problems[:40])
                             + (f"\n  ... {len(problems) - 40} more" if len(problems) > 40 else ""))


# ----------------------------------------------------------------------------------------------------------------
# bit-identical outputs
# ----------------------------------------------------------------------------------------------------------------

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits as an integer tensor of the same shape (floats are viewed, ints returned as is)."""
    if t.is_quantized:  # torch.ao lowered outputs (tests only): compare stored integers
        t = t.int_repr()
    if t.dtype == torch.bool:
        return t.to(torch.uint8)
    if t.is_floating_point() or t.is_complex():
        t = t.contiguous()
        if t.is_complex():
            t = torch.view_as_real(t)
        return t.view(_BITS[t.element_size()])
    return t


def _tensor_mismatch(a: torch.Tensor, b: torch.Tensor, path: str) -> str | None:
    if a.dtype != b.dtype:
        return f"{path}: dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"{path}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.is_quantized != b.is_quantized:
        return f"{path}: quantized {a.is_quantized} vs {b.is_quantized}"
    if a.is_quantized:
        if a.qscheme() != b.qscheme():
            return f"{path}: qscheme {a.qscheme()} vs {b.qscheme()}"
        if a.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            if (a.q_scale(), a.q_zero_point()) != (b.q_scale(), b.q_zero_point()):
                return f"{path}: qparams {(a.q_scale(), a.q_zero_point())} vs {(b.q_scale(), b.q_zero_point())}"
    ba, bb = tensor_bits(a.detach().cpu()), tensor_bits(b.detach().cpu())
    diff = ba != bb
    n = int(diff.sum())
    if n == 0:
        return None
    idx = tuple(int(i) for i in diff.nonzero()[0])
    msg = f"{path}: {n} of {diff.numel()} elements differ; first at {idx}: {a[idx].item()!r} vs {b[idx].item()!r}"
    if a.is_floating_point() and not a.is_quantized:
        d = (a.detach().double() - b.detach().double()).abs()
        d = d[~torch.isnan(d)]
        if d.numel():
            msg += f"; max abs diff {d.max().item():.6g}"
    return msg


def _mismatch(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        return _tensor_mismatch(a, b, path)
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            m = _mismatch(a[k], b[k], f"{path}[{k!r}]")
            if m:
                return m
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return f"{path}: {type(a).__name__} of {len(a)} vs {type(b).__name__} of {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            m = _mismatch(x, y, f"{path}[{i}]")
            if m:
                return m
        return None
    if isinstance(a, float) and isinstance(b, float):
        same = torch.equal(tensor_bits(torch.tensor(a, dtype=torch.float64)),
                           tensor_bits(torch.tensor(b, dtype=torch.float64)))
        return None if same else f"{path}: {a!r} vs {b!r}"
    if type(a) is not type(b) or a != b:
        return f"{path}: {a!r} vs {b!r}"
    return None


def assert_bit_identical(a: Any, b: Any, msg: str = "") -> None:
    """Assert ``a`` and ``b`` are identical bit for bit: same structure (tuples / lists / dicts), same dtypes and
    shapes, same bits in every element (so -0.0 != 0.0 and NaN == NaN of the same payload). Quantized tensors (torch.ao
    outputs) compare their qscheme, per-tensor qparams and stored integers."""
    m = _mismatch(a, b, "output")
    if m:
        raise AssertionError(f"{msg + ': ' if msg else ''}not bit-identical: {m}")


def memoised_quantize(stages: Sequence[str]) -> Callable[[str], QuantResult]:
    """``get(model_name)``: fxquant's :func:`quantize` of a registered model, computed once per name (for
    module-scoped fixtures that many tests share)."""
    cache: dict[str, QuantResult] = {}

    def get(name: str) -> QuantResult:
        if name not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[name] = quantize(fxquant_lib(), name, stages=tuple(stages))
        return cache[name]
    return get
