"""The BF16 teacher's own denoising trajectories: expert calls and the teacher's outputs, for distillation (QAT).

`record_trajectories` runs the unquantized model on prompts under the calibration protocol (steps, size, CFG,
per-prompt seeds ``settings.seed_for(seed_offset + i)``) and keeps, per expert and per timestep bin, a seeded
bottom-k sample of that expert's calls: the call's inputs (latents, timestep, text context, ...; detached on the
CPU, as `capture.ExpertCall` replays them) and the teacher's output tensor. Sampling per bin means every bin of
the schedule is trained, whatever the step count; the same run keeps the same calls.

Memory: a reservoir of ``per_bin`` calls per (expert, bin) in CPU memory, not every call on disk. A call is the
expert's *inputs* (a Wan2.2 A14B call at 720p x 81 frames: latents 16 x 21 x 90 x 160 = 4.8 M values, 19 MB in
fp32, plus a 512 x 4096 text context, 4 MB in BF16) and its output (the latents' shape, 19 MB): ~42 MB, so the
default 4 calls x 4 bins x 2 experts hold ~1.4 GB. The ~75k x 5120 hidden states inside the blocks are never
stored: the student recomputes them. `save_trajectories` / `load_trajectories` write the kept calls to one
safetensors file (structure in its JSON metadata, nothing pickled), so a resumed fine-tune skips the teacher.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..atomic import atomic_path
from ..models import CallInfo, adapter_for, timestep_bin
from ..progress import progress_bar
from ..safeio import read_safetensors
from .capture import ExpertCall, _recording, _to, first_tensor
from .data import generate
from .settings import CalibSettings

logger = logging.getLogger(__name__)

FORMAT = "vidquant-trajectories-1"


@dataclass
class Trajectory:
    """One expert call of the teacher: its inputs (replayable), the teacher's output, and its timestep bin."""

    call: ExpertCall
    target: Tensor
    bin: int


def call_bin(info: CallInfo, edges: list[float]) -> int:
    """The timestep bin of a call (0 for a model without timesteps)."""
    return 0 if info.timestep is None else timestep_bin(info.timestep, edges)


def record_trajectories(
    model: Any,
    prompts: list[str],
    settings: CalibSettings,
    edges: dict[str, list[float]],
    per_bin: int = 4,
    seed_offset: int = 0,
    progress: bool = False,
) -> dict[str, list[Trajectory]]:
    """Per expert, up to ``per_bin`` teacher calls of every timestep bin (``edges[expert]``), in call order.

    ``model`` is a pipeline, unquantized (the teacher). ``seed_offset`` 0 replays the calibration generations
    themselves; a held-out set uses `eval.fidelity.HELD_OUT_SEED_OFFSET`. Raises naming the expert and bin when
    a bin got no call (too few steps for the bins).
    """
    if per_bin < 1:
        raise ValueError(f"per_bin must be >= 1, got {per_bin}")
    if not prompts:
        raise ValueError("record_trajectories needs at least one prompt")
    adapter = adapter_for(model)
    experts = adapter.experts()
    if missing := sorted(set(experts) - set(edges)):
        raise ValueError(f"no timestep bins for expert(s) {', '.join(missing)}")
    generator = torch.Generator().manual_seed(settings.seed + seed_offset + 7919)
    kept: dict[tuple[str, int], list[tuple[float, int, Trajectory]]] = {}
    counter = [0]
    pending: dict[str, tuple[CallInfo, tuple, dict]] = {}

    def record(expert: str, info: CallInfo, args: tuple, kwargs: dict) -> None:
        pending[expert] = (info, args, kwargs)

    def on_output(module: nn.Module, _args: tuple, _kwargs: dict, output: Any, expert: str = "") -> None:
        info, args, kwargs = pending.pop(expert)
        key = float(torch.rand((), generator=generator, dtype=torch.float64))
        counter[0] += 1
        b = call_bin(info, edges[expert])
        calls = kept.setdefault((expert, b), [])
        if len(calls) < per_bin or key < calls[-1][0]:
            target = first_tensor(output).detach().to("cpu", copy=True)
            calls.append((key, counter[0], Trajectory(ExpertCall(info, _to(args, "cpu"), _to(kwargs, "cpu")),
                                                      target, b)))
            calls.sort(key=lambda c: c[0])
            del calls[per_bin:]

    handles = [module.register_forward_hook(lambda m, a, k, o, name=name: on_output(m, a, k, o, name),
                                            with_kwargs=True)
               for name, module in experts.items()]
    try:
        model.set_progress_bar_config(disable=True)
        with torch.no_grad(), _recording(adapter, record), progress_bar(progress) as bar:
            task = bar.add_task("teacher trajectories", total=len(prompts))
            for i, prompt in enumerate(prompts):
                logger.info("teacher trajectories, prompt %d/%d: %s", i + 1, len(prompts), prompt[:80])
                generate(model, prompt, settings, seed=settings.seed_for(seed_offset + i))
                bar.advance(task)
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, list[Trajectory]] = {}
    for expert in experts:
        bins = len(edges[expert]) - 1
        if empty := [b for b in range(bins) if not kept.get((expert, b))]:
            raise ValueError(f"expert {expert}: no call fell into timestep bin(s) {empty} of {bins} "
                             f"({settings.steps} steps): use more steps or fewer bins")
        chosen = [c for b in range(bins) for c in kept[(expert, b)]]
        out[expert] = [t for _, _, t in sorted(chosen, key=lambda c: c[1])]
    return out


def save_trajectories(path: str | Path, trajectories: dict[str, list[Trajectory]], info: dict[str, Any]) -> Path:
    """Write ``trajectories`` to one safetensors file (written under a temporary name, then renamed).

    ``info`` (JSON-ready: what they were made from) goes into the metadata and comes back from `load_trajectories`.
    Call arguments may be tensors, None, bools, numbers, strings, and lists / tuples / dicts of those.
    """
    tensors: dict[str, Tensor] = {}
    layout = []
    for expert, items in trajectories.items():
        for i, t in enumerate(items):
            prefix = f"{expert}.{i}"
            tensors[f"{prefix}.target"] = t.target.contiguous()
            layout.append({
                "expert": expert, "bin": t.bin,
                "info": {"timestep": t.call.info.timestep, "branch": t.call.info.branch,
                         "repeat": t.call.info.repeat},
                "args": _encode(t.call.args, f"{prefix}.args", tensors),
                "kwargs": _encode(t.call.kwargs, f"{prefix}.kwargs", tensors),
            })
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT, "layout": json.dumps(layout), "info": json.dumps(info)})
    return path


def load_trajectories(path: str | Path) -> tuple[dict[str, list[Trajectory]], dict[str, Any]]:
    """The trajectories and ``info`` `save_trajectories` wrote; a file of anything else is refused by name."""
    tensors, meta = read_safetensors(path, None, what="teacher trajectories")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a trajectories file of this vidquant (format {meta.get('format')!r})")
    try:
        layout, info = json.loads(meta["layout"]), json.loads(meta["info"])
        out: dict[str, list[Trajectory]] = {}
        for i, entry in enumerate(layout):
            expert = entry["expert"]
            index = sum(1 for e in layout[:i] if e["expert"] == expert)
            branch = entry["info"]["branch"]
            call_info = CallInfo(entry["info"]["timestep"], tuple(branch) if isinstance(branch, list) else branch,
                                 entry["info"]["repeat"])
            call = ExpertCall(call_info, tuple(_decode(entry["args"], tensors)), _decode(entry["kwargs"], tensors))
            out.setdefault(expert, []).append(Trajectory(call, tensors[f"{expert}.{index}.target"], int(entry["bin"])))
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: malformed trajectories file ({type(err).__name__}: {err})") from None
    return out, info


def count_per_bin(trajectories: list[Trajectory], bins: int) -> list[int]:
    """How many of ``trajectories`` fall into each bin."""
    counts = [0] * bins
    for t in trajectories:
        counts[t.bin] += 1
    return counts


def _encode(value: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, Tensor):
        tensors[key] = value.detach().contiguous()
        return {"tensor": key}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{key}: a non-finite float argument cannot be stored")
        return value
    if isinstance(value, tuple | list):
        return {"list": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}}
    raise ValueError(f"{key}: cannot store a {type(value).__name__} call argument")


def _decode(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, dict):
        if "tensor" in value:
            return tensors[value["tensor"]]
        if "list" in value:
            items = [_decode(v, tensors) for v in value["list"]]
            return tuple(items) if value.get("tuple") else items
        if "dict" in value:
            return {k: _decode(v, tensors) for k, v in value["dict"].items()}
        raise ValueError(f"unknown stored argument {sorted(value)}")
    return value
