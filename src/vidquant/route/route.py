"""Draft, gate, escalate: the routing run behind `vidquant route` (wiring only; the math is elsewhere).

Per prompt ``i`` (seed ``protocol.seed + i`` at every rung, so an escalation regenerates the same sample):

1. the prompt gate (`route.gate.PromptGate`, rules as data) decides; a critical prompt (a face, a logo, a
   recurring character...) goes straight to the policy's critical rung;
2. the others are drafted at the ladder's first rung (``mixed``: the policy's default + rules), and the draft's
   signal (no reference needed; `draft_scores`: `eval.identity.identity_consistency`, or VBench's DINO subject
   consistency with ``escalation.signal: vbench``) is compared with the threshold; below it the prompt is
   generated again at the next rung; the last rung is always accepted.

Each rung writes an ordinary video folder ``OUT/precisions/<rung>/`` (`generate_videos` with the prompt's own
index, so file names and seeds are those of the full list; a rerun skips what is there), and ``OUT/videos/``
holds the accepted video of every prompt (hard links, sidecar with the route), a video folder `vidquant
evaluate` reads. ``compare=True`` also makes the all-BF16 and all-draft references of every prompt, for quality
vs BF16 and the gate's precision/recall on these (held-out) prompts.

`calibrate_threshold` sets the threshold on calibration prompts: BF16 and draft of each, a draft is *bad* when
its `identity_drift` from BF16 is at least ``escalation.bad_drift`` (or its PSNR under ``bad_psnr_db``), and the
threshold on the draft's own score that best catches the bad ones (`choose_threshold`, F2: a missed bad draft
costs more than an extra escalation) is saved as JSON with the draft rung's source and reused.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import atomic_path
from ..calib.prompts import categorize, category_group
from ..eval.generate import PROTOCOL_FILE, VideoRecord, generate_videos, load_frames
from ..eval.identity import identity_consistency, identity_drift
from ..eval.metrics import psnr, ssim
from ..eval.protocol import Protocol
from ..eval.route_report import HTML_NAME, JSON_NAME, PSNR_CAP, write_route_report
from ..eval.vbench import cached_vbench, vbench_status
from .gate import PromptGate
from .policy import MIXED, Policy
from .switch import BF16, RoutedModel

logger = logging.getLogger(__name__)

PRECISIONS_DIR = "precisions"
VIDEOS_DIR = "videos"
GATE_JSON = "gate-calibration.json"
ROUTE_OWNED = (PRECISIONS_DIR, VIDEOS_DIR, "calibration", "vbench", JSON_NAME, HTML_NAME, GATE_JSON)
BETA = 2.0  # F-beta of the threshold choice: recall weighs 4x precision


@dataclass
class Attempt:
    """One generation of a prompt at one rung, and what the gate made of it."""

    rung: str
    reason: str
    video: str  # the mp4, relative to the routing folder
    seconds: float  # denoising seconds (text encoding included, VAE decode not: the sidecar's step times)
    peak_memory_bytes: int
    score: float | None = None  # identity_consistency of the video, when the draft gate judged it
    accepted: bool = False


@dataclass
class PromptRoute:
    """Where one prompt went and why."""

    index: int
    prompt: str
    category: str
    group: str
    critical: bool
    gate_categories: list[str]
    gate_matched: list[str]
    attempts: list[Attempt] = field(default_factory=list)
    quality: dict[str, float] = field(default_factory=dict)  # vs the all-BF16 video (compare runs)

    @property
    def final(self) -> Attempt:
        return next(a for a in self.attempts if a.accepted)


def rung_source(routed: RoutedModel, policy: Policy, rung: str) -> str:
    """Fingerprint of what makes ``rung``'s videos: base, states, and for the mix its rules."""
    return routed.source(f"{MIXED}:{policy.mix_fingerprint()}" if rung == MIXED else rung)


class Router:
    """A routed model under a policy and protocol, generating into one routing folder."""

    def __init__(self, routed: RoutedModel, policy: Policy, protocol: Protocol, out: str | Path,
                 progress: bool = True) -> None:
        self.routed, self.policy, self.protocol, self.out = routed, policy, protocol, Path(out)
        self.progress = progress
        self._plan = policy.plan(routed) if MIXED in (*policy.escalation.ladder, policy.escalation.critical_rung) \
            else None

    def source(self, rung: str) -> str:
        return rung_source(self.routed, self.policy, rung)

    def select(self, rung: str) -> None:
        """Switch the routed model to ``rung`` (a precision, or the policy's mix)."""
        if rung == MIXED:
            if self._plan is None:
                self._plan = self.policy.plan(self.routed)
            self.routed.route(self._plan)
        else:
            self.routed.use(rung)
        self.routed.begin(self.protocol.steps)

    def generate(self, rung: str, prompts: list[str], indices: list[int] | None = None) -> dict[int, VideoRecord]:
        """Videos of ``prompts`` (only ``indices``; None: all) at ``rung`` in ``precisions/<rung>/`` (resumed)."""
        if indices is not None and not indices:
            return {}
        self.select(rung)
        info = {"family": self.routed.adapter.family, "precision": rung, "policy": self.policy.name}
        records = generate_videos(self.routed.model, prompts, self.protocol, self.out / PRECISIONS_DIR / rung,
                                  progress=self.progress, source=self.source(rung), model_info=info, indices=indices)
        return {r.index: r for r in records}


def route_prompts(routed: RoutedModel, policy: Policy, prompts: list[str], protocol: Protocol, out: str | Path, *,
                  gate: PromptGate, threshold: float | None, compare: bool = False,
                  categories: dict[str, str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Route every prompt (module docstring); write ``videos/`` and the routing report, and return its data."""
    if not prompts:
        raise ValueError("no prompts to route")
    check_signal(policy)
    router = Router(routed, policy, protocol, out, progress)
    ladder, critical_rung = policy.escalation.ladder, policy.escalation.critical_rung
    kinds = categorize(prompts, categories)
    routes = []
    for i, prompt in enumerate(prompts):
        decision = gate.decide(prompt)
        routes.append(PromptRoute(i, prompt, kinds[i], category_group(kinds[i]), bool(decision.critical),
                                  list(decision.categories), list(decision.matched)))
    made: dict[tuple[int, str], VideoRecord] = {}  # (prompt, rung) -> its video
    critical = [r.index for r in routes if r.critical]
    for index, record in router.generate(critical_rung, prompts, critical).items():
        made[index, critical_rung] = record
        routes[index].attempts.append(_attempt(record, critical_rung, "prompt gate: critical", out, accepted=True))
    pending = [r.index for r in routes if not r.critical]
    for level, rung in enumerate(ladder):
        records = router.generate(rung, prompts, pending)
        last = level == len(ladder) - 1
        rejected = []
        signal = policy.escalation.signal
        scores = draft_scores(records, signal, Path(out)) if not last and threshold is not None else {}
        for index in pending:
            reason = "draft" if level == 0 else f"escalation {level}"
            attempt = _attempt(records[index], rung, reason, out)
            made[index, rung] = records[index]
            if index in scores:
                attempt.score = scores[index]
                attempt.accepted = attempt.score >= threshold
                attempt.reason += f": {signal} {attempt.score:.3f} {'>=' if attempt.accepted else '<'} {threshold:.3f}"
            else:
                attempt.accepted = True
                attempt.reason += ": last rung" if last else ": no threshold"
            routes[index].attempts.append(attempt)
            if not attempt.accepted:
                rejected.append(index)
        pending = rejected
        if not pending:
            break
    _publish(Path(out), routes, made, protocol, router, policy)
    costs = {}
    if compare:
        references = {rung: router.generate(rung, prompts) for rung in dict.fromkeys((BF16, ladder[0]))}
        _quality(routes, references, made, policy)
        for rung, records in references.items():
            attempts = [_attempt(r, rung, "reference", out) for r in records.values()]
            costs[rung] = {"seconds_per_clip": float(np.mean([a.seconds for a in attempts])),
                           "peak_memory_bytes_per_clip": float(np.mean([a.peak_memory_bytes for a in attempts]))}
    summary = route_summary(routes, policy, threshold, protocol, routed, compare, ladder[0])
    summary["reference_costs"] = costs
    write_route_report(out, summary)
    return summary


def check_signal(policy: Policy) -> None:
    """Refuse, before any video is made, a draft gate on VBench where VBench is not installed."""
    if policy.escalation.signal == "vbench" and not vbench_status()[0]:
        raise ValueError(f"escalation.signal: vbench needs the optional VBench environment. {vbench_status()[1]}")


def draft_scores(records: dict[int, VideoRecord], signal: str, out: Path) -> dict[int, float]:
    """Each video's draft-gate score in [0, 1] (higher: the subject kept its identity), by prompt index.

    "identity": `identity_consistency` of the video alone. "vbench": VBench's subject consistency (DINO features,
    the dimension the HiF4 paper saw fall 0.93 -> 0.53 under W4A4), one VBench call per video folder, scores kept
    in ``out/vbench/<folder>/`` and reused while the folder's videos are the same (`cached_vbench`).
    """
    if signal == "identity":
        return {i: identity_consistency(load_frames(r)) for i, r in records.items()}
    scored: dict[int, float] = {}
    for folder in sorted({r.paths["mp4"].parent for r in records.values()}):
        per_video = cached_vbench(folder, out / "vbench" / folder.name, ["subject_consistency"])
        per_video = per_video["subject_consistency"]["per_video"]
        for i, r in records.items():
            if r.paths["mp4"].parent == folder:
                if r.paths["mp4"].name not in per_video:
                    raise ValueError(f"VBench returned no subject consistency for {r.paths['mp4']}")
                scored[i] = float(per_video[r.paths["mp4"].name])
    return scored


def _attempt(record: VideoRecord, rung: str, reason: str, out: str | Path, accepted: bool = False) -> Attempt:
    sidecar = json.loads(record.paths["sidecar"].read_text())
    seconds = float(sum(sidecar.get("step_seconds", [])) or record.seconds_per_step)
    return Attempt(rung, reason, str(record.paths["mp4"].relative_to(out)), seconds, record.peak_memory_bytes,
                   accepted=accepted)


def _publish(out: Path, routes: list[PromptRoute], made: dict[tuple[int, str], VideoRecord], protocol: Protocol,
             router: Router, policy: Policy) -> None:
    """``videos/``: each prompt's accepted video (hard links, else copies) and a sidecar that adds its route."""
    videos = out / VIDEOS_DIR
    videos.mkdir(parents=True, exist_ok=True)
    with atomic_path(videos / PROTOCOL_FILE) as tmp:
        tmp.write_text(json.dumps({"fingerprint": protocol.fingerprint(), "protocol": protocol.model_dump(mode="json"),
                                   "source": router.source(f"policy:{policy.fingerprint()}"),
                                   "model": {"family": router.routed.adapter.family, "policy": policy.name}},
                                  indent=2) + "\n")
    for route in routes:
        final = route.final
        record = made[route.index, final.rung]
        for key, path in record.paths.items():
            if key != "sidecar":
                _link(path, videos / path.name)
        sidecar = json.loads(record.paths["sidecar"].read_text())  # last: a sidecar means a complete video
        sidecar["route"] = {"rung": final.rung, "reason": final.reason, "path": [a.rung for a in route.attempts]}
        with atomic_path(videos / record.paths["sidecar"].name) as tmp:
            tmp.write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")


def _link(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")  # the temp-name pattern `outputs.remove_temp_files` knows
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)


def _quality(routes: list[PromptRoute], references: dict[str, dict[int, VideoRecord]],
             made: dict[tuple[int, str], VideoRecord], policy: Policy) -> None:
    bf16, drafts = references[BF16], references[policy.escalation.ladder[0]]
    for route in routes:
        ref = load_frames(bf16[route.index])
        final = load_frames(made[route.index, route.final.rung])
        draft = load_frames(drafts[route.index])
        route.quality = {
            "psnr": _finite(psnr(ref, final)), "ssim": ssim(ref, final), "identity_drift": identity_drift(ref, final),
            "draft_psnr": _finite(psnr(ref, draft)), "draft_ssim": ssim(ref, draft),
            "draft_identity_drift": identity_drift(ref, draft),
        }
        route.quality["draft_bad"] = float(_is_bad(route.quality["draft_identity_drift"],
                                                   route.quality["draft_psnr"], policy))




def _finite(value: float) -> float:
    return min(value, PSNR_CAP)


def _is_bad(drift: float, psnr_db: float, policy: Policy) -> bool:
    esc = policy.escalation
    return drift >= esc.bad_drift or (esc.bad_psnr_db is not None and psnr_db < esc.bad_psnr_db)


def choose_threshold(scores: list[float], bad: list[bool], beta: float = BETA) -> dict[str, Any]:
    """The threshold ``t`` on draft scores (flag a draft when its score < t) with the best F-beta at catching
    the ``bad`` drafts; ties: the lowest ``t`` (fewest escalations). No bad draft: t = 0 (never flag).

    Returns threshold, precision, recall (None where undefined), flagged and bad counts.
    """
    if len(scores) != len(bad) or not scores:
        raise ValueError(f"need one bad/good label per score, got {len(scores)} scores and {len(bad)} labels")
    if any(not math.isfinite(s) for s in scores):
        raise ValueError("draft scores must be finite")
    s, b = np.asarray(scores, dtype=np.float64), np.asarray(bad, dtype=bool)
    best = _rates(s, b, 0.0)
    if b.any():
        candidates = sorted({*s.tolist(), float(np.nextafter(s.max(), np.inf))})
        best_f = -1.0
        for t in candidates:
            rates = _rates(s, b, t)
            p, r = rates["precision"] or 0.0, rates["recall"] or 0.0
            f = 0.0 if p + r == 0 else (1 + beta**2) * p * r / (beta**2 * p + r)
            if f > best_f + 1e-12:
                best, best_f = rates, f
    return best


def _rates(s: np.ndarray, b: np.ndarray, t: float) -> dict[str, Any]:
    flagged = s < t
    caught = int((flagged & b).sum())
    return {"threshold": float(t), "flagged": int(flagged.sum()), "bad": int(b.sum()), "caught": caught,
            "precision": caught / int(flagged.sum()) if flagged.any() else None,
            "recall": caught / int(b.sum()) if b.any() else None}


def calibrate_threshold(routed: RoutedModel, policy: Policy, prompts: list[str], protocol: Protocol,
                        out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Fit the draft gate's threshold on ``prompts`` against BF16 (module docstring); write `GATE_JSON` in ``out``."""
    if not prompts:
        raise ValueError("no calibration prompts")
    check_signal(policy)
    router = Router(routed, policy, protocol, out, progress)
    draft_rung = policy.escalation.ladder[0]
    bf16 = router.generate(BF16, prompts)
    drafts = router.generate(draft_rung, prompts)
    scores = draft_scores(drafts, policy.escalation.signal, Path(out))
    rows = []
    for i, prompt in enumerate(prompts):
        ref, draft = load_frames(bf16[i]), load_frames(drafts[i])
        row = {"index": i, "prompt": prompt, "score": scores[i],
               "drift": identity_drift(ref, draft), "psnr": _finite(psnr(ref, draft))}
        row["bad"] = _is_bad(row["drift"], row["psnr"], policy)
        rows.append(row)
    chosen = choose_threshold([r["score"] for r in rows], [r["bad"] for r in rows])
    result = {"kind": "vidquant.gate-calibration", "vidquant_version": __version__, "policy": policy.name,
              "draft_rung": draft_rung, "draft_source": router.source(draft_rung),
              "protocol_fingerprint": protocol.fingerprint(), "signal": policy.escalation.signal,
              "bad_drift": policy.escalation.bad_drift,
              "bad_psnr_db": policy.escalation.bad_psnr_db, "beta": BETA, **chosen, "rows": rows}
    with atomic_path(Path(out) / GATE_JSON) as tmp:
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    logger.info("draft gate: threshold %.4f (precision %s, recall %s on %d calibration prompts, %d bad)",
                chosen["threshold"], chosen["precision"], chosen["recall"], len(rows), chosen["bad"])
    return result


def load_threshold(path: str | Path, routed: RoutedModel, policy: Policy, protocol: Protocol | None = None) -> float:
    """The threshold a `calibrate_threshold` file holds, refused when its draft rung was another model or state
    (a warning when it was calibrated under another protocol: scores move with size and steps)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable gate calibration ({err})") from None
    if not isinstance(data, dict) or data.get("kind") != "vidquant.gate-calibration":
        raise ValueError(f"{path}: not a gate calibration (write one with `vidquant route --calibrate-gate`)")
    threshold = data.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"{path}: threshold must be a number in [0, 1], got {threshold!r}")
    draft = policy.escalation.ladder[0]
    if data.get("draft_rung") != draft or data.get("draft_source") != rung_source(routed, policy, draft):
        raise ValueError(f"{path}: calibrated for another draft (rung {data.get('draft_rung')!r}, or another model, "
                         f"state or mix); calibrate again for rung '{draft}' of policy '{policy.name}'")
    if protocol is not None and data.get("protocol_fingerprint") != protocol.fingerprint():
        logger.warning("%s: the threshold was calibrated under another protocol than %s", path, protocol.model_dump())
    return float(threshold)


def route_summary(routes: list[PromptRoute], policy: Policy, threshold: float | None, protocol: Protocol,
                  routed: RoutedModel, compare: bool, draft_rung: str) -> dict[str, Any]:
    """Totals, per category, the gate's precision/recall on these prompts (compare runs) and every prompt's route."""
    n = len(routes)
    drafts = [a for r in routes for a in r.attempts if a.score is not None]
    seconds = sum(a.seconds for r in routes for a in r.attempts)
    peaks = [max(a.peak_memory_bytes for a in r.attempts) for r in routes]
    totals: dict[str, Any] = {
        "prompts": n,
        "critical": sum(r.critical for r in routes),
        "fallback_rate": sum(r.final.rung != draft_rung for r in routes) / n,
        "rejection_rate": (sum(not a.accepted for a in drafts) / len(drafts)) if drafts else None,
        "drafts_judged": len(drafts),
        "generations": sum(len(r.attempts) for r in routes),
        "seconds_per_accepted_clip": seconds / n,
        "peak_memory_bytes_per_accepted_clip": float(np.mean(peaks)),
        "peak_memory_bytes_max": max(peaks),
        "final_rungs": _count(r.final.rung for r in routes),
    }
    if compare:
        for key in ("psnr", "ssim", "identity_drift", "draft_psnr", "draft_ssim", "draft_identity_drift"):
            totals[key] = float(np.mean([r.quality[key] for r in routes]))
        quantized = [r.quality["psnr"] for r in routes if r.final.rung != BF16]  # the mean above caps BF16 at 100
        totals["psnr_served_quantized"] = float(np.mean(quantized)) if quantized else None
        judged = [r for r in routes if not r.critical and r.attempts[0].score is not None]
        if judged:
            totals["gate_held_out"] = _rates(np.array([r.attempts[0].score for r in judged]),
                                             np.array([bool(r.quality["draft_bad"]) for r in judged]),
                                             threshold if threshold is not None else 0.0)
    groups: dict[str, list[PromptRoute]] = {}
    for r in routes:
        groups.setdefault(r.category, []).append(r)
    per_category = {}
    for category, members in sorted(groups.items()):
        row: dict[str, Any] = {"group": category_group(category), "prompts": len(members),
                               "critical": sum(m.critical for m in members),
                               "fallback_rate": sum(m.final.rung != draft_rung for m in members) / len(members),
                               "seconds_per_clip": sum(a.seconds for m in members for a in m.attempts) / len(members)}
        if compare:
            row["psnr"] = float(np.mean([m.quality["psnr"] for m in members]))
            row["draft_psnr"] = float(np.mean([m.quality["draft_psnr"] for m in members]))
        per_category[category] = row
    costs = {name: asdict(routed.cost(name)) for name in routed.precisions}
    return {"kind": "vidquant.route", "vidquant_version": __version__, "policy": policy.model_dump(mode="json"),
            "policy_fingerprint": policy.fingerprint(), "threshold": threshold,
            "protocol": protocol.model_dump(mode="json"), "draft_rung": draft_rung, "compare": compare,
            "precision_costs": costs, "totals": totals, "per_category": per_category,
            "prompts": [{**asdict(r), "final": r.final.rung} for r in routes]}


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


