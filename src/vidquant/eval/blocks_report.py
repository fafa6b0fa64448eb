"""analysis.html: the per-block table (most sensitive first) and per-expert plots over depth.

Also `blocks_section`, the same table for the run report when a state chose its protected blocks itself.
"""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from .. import __version__
from .report_plots import png_uri
from .templates import page

if TYPE_CHECKING:
    from .blocks import Analysis

COLUMNS = (  # key, header, format
    ("sensitivity", "Sensitivity (rel. output error)", "{:.3g}"),
    ("layer_sqnr_db", "Layer SQNR (dB)", "{:.2f}"),
    ("absmax", "absmax", "{:.3g}"),
    ("p99_9", "p99.9", "{:.3g}"),
    ("p99_9_over_median", "p99.9 / median", "{:.3g}"),
    ("kurtosis", "kurtosis", "{:.3g}"),
    ("out_of_band", "outside HiF8 3-bit band", "{:.1%}"),
    ("above_band", "above (>= 16)", "{:.2%}"),
    ("below_band", "below (< 1/8)", "{:.1%}"),
    ("act_hif8_sqnr_db", "inputs in HiF8: SQNR (dB)", "{:.1f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return escape(fmt.format(value))


def table_html(table: list[dict[str, Any]], protected: dict[str, list[int]] | None = None) -> str:
    """The per-block rows (already sorted) as an HTML table; ``protected`` blocks are marked."""
    protected = protected or {}
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in table)]
    head = "".join(f"<th>{escape(h)}</th>" for _, h, _ in columns)
    body = []
    for r in table:
        mark = " (kept BF16)" if r["block"] in protected.get(r["expert"], []) else ""
        cells = "".join(f"<td>{_cell(r.get(k), f)}</td>" for k, _, f in columns)
        body.append(f'<tr><td class="l">{escape(str(r["expert"]))}</td>'
                    f'<td class="l">{r["block"]}{escape(mark)}</td>{cells}</tr>')
    return (f'<table><tr><th class="l">Expert</th><th class="l">Block</th>{head}</tr>'
            f"{''.join(body)}</table>")


def depth_png(table: list[dict[str, Any]]) -> str:
    """Per expert, over block depth: sensitivity, outside-band fraction and p99.9 / median (log scales)."""
    experts = sorted({r["expert"] for r in table})
    panels = [("sensitivity", "sensitivity"), ("act_hif8_sqnr_db", "inputs in HiF8: SQNR (dB)"),
              ("p99_9_over_median", "p99.9 / median")]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in table)]
    fig = Figure(figsize=(12, 0.6 + 2.4 * len(experts)))
    axes = fig.subplots(len(experts), len(panels), squeeze=False)
    for row, expert in zip(axes, experts, strict=True):
        rows = sorted((r for r in table if r["expert"] == expert), key=lambda r: r["block"])
        x = np.array([r["block"] for r in rows])
        for ax, (key, title) in zip(row, panels, strict=True):
            values = np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows])
            ax.bar(x, np.where(np.isfinite(values), values, 0.0), color="#2563eb", width=0.8)
            if key != "act_hif8_sqnr_db" and (values[np.isfinite(values)] > 0).any():
                ax.set_yscale("log")
            ax.set_title(f"{expert}: {title}", fontsize=10)
            ax.set_xlabel("block")
    fig.tight_layout()
    return png_uri(fig)


def render(analysis: Analysis) -> str:
    table = analysis.table()
    meta = analysis.meta
    lines = []
    for expert, s in analysis.sensitivity.items():
        total = sum(s["blocks"])
        lines.append(f"{expert}: every block quantized: relative output error {s['all']:.3g} "
                     f"(sum over single blocks {total:.3g}); {s['calls']} held-out calls")
    note = f'<div class="note">{escape(chr(10).join(lines))}</div>' if lines else ""
    body = (f"<section><h2>Blocks, most sensitive first</h2>{note}{table_html(table)}</section>"
            f'<section><h2>Over depth</h2><figure><img alt="per-block statistics" src="{depth_png(table)}">'
            f"<figcaption>Sensitivity: the expert's relative output error when only that block is quantized. "
            f"Inputs in HiF8: the SQNR of the block's Linear inputs rounded to HiF8, which keeps 3 mantissa "
            f"bits only for |x| in [2^-3, 2^4).</figcaption></figure></section>")
    recipe = (meta.get("recipe") or {}).get("name", "no state: activation statistics only")
    return page(escape("Per-block analysis"), escape(f"recipe: {recipe}"), body,
                escape(f"vidquant {__version__} · model {str(meta.get('model_fingerprint', ''))[:12]}"))


def blocks_section(plan: dict[str, Any]) -> str:
    """The run report's section for a state whose protected blocks were chosen by sensitivity (else empty)."""
    sensitivity = plan.get("sensitivity") or {}
    if not sensitivity:
        return ""
    table = sorted(({"expert": e, "block": b, "sensitivity": v} for e, vs in sensitivity.items()
                    for b, v in enumerate(vs)), key=lambda r: -r["sensitivity"])
    return ("<section><h2>Protected blocks, chosen by sensitivity</h2>"
            f"{table_html(table, plan.get('protected_blocks'))}</section>")
