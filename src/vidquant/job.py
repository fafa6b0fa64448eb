"""The main job: calibrate -> quantize -> generate BF16 and quantized -> evaluate -> report.

Each stage writes its artifact under ``out`` and reuses it when it is already there (statistics resume,
a state made by the same recipe is loaded, videos already generated under the same protocol are
skipped), so a rerun after an interruption continues where it stopped:

    out/stats/  out/state/  out/videos/bf16/  out/videos/quantized/  out/report/report.html
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .calib.calibrate import CalibSettings, calibrate
from .calib.layer_inputs import collect_layer_inputs
from .calib.stats import TOKEN_BUCKETS, TOKEN_MIN_EXP, CalibStats
from .eval import metrics
from .eval.generate import check_pair, generate_videos, load_frames
from .eval.probes import weight_bytes
from .eval.protocol import Protocol
from .eval.report import ActivationTail, Metric, PromptResult, ReportData, write_report
from .eval.vbench import VBenchError, check_vbench_paths, run_vbench, vbench_status
from .methods.fidelity import binned_sqnr
from .models import wan
from .outputs import locked_output
from .ptq import quantize
from .recipes import Recipe
from .state import PTQState, apply, load_state, quant_linear, remove_state, verify

logger = logging.getLogger(__name__)

# metrics.TEMPORAL keys -> report names: the proxies must not pass for VBench's own dimensions
REPORT_NAME = {"temporal_flickering": "temporal_flickering", "motion_smoothness": "motion_smoothness_proxy",
               "subject_consistency": "subject_consistency_proxy"}
HELD_OUT_SEED_OFFSET = 10_000  # fidelity inputs: seeds clear of the calibration prompts' seed + i
RUN_OWNED = ("stats", "state", "state.partial", "videos", "report", "vbench")  # what a run folder may hold


@dataclass
class Job:
    """What `run` needs besides the pipeline: prompts, protocol, calibration settings, where to write."""

    recipe: Recipe
    calib_prompts: list[str]
    eval_prompts: list[str]
    protocol: Protocol
    calib: CalibSettings
    out: Path
    model: str = "tiny"
    vbench: bool = True
    fidelity_prompts: int = 1  # held-out evaluation prompts whose layer inputs score per-layer SQNR (0: skip)


def run(pipe, job: Job, *, progress: bool = True) -> Path:
    """Run every stage (reusing artifacts whose inputs are unchanged); return the path of report.html."""
    use_vbench = job.vbench and vbench_status()[0]
    if use_vbench:
        check_vbench_paths(job.out / "videos" / "bf16", job.out / "vbench")  # before any long work
    with locked_output(job.out, RUN_OWNED, "vidquant run folder"):
        return _run(pipe, job, use_vbench, progress)


def _run(pipe, job: Job, use_vbench: bool, progress: bool) -> Path:
    _check_writable(job.out)
    stats = None
    if job.recipe.smoothing.statistic != "none" or job.recipe.method == "svdquant-gptq":
        stats = calibrate(pipe, job.calib_prompts, job.calib, job.out / "stats", progress=progress)
    state = _state(pipe, job, stats)
    model_source = stats.meta["model_fingerprint"] if stats is not None else wan.fingerprint(pipe)
    quantized_source = hashlib.sha256(f"{model_source}\n{state.fingerprint()}".encode()).hexdigest()
    sqnr = _fidelity(pipe, job, state) if job.fidelity_prompts else []
    bf16_bytes = weight_bytes(pipe)
    bf16 = generate_videos(pipe, job.eval_prompts, job.protocol, job.out / "videos" / "bf16", progress=progress,
                           source=model_source, replace_stale=True)
    apply(pipe, state)
    quant_bytes = weight_bytes(pipe)
    generate_videos(pipe, job.eval_prompts, job.protocol, job.out / "videos" / "quantized", progress=progress,
                    source=quantized_source, replace_stale=True)
    pairs = check_pair(job.out / "videos" / "bf16", job.out / "videos" / "quantized")
    rows = [metrics.compare_videos(ref, test) for ref, test in pairs]
    summary = metrics.summarize(rows)
    mean = summary["mean"]
    table = [
        Metric("psnr", None, mean["psnr"], unit="dB"),
        Metric("ssim", None, mean["ssim"]),
        Metric("latent_rel_err", None, mean["latent_rel_error"], higher_is_better=False),
        *[Metric(REPORT_NAME[n], mean[f"{n}_ref"], mean[f"{n}_test"]) for n in metrics.TEMPORAL],
        Metric("weight_bytes", bf16_bytes.bf16, quant_bytes.stored, group="cost", higher_is_better=False),
        Metric("peak_memory_bytes", _mean(r.peak_memory_bytes for r in bf16),
               _mean(test.peak_memory_bytes for _, test in pairs), group="cost", higher_is_better=False),
        Metric("seconds_per_step", _mean(r.seconds_per_step for r in bf16),
               _mean(test.seconds_per_step for _, test in pairs), group="cost", higher_is_better=False),
    ]
    notes = []
    if use_vbench:
        try:
            table += _vbench_metrics(job.out)
        except (VBenchError, ValueError, OSError) as err:  # an optional scorer must not cost the report
            logger.error("VBench failed, the report goes without it: %s", err)
            notes.append(f"VBench failed, so its dimensions are missing: {err}")
    elif job.vbench:
        notes.append(vbench_status()[1])
    prompts = [
        PromptResult(
            prompt=ref.prompt,
            quantized={"ssim": row["ssim"], "psnr": row["psnr"],
                       **{REPORT_NAME[n]: row[f"{n}_test"] for n in metrics.TEMPORAL}},
            bf16={REPORT_NAME[n]: row[f"{n}_ref"] for n in metrics.TEMPORAL},
            bf16_frames=load_frames(ref),
            quantized_frames=load_frames(test),
        )
        for (ref, test), row in zip(pairs, rows, strict=True)
    ]
    data = ReportData(
        metrics=table,
        recipe=job.recipe.to_dict(),
        protocol=job.protocol.model_dump(mode="json"),
        model=job.model,
        model_fingerprint=state.base.get("stats_model_fingerprint") or state.base["config_sha256"],
        state_path=str(job.out / "state"),
        library_version=__version__,
        prompts=prompts,
        sqnr=sqnr,
        tails=_worst_tails(stats) if stats is not None else [],
        notes=notes,
    )
    return write_report(job.out / "report", data)


def _check_writable(out: Path) -> None:
    """Fail before any long work when ``out`` cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(f"{out}: output folder is not writable ({err.strerror or err})") from err


def _state(pipe, job: Job, stats: CalibStats | None) -> PTQState:
    """The state in out/state when it was made by this recipe from these statistics for this model, else a new one."""
    path = job.out / "state"
    if (path / "manifest.json").is_file():
        state = load_state(path)
        stale = _stale(pipe, state, job.recipe, stats)
        if stale is None:
            logger.info("reusing the PTQ state in %s", path)
            return state
        logger.info("%s holds a state made from other inputs (%s): quantizing again", path, stale)
    partial = job.out / "state.partial"  # svdquant-gptq's finished layers, for a rerun after an interruption
    state = quantize(pipe, job.recipe, stats, prompts=job.calib_prompts, progress=True, checkpoint=partial)
    state.save(path)
    if partial.exists():
        remove_state(partial)
    return state


def _stale(pipe, state: PTQState, recipe: Recipe, stats: CalibStats | None) -> str | None:
    """Why ``state`` is not the one ``recipe`` makes from ``stats`` for ``pipe`` (None: it is)."""
    if state.recipe != recipe.to_dict():
        return "another recipe"
    if state.base.get("stats_fingerprint") != (None if stats is None else stats.fingerprint()):
        return "other calibration statistics"
    try:
        verify(pipe, state)
    except ValueError as err:
        return str(err)
    return None


def _fidelity(pipe, job: Job, state: PTQState) -> list[dict]:
    """Per-layer output SQNR of the state's quantized Linears on held-out inputs (before the state is applied).

    The inputs come from `Job.fidelity_prompts` held-out prompts (seeds clear of calibration's), one extra
    BF16 generation each, sampled per timestep bin so that per-bin clip ratios are scored where they apply.
    """
    n = job.fidelity_prompts
    settings = job.calib.model_copy(update={"num_prompts": n, "seed": job.calib.seed + HELD_OUT_SEED_OFFSET})
    experts = wan.experts(pipe)
    edges = state.timestep_bins or wan.expert_bin_edges(pipe, 1)
    groups = {expert: [g for group in wan.input_groups(model) if (g := [x for x in group if f"{expert}.{x}"
                                                                       in state.layers])]
              for expert, model in experts.items()}
    inputs = collect_layer_inputs(pipe, job.eval_prompts[:n], settings, groups, edges, max_tokens=256, hessians=False)
    rows = []
    for expert, records in inputs.items():
        for record in records.values():
            samples = record.bin_samples()
            for layer in record.layers:
                linear = experts[expert].get_submodule(layer)
                quantized = quant_linear(linear, state.layers[f"{expert}.{layer}"])
                rows.append({"expert": expert, "layer": layer, "sqnr_db": binned_sqnr(linear, quantized, samples)})
    order = {f"{e}.{n}": i for i, (e, m) in enumerate(experts.items()) for n in wan.target_linears(m)}
    return sorted(rows, key=lambda r: order[f"{r['expert']}.{r['layer']}"])


def _worst_tails(stats: CalibStats, count: int = 4) -> list[ActivationTail]:
    """The layer inputs whose max is furthest above their p99.9 (the tails percentile masks clip)."""
    scored = []
    for expert in stats.experts():
        for name, obs in stats.inputs[expert].items():
            absmax, p999 = stats.absmax(expert, name), stats.percentile(expert, name, 99.9)
            ratio = float((absmax / p999.clamp(min=1e-30)).max())
            scored.append((ratio, expert, name, absmax, p999, obs.token_absmax.sum((0, 1))))
    scored.sort(key=lambda t: -t[0])
    return [ActivationTail(layer=name, expert=expert, absmax=absmax.numpy(), percentile=p999.numpy(),
                           token_counts=counts.numpy(), token_edges=_token_edges())
            for _, expert, name, absmax, p999, counts in scored[:count]]


def _token_edges() -> np.ndarray:
    """Edges of the per-token absmax histogram of `calib.stats.token_buckets` (underflow and overflow open)."""
    inner = [2.0 ** (TOKEN_MIN_EXP + j // 4) * (1 + (j % 4) / 4) for j in range(TOKEN_BUCKETS - 2)]
    return np.array([0.0, *inner, 2.0 ** (TOKEN_MIN_EXP + (TOKEN_BUCKETS - 2) // 4), np.inf])


def _vbench_metrics(out: Path) -> list[Metric]:
    ref = run_vbench(out / "videos" / "bf16", out / "vbench" / "bf16")
    test = run_vbench(out / "videos" / "quantized", out / "vbench" / "quantized")
    return [Metric(dim, ref[dim]["mean"], test[dim]["mean"], group="vbench") for dim in ref]


def _mean(values) -> float:
    return float(np.mean(list(values)))
