"""The main job: calibrate -> quantize -> generate BF16 and quantized -> evaluate -> report, composed.

Each stage is one function (and one CLI command); this module only chains them over one output folder and
reuses an artifact when its inputs are unchanged (statistics resume, a state made by the same recipe from the
same statistics for the same model is loaded, videos of the same source and protocol are skipped), so a rerun
after an interruption continues where it stopped:

    out/stats/  out/state/  out/videos/bf16/  out/videos/quantized/  out/report/report.html
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import dist
from .calib.calibrate import CalibSettings, calibrate
from .calib.stats import CalibStats
from .eval.evaluate import EVALUATION, evaluate, report
from .eval.fidelity import state_fidelity
from .eval.generate import generate
from .eval.protocol import Protocol
from .eval.vbench import check_vbench_paths, vbench_status
from .models import adapter_for
from .outputs import locked_output_ranks
from .ptq import method_class, quantize_into
from .recipes import Recipe
from .state import PTQState, load_state, verify

logger = logging.getLogger(__name__)

RUN_OWNED = ("stats", "state", "videos", "report", "vbench")  # what a run folder may hold


@dataclass
class Job:
    """What `run` needs besides the model: prompts, protocol, calibration settings, where to write."""

    recipe: Recipe
    calib_prompts: list[str]
    eval_prompts: list[str]
    protocol: Protocol
    calib: CalibSettings
    out: Path
    model: str = "tiny"
    vbench: bool = True
    fidelity_prompts: int = 1  # held-out evaluation prompts whose layer inputs score per-layer SQNR (0: skip)


def run(model: Any, job: Job, *, progress: bool = True) -> Path:
    """Run every stage (reusing artifacts whose inputs are unchanged); return the path of report.html."""
    adapter = adapter_for(model)
    adapter.check_protocol(job.protocol)  # everything checkable is checked before any long work
    adapter.check_protocol(job.calib)
    if job.vbench and vbench_status()[0]:
        check_vbench_paths(job.out / "videos" / "bf16", job.out / "vbench")
    with locked_output_ranks(job.out, RUN_OWNED, "vidquant run folder"):
        _check_writable(job.out)
        stats = None
        if method_class(job.recipe.method)().needs_stats(job.recipe):
            stats = calibrate(model, job.calib_prompts, job.calib, job.out / "stats", progress=progress)
        state = state_in(model, job.recipe, stats, job.out / "state", job.calib_prompts)
        n = job.fidelity_prompts
        # rank 0 alone scores the layers and reports; under torchrun every rank generates its share of the videos
        sqnr = state_fidelity(model, state, job.eval_prompts[:n], job.calib) if n and dist.is_main() else []
        base = stats.meta["model_fingerprint"] if stats is not None else adapter.fingerprint()
        videos = job.out / "videos"
        generate(model, job.eval_prompts, job.protocol, videos / "bf16", model_fingerprint=base, progress=progress,
                 replace_stale=True)
        generate(model, job.eval_prompts, job.protocol, videos / "quantized", state=state, model_fingerprint=base,
                 progress=progress, replace_stale=True)

        def evaluate_and_report() -> str:
            evaluation = evaluate(videos / "bf16", videos / "quantized", vbench=job.vbench,
                                  vbench_out=job.out / "vbench")
            (job.out / "report").mkdir(exist_ok=True)
            evaluation.save(job.out / "report" / EVALUATION)
            return str(report(evaluation, job.out / "report", state=state, stats=stats, sqnr=sqnr, model=job.model,
                              state_path=str(job.out / "state")))

        return Path(dist.on_main(evaluate_and_report))


def _check_writable(out: Path) -> None:
    """Fail before any long work when ``out`` cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(f"{out}: output folder is not writable ({err.strerror or err})") from err


def state_in(model: Any, recipe: Recipe, stats: CalibStats | None, path: Path, calib_prompts: list[str]) -> PTQState:
    """The state in ``path`` when ``recipe`` made it from ``stats`` for ``model``, else a new one saved there (the
    quantize stage with reuse, shared by `run` and `vidquant sweep`); ``model`` is not changed. Under torchrun
    it is reused only when every rank finds it current, and every rank returns the same state (`ptq.quantize_into`)."""
    found = load_state(path) if (path / "manifest.json").is_file() else None
    stale = "none saved" if found is None else _stale(model, found, recipe, stats)
    if all(s is None for s in dist.all_gather(stale)):  # every rank agrees before any rank rewrites it
        logger.info("reusing the PTQ state in %s", path)
        return found
    if found is not None:
        logger.info("%s holds a state made from other inputs (%s): quantizing again", path, stale)
    # svdquant-gptq's finished layers are kept in the state's checkpoint for a rerun after an interruption
    return quantize_into(model, recipe, stats, path, prompts=calib_prompts, progress=True)


def _stale(model: Any, state: PTQState, recipe: Recipe, stats: CalibStats | None) -> str | None:
    """Why ``state`` is not the one ``recipe`` makes from ``stats`` for ``model`` (None: it is)."""
    if state.recipe != recipe.to_dict():
        return "another recipe"
    if state.base.get("stats_fingerprint") != (None if stats is None else stats.fingerprint()):
        return "other calibration statistics"
    try:
        verify(model, state)
    except ValueError as err:
        return str(err)
    return None
