"""HTML rendering of a :class:`~fxquant.tools.compare.CompareReport`: one self-contained file, a matplotlib bar
chart of per-layer SQNR (PNG embedded as base64) and the table."""
from __future__ import annotations

import base64
import html
import io
import math
import os
from typing import Any, Optional

__all__ = ["write_html", "sqnr_chart_png"]

_CAP_DB = 80.0  # bars for exact layers are drawn at this height (and labelled "exact")

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}tr.float td{color:#777}
tr.bad td{background:#fde8e8}.meta{color:#555}"""


def _bar(v: Optional[float]) -> float:
    if v is None or math.isnan(v):
        return 0.0
    return max(min(v, _CAP_DB), -10.0)


def sqnr_chart_png(report: Any, limit: int = 60) -> bytes:
    """A horizontal bar chart (local and accumulated SQNR per layer, worst at the top) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = list(report.rows)[:limit]
    names = [r.node for r in rows]
    height = max(2.5, 0.28 * len(rows) + 1.2)
    fig, ax = plt.subplots(figsize=(9, height), dpi=90)
    try:
        y = list(range(len(rows)))
        ax.barh([i - 0.2 for i in y], [_bar(r.local_sqnr) for r in rows], height=0.4, label="local (this layer)",
                color="#d9534f")
        ax.barh([i + 0.2 for i in y], [_bar(r.act_sqnr) for r in rows], height=0.4, label="accumulated",
                color="#5b8def")
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"SQNR (dB, higher is better; exact drawn at {_CAP_DB:.0f})")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _cell(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "exact" if v > 0 else "-inf"
    return f"{v:.1f}"


def _table(report: Any, bad_db: float) -> str:
    head = ("node", "op", "quantized", "weight SQNR", "local SQNR", "accumulated SQNR", "why not / note")
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in report.rows:
        cls = "float" if not r.quantized else ("bad" if r.local_sqnr is not None and r.local_sqnr < bad_db else "")
        cells = [html.escape(r.node), html.escape(r.op), "yes" if r.quantized else "no"]
        nums = [_cell(r.weight_sqnr), _cell(r.local_sqnr), _cell(r.act_sqnr)]
        out.append(f'<tr class="{cls}">' + "".join(f"<td>{c}</td>" for c in cells)
                   + "".join(f'<td class="num">{c}</td>' for c in nums)
                   + f"<td>{html.escape(r.reason or r.note)}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def write_html(report: Any, path: str, bad_db: float = 20.0) -> None:
    """Write ``report`` as a self-contained HTML page to ``path`` (rows under ``bad_db`` local SQNR highlighted)."""
    try:
        png = base64.b64encode(sqnr_chart_png(report)).decode("ascii")
        chart = f'<img alt="per-layer SQNR bar chart" src="data:image/png;base64,{png}">'
    except ImportError:
        chart = "<p>(no chart: matplotlib is not installed; <code>pip install 'fxquant[report]'</code>)</p>"
    meta = "".join(f"<div>{html.escape(k)}: {html.escape(str(v))}</div>" for k, v in report.meta.items())
    n_q = sum(r.quantized for r in report.rows)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(report.title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(report.title)}</h1>
<div class="meta">{meta}<div>{n_q} of {len(report.rows)} layers quantized; worst first. SQNR in dB: local = the
layer alone on the float model's inputs (weight + output quantization); accumulated = the quantized model's
activation against the float model's.</div></div>
<h2>SQNR per layer</h2>
{chart}
<h2>Layers</h2>
{_table(report, bad_db)}
</body></html>
"""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
