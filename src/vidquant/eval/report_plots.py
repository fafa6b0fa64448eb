"""The report's pictures as ``data:`` URIs: per-layer SQNR, activation tails, BF16/quantized frame strips.

Matplotlib draws through its Agg canvas on a private `Figure` (no pyplot state, no display needed); frames are
resized and JPEG-encoded with OpenCV so that a page of 80 prompts stays a few MiB.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from .report import ActivationTail

logger = logging.getLogger(__name__)

MAX_TAILS = 8
STRIP_FRAMES = 4
FRAME_HEIGHT = 150  # px per frame in a strip: enough to see a face change, small enough for many prompts
DIFF_GAIN = 4
_BLOCK = re.compile(r"blocks\.(\d+)\.")


def png_uri(fig: Figure) -> str:
    """A figure as a ``data:`` PNG URI (the one way every report embeds a plot)."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def sqnr_png(rows: Sequence[Mapping[str, Any]]) -> str:
    """One bar panel per expert, layers in model order, coloured red (low SQNR) to green; the worst 3 named."""
    experts: dict[str, list[tuple[str, float]]] = {}
    for r in rows:
        experts.setdefault(str(r["expert"]), []).append((str(r["layer"]), float(r["sqnr_db"])))
    finite = [v for layers in experts.values() for _, v in layers if math.isfinite(v)] or [0.0]
    lo, hi = min(finite), max(finite)
    norm, cmap = Normalize(lo, hi if hi > lo else lo + 1), colormaps["RdYlGn"]
    height = 0.4 + 2.8 * len(experts)
    fig = Figure(figsize=(12, height))
    fig.subplots_adjust(left=0.06, right=0.99, top=1 - 0.4 / height, bottom=0.6 / height, hspace=0.55)
    axes = fig.subplots(len(experts), 1, sharey=True, squeeze=False)[:, 0]
    for ax, (expert, layers) in zip(axes, experts.items(), strict=True):
        values = np.clip(np.nan_to_num([v for _, v in layers], nan=lo), lo, hi)  # NaN: a broken layer, drawn lowest
        x = np.arange(len(values))
        ax.bar(x, values, width=1.0, color=cmap(norm(values)), linewidth=0)
        median = float(np.median(values))
        ax.axhline(median, color="#52606d", linestyle="--", linewidth=1)
        for i in [i for i in np.argsort(values)[:3] if values[i] < median]:
            right = x[i] > 0.75 * len(values)  # keep the label inside the axes
            ax.annotate(layers[i][0], (x[i], values[i]), xytext=(-4 if right else 4, 14), textcoords="offset points",
                        fontsize=8, color="#9b1c1c", ha="right" if right else "left",
                        arrowprops={"arrowstyle": "-", "color": "#9b1c1c", "lw": 0.6})
        _block_ticks(ax, [name for name, _ in layers])
        ax.set_xlim(-0.5, len(values) - 0.5)
        ax.set_ylabel("SQNR (dB)")
        ax.set_title(f"{expert}: {len(values)} layers, median {median:.1f} dB, worst {values.min():.1f} dB",
                     fontsize=10, loc="left")
        ax.grid(axis="y", alpha=0.3)
    return png_uri(fig)


def _block_ticks(ax: Any, names: list[str]) -> None:
    """Tick the first layer of every few transformer blocks, so positions read as depth."""
    firsts: dict[int, int] = {}
    for i, name in enumerate(names):
        m = _BLOCK.search(name)
        if m:
            firsts.setdefault(int(m.group(1)), i)
    if not firsts:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer (model order)")
        return
    step = max(1, math.ceil(len(firsts) / 20))
    blocks = sorted(firsts)[::step]
    ax.set_xticks([firsts[b] for b in blocks], [str(b) for b in blocks])
    ax.set_xlabel("transformer block")


def tails_png(tails: Sequence[ActivationTail]) -> str:
    """Small multiples: per channel (sorted by absmax) absmax vs the percentile, and the token-absmax histogram."""
    panels = [(t, "channels") for t in tails if t.absmax is not None]
    panels += [(t, "tokens") for t in tails if t.token_counts is not None]
    panels.sort(key=lambda p: tails.index(p[0]))
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    height = 0.4 + 3.0 * nrows
    fig = Figure(figsize=(12, height))  # fixed margins: a constrained layout costs seconds on log axes
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - 0.55 / height, bottom=0.55 / height, wspace=0.2, hspace=0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (tail, kind) in zip(axes, panels, strict=False):
        (_channels if kind == "channels" else _tokens)(ax, tail)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return png_uri(fig)


def _positive(v: np.ndarray) -> np.ndarray:
    v = np.abs(np.asarray(v, dtype=np.float64).ravel())
    return np.where(v > 0, v, np.nan)


def _channels(ax: Any, tail: ActivationTail) -> None:
    absmax = _positive(tail.absmax)
    order = np.argsort(-np.nan_to_num(absmax, nan=0.0))
    x = np.arange(1, absmax.size + 1)
    ax.plot(x, absmax[order], color="#c81e1e", linewidth=1.2, label="absmax")
    title = f"{tail.expert} · {tail.layer}"
    if tail.percentile is not None:
        pct = _positive(tail.percentile)[order]
        ax.plot(x, pct, ".", color="#2563eb", markersize=2, label=tail.percentile_label)
        ax.fill_between(x, pct, absmax[order], color="#c81e1e", alpha=0.12, linewidth=0)
        ratio = absmax[order][0] / pct[0] if pct[0] else math.inf
        title += f"\ntop channel absmax / {tail.percentile_label} = {ratio:.1f}×"
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("channel rank (by absmax)")
    ax.set_ylabel("|x|")
    ax.set_title(title, fontsize=9, loc="left")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)


def _tokens(ax: Any, tail: ActivationTail) -> None:
    counts = np.asarray(tail.token_counts, dtype=np.float64).ravel()
    edges = np.asarray(tail.token_edges, dtype=np.float64).ravel()
    # Drawable buckets: counted, with finite positive edges (under/overflow buckets have 0 / inf edges).
    keep = (counts > 0) & (edges[:-1] > 0) & np.isfinite(edges[1:])
    if not keep.any():
        ax.set_visible(False)
        return
    first, last = np.flatnonzero(keep)[[0, -1]]
    ax.stairs(counts[first:last + 1], edges[first:last + 2], fill=True, color="#52606d")
    cum = np.cumsum(counts) / counts.sum()
    for name, k, colour in (("p99.9", int(np.searchsorted(cum, 0.999)), "#2563eb"),
                            ("max", int(np.flatnonzero(counts)[-1]), "#c81e1e")):
        # Known only to its bucket: below the upper edge, or above the lower one in the overflow bucket.
        value, rel = (edges[k + 1], "≤") if np.isfinite(edges[k + 1]) else (edges[k], ">")
        ax.axvline(value, color=colour, linewidth=1, label=f"{name} {rel} {value:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("per-token absmax")
    ax.set_ylabel("tokens")
    ax.set_title(f"{tail.expert} · {tail.layer} (tokens)", fontsize=9, loc="left")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def frame_strips(bf16: np.ndarray, quantized: np.ndarray) -> list[tuple[str, str]]:
    """Rows (label, JPEG data URI): BF16, quantized and, when the videos match in shape, |difference| × 4."""
    a, b = _rgb(bf16, "bf16_frames"), _rgb(quantized, "quantized_frames")
    rows = [("BF16", _strip(a)), ("Quantized", _strip(b))]
    if a.shape == b.shape:
        diff = np.clip(np.abs(a.astype(np.int16) - b.astype(np.int16)) * DIFF_GAIN, 0, 255).astype(np.uint8)
        rows.append((f"|Δ| ×{DIFF_GAIN}", _strip(diff)))
    else:
        logger.warning("BF16 and quantized frames differ in shape (%s vs %s): no difference row", a.shape, b.shape)
    return rows


def _rgb(frames: np.ndarray, what: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {frames.dtype}")
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.shape[0] == 0:
        raise ValueError(f"{what} must be (T, H, W, 3) or (T, H, W), got {frames.shape}")
    return np.repeat(frames, 3, axis=-1) if frames.shape[-1] == 1 else frames


def _strip(frames: np.ndarray) -> str:
    idx = np.unique(np.linspace(0, len(frames) - 1, min(STRIP_FRAMES, len(frames))).round().astype(int))
    h, w = frames.shape[1:3]
    size = (max(1, round(w * FRAME_HEIGHT / h)), FRAME_HEIGHT)
    interp = cv2.INTER_AREA if h > FRAME_HEIGHT else cv2.INTER_NEAREST
    gap = np.full((FRAME_HEIGHT, 4, 3), 255, np.uint8)
    tiles = [cv2.resize(np.ascontiguousarray(frames[i]), size, interpolation=interp) for i in idx]
    strip = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(strip, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise RuntimeError("OpenCV could not encode a frame strip as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode()
