"""The `evaluate` and `report` stages: two video folders (BF16 and quantized, one protocol) in, the comparison out.

Fidelity to the reference (PSNR, SSIM, latent error), the temporal scores of both (VBench's flickering formula,
motion-smoothness and subject-consistency proxies), the costs recorded at generation (weight bytes in each
folder's ``protocol.json``, peak memory and seconds per step in each sidecar), and VBench's five dimensions when
it is installed and asked for: a failing VBench costs its own rows only (a note says why). `Evaluation` is
what `report` draws (with the state's recipe, the statistics' activation tails and per-layer SQNR when
given); ``evaluation.json`` (`save` / `load_evaluation`) carries it between the two commands.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..outputs import check_output
from . import metrics
from .generate import check_pair, folder_info, load_frames, load_records
from .report import METRICS, REPORT, Metric, PromptResult, ReportData, write_report
from .tails import worst_tails
from .vbench import VBenchError, cached_vbench, run_vbench, vbench_status

logger = logging.getLogger(__name__)

EVALUATION = "evaluation.json"
REPORT_OWNED = (EVALUATION, REPORT, METRICS, "vbench")  # what an evaluation / report folder may hold
# metrics.TEMPORAL keys -> report names: the proxies must not pass for VBench's own dimensions
REPORT_NAME = {"temporal_flickering": "temporal_flickering", "motion_smoothness": "motion_smoothness_proxy",
               "subject_consistency": "subject_consistency_proxy", "identity_consistency": "identity_consistency"}


@dataclass
class Evaluation:
    """The comparison of two video folders: summary metrics, per-prompt rows, the protocol, notes."""

    bf16_dir: str
    quantized_dir: str
    metrics: list[Metric]
    prompts: list[PromptResult]
    protocol: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    recipe: str | None = None  # of the quantized folder's state, when it says

    def save(self, path: str | Path) -> Path:
        """Write the evaluation as JSON (atomically); frames stay in the video folders."""
        data = {
            "format": 1, "bf16_dir": self.bf16_dir, "quantized_dir": self.quantized_dir, "recipe": self.recipe,
            "protocol": self.protocol, "notes": self.notes,
            "metrics": [{"name": m.name, "bf16": m.bf16, "quantized": m.quantized, "group": m.group}
                        for m in self.metrics],
            "prompts": [{"prompt": p.prompt, "quantized": p.quantized, "bf16": p.bf16} for p in self.prompts],
        }
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, allow_nan=True))
        return path


def evaluate(bf16_dir: str | Path, quantized_dir: str | Path, *, vbench: bool = False,
             vbench_out: str | Path | None = None, vbench_bf16_out: str | Path | None = None) -> Evaluation:
    """Compare the quantized videos with their BF16 references (same prompts, same protocol, checked first).

    VBench scores go to ``vbench_out/{bf16,quantized}``; ``vbench_bf16_out`` puts the BF16 ones elsewhere (a sweep
    shares one folder among its cells), and BF16 scores of the same videos are reused (`cached_vbench`).
    """
    pairs = check_pair(bf16_dir, quantized_dir)
    rows = [metrics.compare_videos(ref, test) for ref, test in pairs]
    mean = metrics.summarize(rows)["mean"]
    table = [
        Metric("psnr", None, mean["psnr"]),
        Metric("ssim", None, mean["ssim"]),
        Metric("latent_rel_err", None, mean["latent_rel_error"]),
        Metric("identity_drift", None, mean["identity_drift"]),
        *[Metric(REPORT_NAME[n], mean[f"{n}_ref"], mean[f"{n}_test"]) for n in metrics.TEMPORAL],
    ]
    ref_info, test_info = (info.model if (info := folder_info(d)) else {} for d in (bf16_dir, quantized_dir))
    if "weight_bytes" in test_info and "bf16_weight_bytes" in ref_info:
        table.append(Metric("weight_bytes", ref_info["bf16_weight_bytes"], test_info["weight_bytes"], group="cost"))
    table += [
        Metric("peak_memory_bytes", _mean(r.peak_memory_bytes for r, _ in pairs),
               _mean(t.peak_memory_bytes for _, t in pairs), group="cost"),
        Metric("seconds_per_step", _mean(r.seconds_per_step for r, _ in pairs),
               _mean(t.seconds_per_step for _, t in pairs), group="cost"),
    ]
    notes = []
    if vbench:
        available, message = vbench_status()
        if not available:
            notes.append(message)
        else:
            out = Path(vbench_out) if vbench_out is not None else Path(quantized_dir).parent / "vbench"
            ref_out = Path(vbench_bf16_out) if vbench_bf16_out is not None else out / "bf16"
            try:
                table += _vbench_metrics(Path(bf16_dir), Path(quantized_dir), ref_out, out / "quantized")
            except (VBenchError, ValueError, OSError) as err:  # an optional scorer must not cost the evaluation
                logger.error("VBench failed, the evaluation goes without it: %s", err)
                notes.append(f"VBench failed, so its dimensions are missing: {err}")
    prompts = [
        PromptResult(
            prompt=ref.prompt,
            quantized={"ssim": row["ssim"], "psnr": row["psnr"], "identity_drift": row["identity_drift"],
                       **{REPORT_NAME[n]: row[f"{n}_test"] for n in metrics.TEMPORAL}},
            bf16={REPORT_NAME[n]: row[f"{n}_ref"] for n in metrics.TEMPORAL},
        )
        for (ref, _), row in zip(pairs, rows, strict=True)
    ]
    protocol = json.loads(pairs[0][0].paths["sidecar"].read_text())["protocol"]
    return Evaluation(str(bf16_dir), str(quantized_dir), table, prompts, protocol, notes, test_info.get("recipe"))


def load_evaluation(path: str | Path) -> Evaluation:
    """Read ``evaluation.json`` written by `Evaluation.save`, with an error naming the file and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return Evaluation(
            str(data["bf16_dir"]), str(data["quantized_dir"]),
            [Metric(m["name"], m["bf16"], m["quantized"], group=m["group"]) for m in data["metrics"]],
            [PromptResult(p["prompt"], dict(p["quantized"]), dict(p["bf16"])) for p in data["prompts"]],
            dict(data["protocol"]), list(data["notes"]), data.get("recipe"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such evaluation; run `vidquant evaluate` first") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a vidquant evaluation ({err!r})") from None


def report(evaluation: Evaluation, out: str | Path, *, state: Any = None, stats: Any = None,
           sqnr: list[dict] | None = None, model: str = "", state_path: str | None = None) -> Path:
    """The `report` stage: ``out/report.html`` and ``out/metrics.json`` from an evaluation (see `write_report`)."""
    out = check_output(out, REPORT_OWNED, "report folder")
    frames = frames_of(evaluation)
    prompts = [replace(p, bf16_frames=a, quantized_frames=b) for p, (a, b) in zip(evaluation.prompts, frames,
                                                                                  strict=True)]
    base = {} if state is None else state.base
    data = ReportData(
        metrics=evaluation.metrics,
        recipe=state.recipe if state is not None else (evaluation.recipe or ""),
        protocol=evaluation.protocol,
        model=model,
        model_fingerprint=base.get("stats_model_fingerprint") or base.get("config_sha256") or "",
        state_path=state_path,
        prompts=prompts,
        sqnr=list(sqnr or []),
        tails=worst_tails(stats) if stats is not None else [],
        notes=evaluation.notes,
        plan={} if state is None else state.plan,
        qat={} if state is None else state.qat,
    )
    return write_report(out, data)


def frames_of(evaluation: Evaluation) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
    """The (BF16, quantized) frames of each prompt, read from the folders (None where a video is gone)."""
    folders = [{r.index: r for r in load_records(d)} for d in (evaluation.bf16_dir, evaluation.quantized_dir)]
    out = []
    for i in range(len(evaluation.prompts)):
        pair = []
        for records in folders:
            record = records.get(i)
            ok = record is not None and record.paths["frames"].is_file()
            pair.append(load_frames(record) if ok else None)
        out.append((pair[0], pair[1]))
    return out


def _vbench_metrics(bf16_dir: Path, quantized_dir: Path, ref_out: Path, test_out: Path) -> list[Metric]:
    ref = cached_vbench(bf16_dir, ref_out)
    test = run_vbench(quantized_dir, test_out)
    return [Metric(dim, ref[dim]["mean"], test[dim]["mean"], group="vbench") for dim in ref]


def _mean(values) -> float:
    return float(np.mean(list(values)))
