"""One self-contained ``report.html`` (plus ``metrics.json``) comparing a quantized run with its BF16 reference.

The page exists so that a person sees at a glance what an average hides: the HiF4 paper's VBench mean fell
13.5 % while subject consistency collapsed 0.93 -> 0.53. So the headline names the worst dimension and the
worst prompt next to the average, prompts are ranked worst first on a colour scale, and frame strips show the
failure. Everything is inline (plots and frames as base64 images, CSS in the page, a Content-Security-Policy that
forbids any fetch), so the file can be mailed or archived as is. All user text goes through `html.escape`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import atomic_path
from . import report_plots as plots
from .blocks_report import blocks_section
from .templates import page

logger = logging.getLogger(__name__)

REPORT = "report.html"
METRICS = "metrics.json"
GROUPS = {"quality": "Weight-free metrics", "vbench": "VBench", "cost": "Memory and speed"}
# name -> (label, short column label, higher is better, unit)
KNOWN: dict[str, tuple[str, str, bool, str]] = {
    "psnr": ("PSNR vs BF16", "PSNR", True, "dB"),
    "ssim": ("SSIM vs BF16", "SSIM", True, ""),
    "latent_rel_err": ("Latent relative error", "Latent err", False, ""),
    "temporal_flickering": ("Temporal flickering", "Flicker", True, ""),
    "motion_smoothness_proxy": ("Motion smoothness (proxy)", "Smooth.*", True, ""),
    "subject_consistency_proxy": ("Subject consistency (proxy)", "Subj.*", True, ""),
    "identity_consistency": ("Identity consistency", "Ident.", True, ""),
    "identity_drift": ("Identity drift vs BF16", "Id drift", False, ""),
    "subject_consistency": ("Subject consistency", "Subj.", True, ""),
    "motion_smoothness": ("Motion smoothness", "Smooth.", True, ""),
    "imaging_quality": ("Imaging quality", "Imaging", True, ""),
    "aesthetic_quality": ("Aesthetic quality", "Aesth.", True, ""),
    "overall_consistency": ("Overall consistency", "Overall", True, ""),
    "weight_bytes": ("Transformer weights", "Weights", False, "bytes"),
    "peak_memory_bytes": ("Peak memory", "Peak mem", False, "bytes"),
    "seconds_per_step": ("Seconds per step", "s/step", False, "s"),
}
_SHADE_FULL = 0.20  # a 20 % relative drop gets the full colour
# Weight-free proxies move by this much with no change in quality: the HOG subject proxy +1.0 % under W4A4 at 35 dB
# PSNR in the demo; on the tiny Wan2.2 pipeline (bench/identity.py) the per-video proxies' means moved by up to
# 2.0 % (identity_consistency, rtn-nvfp4: "better") and the HOG proxy by at most 0.63 % whatever the recipe, even
# a broken INT4 one. A smaller relative change of a "quality" metric reads as "no change" in the headline.
NOISE_FLOOR = 0.02
_MAX_WORST = 5


@dataclass
class Metric:
    """One row of the summary table, as in the papers: the value under BF16 and under the quantized model.

    ``bf16`` is None for a metric that only exists against the reference (PSNR); ``group`` is ``"quality"``
    (weight-free), ``"vbench"`` or ``"cost"`` (bytes, seconds; left out of the quality averages). ``label``,
    ``higher_is_better`` and ``unit`` default from `KNOWN` by ``name`` (unknown names: higher is better).
    """

    name: str
    bf16: float | None
    quantized: float | None
    group: str = "quality"
    label: str | None = None
    higher_is_better: bool | None = None
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"metric {self.name!r}: group must be one of {list(GROUPS)}, got {self.group!r}")
        known = KNOWN.get(self.name, (self.name.replace("_", " ").capitalize(), self.name, True, ""))
        self.label = self.label or known[0]
        self.higher_is_better = known[2] if self.higher_is_better is None else self.higher_is_better
        self.unit = known[3] if self.unit is None else self.unit

    @property
    def delta(self) -> float | None:
        return _finite(None if self.bf16 is None or self.quantized is None else self.quantized - self.bf16)

    @property
    def relative(self) -> float | None:
        delta = self.delta
        return None if delta is None or not self.bf16 else _finite(delta / abs(self.bf16))

    @property
    def drop(self) -> float | None:
        """Relative change in the bad direction: positive means the quantized model is worse."""
        rel = self.relative
        return None if rel is None else (-rel if self.higher_is_better else rel)


@dataclass
class PromptResult:
    """One prompt: its per-video metrics and, optionally, the two videos' frames (uint8, (T, H, W, 3)).

    ``quantized`` holds the values under the quantized model (PSNR/SSIM against BF16, consistency, VBench
    per-video scores ...); ``bf16`` the same metrics measured on the BF16 video where they have one, so that
    the drop is shown and ranked.
    """

    prompt: str
    quantized: dict[str, float]
    bf16: dict[str, float] = field(default_factory=dict)
    bf16_frames: np.ndarray | None = None
    quantized_frames: np.ndarray | None = None


@dataclass
class ActivationTail:
    """Activation statistics of one Linear input: per-channel absmax and a high percentile (same channels), and/or
    a histogram of per-token absmax (``token_counts`` over ``token_edges``, one edge more than counts; edges 0 and
    inf are allowed for under/overflow buckets, as in the calibration's quarter-octave grid). The gap between
    absmax and the percentile is the tail the methods clip or smooth."""

    layer: str
    expert: str = "transformer"
    absmax: np.ndarray | None = None
    percentile: np.ndarray | None = None
    percentile_label: str = "p99.9"
    token_counts: np.ndarray | None = None
    token_edges: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.token_counts is None) != (self.token_edges is None) or (
            self.token_counts is not None and np.size(self.token_edges) != np.size(self.token_counts) + 1
        ):
            raise ValueError(f"{self.layer}: token_counts needs token_edges with one more entry")
        if self.absmax is not None and self.percentile is not None and np.size(self.absmax) != np.size(self.percentile):
            raise ValueError(f"{self.layer}: absmax and percentile must have one value per channel")


@dataclass
class ReportData:
    """Everything a report shows; only ``metrics`` is required to make a useful page.

    - ``recipe``: recipe name or its dict; ``protocol``: generation settings (size, frames, steps, CFG, seed ...)
    - ``model``, ``model_fingerprint``, ``state_path``, ``library_version``: what was compared, to reproduce it
    - ``metrics``: summary rows (`Metric`); ``prompts``: per-prompt rows (`PromptResult`)
    - ``sqnr``: per-layer rows ``{"layer", "expert", "sqnr_db"}`` in model order
    - ``tails``: `ActivationTail` of the worst layers (the first 8 are plotted)
    - ``notes``: shown as call-outs (e.g. why VBench is missing); ``extra``: any other settings, shown as is
    - ``plan``: the state's layer plan; when ``protect_blocks: auto`` chose its blocks, the sensitivity table
    - ``qat``: a fine-tuned state's QAT record (`ptq.finetune`): PTQ vs PTQ + QAT losses, what trained, what was kept
    """

    metrics: list[Metric]
    recipe: str | Mapping[str, Any] = ""
    protocol: Mapping[str, Any] = field(default_factory=dict)
    model: str = ""
    model_fingerprint: str = ""
    state_path: str | None = None
    library_version: str = __version__
    prompts: list[PromptResult] = field(default_factory=list)
    sqnr: list[Mapping[str, Any]] = field(default_factory=list)
    tails: list[ActivationTail] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: Mapping[str, Any] = field(default_factory=dict)
    plan: Mapping[str, Any] = field(default_factory=dict)
    qat: Mapping[str, Any] = field(default_factory=dict)
    title: str = "vidquant: quantized vs BF16"
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


@dataclass
class PromptRank:
    """Where a prompt stands: per metric its badness in [0, 1] among the prompts, and their mean."""

    index: int
    badness: dict[str, float]
    score: float
    worst: bool = False


def write_report(out_dir: str | Path, data: ReportData, *, max_strips: int = 32) -> Path:
    """Write ``report.html`` and ``metrics.json`` into `out_dir` (each atomically) and return the page's path.

    Frame strips are drawn for the `max_strips` worst prompts that have frames, to bound the page's size.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranking = rank_prompts(data)
    summary = summarize(data, ranking)
    with atomic_path(out / METRICS) as tmp:
        tmp.write_text(json.dumps(_clean(_metrics_json(data, ranking, summary)), indent=2))
    html = _render(data, ranking, summary, max_strips)
    with atomic_path(out / REPORT) as tmp:
        tmp.write_text(html, encoding="utf-8")
    logger.info("report written to %s (%.1f MiB)", out / REPORT, len(html) / 2**20)
    return out / REPORT


def rank_prompts(data: ReportData) -> list[PromptRank]:
    """Prompts ordered worst first. Per metric a prompt is scored by its drop against its own BF16 value when it
    has one (else by the value itself), scaled to [0, 1] across prompts; the top tenth (1 to 5) are flagged."""
    names = _prompt_metrics(data)
    raw: dict[str, list[float | None]] = {}
    for name in names:
        higher = _direction(data, name)
        values = []
        for p in data.prompts:
            q = p.quantized.get(name)
            if q is None or not math.isfinite(q):
                values.append(None)
            elif p.bf16.get(name):
                values.append(_prompt_drop(data, p, name))
            else:
                values.append(-q if higher else q)
        raw[name] = values
    ranks = []
    for i in range(len(data.prompts)):
        badness = {n: _scaled(raw[n], i) for n in names if raw[n][i] is not None}
        ranks.append(PromptRank(i, badness, float(np.mean(list(badness.values()))) if badness else 0.0))
    ranks.sort(key=lambda r: -r.score)
    for r in ranks[: min(_MAX_WORST, max(1, round(len(ranks) / 10)))]:
        r.worst = r.score > 0
    return ranks


def summarize(data: ReportData, ranking: list[PromptRank]) -> dict[str, Any]:
    """The headline numbers: average relative drop, worst dimension, VBench mean, worst prompt, memory."""
    quality = [m for m in data.metrics if m.group != "cost" and m.drop is not None]
    summary: dict[str, Any] = {"average_relative_drop": None, "metrics_averaged": len(quality)}
    if quality:
        summary["average_relative_drop"] = float(np.mean([m.drop for m in quality]))
        settled = [settled_drop(data, m) for m in quality]
        summary["average_settled_drop"] = float(np.mean(settled))  # changes within noise counted as none
        summary["within_noise"] = [m.name for m, d in zip(quality, settled, strict=True) if d == 0]
        worst = max(quality, key=lambda m: m.drop)
        summary["worst_dimension"] = _metric_json(worst)
    vb = [m for m in data.metrics if m.group == "vbench" and m.bf16 is not None and m.quantized is not None]
    if vb:
        mean = Metric("vbench_mean", float(np.mean([m.bf16 for m in vb])), float(np.mean([m.quantized for m in vb])),
                      group="vbench", label=f"VBench mean ({len(vb)} dims)")
        summary["vbench_mean"] = _metric_json(mean)
    if ranking and ranking[0].worst:
        top = ranking[0]
        prompt = data.prompts[top.index]
        # Name the metric it is worst at; among near-ties prefer the largest drop against its own BF16 value.
        why = max(top.badness, key=lambda n: (round(top.badness[n], 1), _prompt_drop(data, prompt, n)))
        summary["worst_prompt"] = {"prompt": prompt.prompt, "index": top.index, "metric": why,
                                   "quantized": prompt.quantized.get(why), "bf16": prompt.bf16.get(why)}
    for m in data.metrics:
        if m.name in ("weight_bytes", "peak_memory_bytes"):
            summary[m.name] = _metric_json(m)
    return summary


def settled_drop(data: ReportData, m: Metric) -> float:
    """``m.drop``, or 0.0 when it is within the metric's noise, so that a proxy moved by noise reads as "no change".

    Noise: two paired standard errors of the per-prompt relative changes where the prompts carry both values, and
    for weight-free metrics (group "quality") at least `NOISE_FLOOR`.
    """
    drop = m.drop
    if drop is None:
        return 0.0
    changes = [_prompt_drop(data, p, m.name) for p in data.prompts]
    changes = [c for c in changes if math.isfinite(c)]
    noise = 2 * float(np.std(changes, ddof=1)) / math.sqrt(len(changes)) if len(changes) >= 2 else 0.0
    if m.group == "quality":
        noise = max(noise, NOISE_FLOOR)
    return 0.0 if abs(drop) <= noise else drop


# ---------------------------------------------------------------- HTML


def _render(data: ReportData, ranking: list[PromptRank], summary: dict, max_strips: int) -> str:
    recipe = data.recipe if isinstance(data.recipe, str) else str(data.recipe.get("name", "custom recipe"))
    subtitle = " · ".join(escape(s) for s in (recipe, data.model, data.created) if s)
    body = [_cards(data, summary)]
    body += [f'<div class="note">{escape(n)}</div>' for n in data.notes]
    body += [_metrics_table(data), _prompts_table(data, ranking), _sqnr_section(data), _qat_section(data),
             blocks_section(data.plan),
             _tails_section(data), _strips_section(data, ranking, max_strips), _settings_section(data)]
    footer = f"vidquant {escape(data.library_version)} · generated {escape(data.created)} · self-contained file"
    return page(escape(data.title), subtitle, "\n".join(b for b in body if b), footer)


def _cards(data: ReportData, s: dict) -> str:
    cards = []
    avg = s["average_relative_drop"]
    if avg is not None:
        settled = s["average_settled_drop"]
        value = _pct(abs(avg), signed=False) + (" better" if settled < 0 else "")
        if settled == 0:  # every change within its metric's noise: no verdict either way
            value = "no change"
        sub = f"over {s['metrics_averaged']} quality metrics" + (f" (raw {_pct(avg)})" if settled == 0 else "")
        if s["within_noise"]:
            sub += f"; {len(s['within_noise'])} within noise: " + ", ".join(escape(_short_label(n))
                                                                           for n in s["within_noise"])
        cards.append(_card("Average relative drop", value, sub, "bad" if settled > 0.01 else "good"))
    if "vbench_mean" in s:
        v = s["vbench_mean"]
        cards.append(_card("VBench mean", f"{_num(v['quantized'])}",
                           f"BF16 {_num(v['bf16'])} · {_pct(v['relative'])}", ""))
    if "worst_dimension" in s:
        w = s["worst_dimension"]
        times = f" · {w['drop'] / avg:.1f}× the average drop" if avg and avg > 0 and w["drop"] > 1.5 * avg else ""
        cards.append(_card("Worst dimension", escape(w["label"]),
                           f"{_fmt(w['bf16'], w['unit'])} → {_fmt(w['quantized'], w['unit'])} ({_pct(w['relative'])})"
                           + times, "bad text" if w["drop"] > 0.01 else "text"))
    if "worst_prompt" in s:
        w = s["worst_prompt"]
        value = _fmt(w["quantized"], "") if w["bf16"] is None else f"{_num(w['bf16'])} → {_num(w['quantized'])}"
        cards.append(_card("Worst prompt", f"#{w['index']} · {escape(_short_label(w['metric']))} {value}",
                           f"“{escape(_short(w['prompt'], 110))}”", "bad text"))
    if "weight_bytes" in s:
        w = s["weight_bytes"]
        sub = f"BF16 {_fmt(w['bf16'], 'bytes')} · {_pct(w['relative'])}"
        if "peak_memory_bytes" in s:
            peak = s["peak_memory_bytes"]
            sub += f"<br>peak memory {_fmt(peak['quantized'], 'bytes')} ({_pct(peak['relative'])})"
        cards.append(_card("Transformer weights", _fmt(w["quantized"], "bytes"), sub, "good"))
    return f'<section class="cards">{"".join(cards)}</section>' if cards else ""


def _card(key: str, value: str, sub: str, tone: str) -> str:
    return (f'<div class="card {tone}"><div class="k">{key}</div><div class="v">{value}</div>'
            f'<div class="s">{sub}</div></div>')


def _metrics_table(data: ReportData) -> str:
    if not data.metrics:
        return ""
    rows = []
    for group, title in GROUPS.items():
        members = [m for m in data.metrics if m.group == group]
        if members:
            rows.append(f'<tr class="group"><td colspan="6">{title}</td></tr>')
        for m in members:
            arrow = "↑" if m.higher_is_better else "↓"
            rows.append(
                f'<tr><td class="l">{escape(m.label)} <small>{arrow} better</small></td>'
                f"<td>{_fmt(m.bf16, m.unit, ref=True)}</td><td>{_fmt(m.quantized, m.unit)}</td>"
                f"<td>{_fmt(m.delta, m.unit, signed=True)}</td>"
                f'<td><span class="pill" style="{_shade(m.drop)}">{_pct(m.relative)}</span></td>'
                f"<td>{_bar(m.relative, m.drop)}</td></tr>"
            )
    head = '<tr><th class="l">Metric</th><th>BF16</th><th>Quantized</th><th>Delta</th><th>Relative</th><th></th></tr>'
    return f"<section><h2>Metrics</h2><table>{head}{''.join(rows)}</table></section>"


def _prompts_table(data: ReportData, ranking: list[PromptRank]) -> str:
    if not data.prompts:
        return ""
    names = _prompt_metrics(data)
    head = "".join(f'<th title="{escape(_label(data, n))}">{escape(_short_label(n))}</th>' for n in names)
    rows = []
    for rank, r in enumerate(ranking, 1):
        p = data.prompts[r.index]
        cells = []
        for n in names:
            q, b = p.quantized.get(n), p.bf16.get(n)
            style = _shade(r.badness.get(n, 0.0) * _SHADE_FULL) if n in r.badness else ""
            ref = f"<small>BF16 {_num(b)}</small>" if b is not None else ""
            cells.append(f'<td style="{style}">{_num(q)}{ref}</td>')
        badge = '<span class="badge">worst</span>' if r.worst else ""
        rows.append(f'<tr class="{"worst" if r.worst else ""}"><td>{rank}</td><td>{r.index}</td>'
                    f'<td class="prompt">{badge}{escape(p.prompt)}</td>{"".join(cells)}</tr>')
    legend = ("Ranked worst first. Shading: how bad the value is among these prompts (the drop against the prompt's "
              "own BF16 video where that exists); * marks weight-free proxies.")
    return (f'<section><h2>Prompts</h2><p class="legend">{legend}</p><table><tr><th>Rank</th><th>#</th>'
            f'<th class="l">Prompt</th>{head}</tr>{"".join(rows)}</table></section>')


def _sqnr_section(data: ReportData) -> str:
    if not data.sqnr:
        return ""
    worst = sorted(data.sqnr, key=lambda r: _sort_low(float(r["sqnr_db"])))[:10]
    rows = "".join(f'<tr><td class="l">{escape(str(r["expert"]))}</td><td class="l">{escape(str(r["layer"]))}</td>'
                   f'<td>{float(r["sqnr_db"]):.2f}</td></tr>' for r in worst)
    img = plots.sqnr_png(data.sqnr)
    return (f'<section><h2>Per-layer SQNR</h2><figure><img alt="per-layer SQNR" src="{img}">'
            f"<figcaption>Signal-to-quantization-noise ratio of each quantized Linear's output, in model order "
            f"(higher is better; dashed: median).</figcaption></figure>"
            f'<h3>Lowest SQNR layers</h3><table><tr><th class="l">Expert</th><th class="l">Layer</th>'
            f"<th>SQNR (dB)</th></tr>{rows}</table></section>")


def _qat_section(data: ReportData) -> str:
    """PTQ vs PTQ + QAT: the distillation loss (MSE vs the BF16 teacher per expert call) before and after, on the
    training calls and on held-out calls, and whether the fine-tuned deltas or the PTQ state were kept."""
    qat = data.qat
    if not qat or "loss" not in qat:
        return ""
    loss = qat["loss"]
    rows = "".join(
        f'<tr><td class="l">{escape(what)}</td><td>{_num(loss.get(f"{key}_before"))}</td>'
        f'<td>{_num(loss.get(f"{key}_after"))}</td><td>{_pct(_change(loss, key))}</td></tr>'
        for what, key in (("training calls", "train"), ("held-out calls", "held_out")))
    kept = ("the fine-tuned deltas (best held-out step " + escape(str(qat.get("best_step"))) + ")"
            if qat.get("kept") == "qat" else "the PTQ state unchanged: " + escape(str(qat.get("why", ""))))
    trained = escape(", ".join(map(str, qat.get("train", []))))
    return (f"<section><h2>PTQ vs PTQ + QAT</h2><p class=\"legend\">Quantization-aware fine-tuning ({trained}; "
            f"{escape(str(qat.get('steps')))} steps, lr {escape(str(qat.get('lr')))}, rank "
            f"{escape(str(qat.get('rank')))}): output MSE against the BF16 teacher per expert call. Kept: {kept}."
            f'</p><table><tr><th class="l">Loss on</th><th>PTQ</th><th>PTQ + QAT</th><th>Change</th></tr>{rows}'
            "</table></section>")


def _change(loss: Mapping[str, Any], key: str) -> float | None:
    before, after = loss.get(f"{key}_before"), loss.get(f"{key}_after")
    if not isinstance(before, int | float) or not isinstance(after, int | float) or before == 0:
        return None
    return (after - before) / before


def _tails_section(data: ReportData) -> str:
    tails = [t for t in data.tails if t.absmax is not None or t.token_counts is not None][: plots.MAX_TAILS]
    if not tails:
        return ""
    img = plots.tails_png(tails)
    return (f'<section><h2>Activation tails</h2><figure><img alt="activation tails" src="{img}">'
            "<figcaption>Per input channel, sorted by absmax: absmax against the percentile the tail-aware methods "
            "use (log scale), and the per-token absmax distribution. A wide gap is an outlier tail.</figcaption>"
            "</figure></section>")


def _strips_section(data: ReportData, ranking: list[PromptRank], max_strips: int) -> str:
    with_frames = [r for r in ranking if data.prompts[r.index].bf16_frames is not None
                   and data.prompts[r.index].quantized_frames is not None]
    if not with_frames:
        return ""
    parts = []
    for r in with_frames[:max_strips]:
        p = data.prompts[r.index]
        rows = plots.frame_strips(p.bf16_frames, p.quantized_frames)
        body = "".join(f'<div class="row"><span>{name}</span><img alt="{name} frames" src="{src}"></div>'
                       for name, src in rows)
        badge = '<span class="badge">worst</span>' if r.worst else ""
        numbers = " · ".join(f"{escape(_short_label(n))} " + (f"{_num(p.bf16[n])} → " if n in p.bf16 else "")
                             + _num(p.quantized[n]) for n in _prompt_metrics(data) if n in p.quantized)
        parts.append(f'<div class="strip {"worst" if r.worst else ""}"><h3>{badge}#{r.index} · {escape(p.prompt)}'
                     f'</h3><p class="legend">{numbers}</p>{body}</div>')
    more = len(with_frames) - max_strips
    tail = f'<p class="legend">{more} more prompts have frames; raise max_strips to draw them.</p>' if more > 0 else ""
    return ("<section><h2>Frames</h2><p class=\"legend\">Four evenly spaced frames, BF16 above quantized; the third "
            f"row is their absolute difference ×4. Worst prompts first.</p>{''.join(parts)}{tail}</section>")


def _settings_section(data: ReportData) -> str:
    items: dict[str, Any] = {"Recipe": data.recipe, "Model": data.model, "Model fingerprint": data.model_fingerprint,
                             "PTQ state": data.state_path, "vidquant version": data.library_version}
    items.update({f"Protocol · {k}": v for k, v in data.protocol.items()})
    items.update({str(k): v for k, v in data.extra.items()})
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(_text(v))}</dd>" for k, v in items.items() if v not in ("", None))
    return f'<section><h2>Settings and fingerprints</h2><dl class="kv">{rows}</dl></section>'


# ---------------------------------------------------------------- numbers and text


def _prompt_metrics(data: ReportData) -> list[str]:
    seen = {n for p in data.prompts for n in p.quantized}
    order = [n for n in KNOWN if n in seen]
    return order + sorted(seen - set(order))


def _prompt_drop(data: ReportData, p: PromptResult, name: str) -> float:
    q, b = p.quantized.get(name), p.bf16.get(name)
    if q is None or not b or not math.isfinite(q):
        return -math.inf
    return (b - q) / abs(b) if _direction(data, name) else (q - b) / abs(b)


def _direction(data: ReportData, name: str) -> bool:
    for m in data.metrics:
        if m.name == name:
            return bool(m.higher_is_better)
    return KNOWN.get(name, ("", "", True, ""))[2]


def _label(data: ReportData, name: str) -> str:
    for m in data.metrics:
        if m.name == name:
            return str(m.label)
    return KNOWN.get(name, (name,))[0]


def _short_label(name: str) -> str:
    return KNOWN[name][1] if name in KNOWN else name


def _scaled(values: list[float | None], i: int) -> float:
    present = [v for v in values if v is not None]
    lo, hi = min(present), max(present)
    return 0.0 if hi - lo <= 1e-12 * max(1.0, abs(hi)) else (values[i] - lo) / (hi - lo)


def _sort_low(x: float) -> float:
    """Sort key putting NaN first: a NaN SQNR is a broken layer, the worst of all."""
    return -math.inf if math.isnan(x) else x


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return "nan" if math.isnan(x) else f"{x:.4g}"


def _fmt(x: float | None, unit: str | None, *, signed: bool = False, ref: bool = False) -> str:
    if x is None:
        return "ref" if ref else "—"
    sign = "+" if signed and x > 0 else ""
    if unit == "bytes" and math.isfinite(x):
        for div, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if abs(x) >= div:
                return f"{sign}{x / div:.2f} {name}"
        return f"{sign}{x:.0f} B"
    return f"{sign}{_num(x)}{' ' + unit if unit else ''}"


def _pct(x: float | None, *, signed: bool = True) -> str:
    if x is None:
        return "—"
    return f"{x * 100:+.1f} %" if signed else f"{x * 100:.1f} %"


def _shade(drop: float | None) -> str:
    """Background for a drop: red when worse, green when better, stronger up to a 20 % change."""
    if drop is None or abs(drop) < 1e-3:
        return ""
    alpha = 0.10 + 0.55 * min(abs(drop) / _SHADE_FULL, 1.0)
    rgb = "200,30,30" if drop > 0 else "14,124,58"
    return f"background:rgba({rgb},{alpha:.2f})"


def _bar(rel: float | None, drop: float | None) -> str:
    if rel is None:
        return ""
    width = min(abs(rel) / (2 * _SHADE_FULL), 0.5) * 100
    left = 50 if rel >= 0 else 50 - width
    colour = "#c81e1e" if (drop or 0) > 0 else "#0e7c3a"
    return f'<span class="bar"><i style="left:{left:.1f}%;width:{width:.1f}%;background:{colour}"></i><b></b></span>'


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(_clean(v), sort_keys=True, default=str)


# ---------------------------------------------------------------- metrics.json


def _metric_json(m: Metric) -> dict[str, Any]:
    return {"name": m.name, "label": m.label, "group": m.group, "unit": m.unit, "higher_is_better": m.higher_is_better,
            "bf16": m.bf16, "quantized": m.quantized, "delta": m.delta, "relative": m.relative, "drop": m.drop}


def _metrics_json(data: ReportData, ranking: list[PromptRank], summary: dict) -> dict[str, Any]:
    """The page's numbers, machine-readable. Non-finite values: NaN -> null, ±inf -> "inf" / "-inf"."""
    by_index = {r.index: r for r in ranking}
    tails = []
    for t in data.tails:
        entry: dict[str, Any] = {"layer": t.layer, "expert": t.expert, "percentile_label": t.percentile_label}
        if t.absmax is not None:
            entry |= {"channels": int(np.size(t.absmax)), "absmax_max": float(np.max(t.absmax))}
        if t.percentile is not None:
            entry["percentile_max"] = float(np.max(t.percentile))
        if t.token_counts is not None:
            entry["tokens"] = int(np.sum(t.token_counts))
        tails.append(entry)
    return {
        "format": 1,
        "title": data.title,
        "created": data.created,
        "settings": {"recipe": data.recipe, "protocol": data.protocol, "model": data.model,
                     "model_fingerprint": data.model_fingerprint, "state_path": data.state_path,
                     "library_version": data.library_version, "extra": data.extra},
        "summary": summary,
        "metrics": [_metric_json(m) for m in data.metrics],
        "prompts": [{"index": i, "prompt": p.prompt, "quantized": p.quantized, "bf16": p.bf16,
                     "badness": by_index[i].score, "worst": by_index[i].worst} for i, p in enumerate(data.prompts)],
        "sqnr": [dict(r) for r in data.sqnr],
        "activation_tails": tails,
        "notes": data.notes,
        **({"qat": dict(data.qat)} if data.qat else {}),
    }


def _clean(v: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN to None, infinities to strings, mappings and sequences walked."""
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, Path):
        return str(v)
    return v
