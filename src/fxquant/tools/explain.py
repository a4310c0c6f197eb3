"""explain: node by node, what fxquant quantized and why the rest stayed float.

    >>> rows = fxquant.explain(prepared)          # list of ExplainRow
    >>> print(fxquant.format_explain(rows))       # a table for terminals
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..passes.common import get_state

__all__ = ["ExplainRow", "explain", "format_explain"]


@dataclass(frozen=True)
class ExplainRow:
    """One call node of the prepared graph."""

    node: str
    op: str
    quantized: bool
    qconfig: str
    reason: str


def _op_name(target: Any) -> str:
    if isinstance(target, type):
        return target.__name__
    if isinstance(target, str):
        return f".{target}()"
    return getattr(target, "__name__", str(target))


def _qconfig_name(qconfig: Any) -> str:
    if qconfig is None:
        return "-"
    act = getattr(qconfig, "activation", None)
    name = getattr(act, "__name__", None) or getattr(getattr(act, "p", None), "func", act)
    return getattr(name, "__name__", str(name))


def explain(model: nn.Module) -> list[ExplainRow]:
    """Rows for every call node of a model made by prepare_fx / prepare_qat_fx (or converted from one)."""
    state = get_state(model)
    if state is None:
        raise ValueError(f"explain() needs a model returned by fxquant.prepare_fx / convert_fx, got "
                         f"{type(model).__name__}")
    rows = []
    for name, rec in state.nodes.items():
        quantized = rec.qconfig is not None and not rec.reason
        rows.append(ExplainRow(name, _op_name(rec.target), quantized, _qconfig_name(rec.qconfig), rec.reason))
    return rows


def format_explain(rows: list[ExplainRow], only_float: bool = False) -> str:
    """A fixed-width table; ``only_float`` keeps the rows that stayed float."""
    shown = [r for r in rows if not (only_float and r.quantized)]
    header = ("node", "op", "quantized", "why not")
    table = [header] + [(r.node, r.op, "yes" if r.quantized else "no", r.reason) for r in shown]
    widths = [min(max(len(row[i]) for row in table), 40) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in table]
    n_q = sum(r.quantized for r in rows)
    lines.append(f"{n_q} of {len(rows)} ops quantized")
    return "\n".join(lines)
