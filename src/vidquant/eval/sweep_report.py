"""The comparison report of a sweep: one row per configuration, the best per column marked, and per category.

A sweep asks "which setting is best, and where does it hurt": so the table is "config | metric columns | drop
vs BF16" (the BF16 reference as its first row where a metric has one), the best value of each column is marked,
and a per-prompt-category breakdown shows whether identity-sensitive prompts (a recurring character, logos,
faces, plates, text, animal markings) lose more than scenery and motion, which an average hides. Written as
``sweep.html`` (self-contained, like report.html: the same page skeleton and Content-Security-Policy, inline
plots), ``sweep.json`` and two CSV files. All user text goes through `html.escape`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .. import __version__
from ..atomic import atomic_path
from ..calib.prompts import IDENTITY_SENSITIVE, SCENERY_MOTION, UNCATEGORIZED, category_group
from .evaluate import Evaluation
from .report import KNOWN, _clean
from .report_plots import png_uri
from .templates import page

logger = logging.getLogger(__name__)

SWEEP_HTML, SWEEP_JSON, SWEEP_CSV, CATEGORIES_CSV = "sweep.html", "sweep.json", "sweep.csv", "sweep_categories.csv"
REPORT_OWNED = (SWEEP_HTML, SWEEP_JSON, SWEEP_CSV, CATEGORIES_CSV)
SKIPPED = ("peak_memory_bytes", "seconds_per_step")  # measured per run, noisy on a shared machine: JSON only
DROP = "drop"
# per-prompt metrics of the category breakdown: name -> (label, higher is better, unit)
CATEGORY_METRICS = {"psnr": ("PSNR vs BF16", True, "dB"), "ssim": ("SSIM vs BF16", True, ""),
                    "subject_consistency_drop": ("Subject consistency (proxy) drop vs BF16", False, "%"),
                    "identity_drift": ("Identity drift vs BF16 (eval/identity.py)", False, "")}
_BEST_STYLE = "background:rgba(14,124,58,.16);font-weight:650"


@dataclass
class CellResult:
    """One configuration's outcome: its changes to the base recipe, its evaluation and per-layer SQNR rows."""

    name: str
    changes: Mapping[str, Any]
    recipe: Mapping[str, Any]
    calib_key: str | None
    evaluation: Evaluation
    sqnr: list[Mapping[str, Any]] = field(default_factory=list)
    report_href: str | None = None  # the cell's own report.html, relative to the sweep report


@dataclass(frozen=True)
class Column:
    """One column of the table: a metric of the evaluations, the per-layer SQNR summary, or the drop vs BF16."""

    key: str
    label: str
    higher_is_better: bool
    unit: str = ""


def columns(results: Sequence[CellResult]) -> list[Column]:
    """The table's columns: every evaluation metric (in the report's order, noisy costs left out), the per-layer
    SQNR mean and worst where computed, and the average relative drop vs BF16."""
    seen: dict[str, Any] = {}
    for r in results:
        for m in r.evaluation.metrics:
            if m.name not in SKIPPED:
                seen.setdefault(m.name, m)
    order = [n for n in KNOWN if n in seen] + sorted(set(seen) - set(KNOWN))
    cols = [Column(n, KNOWN[n][1] if n in KNOWN else n, bool(seen[n].higher_is_better), seen[n].unit or "")
            for n in order]
    if any(r.sqnr for r in results):
        cols += [Column("sqnr_mean", "Layer SQNR mean", True, "dB"), Column("sqnr_worst", "Layer SQNR worst", True,
                                                                            "dB")]
    return [*cols, Column(DROP, "Drop vs BF16", False, "%")]


def cell_values(result: CellResult) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """(value, relative change vs BF16) per column key for one configuration."""
    values: dict[str, float | None] = {}
    relative: dict[str, float | None] = {}
    for m in result.evaluation.metrics:
        values[m.name], relative[m.name] = _finite(m.quantized), m.relative
    sqnr = [float(r["sqnr_db"]) for r in result.sqnr]
    if sqnr:
        finite = [v for v in sqnr if math.isfinite(v)]
        values["sqnr_mean"] = float(np.mean(finite)) if finite else None
        values["sqnr_worst"] = -math.inf if any(math.isnan(v) for v in sqnr) else min(sqnr)  # NaN: a broken layer
    drops = [m.drop for m in result.evaluation.metrics if m.group != "cost" and m.drop is not None]
    values[DROP] = 100 * float(np.mean(drops)) if drops else None
    return values, relative


def best_of(values: Sequence[float | None], higher_is_better: bool) -> set[int]:
    """Indices holding the best value (ties all marked; NaN and None never); none when fewer than two values differ.
    An infinity counts: a broken layer's -inf SQNR loses to any finite one."""
    cands = [(i, v) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    if len({v for _, v in cands}) < 2:
        return set()
    best = max(v for _, v in cands) if higher_is_better else min(v for _, v in cands)
    if math.isinf(best):
        return {i for i, v in cands if v == best}
    tol = 1e-9 * max(1.0, abs(best))
    return {i for i, v in cands if abs(v - best) <= tol}


def category_table(results: Sequence[CellResult], categories: Mapping[str, str]) -> dict[str, Any]:
    """Per category metric, per column (the two groups, then each category in order of appearance) the mean over
    its prompts for each configuration: ``{"columns": [...], "counts": {...}, "metrics": {m: {col: [per cell]}}}``."""
    prompts = [p.prompt for p in results[0].evaluation.prompts] if results else []
    cats = [categories.get(p.strip(), UNCATEGORIZED) for p in prompts]
    members: dict[str, list[int]] = {}
    for group in (IDENTITY_SENSITIVE, SCENERY_MOTION):
        if idx := [i for i, c in enumerate(cats) if category_group(c) == group]:
            members[group] = idx
    for i, c in enumerate(cats):
        members.setdefault(c, []).append(i)
    table: dict[str, dict[str, list[float | None]]] = {}
    for metric in CATEGORY_METRICS:
        table[metric] = {}
        for col, idx in members.items():
            row = []
            for r in results:
                by_prompt = {p.prompt: p for p in r.evaluation.prompts}
                vals = [v for i in idx if (v := _prompt_value(by_prompt.get(prompts[i]), metric)) is not None]
                row.append(float(np.mean(vals)) if vals else None)
            table[metric][col] = row
    return {"columns": list(members), "counts": {c: len(i) for c, i in members.items()},
            "prompts": [{"prompt": p, "category": c, "group": category_group(c)} for p, c in zip(prompts, cats,
                                                                                             strict=True)],
            "metrics": table}


def write_sweep_report(out_dir: str | Path, results: Sequence[CellResult], *, title: str = "vidquant sweep",
                       model: str = "", base_recipe: str = "", protocol: Mapping[str, Any] | None = None,
                       categories: Mapping[str, str] | None = None) -> Path:
    """Write sweep.html, sweep.json, sweep.csv and sweep_categories.csv into ``out_dir``; return the page's path."""
    if not results:
        raise ValueError("a sweep report needs at least one configuration")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = columns(results)
    rows = [cell_values(r) for r in results]
    best = {c.key: best_of([v.get(c.key) for v, _ in rows], c.higher_is_better) for c in cols}
    bf16 = _bf16_row(results)
    cats = category_table(results, categories or {})
    cat_best = {m: {col: best_of(vals, CATEGORY_METRICS[m][1]) for col, vals in t.items()}
                for m, t in cats["metrics"].items()}
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data = {
        "format": 1, "title": title, "created": created, "library_version": __version__, "model": model,
        "base_recipe": base_recipe, "protocol": dict(protocol or {}),
        "columns": [{"key": c.key, "label": c.label, "higher_is_better": c.higher_is_better, "unit": c.unit}
                    for c in cols],
        "bf16": bf16,
        "cells": [{"name": r.name, "changes": dict(r.changes), "recipe": dict(r.recipe), "calib_key": r.calib_key,
                   "values": {c.key: v.get(c.key) for c in cols}, "relative": rel,
                   "best": [c.key for c in cols if i in best[c.key]], "report": r.report_href,
                   "notes": r.evaluation.notes}
                  for i, (r, (v, rel)) in enumerate(zip(results, rows, strict=True))],
        "categories": {**cats, "best": {m: {col: sorted(b) for col, b in t.items()} for m, t in cat_best.items()}},
    }
    with atomic_path(out / SWEEP_JSON) as tmp:
        tmp.write_text(json.dumps(_clean(data), indent=1))
    _write_csvs(out, results, cols, rows, best, bf16, cats, cat_best)
    html = _render(title, created, model, base_recipe, results, cols, rows, best, bf16, cats, cat_best,
                   dict(protocol or {}))
    with atomic_path(out / SWEEP_HTML) as tmp:
        tmp.write_text(html, encoding="utf-8")
    logger.info("sweep report written to %s", out / SWEEP_HTML)
    return out / SWEEP_HTML


# ---------------------------------------------------------------- pieces


def _bf16_row(results: Sequence[CellResult]) -> dict[str, float | None]:
    """The BF16 reference value of each metric that has one (the same videos for every cell: the first says)."""
    row: dict[str, float | None] = {}
    for r in results:
        for m in r.evaluation.metrics:
            if m.bf16 is not None and m.name not in row:
                row[m.name] = _finite(m.bf16)
    return row


def _prompt_value(p: Any, metric: str) -> float | None:
    if p is None:
        return None
    if metric == "subject_consistency_drop":
        q, b = p.quantized.get("subject_consistency_proxy"), p.bf16.get("subject_consistency_proxy")
        return None if q is None or not b else _finite(100 * (b - q) / abs(b))
    return _finite(p.quantized.get(metric))


def _write_csvs(out: Path, results: Sequence[CellResult], cols: list[Column], rows: list, best: dict,
                bf16: dict, cats: dict, cat_best: dict) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["config", "changes", "calib_key", *(c.key for c in cols), "best_in"])
    w.writerow(["bf16", "", "", *(_csv(bf16.get(c.key)) for c in cols), ""])
    for i, (r, (values, _)) in enumerate(zip(results, rows, strict=True)):
        w.writerow([r.name, json.dumps(_clean(dict(r.changes)), sort_keys=True), r.calib_key or "",
                    *(_csv(values.get(c.key)) for c in cols), ";".join(c.key for c in cols if i in best[c.key])])
    with atomic_path(out / SWEEP_CSV) as tmp:
        tmp.write_text(buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "category", "prompts", "config", "value", "best"])
    for metric, table in cats["metrics"].items():
        for col, values in table.items():
            for i, (r, v) in enumerate(zip(results, values, strict=True)):
                w.writerow([metric, col, cats["counts"][col], r.name, _csv(v), int(i in cat_best[metric][col])])
    with atomic_path(out / CATEGORIES_CSV) as tmp:
        tmp.write_text(buf.getvalue())


def _render(title: str, created: str, model: str, base_recipe: str, results: Sequence[CellResult],
            cols: list[Column], rows: list, best: dict, bf16: dict, cats: dict, cat_best: dict,
            protocol: dict) -> str:
    subtitle = " · ".join(escape(s) for s in (f"base recipe {base_recipe}" if base_recipe else "", model, created)
                          if s)
    body = [_main_table(results, cols, rows, best, bf16), _categories_section(results, cats, cat_best),
            _plots_section(results, cols, rows, best, cats), _settings(protocol, cats)]
    footer = f"vidquant {escape(__version__)} · generated {escape(created)} · self-contained file"
    return page(escape(title), subtitle, "\n".join(b for b in body if b), footer)


def _main_table(results: Sequence[CellResult], cols: list[Column], rows: list, best: dict, bf16: dict) -> str:
    head = "".join(f'<th title="{escape(c.label)}">{escape(c.label)}<br><small>{"↑" if c.higher_is_better else "↓"}'
                   f"{' ' + escape(c.unit) if c.unit else ''}</small></th>" for c in cols)
    ref = "".join(f"<td>{_bytes(bf16.get(c.key)) if c.unit == 'bytes' else _num(bf16.get(c.key))}</td>"
                  if c.key in bf16 else "<td>ref</td>" if c.key != DROP else "<td>0</td>" for c in cols)
    body = [f'<tr><td class="l"><b>BF16</b><small>the reference videos</small></td>{ref}</tr>']
    for i, (r, (values, rel)) in enumerate(zip(results, rows, strict=True)):
        cells = []
        for c in cols:
            v = values.get(c.key)
            mark = i in best[c.key]
            sub = f"<small>{_pct(rel.get(c.key))}</small>" if rel.get(c.key) is not None else ""
            text = (_bytes(v) if c.unit == "bytes" else _num(v)) + (" ★" if mark else "")
            cells.append(f'<td style="{_BEST_STYLE if mark else ""}">{text}{sub}</td>')
        name = escape(r.name)
        link = f'<a href="{escape(r.report_href)}">{name}</a>' if r.report_href else name
        changes = escape(", ".join(f"{k}: {json.dumps(_clean(v))}" for k, v in r.changes.items()) or "base recipe")
        body.append(f'<tr><td class="l">{link}<small>{changes}</small></td>{"".join(cells)}</tr>')
    legend = ("★ best of the column (ties all marked). Small figures: change relative to the BF16 value. "
              "Drop vs BF16: the mean relative drop (%) over the quality metrics that have a BF16 value (temporal "
              "scores, VBench); PSNR / SSIM / latent error are measured against the BF16 videos themselves. "
              "* marks weight-free proxies.")
    return (f'<section><h2>Configurations</h2><p class="legend">{legend}</p><table><tr><th class="l">Config</th>'
            f"{head}</tr>{''.join(body)}</table></section>")


def _categories_section(results: Sequence[CellResult], cats: dict, cat_best: dict) -> str:
    if not cats["columns"]:
        return ""
    parts = []
    head = "".join(f"<th>{escape(c)}<br><small>{cats['counts'][c]} prompt{'s' * (cats['counts'][c] != 1)}</small></th>"
                   for c in cats["columns"])
    for metric, table in cats["metrics"].items():
        if all(v is None for vals in table.values() for v in vals):
            continue
        label, higher, unit = CATEGORY_METRICS[metric]
        rows = []
        for i, r in enumerate(results):
            cells = "".join(
                f'<td style="{_BEST_STYLE if i in cat_best[metric][c] else ""}">{_num(table[c][i])}'
                f"{' ★' if i in cat_best[metric][c] else ''}</td>" for c in cats["columns"])
            rows.append(f'<tr><td class="l">{escape(r.name)}</td>{cells}</tr>')
        arrow = "↑" if higher else "↓"
        parts.append(f"<h3>{escape(label)} <small>({arrow} better{', ' + unit if unit else ''}; mean over the "
                     f'prompts of each column)</small></h3><table><tr><th class="l">Config</th>{head}</tr>'
                     f"{''.join(rows)}</table>")
    legend = ("Identity-sensitive: a recurring character, products and logos, faces, vehicles and plates, signs and "
              "text, animal markings (the bundled prompts' sections); scenery / motion: landscapes, city life, "
              "interiors, fantasy. Prompts from a file without `# ---- category ----` headers are uncategorized. "
              "With a handful of prompts per column these means are noisy.")
    return f'<section><h2>Per prompt category</h2><p class="legend">{legend}</p>{"".join(parts)}</section>'


def _plots_section(results: Sequence[CellResult], cols: list[Column], rows: list, best: dict, cats: dict) -> str:
    shown = [c for c in cols if c.key in ("psnr", "ssim", "latent_rel_err", "sqnr_mean", DROP)
             and any(v.get(c.key) is not None for v, _ in rows)]
    figures = []
    if shown:
        figures.append(("configurations", _summary_png(results, shown, rows, best),
                        "Each configuration on the main columns; the best bar of each panel is green."))
    psnr = cats["metrics"].get("psnr", {})
    if psnr and any(v is not None for vals in psnr.values() for v in vals):
        figures.append(("PSNR per category", _category_png(results, psnr, cats["counts"]),
                        "Mean PSNR vs BF16 per prompt category (the two groups first), one bar per configuration."))
    if not figures:
        return ""
    body = "".join(f'<figure><img alt="{escape(alt)}" src="{src}"><figcaption>{escape(cap)}</figcaption></figure>'
                   for alt, src, cap in figures)
    return f"<section><h2>Plots</h2>{body}</section>"


def _settings(protocol: dict, cats: dict) -> str:
    items = [(f"Protocol · {k}", json.dumps(_clean(v)) if not isinstance(v, str) else v) for k, v in protocol.items()]
    items += [(f"Prompt {i} · {p['category']}", p["prompt"]) for i, p in enumerate(cats["prompts"])]
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in items)
    return f'<section><h2>Protocol and prompts</h2><dl class="kv">{rows}</dl></section>' if rows else ""


# ---------------------------------------------------------------- plots (matplotlib Agg on a private Figure)


def _summary_png(results: Sequence[CellResult], shown: list[Column], rows: list, best: dict) -> str:
    names = [r.name for r in results]
    width = min(16.0, 3.0 + 0.5 * len(names) * len(shown))
    fig = Figure(figsize=(width, 3.6))
    fig.subplots_adjust(left=0.06, right=0.99, top=0.88, bottom=0.42, wspace=0.35)
    axes = fig.subplots(1, len(shown), squeeze=False)[0]
    x = np.arange(len(names))
    for ax, c in zip(axes, shown, strict=True):
        values = np.array([np.nan if (v := vals.get(c.key)) is None else v for vals, _ in rows], dtype=float)
        colours = ["#0e7c3a" if i in best[c.key] else "#7b8794" for i in range(len(names))]
        ax.bar(x, np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0), color=colours, width=0.7)
        finite = values[np.isfinite(values)]
        if finite.size and c.key != DROP and c.key != "latent_rel_err":  # zoom in on differences
            lo, hi = float(finite.min()), float(finite.max())
            pad = 0.15 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-6)
            ax.set_ylim(lo - pad - (hi - lo) * 0.5, hi + pad)
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{c.label} ({'↑' if c.higher_is_better else '↓'} better)", fontsize=9, loc="left")
        ax.grid(axis="y", alpha=0.3)
    return png_uri(fig)


def _category_png(results: Sequence[CellResult], table: Mapping[str, list[float | None]],
                  counts: Mapping[str, int]) -> str:
    cols = list(table)
    fig = Figure(figsize=(min(16.0, 6.0 + 0.9 * len(cols)), 4.0))
    fig.subplots_adjust(left=0.08, right=0.75, top=0.94, bottom=0.3)
    ax = fig.subplots()
    n = len(results)
    width = 0.8 / n
    x = np.arange(len(cols))
    for i, r in enumerate(results):
        values = [np.nan if (v := table[c][i]) is None else v for c in cols]
        ax.bar(x - 0.4 + (i + 0.5) * width, values, width=width, label=r.name)
    finite = [v for vals in table.values() for v in vals if v is not None and math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = 0.15 * (hi - lo) if hi > lo else 0.5
        ax.set_ylim(lo - pad - 0.5 * (hi - lo), hi + pad)
    ax.set_xticks(x, [f"{c}\n({counts[c]})" for c in cols], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("PSNR vs BF16 (dB)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return png_uri(fig)


# ---------------------------------------------------------------- numbers


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.4g}"


def _bytes(x: float | None) -> str:
    if x is None:
        return "—"
    for div, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= div:
            return f"{x / div:.2f} {name}"
    return f"{x:.0f} B"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:+.2f} %"


def _csv(x: float | None) -> str:
    return "" if x is None else repr(float(x))
