"""compare: per-layer numerics of a quantized model against its float model (the successor of torch.ao's Numeric
Suite).

    report = fxquant.tools.compare.compare(float_model, quantized, example_inputs)
    print(report)                      # a table, worst layer first
    report.rows[0].node                # the layer that loses the most
    report.to_html("report.html")      # bar chart + table

How layers are matched: the float model is traced and fused the way prepare_fx did it (same backend config, same
custom config), so conv+bn+relu becomes one node in both models, under the same node name. Every node both graphs
share is compared; each row holds

* ``weight_sqnr``: the layer's dequantized weight against the (BN-folded) float weight,
* ``local_sqnr``: the layer run in the quantized model on the *float* model's inputs, through its own output
  quantization, against the float output: the error this layer adds by itself (a shadow comparison),
* ``act_sqnr``: the quantized model's activation against the float model's: the error accumulated up to here,
* ``quantized`` / ``reason``: from :func:`fxquant.tools.explain.explain` (why a layer stayed float).

Rows are sorted by ``local_sqnr`` (then ``act_sqnr``), lowest (worst) first. SQNR is
``10 log10(sum(float^2) / sum((float - quantized)^2))`` in dB; ``inf`` means exact.

Lowered models (int8 kernels from convert_fx) are matched through the lowering record: a kernel that runs
conv + add + relu gets one row, named after its first op, compared after its last. Such a kernel takes integers,
so its local run gets the float model's inputs quantized as its producers quantize them, and the float side is run
on the same (dequantized) inputs: local SQNR still measures only the layer's own error.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ..passes.common import get_state, is_observer
from . import _capture
from ._lowered import LoweredView, is_lowered
from .explain import explain

__all__ = ["CompareRow", "CompareReport", "compare", "format_rows"]


@dataclass(frozen=True)
class CompareRow:
    """One layer (graph node) present in both the float and the quantized model."""

    node: str
    op: str
    quantized: bool
    reason: str
    weight_sqnr: Optional[float]
    local_sqnr: Optional[float]
    act_sqnr: Optional[float]
    note: str = ""

    @property
    def sort_key(self) -> tuple[float, float]:
        """Lower is worse; layers without numbers go last."""
        def key(v: Optional[float]) -> float:
            return math.inf if v is None or math.isnan(v) else v
        return key(self.local_sqnr), key(self.act_sqnr)


@dataclass
class CompareReport:
    """The rows of :func:`compare`, worst first, with text and HTML renderings."""

    rows: list[CompareRow]
    title: str = "fxquant per-layer comparison"
    meta: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[CompareRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> CompareRow:
        return self.rows[index]

    def row(self, node: str) -> CompareRow:
        """The row of node ``node``; KeyError listing the nodes when absent."""
        for r in self.rows:
            if r.node == node:
                return r
        raise KeyError(f"no row for node {node!r}; rows: {', '.join(r.node for r in self.rows)}")

    def table(self, limit: Optional[int] = None) -> str:
        """A fixed-width text table (the ``limit`` worst rows, all by default)."""
        return format_rows(self.rows if limit is None else self.rows[:limit])

    def __str__(self) -> str:
        return self.table()

    def to_html(self, path: str) -> str:
        """Write an HTML report (bar chart of per-layer SQNR + the table) to ``path``; returns ``path``."""
        from .report_html import write_html

        write_html(self, path)
        return path


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "exact" if v > 0 else "-inf"
    return f"{v:.1f}"


def format_rows(rows: list[CompareRow]) -> str:
    """Rows as a fixed-width table (SQNR in dB, higher is better)."""
    header = ("node", "op", "quantized", "weight dB", "local dB", "act dB", "why not / note")
    body = [(r.node, r.op, "yes" if r.quantized else "no", _fmt(r.weight_sqnr), _fmt(r.local_sqnr),
             _fmt(r.act_sqnr), r.reason or r.note) for r in rows]
    table = [header] + body
    widths = [min(max(len(row[i]) for row in table), 40) for i in range(6)]
    lines = ["  ".join(cell[:40].ljust(w) for cell, w in zip(row[:6], widths)) + "  " + row[6] for row in table]
    lines.append(f"{len(rows)} layers; SQNR in dB (higher is better); local = this layer alone on float inputs, "
                 f"act = accumulated error")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- matching
def _fused_float(float_model: nn.Module, state: Any, example_inputs: tuple) -> fx.GraphModule:
    """Trace + fuse a copy of the float model exactly as prepare_fx did (node names then match); a model plain
    torch.fx cannot trace is traced on ``example_inputs``, as prepare_fx did (its warning is not repeated)."""
    from .. import pipeline

    ctx = pipeline.Context(backend_config=state.backend_config, prepare_custom_config=state.prepare_custom_config,
                           example_inputs=example_inputs)
    model = copy.deepcopy(float_model).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*traced it on example_inputs")
        return pipeline.run(model, ("trace", "fuse"), ctx)


def _weight_pairs(f_mod: nn.Module, q_mod: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(float weights, dequantized weights) of one layer: every float parameter named like ``*weight*`` against
    the quantized module's attribute of the same name (reference modules dequantize on access) or, for lowered
    modules, ``float_weight()``."""
    f_mod = f_mod[0] if isinstance(f_mod, nn.Sequential) and len(f_mod) else f_mod
    q_mod = q_mod[0] if isinstance(q_mod, nn.Sequential) and len(q_mod) else q_mod
    f_ws, q_ws = [], []
    lowered = callable(getattr(q_mod, "float_weight", None))
    for name, param in f_mod.named_parameters(recurse=False):
        if "weight" not in name:
            continue
        q_w = q_mod.float_weight() if lowered and name == "weight" else getattr(q_mod, name, None)
        if isinstance(q_w, torch.Tensor) and q_w.shape == param.shape:
            f_ws.append(param.detach())
            q_ws.append(q_w.detach())
    return f_ws, q_ws


def _function_weight_sqnr(f_node: fx.Node, q_node: fx.Node, f_env: dict, q_env: dict) -> Optional[float]:
    """Functional ops (F.conv2d(x, self.w)): the first parameter argument that was quantized."""
    pairs = list(zip(f_node.args, q_node.args)) + [(f_node.kwargs[k], q_node.kwargs[k])
                                                     for k in f_node.kwargs if k in q_node.kwargs]
    for f_arg, q_arg in pairs:
        if isinstance(f_arg, fx.Node) and f_arg.op == "get_attr" and isinstance(q_arg, fx.Node) and \
                _capture.is_qdq(q_arg):
            return _capture.sqnr(f_env[f_arg.name], q_env[q_arg.name])
    return None


def _submodule(gm: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


def _has_quantized_weight(mod: nn.Module) -> bool:
    part = mod[0] if isinstance(mod, nn.Sequential) and len(mod) else mod
    return any(callable(getattr(part, name, None)) for name in ("get_weight", "float_weight", "get_flat_weights")) \
        or any("_int" in name for name, _ in part.named_buffers(recurse=False))


def _weight_sqnr(f_gm: fx.GraphModule, q_gm: fx.GraphModule, f_node: fx.Node, q_node: fx.Node,
                 f_env: dict, q_env: dict, expected: bool) -> Optional[float]:
    """Weight SQNR of a layer whose weight is quantized, or that convert was meant to quantize (``expected``);
    None for weights that stay float by design (LayerNorm, ...)."""
    if q_node.op == "call_module" and f_node.op == "call_module":
        f_mod, q_mod = _submodule(f_gm, str(f_node.target)), _submodule(q_gm, str(q_node.target))
        if f_mod is None or q_mod is None or not (expected or _has_quantized_weight(q_mod)):
            return None
        with torch.no_grad():
            f_ws, q_ws = _weight_pairs(f_mod, q_mod)
        return _capture.sqnr(f_ws, q_ws) if f_ws else None
    if q_node.op == "call_function":
        return _function_weight_sqnr(f_node, q_node, f_env, q_env)
    return None


def _row(f_gm: fx.GraphModule, q_gm: fx.GraphModule, f_node: fx.Node, q_node: fx.Node, f_env: dict, q_env: dict,
         info: Any, state: Any) -> CompareRow:
    end = _capture.output_end(q_node)
    act = _capture.sqnr(f_env[f_node.name], q_env[end.name])
    note = ""
    try:
        local = _capture.sqnr(f_env[f_node.name], _capture.shadow_value(q_gm, q_node, q_env, f_env))
    except Exception as exc:  # noqa: BLE001 - a layer that cannot run alone is reported, not fatal
        local, note = None, f"shadow run failed: {type(exc).__name__}: {exc}"[:120]
    expected = q_node.op == "call_module" and str(q_node.target) in state.weighted_modules
    weight = _weight_sqnr(f_gm, q_gm, f_node, q_node, f_env, q_env, expected) if info.quantized else None
    if act is None and not note:
        note = "output not comparable (not a float tensor, or shapes differ)"
    if weight is not None and math.isinf(weight) and weight > 0:
        note = note or "weight unchanged: convert_fx did not quantize it"
    return CompareRow(q_node.name, info.op, info.quantized, info.reason, weight, local, act, note)


def _lowered_weight(f_gm: fx.GraphModule, q_mod: Optional[nn.Module], first: fx.Node, f_env: dict
                    ) -> Optional[float]:
    if q_mod is None or not _has_quantized_weight(q_mod):
        return None
    if first.op == "call_module":
        f_mod = _submodule(f_gm, str(first.target))
        f_ws, q_ws = _weight_pairs(f_mod, q_mod) if f_mod is not None else ([], [])
        return _capture.sqnr(f_ws, q_ws) if f_ws else None
    q_w = q_mod.float_weight() if callable(getattr(q_mod, "float_weight", None)) else None
    for arg in list(first.args) + list(first.kwargs.values()):  # functional conv / linear: the parameter argument
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and q_w is not None and \
                getattr(f_env.get(arg.name), "shape", None) == q_w.shape:
            return _capture.sqnr(f_env[arg.name], q_w)
    return None


def _lowered_rows(f_gm: fx.GraphModule, q_gm: fx.GraphModule, f_env: dict, q_env: dict, infos: dict,
                  nodes: Iterable[fx.Node]) -> list[CompareRow]:
    """Rows of a lowered model: each lowered node against the float node whose value it produces."""
    view = LoweredView(f_gm, q_gm, q_env)
    rows, seen = [], set()
    for node in nodes:
        pair = view.match(node)
        if pair is None or pair[0].name not in infos or pair[0].name in seen:
            continue
        first, last = pair
        if not _capture.is_float_value(f_env[last.name]):
            continue
        seen.add(first.name)
        info, note = infos[first.name], ""
        try:
            test, reference = view.shadow(node, f_env, first, last)
            local = _capture.sqnr(reference, test)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            local, note = None, f"shadow run failed: {type(exc).__name__}: {exc}"[:120]
        q_mod = _submodule(q_gm, str(node.target)) if node.op == "call_module" else None
        with torch.no_grad():
            weight = _lowered_weight(f_gm, q_mod, first, f_env) if info.quantized else None
        if last is not first:
            note = note or f"fused kernel: output compared after {last.name}"
        rows.append(CompareRow(first.name, info.op, info.quantized, info.reason, weight, local,
                               _capture.sqnr(f_env[last.name], view.value(node)), note))
    return rows


def _check_inputs(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"compare() needs example_inputs as a tuple of positional inputs, got "
                        f"{type(example_inputs).__name__}; wrap a single tensor as (x,)")
    return example_inputs


def compare(float_model: nn.Module, quantized_model: nn.Module, example_inputs: tuple,
            progress: bool = False) -> CompareReport:
    """Compare ``quantized_model`` (from convert_fx / convert_to_reference_fx) with ``float_model`` layer by layer.

    ``float_model`` is the model that was given to prepare_fx (it is copied, not changed); ``example_inputs`` a
    tuple of positional inputs (a representative batch: SQNR is measured over it); ``progress`` shows a progress
    bar over the layers. Returns a :class:`CompareReport`, worst layer first.
    """
    state = get_state(quantized_model)
    if state is None or not isinstance(quantized_model, fx.GraphModule):
        raise ValueError(f"compare() needs the model returned by fxquant's convert_fx / convert_to_reference_fx "
                         f"(got {type(quantized_model).__name__} without fxquant's prepare state)")
    if any(is_observer(m) for m in quantized_model.modules()):
        raise ValueError("compare() needs the converted model, but this one still has observers (a prepared model): "
                         "calibrate it, then pass convert_fx(prepared)")
    inputs = _check_inputs(example_inputs)
    f_gm = _fused_float(float_model, state, inputs)
    f_env = _capture.record(f_gm, inputs)
    q_env = _capture.record(quantized_model, inputs)
    infos = {r.node: r for r in explain(quantized_model)}
    f_nodes = {n.name: n for n in f_gm.graph.nodes}
    nodes = tqdm(list(quantized_model.graph.nodes), desc="compare", unit="node", disable=not progress)
    if is_lowered(quantized_model):
        rows = _lowered_rows(f_gm, quantized_model, f_env, q_env, infos, nodes)
    else:
        rows = [_row(f_gm, quantized_model, f_nodes[n.name], n, f_env, q_env, infos[n.name], state)
                for n in nodes if n.name in infos and n.name in f_nodes and _capture.is_float_value(f_env[n.name])]
    rows.sort(key=lambda r: r.sort_key)
    return CompareReport(rows, meta={"model": type(float_model).__name__, "inputs": _describe(inputs)})


def _describe(inputs: tuple) -> str:
    return ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" if isinstance(x, torch.Tensor)
                     else type(x).__name__ for x in inputs)
