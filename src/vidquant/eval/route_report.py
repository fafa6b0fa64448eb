"""The routing report: ``route.json`` (the data) and ``route.html`` (one self-contained page, the run report's style).

What the operator review of the HiF4 paper asks a routed pipeline to show: per prompt the path taken and why (the
prompt gate's categories and matched words, each draft's identity score against the threshold, the escalations),
and in total the fallback rate, the rejection rate, seconds and peak memory per accepted clip, quality against the
all-BF16 and all-draft references, per prompt category, and what each precision costs in memory. All user text
goes through `html.escape`; the page loads nothing (`templates.page`'s Content-Security-Policy).
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from .templates import page

logger = logging.getLogger(__name__)

JSON_NAME = "route.json"
HTML_NAME = "route.html"
MIB = 2**20
PSNR_CAP = 100.0  # what `route.route` counts an identical video's PSNR as (JSON has no inf)


def write_route_report(out: str | Path, data: dict[str, Any]) -> Path:
    """Write ``route.json`` and ``route.html`` into ``out`` (each under a temporary name, then renamed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = _finite({**data, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    with atomic_path(out / JSON_NAME) as tmp:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    with atomic_path(out / HTML_NAME) as tmp:
        tmp.write_text(render(data), encoding="utf-8")
    logger.info("routing report: %s", out / HTML_NAME)
    return out / HTML_NAME


def _finite(value: Any) -> Any:
    """The data with every NaN / inf float as None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def render(data: dict[str, Any]) -> str:
    """The HTML page of a routing run's data (`route.route_summary`)."""
    t = data["totals"]
    policy = data["policy"]
    threshold = data.get("threshold")
    subtitle = " · ".join(escape(s) for s in (f"policy {policy.get('name', '')}",
                                                f"draft rung {data['draft_rung']}",
                                                "no draft gate" if threshold is None else f"threshold {threshold:.3f}",
                                                data.get("created", "")) if s)
    cards = [
        _card("Prompts", str(t["prompts"]), f"{t['critical']} critical by the prompt gate; {t['generations']} "
              "generations", ""),
        _card("Fallback rate", _pct(t["fallback_rate"]), "prompts not served by the draft rung", ""),
        _card("Rejection rate", "-" if t["rejection_rate"] is None else _pct(t["rejection_rate"]),
              f"of {t['drafts_judged']} drafts the identity gate judged", ""),
        _card("Seconds / accepted clip", f"{t['seconds_per_accepted_clip']:.3g} s",
              "denoising, all attempts counted", ""),
        _card("Peak memory / accepted clip", f"{t['peak_memory_bytes_per_accepted_clip'] / MIB:.0f} MiB",
              f"max {t['peak_memory_bytes_max'] / MIB:.0f} MiB", ""),
    ]
    if "psnr" in t:
        served = t.get("psnr_served_quantized")
        cards.append(_card("PSNR vs all-BF16", f"{t['psnr']:.2f} dB",
                           f"identical videos count {PSNR_CAP:g} dB; clips served quantized: "
                           f"{'-' if served is None else f'{served:.2f} dB'}; all-{data['draft_rung']}: "
                           f"{t['draft_psnr']:.2f} dB", ""))
    body = [f'<div class="cards">{"".join(cards)}</div>', _quality(data), _gate(data), _categories(data),
            _costs(data), _prompts(data), _settings(data)]
    footer = f"vidquant {escape(str(data.get('vidquant_version', '')))} · self-contained file"
    return page("Routing report", subtitle, "\n".join(b for b in body if b), footer)


def _card(key: str, value: str, sub: str, tone: str) -> str:
    return (f'<div class="card {tone}"><div class="k">{escape(key)}</div><div class="v">{escape(value)}</div>'
            f'<div class="s">{escape(sub)}</div></div>')


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return f"{value:.{digits}g}" if isinstance(value, float) else escape(str(value))


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    cells = "".join(f'<th class="{"l" if i < left else ""}">{escape(h)}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _quality(data: dict[str, Any]) -> str:
    t = data["totals"]
    if "psnr" not in t:
        return ('<h2>Quality</h2><div class="note">Run with --compare for quality against all-BF16 and all-'
                f'{escape(data["draft_rung"])} references.</div>')
    costs = data.get("reference_costs", {})

    def cost(rung: str) -> list[str]:
        c = costs.get(rung)
        return ["-", "-"] if c is None else [f"{c['seconds_per_clip']:.3g}",
                                             f"{c['peak_memory_bytes_per_clip'] / MIB:.0f}"]

    draft = data["draft_rung"]
    rows = [["routed", f"{t['psnr']:.2f}", f"{t['ssim']:.4f}", f"{t['identity_drift']:.4f}",
             f"{t['seconds_per_accepted_clip']:.3g}", f"{t['peak_memory_bytes_per_accepted_clip'] / MIB:.0f}"],
            [f"all-{escape(draft)}", f"{t['draft_psnr']:.2f}", f"{t['draft_ssim']:.4f}",
             f"{t['draft_identity_drift']:.4f}", *cost(draft)],
            ["all-bf16", "reference", "1", "0", *cost("bf16")]]
    return "<h2>Routed vs all-BF16 and all-draft</h2>" + _table(
        ["videos", "PSNR dB vs BF16", "SSIM", "identity drift", "s / clip", "peak MiB / clip"], rows)


def _gate(data: dict[str, Any]) -> str:
    held = data["totals"].get("gate_held_out")
    if held is None:
        return ""
    note = (f"On these prompts (held out from the threshold's calibration): {held['bad']} of the drafts judged were "
            f"bad (identity drift >= {data['policy']['escalation']['bad_drift']} vs BF16); the gate flagged "
            f"{held['flagged']}, caught {held['caught']}: precision {_num(held['precision'])}, recall "
            f"{_num(held['recall'])}.")
    return f'<h2>Identity gate</h2><div class="note">{escape(note)}</div>'


def _categories(data: dict[str, Any]) -> str:
    rows = []
    for name, c in data["per_category"].items():
        rows.append([escape(name), escape(c["group"]), str(c["prompts"]), str(c["critical"]),
                     _pct(c["fallback_rate"]), f"{c['seconds_per_clip']:.3g}",
                     _num(c.get("psnr"), 4), _num(c.get("draft_psnr"), 4)])
    return "<h2>Per prompt category</h2>" + _table(
        ["category", "group", "prompts", "critical", "fallback", "s / clip", "PSNR routed", "PSNR draft"], rows, 2)


def _costs(data: dict[str, Any]) -> str:
    rows = [[escape(name), str(c["layers"]), f"{c['resident_bytes'] / MIB:.3f}", f"{c['state_bytes'] / MIB:.3f}"]
            for name, c in data["precision_costs"].items()]
    return "<h2>Memory per precision (beyond the base weights)</h2>" + _table(
        ["precision", "layers", "resident MiB", "state MiB"], rows)


def _prompts(data: dict[str, Any]) -> str:
    rows = []
    for p in data["prompts"]:
        path = " → ".join(f"{escape(a['rung'])}" + ("" if a["score"] is None else f" ({a['score']:.3f})")
                          for a in p["attempts"])
        why = "<br>".join(escape(a["reason"]) for a in p["attempts"])
        gate = ", ".join(p["gate_categories"]) + (f": {', '.join(p['gate_matched'][:4])}" if p["gate_matched"] else "")
        final = next(a for a in p["attempts"] if a["accepted"])
        quality = p.get("quality") or {}
        rows.append([str(p["index"]), f'<span class="prompt">{escape(p["prompt"])}</span>', escape(p["category"]),
                     escape(gate) or "-", path, why, escape(p["final"]),
                     f"{sum(a['seconds'] for a in p['attempts']):.3g}", f"{final['peak_memory_bytes'] / MIB:.0f}",
                     _num(quality.get("psnr"), 4)])
    return "<h2>Every prompt: path and why</h2>" + _table(
        ["#", "prompt", "category", "prompt gate", "path (identity score)", "why", "final", "s", "peak MiB",
         "PSNR vs BF16"], rows, 6)


def _settings(data: dict[str, Any]) -> str:
    items = {"policy": json.dumps(data["policy"], sort_keys=True), "policy fingerprint": data["policy_fingerprint"],
             "protocol": json.dumps(data["protocol"], sort_keys=True)}
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items.items())
    return f'<h2>Settings</h2><dl class="kv">{rows}</dl>'
