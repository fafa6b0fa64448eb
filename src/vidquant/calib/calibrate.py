"""The calibration run: generate with the BF16 pipeline over calibration prompts and collect statistics.

Prompt i is generated with seed ``seed + i`` whatever the process that runs it, so one process and N
`torchrun` ranks (prompts dealt round-robin, statistics merged with collective ops) give identical
statistics. Each process saves its statistics atomically after every prompt; rerunning the same command
resumes after the last saved prompt, and refuses statistics made from another model, prompt set or
settings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import __version__
from ..eval.protocol import Protocol
from ..models import wan
from ..outputs import check_output, locked_output
from . import histogram
from .collector import collecting
from .prompts import prompt_set_hash
from .stats import FORMAT_VERSION, STATS_FILE, STATS_OWNED, TAIL_KEYS, CalibStats, InputStats, load_stats

logger = logging.getLogger(__name__)


class CalibSettings(Protocol):
    """The generation protocol of the calibration run, plus how much to run and how to key statistics."""

    num_prompts: int = Field(16, ge=1)
    bins: int = Field(4, ge=1)
    tail_keys: Literal[TAIL_KEYS] = "total"  # type: ignore[valid-type]


def new_stats(
    pipe, settings: CalibSettings, prompts: list[str], device: torch.device, fingerprint: str | None = None
) -> CalibStats:
    """Empty statistics for every distinct target-Linear input of every expert of ``pipe``.

    ``fingerprint`` defaults to `wan.fingerprint` of the pipeline's weights.
    """
    edges = wan.expert_bin_edges(pipe, settings.bins)
    inputs, info = {}, {}
    for name, model in wan.experts(pipe).items():
        linears = wan.target_linears(model)
        observers = {}
        for group in wan.input_groups(model):
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
        "model_fingerprint": fingerprint or wan.fingerprint(pipe),
        "model_class": type(pipe).__name__,
        "prompt_set_hash": prompt_set_hash(prompts),
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
    pipe, prompts: list[str], settings: CalibSettings, out: str | Path, *, progress: bool = True
) -> CalibStats:
    """Run calibration (resuming what ``out`` already holds) and return the merged statistics."""
    out = Path(out)
    if len(prompts) < settings.num_prompts:
        raise ValueError(f"{settings.num_prompts} calibration prompts asked for, the prompt set has {len(prompts)}")
    prompts = prompts[: settings.num_prompts]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    # one process holds the folder's lock; torchrun's ranks share it, each writing its own file
    guard = locked_output(out, STATS_OWNED, "statistics folder") if rank == 0 else _checked(out)
    with guard:
        if world > 1:
            dist.barrier()  # rank 0 has created the folder and removed stale temp files
        stats = _calibrate_rank(pipe, prompts, settings, out, rank, world, progress)
        if world > 1:
            stats = _all_reduce(stats)
            stats.meta["prompts_done"], stats.meta["world_size"] = len(prompts), 1
            if rank == 0:
                stats.save(out)
    _report_nonfinite(stats)
    return stats


@contextmanager
def _checked(out: Path) -> Iterator[Path]:
    yield check_output(out, STATS_OWNED, "statistics folder")


def _calibrate_rank(pipe, prompts: list[str], settings: CalibSettings, out: Path, rank: int, world: int,
                    progress: bool) -> CalibStats:
    """This process's share of the prompts (resuming its file in ``out``), statistics not yet merged."""
    device = next(wan.experts(pipe)["transformer"].parameters()).device
    stats = new_stats(pipe, settings, prompts, device)
    stats.meta["world_size"] = world
    mine = list(range(rank, len(prompts), world))
    file = out / (STATS_FILE if world == 1 else f"rank{rank}-of-{world}.safetensors")
    if file.is_file():
        old = load_stats(file, device)
        _check_resumable(old.meta, stats.meta, file)
        stats = old
        logger.info("resuming %s: %d of %d prompts done", file, stats.meta["prompts_done"], len(mine))

    pipe.set_progress_bar_config(disable=True)
    todo = mine[stats.meta["prompts_done"] :]
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not progress or rank != 0,
    )
    with bar, collecting(stats, wan.experts(pipe)):
        prompt_task = bar.add_task("prompts", total=len(mine), completed=len(mine) - len(todo))
        step_task = bar.add_task("steps", total=settings.steps)
        for i in todo:
            logger.info("(%d/%d) calibrating prompt %d: %s", mine.index(i) + 1, len(mine), i, prompts[i][:80])
            bar.reset(step_task)
            generate(pipe, prompts[i], settings, seed=settings.seed + i, on_step=lambda: bar.advance(step_task))
            stats.meta["prompts_done"] += 1
            stats.save(out, file.name)
            bar.advance(prompt_task)
    return stats
def generate(pipe, prompt: str, settings: CalibSettings, *, seed: int, on_step: Callable[[], None]) -> None:
    """One calibration generation: the settings' protocol, latents only (the VAE adds nothing here)."""

    def step_end(_pipe, _i, _t, callback_kwargs):
        on_step()
        return callback_kwargs

    pipe(**settings.call_kwargs(pipe, prompt, seed), output_type="latent", callback_on_step_end=step_end)


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
