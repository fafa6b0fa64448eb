"""Quantization-aware fine-tuning with compact deltas (`vidquant finetune`): distil a PTQ state against its teacher.

The boundary-protection HiF8 paper's second stage (QAT after PTQ), kept compact: the quantized weights stay
frozen (dense fake-quantized, or GPTQ's packed rounding), and only small tensors train —

- ``lora``: a rank-r delta ``(x down^T) up^T`` on every quantized Linear (`nn.parts.LoRADelta`; ``up`` starts at
  0, so step 0 *is* the PTQ model). A new part rather than the SVDQuant branch: most recipes (tail-aware, HiF8)
  have no branch, and the branch's factors define the residual that was rounded, so moving them would need the
  weight re-rounded (and GPTQ's rounding re-done) to stay consistent;
- ``masks``: each smoothing mask as ``m0 · exp(s)`` (s trains, so Adam's step is relative in every channel);
  the folded weight ``Q_w(W / m)`` is re-quantized through the STE on every call (`QuantLinear.train_transforms`:
  the base weight referenced, the dense copy dropped) and re-encoded at the end. Not for layers whose weight is
  GPTQ's packed rounding (fixed for its mask) or rotated ones (their fold is not differentiable): those skip it;
- ``clips``: the activation clip ratios, one per timestep bin, with PACT's gradient (`methods.ste`), kept in
  [clip_min, 1].

Loss: per expert call, the MSE between the student's output (the model with the state applied: packed runtime
below 16 bits, so no dense weight copy is held, fake where a mask trains) and the BF16 teacher's on the
teacher's own trajectories (`calib.trajectories`: calibration prompts and seeds, a sample per expert and
timestep bin); AdamW on the deltas only; each block of the expert under
`torch.utils.checkpoint` (activations of one block at a time); one call per step in a seeded order.
Held-out calls (calibration prompts under the held-out seeds, never trained on) score every ``eval_every`` steps;
the best-by-held-out deltas are kept, and when none beats the PTQ state's held-out loss the PTQ state is
returned unchanged (its ``qat`` record says so). Deltas, optimizer state and history are saved every
``checkpoint_every`` steps under ``checkpoint`` and a rerun resumes there, to the same result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from .. import formats
from ..atomic import atomic_path
from ..calib.data import calibration_data, is_prompts
from ..calib.prompts import prompt_set_hash
from ..calib.stats import CalibStats
from ..calib.trajectories import Trajectory, load_trajectories, record_trajectories, save_trajectories
from ..eval.fidelity import HELD_OUT_SEED_OFFSET
from ..models import adapter_for, split_name
from ..nn import QuantLinear, StepContext, swap
from ..nn.parts import ChannelMask, LoRADelta
from ..outputs import check_output
from ..progress import progress_bar
from ..safeio import read_safetensors
from ..state import LayerState, PTQState, quant_linear, verify

logger = logging.getLogger(__name__)

TRAINABLE = ("lora", "masks", "clips")
TRAJECTORIES = "trajectories.safetensors"
DELTAS = "qat.safetensors"
QAT_FILES = (TRAJECTORIES, DELTAS)


class QATSettings(BaseModel):
    """What `finetune` trains and how; recorded in the state's ``qat`` section."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    rank: int = Field(4, ge=1)
    train: tuple[str, ...] = ("lora",)
    weight_decay: float = Field(0.0, ge=0)
    calls_per_bin: int = Field(4, ge=1)  # training calls kept per expert and timestep bin
    held_out_prompts: int = Field(2, ge=1)
    held_out_per_bin: int = Field(2, ge=1)
    eval_every: int = Field(25, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    seed: int = 0
    clip_min: float = Field(0.05, gt=0, le=1)
    gradient_checkpointing: bool = True

    @field_validator("train")
    @classmethod
    def _train(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError(f"train: name at least one of {', '.join(TRAINABLE)}")
        if unknown := sorted(set(value) - set(TRAINABLE)):
            raise ValueError(f"train: unknown {', '.join(unknown)} (known: {', '.join(TRAINABLE)})")
        return tuple(t for t in TRAINABLE if t in value)


class _LogScale(nn.Module):
    """``m0 · exp(s)``: a mask trained by a relative, per-channel log-scale (s = 0: the PTQ mask)."""

    def __init__(self, n: int, device: torch.device) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.zeros(n, device=device))

    def forward(self, m0: Tensor) -> Tensor:
        return m0 * torch.exp(self.s)


def finetune(
    model: Any,
    state: PTQState,
    stats: CalibStats,
    settings: QATSettings | None = None,
    *,
    prompts: list[str] | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
) -> PTQState:
    """The state ``state`` fine-tuned on ``model``'s (a pipeline, BF16) own trajectories; ``model`` is unchanged.

    ``stats``: the calibration statistics whose protocol and prompts (``prompts``, default bundled; their hash is
    checked) make the teacher's trajectories. ``checkpoint_dir``: where deltas and the recorded trajectories are
    kept for a rerun (e.g. ``state-qat/.partial``).
    """
    settings = settings or QATSettings()
    verify(model, state)
    adapter = adapter_for(model)
    data, calib = calibration_data(stats, prompts, None)
    if not is_prompts(data):
        raise ValueError("finetune distils the teacher's denoising trajectories: it needs a video pipeline "
                         "calibrated on prompts (a forward loop has no trajectories to replay)")
    if "clips" in settings.train and not state.timestep_bins and calib.bins > 1:
        logger.info("clips: the state has no timestep bins; training one ratio per calibration bin (%d)", calib.bins)
    edges = state.timestep_bins or adapter.bin_edges(calib.bins)
    ckpt = None if checkpoint_dir is None else check_output(checkpoint_dir, QAT_FILES, "QAT checkpoint")
    train, held = _trajectories(model, state, stats, data, calib, edges, settings, ckpt, progress)
    run = _Student(model, state, settings, edges)
    with run.active():
        result = run.fit(train, held, ckpt, _fingerprint(state, stats, data, settings), progress)
    return run.result_state(result)


def remove_checkpoint(checkpoint_dir: str | Path) -> None:
    """Delete a QAT checkpoint folder (`finetune`'s files only; anything else in it is refused by name)."""
    directory = check_output(checkpoint_dir, QAT_FILES, "QAT checkpoint")
    if not directory.is_dir():
        return
    for name in QAT_FILES:
        (directory / name).unlink(missing_ok=True)
    directory.rmdir()


def _trajectories(model: Any, state: PTQState, stats: CalibStats, prompts: list[str], calib, edges,
                  settings: QATSettings, ckpt: Path | None, progress: bool
                  ) -> tuple[list[tuple[str, Trajectory]], list[tuple[str, Trajectory]]]:
    """Training and held-out teacher calls, flattened to (expert, trajectory) in expert then call order."""
    info = {"config": state.base["config_sha256"], "stats": stats.fingerprint(), "prompts": prompt_set_hash(prompts),
            "edges": edges, "per_bin": settings.calls_per_bin, "held_out_prompts": settings.held_out_prompts,
            "held_out_per_bin": settings.held_out_per_bin}
    path = None if ckpt is None else ckpt / TRAJECTORIES
    if path is not None and path.is_file():
        stored, stored_info = load_trajectories(path)
        if stored_info == json.loads(json.dumps(info)):
            logger.info("resuming with the teacher trajectories in %s", path)
            return _split(stored, "train"), _split(stored, "held")
        logger.warning("%s was recorded under other settings: recording the teacher again", path)
    train = record_trajectories(model, prompts, calib, edges, settings.calls_per_bin, 0, progress)
    held = record_trajectories(model, prompts[:settings.held_out_prompts], calib, edges, settings.held_out_per_bin,
                               HELD_OUT_SEED_OFFSET, progress)
    if path is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        merged = {f"train:{e}": v for e, v in train.items()} | {f"held:{e}": v for e, v in held.items()}
        save_trajectories(path, merged, info)
    return _flat(train), _flat(held)


def _split(stored: dict[str, list[Trajectory]], kind: str) -> list[tuple[str, Trajectory]]:
    return [(key.split(":", 1)[1], t) for key, items in stored.items() if key.startswith(f"{kind}:") for t in items]


def _flat(trajectories: dict[str, list[Trajectory]]) -> list[tuple[str, Trajectory]]:
    return [(expert, t) for expert, items in trajectories.items() for t in items]


def _fingerprint(state: PTQState, stats: CalibStats, prompts: list[str], settings: QATSettings) -> str:
    """What a checkpoint must match to be resumed: the state, the data and every setting but the step counts."""
    fixed = settings.model_dump(exclude={"steps", "checkpoint_every"})
    blob = json.dumps({"state": state.fingerprint(), "stats": stats.fingerprint(), "prompts": prompt_set_hash(prompts),
                       "settings": fixed}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


class _Student:
    """The model with the state's `QuantLinear`s swapped in and their deltas made trainable, while `active`."""

    def __init__(self, model: Any, state: PTQState, settings: QATSettings, edges: dict[str, list[float]]) -> None:
        self.model, self.state, self.settings, self.edges = model, state, settings, edges
        self.adapter = adapter_for(model)
        self.contexts = {expert: StepContext() for expert in self.adapter.experts()}
        self.layers: dict[str, QuantLinear] = {}
        self.params: dict[str, nn.Parameter] = {}  # "layer.lora_down" / ".lora_up" / ".mask_log_scale" / ".act_clip"
        self.mask0: dict[str, Tensor] = {}
        self.skipped: dict[str, str] = {}

    @contextmanager
    def active(self) -> Iterator[None]:
        """Swap the student in, freeze the base, wrap the blocks in checkpoints; undo everything on exit."""
        experts = self.adapter.experts()
        frozen = [(p, p.requires_grad) for m in experts.values() for p in m.parameters()]
        originals: dict[str, nn.Linear] = {}
        with ExitStack() as stack:
            for p, _ in frozen:
                p.requires_grad_(False)
            stack.callback(lambda: [p.requires_grad_(flag) for p, flag in frozen])
            generator = torch.Generator().manual_seed(self.settings.seed)
            for name in sorted(self.state.layers):
                expert, layer = split_name(name)
                linear = self.adapter.linear(name)
                q = quant_linear(linear, self.state.layers[name], self.contexts[expert], name, self._runtime(name))
                self._make_trainable(name, q, linear, generator)
                originals[name] = swap(experts[expert], layer, q)
                self.layers[name] = q
            stack.callback(lambda: [swap(experts[split_name(n)[0]], split_name(n)[1], lin)
                                    for n, lin in originals.items()])
            stack.enter_context(_teacher_offloaded(originals, keep=set(self.mask0)))
            if self.settings.gradient_checkpointing:
                stack.enter_context(_checkpointed_blocks(self.adapter))
            yield

    def _runtime(self, name: str) -> str:
        """Packed (the weight as the format's bytes: no dense copy at all) unless this layer's mask trains, which
        re-quantizes the referenced base weight per call (fake runtime, dense copy dropped); same outputs either way."""
        layer = self.state.layers[name]
        if formats.get(layer.weight_format).bits_per_value >= 16:
            return "fake"
        return "fake" if "masks" in self.settings.train and self._mask_skip(name) is None else "packed"

    def _mask_skip(self, name: str) -> str | None:
        """Why this layer's mask cannot train (None: it can)."""
        tensors = self.state.layers[name].tensors
        if "mask" not in tensors:
            return "no mask"
        if "weight_packed" in tensors:
            return "weight is GPTQ's packed rounding"
        if any(k.startswith("rotation_") for k in tensors):
            return "rotated input"
        return None

    def _make_trainable(self, name: str, q: QuantLinear, linear: nn.Linear, generator: torch.Generator) -> None:
        device, train = linear.weight.device, self.settings.train
        if "lora" in train:
            if q.lora is None:  # kaiming-uniform down, zero up (LoRA's init): the delta starts at 0
                bound = 1.0 / math.sqrt(q.in_features)
                down = (torch.rand(self.settings.rank, q.in_features, generator=generator) * 2 - 1) * bound
                q.lora = LoRADelta(down, torch.zeros(q.out_features, self.settings.rank), device)
            for key in LoRADelta.tensor_names:
                param = nn.Parameter(getattr(q.lora, key).clone())
                setattr(q.lora, key, param)
                self.params[f"{name}.{key}"] = param
        if "clips" in train:
            expert = split_name(name)[0]
            clip = q.act.act_clip
            if clip is None:
                clip = torch.ones(len(self.edges[expert]) - 1, device=device)
            q.act.act_clip = param = nn.Parameter(clip.detach().clone().float())
            self.params[f"{name}.act_clip"] = param
        if "masks" in train:
            masks = [t for t in q.transforms if isinstance(t, ChannelMask)]
            why = self._mask_skip(name)
            if why is not None:
                self.skipped[name] = why
            else:
                self.mask0[name] = masks[0].mask.detach().clone()
                scale = _LogScale(q.in_features, device)
                parametrize.register_parametrization(masks[0], "mask", scale, unsafe=True)
                q.train_transforms(linear.weight)
                self.params[f"{name}.mask_log_scale"] = scale.s

    # ---- training ----------------------------------------------------------------------------------------
    def loss(self, expert: str, t: Trajectory) -> Tensor:
        """MSE between the student's and the teacher's output on one recorded call."""
        self.contexts[expert].timestep_bin = t.bin
        y = t.call.replay(self.adapter.experts()[expert])
        return F.mse_loss(y.float(), t.target.to(y.device, torch.float32))

    def mean_loss(self, calls: list[tuple[str, Trajectory]]) -> float:
        with torch.no_grad():
            return sum(float(self.loss(e, t)) for e, t in calls) / len(calls)

    def snapshot(self) -> dict[str, Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def load(self, values: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(values[k])

    def fit(self, train: list[tuple[str, Trajectory]], held: list[tuple[str, Trajectory]], ckpt: Path | None,
            fingerprint: str, progress: bool) -> dict[str, Any]:
        s = self.settings
        if not train or not held:
            raise ValueError("finetune needs training and held-out teacher calls; none were recorded")
        lora = [p for k, p in self.params.items() if ".lora_" in k]
        others = [p for k, p in self.params.items() if ".lora_" not in k]
        optimizer = torch.optim.AdamW([{"params": lora, "weight_decay": s.weight_decay},
                                       {"params": others, "weight_decay": 0.0}], lr=s.lr)
        start, history, best, running = 0, [], None, None
        resumed = None if ckpt is None else _load_checkpoint(ckpt / DELTAS, fingerprint, self.params, optimizer)
        if resumed is not None:
            start, history, best_values, best, running = resumed
            self.best_values = best_values
            logger.info("resuming QAT at step %d of %d", start, s.steps)
        else:
            ptq = {"train": self.mean_loss(train), "held_out": self.mean_loss(held)}
            best = {"step": 0, "held_out": ptq["held_out"], "ptq": ptq}
            self.best_values = self.snapshot()
            history.append({"step": 0, "held_out": ptq["held_out"], "train": ptq["train"]})
        with progress_bar(progress) as bar:
            task = bar.add_task("QAT", total=s.steps, completed=min(start, s.steps))
            for step in range(start, s.steps):
                expert, t = train[_order(len(train), step, s.seed)]
                loss = self.loss(expert, t)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                self._project()
                value = loss.item()
                running = value if running is None else 0.9 * running + 0.1 * value
                done = step + 1
                bar.update(task, advance=1, description=f"QAT loss {running:.4g}")
                if done % s.eval_every == 0 or done == s.steps:
                    value = self.mean_loss(held)
                    history.append({"step": done, "held_out": value, "train_running": running})
                    logger.info("QAT step %d: running train loss %.4g, held-out %.4g (PTQ %.4g)", done, running,
                                value, best["ptq"]["held_out"])
                    if value < best["held_out"]:
                        best = {**best, "step": done, "held_out": value}
                        self.best_values = self.snapshot()
                if ckpt is not None and (done % s.checkpoint_every == 0 or done == s.steps):
                    _save_checkpoint(ckpt / DELTAS, fingerprint, done, history, best, running, self.params,
                                     self.best_values, optimizer)
        self.load(self.best_values)
        best["train_after"] = self.mean_loss(train) if best["step"] else best["ptq"]["train"]
        return {"history": history, "best": best, "train_calls": len(train), "held_out_calls": len(held)}

    def _project(self) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                if k.endswith(".act_clip"):
                    p.clamp_(self.settings.clip_min, 1.0)

    # ---- the result ---------------------------------------------------------------------------------------
    def result_state(self, result: dict[str, Any]) -> PTQState:
        """The fine-tuned state (the best deltas added to each layer's tensors), or the PTQ state unchanged."""
        s, best = self.settings, result["best"]
        kept = "qat" if best["step"] > 0 else "ptq"
        record = {
            "kept": kept,
            "steps": s.steps, "lr": s.lr, "rank": s.rank if "lora" in s.train else 0, "train": list(s.train),
            "seed": s.seed, "weight_decay": s.weight_decay, "best_step": best["step"],
            "calls": {"train": result["train_calls"], "held_out": result["held_out_calls"],
                      "per_bin": s.calls_per_bin, "held_out_per_bin": s.held_out_per_bin,
                      "held_out_prompts": s.held_out_prompts},
            "loss": {"train_before": best["ptq"]["train"], "train_after": best["train_after"],
                     "held_out_before": best["ptq"]["held_out"], "held_out_after": best["held_out"]},
            "history": result["history"],
            "skipped_masks": dict(sorted(self.skipped.items())),
            "gradient_checkpointing": s.gradient_checkpointing,
        }
        if kept == "ptq":
            record["why"] = "no step beat the PTQ state's held-out loss: the PTQ state is kept unchanged"
            logger.warning("QAT did not improve the held-out loss (%.4g): keeping the PTQ state",
                           best["ptq"]["held_out"])
            return PTQState(dict(self.state.layers), self.state.recipe, self.state.base, self.state.plan,
                            self.state.library_version, dict(self.state.timestep_bins), record)
        values, layers = self.best_values, {}
        bins = dict(self.state.timestep_bins)
        for name, layer in self.state.layers.items():
            tensors = dict(layer.tensors)
            if f"{name}.lora_down" in values:
                tensors["lora_down"] = values[f"{name}.lora_down"].cpu()
                tensors["lora_up"] = values[f"{name}.lora_up"].cpu()
            if f"{name}.act_clip" in values:
                tensors["act_clip"] = values[f"{name}.act_clip"].cpu()
                expert = split_name(name)[0]
                if tensors["act_clip"].dim() == 1:
                    bins.setdefault(expert, list(self.edges[expert]))
            if f"{name}.mask_log_scale" in values:  # the very expression the parametrization computed
                tensors["mask"] = (self.mask0[name] * torch.exp(values[f"{name}.mask_log_scale"])).cpu()
            layers[name] = LayerState(layer.weight_format, layer.act_format, layer.weight_sha256, tensors,
                                      {**layer.info, "qat": "+".join(s.train)})
        return PTQState(layers, self.state.recipe, self.state.base, self.state.plan, self.state.library_version,
                        bins, record)


@contextmanager
def _teacher_offloaded(linears: dict[str, nn.Linear], keep: set[str]) -> Iterator[None]:
    """Move the swapped-out base weights (the teacher's: its outputs are already recorded) to host memory while the
    student trains, and back after: at A14B that frees 26 GiB per expert of accelerator memory (README, QAT's
    full-size budget). Only the weight tensors move: the bias is shared with the student. ``keep``: layers whose
    trained mask re-quantizes from the base weight on every call."""
    moved = {}
    for name, linear in linears.items():
        if name not in keep and linear.weight.device.type != "cpu":
            moved[name] = linear.weight.device
            linear.weight.data = linear.weight.data.to("cpu")
    if moved:
        logger.info("QAT: %d base weights moved to host memory while the student trains", len(moved))
    try:
        yield
    finally:
        for name, device in moved.items():
            linears[name].weight.data = linears[name].weight.data.to(device)


def _order(n: int, step: int, seed: int) -> int:
    """The call trained at ``step``: a seeded permutation per pass over the ``n`` calls (resumable from any step)."""
    epoch, i = divmod(step, n)
    return int(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))[i])


@contextmanager
def _checkpointed_blocks(adapter: Any) -> Iterator[None]:
    """Each block of each expert recomputes its activations in the backward pass (`torch.utils.checkpoint`)."""
    wrapped = []
    for expert, module in adapter.experts().items():
        for prefix in adapter.blocks(expert):
            block = module.get_submodule(prefix)
            inner = block.forward

            def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
                if torch.is_grad_enabled():
                    return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
                return _inner(*args, **kwargs)

            block.forward = forward
            wrapped.append(block)
    if not wrapped:
        logger.warning("the model's adapter names no blocks: training without gradient checkpointing")
    try:
        yield
    finally:
        for block in wrapped:
            del block.forward


def _save_checkpoint(path: Path, fingerprint: str, step: int, history: list, best: dict, running: float | None,
                     params: dict[str, nn.Parameter], best_values: dict[str, Tensor],
                     optimizer: torch.optim.Optimizer) -> None:
    """Deltas, the best ones, and AdamW's moments (safetensors), with step and history in the metadata."""
    tensors = {f"param.{k}": p.detach().cpu().contiguous() for k, p in params.items()}
    tensors |= {f"best.{k}": v.cpu().contiguous() for k, v in best_values.items()}
    index = {id(p): k for k, p in params.items()}
    steps = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st:
                key = index[id(p)]
                tensors[f"exp_avg.{key}"] = st["exp_avg"].cpu().contiguous()
                tensors[f"exp_avg_sq.{key}"] = st["exp_avg_sq"].cpu().contiguous()
                steps[key] = float(st["step"])
    meta = {"fingerprint": fingerprint, "step": step, "history": history, "best": best, "running": running,
            "adam_steps": steps}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"qat": json.dumps(meta)})


def _load_checkpoint(path: Path, fingerprint: str, params: dict[str, nn.Parameter],
                     optimizer: torch.optim.Optimizer
                     ) -> tuple[int, list, dict[str, Tensor], dict, float | None] | None:
    """Restore what `_save_checkpoint` wrote, when it was made under the same fingerprint (None otherwise)."""
    if not path.is_file():
        return None
    tensors, meta = read_safetensors(path, None, what="QAT checkpoint")
    try:
        info = json.loads(meta["qat"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: malformed QAT checkpoint ({err})") from None
    if info.get("fingerprint") != fingerprint:
        logger.warning("%s was made from another state, data or settings: starting QAT afresh", path)
        return None
    if missing := [k for k in params if f"param.{k}" not in tensors or f"best.{k}" not in tensors]:
        raise ValueError(f"{path}: QAT checkpoint lacks deltas for {missing[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
    for k, p in params.items():
        if k in info["adam_steps"]:
            optimizer.state[p] = {"step": torch.tensor(info["adam_steps"][k]),
                                  "exp_avg": tensors[f"exp_avg.{k}"].to(p.device),
                                  "exp_avg_sq": tensors[f"exp_avg_sq.{k}"].to(p.device)}
    best_values = {k: tensors[f"best.{k}"].to(p.device) for k, p in params.items()}
    return int(info["step"]), list(info["history"]), best_values, dict(info["best"]), info.get("running")
