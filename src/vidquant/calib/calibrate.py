"""The calibration run: generate with the BF16 pipeline over calibration prompts and collect statistics.

Prompt i is generated with seed ``seed + i`` whatever the process that runs it, so one process and N
`torchrun` ranks (prompts dealt round-robin, statistics merged with collective ops) give identical
statistics. Each process saves its statistics atomically after every prompt; rerunning the same command
resumes after the last saved prompt, and refuses statistics made from another model, prompt set or
settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import __version__
from ..dist import deal
from ..dist import rank as dist_rank
from ..dist import world as dist_world
from ..models import adapter_for
from ..outputs import locked_output, locked_output_ranks
from ..progress import progress_bar
from . import histogram
from .collector import collecting
from .data import CalibData, ForwardLoop, generate, is_prompts, run_loop
from .prompts import default_prompts, prompt_set_hash
from .settings import CalibSettings
from .stats import FORMAT_VERSION, STATS_FILE, STATS_OWNED, CalibStats, InputStats, load_stats

logger = logging.getLogger(__name__)


def new_stats(
    model: Any, settings: CalibSettings, data_hash: str | None, device: torch.device,
    fingerprint: str | None = None, *, prompts: bool = True,
) -> CalibStats:
    """Empty statistics for every distinct target-Linear input of every expert of ``model``.

    ``data_hash``: the prompt set's hash (``prompts``) or the forward loop's batches' hash (None: unknown);
    ``fingerprint`` defaults to the adapter's fingerprint of the model's weights.
    """
    adapter = adapter_for(model)
    if settings.bins != 1 and any(adapter.timestep_range(e) is None for e in adapter.experts()):
        logger.info("this %s model has no timestep: one timestep bin instead of %d", adapter.family, settings.bins)
        settings = settings.model_copy(update={"bins": 1})
    edges = adapter.bin_edges(settings.bins)
    inputs, info = {}, {}
    for name in adapter.experts():
        linears = adapter.target_linears(name)
        if not linears:
            raise ValueError(f"expert '{name}' of this {adapter.family} model has no Linear to calibrate")
        observers = {}
        for group in adapter.input_groups(name):
            observers[group[0]] = InputStats.empty(
                group, linears[group[0]].in_features, settings.bins, settings.tail_keys, device
            )
        inputs[name] = observers
        info[name] = {
            "observers": {k: v.layers for k, v in observers.items()},
            "bin_edges": edges[name],
        }
    meta = {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "model_fingerprint": fingerprint or adapter.fingerprint(),
        "model_class": type(model).__name__,
        "model_family": adapter.family,
        "data_kind": "prompts" if prompts else "forward_loop",
        "prompt_set_hash": data_hash if prompts else None,
        "data_hash": data_hash,
        "settings": settings.model_dump(mode="json"),
        "experts": info,
        "prompts_done": 0,
    }
    return CalibStats(inputs, meta)


def _check_resumable(old: dict, new: dict, where: Path) -> None:
    for key in ("model_fingerprint", "prompt_set_hash", "settings", "world_size"):
        if old.get(key) != new.get(key):
            raise ValueError(
                f"{where}: these statistics were made with a different {key.replace('_', ' ')} "
                f"({old.get(key)} vs now {new.get(key)}); use another --out or delete it"
            )


def calibrate(
    model: Any,
    data: CalibData | None = None,
    settings: CalibSettings | None = None,
    out: str | Path | None = None,
    *,
    progress: bool = True,
) -> CalibStats:
    """Statistics of ``model``'s target-Linear inputs over ``data``, merged; saved to ``out`` when given.

    ``data``: calibration prompts for a video pipeline (default: the bundled set; resumes what ``out``
    holds, prompt by prompt), or a forward loop for any model (`data.run_loop`; run once, saved at the end).
    """
    adapter = adapter_for(model)
    settings = settings or CalibSettings()
    if data is None:
        if not adapter.is_pipeline:
            raise ValueError(f"calibrating a {type(model).__name__} needs a forward loop (a callable taking the "
                             "model, or an iterable of input batches)")
        data = default_prompts()
    if not is_prompts(data):
        return _calibrate_loop(model, data, settings, out)
    adapter.check_protocol(settings)
    adapter.check_calibration(settings)
    if len(data) < settings.num_prompts:
        raise ValueError(f"{settings.num_prompts} calibration prompts asked for, the prompt set has {len(data)}")
    prompts = list(data[: settings.num_prompts])
    if out is None:
        stats = new_stats(model, settings, prompt_set_hash(prompts), adapter.device())
        _run_prompts(model, stats, prompts, list(range(len(prompts))), settings, progress, save=None)
        _report_nonfinite(stats)
        return stats
    out = Path(out)
    rank, world = dist_rank(), dist_world()
    # one process holds the folder's lock; torchrun's ranks share it, each writing its own file
    with locked_output_ranks(out, STATS_OWNED, "statistics folder"):
        stats = _calibrate_rank(model, prompts, settings, out, rank, world, progress)
        if world > 1:
            stats = _all_reduce(stats)
            stats.meta["prompts_done"], stats.meta["world_size"] = len(prompts), 1
            if rank == 0:
                stats.save(out)
    _report_nonfinite(stats)
    return stats


def _calibrate_loop(model: Any, loop: ForwardLoop, settings: CalibSettings, out: str | Path | None) -> CalibStats:
    """Statistics over one run of a forward loop (no mid-loop resume: a loop cannot be restarted halfway)."""
    adapter = adapter_for(model)
    stats = new_stats(model, settings, None, adapter.device(), prompts=False)
    with collecting(stats, adapter):
        stats.meta["data_hash"] = run_loop(model, loop)
    if not any(int(obs.tokens.sum()) for observers in stats.inputs.values() for obs in observers.values()):
        raise ValueError("the forward loop never called the model's Linears: nothing was calibrated")
    if out is not None:
        with locked_output(out, STATS_OWNED, "statistics folder"):
            stats.save(out)
    _report_nonfinite(stats)
    return stats


def _calibrate_rank(pipe: Any, prompts: list[str], settings: CalibSettings, out: Path, rank: int, world: int,
                    progress: bool) -> CalibStats:
    """This process's share of the prompts (resuming its file in ``out``), statistics not yet merged."""
    adapter = adapter_for(pipe)
    device = adapter.device()
    stats = new_stats(pipe, settings, prompt_set_hash(prompts), device)
    stats.meta["world_size"] = world
    mine = deal(range(len(prompts)), rank, world)
    file = out / (STATS_FILE if world == 1 else f"rank{rank}-of-{world}.safetensors")
    if file.is_file():
        old = load_stats(file, device)
        _check_resumable(old.meta, stats.meta, file)
        stats = old
        logger.info("resuming %s: %d of %d prompts done", file, stats.meta["prompts_done"], len(mine))
    todo = mine[stats.meta["prompts_done"] :]
    _run_prompts(pipe, stats, prompts, todo, settings, progress and rank == 0,
                 save=lambda: stats.save(out, file.name), total=len(mine))
    return stats


def _run_prompts(pipe: Any, stats: CalibStats, prompts: list[str], todo: list[int], settings: CalibSettings,
                 progress: bool, save: Callable[[], None] | None, total: int | None = None) -> None:
    """Generate the prompts of ``todo`` with hooks collecting into ``stats``; ``save`` after each."""
    total = len(todo) if total is None else total
    pipe.set_progress_bar_config(disable=True)
    with progress_bar(progress) as bar, collecting(stats, adapter_for(pipe)):
        prompt_task = bar.add_task("prompts", total=total, completed=total - len(todo))
        step_task = bar.add_task("steps", total=settings.steps)
        for n, i in enumerate(todo):
            logger.info("(%d/%d) calibrating prompt %d: %s", total - len(todo) + n + 1, total, i, prompts[i][:80])
            bar.reset(step_task)
            generate(pipe, prompts[i], settings, seed=settings.seed_for(i), on_step=lambda: bar.advance(step_task))
            stats.meta["prompts_done"] += 1
            if save is not None:
                save()
            bar.advance(prompt_task)


def _all_reduce(stats: CalibStats) -> CalibStats:
    """Merge every rank's statistics into every rank's, exactly (sums, maxima, aligned histograms)."""
    for observers in stats.inputs.values():
        for obs in observers.values():
            dist.all_reduce(obs.absmax, dist.ReduceOp.MAX)
            for t in (obs.tokens, obs.token_absmax):
                dist.all_reduce(t, dist.ReduceOp.SUM)
            obs.tails = [_all_reduce_tail(h) for h in obs.tails]
    return stats


def _all_reduce_tail(h: histogram.TailHistogram) -> histogram.TailHistogram:
    """Gather every rank's histogram and merge them in rank order (exact, so every rank agrees)."""
    world = dist.get_world_size()
    gathered = []
    for key, tensor in histogram.state_dict(h).items():
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        gathered.append((key, parts))
    per_rank = [histogram.from_state_dict({key: parts[r] for key, parts in gathered}) for r in range(world)]
    merged = per_rank[0]
    for other in per_rank[1:]:
        merged = histogram.merge(merged, other)
    return merged


def _report_nonfinite(stats: CalibStats) -> None:
    for expert, observers in stats.inputs.items():
        for obs in observers.values():
            bad = obs.nonfinite
            if bad:
                logger.warning(
                    "%s %s: %d NaN/Inf activation values seen and excluded from the statistics",
                    expert,
                    ",".join(obs.layers),
                    bad,
                )
