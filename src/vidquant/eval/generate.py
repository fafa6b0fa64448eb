"""Generate evaluation videos under a `Protocol` and keep everything the report compares.

Per prompt ``i`` (seed ``protocol.seed + i``), in ``out_dir``:

- ``{name}-{i}.mp4``: the video in the layout of VBench's custom-input mode, which reads the prompt from
  the file name (the stem minus ``-{i}``);
- ``{name}-{i}.frames.npz``: the exact uint8 frames ``(T, H, W, 3)``, so metrics do not see codec loss;
- ``{name}-{i}.latents.safetensors``: the final denoised latents (before the VAE), key ``latents``;
- ``{name}-{i}.json``: the sidecar (protocol and its fingerprint, prompt, seed, seconds per step, peak
  memory), written last, so a sidecar means a complete video;

plus ``prompts.json`` (mp4 file name -> full prompt) and ``protocol.json``. ``name`` is the prompt made
filename-safe (`video_name`): '/', '\\' and control characters become '_', runs of whitespace one space,
and it is cut to 180 UTF-8 bytes (at a word boundary when one is near) so every file name stays under
the 255-byte limit. VBench would then read a cut or altered prompt from the name, which matters for its
text-video dimensions; ``prompts.json`` has the full prompts (VBench's ``--prompt_file`` takes the same
map keyed by video path). Every file is written under a temporary name and renamed, so an interrupted
run leaves no truncated file, and a rerun skips the prompts already done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.torch import save_file

from vidquant import __version__, dist
from vidquant.atomic import atomic_path
from vidquant.eval.probes import PeakMemory, StepTimer, peak_memory, weight_bytes
from vidquant.eval.protocol import Protocol
from vidquant.models import adapter_for
from vidquant.outputs import LOCK_FILE, check_output
from vidquant.progress import progress_bar
from vidquant.safeio import TensorSpec, read_safetensors
from vidquant.state import apply
from vidquant.validation import describe

logger = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.json"
PROTOCOL_FILE = "protocol.json"
SIDECAR_KIND = "vidquant.video"
MAX_NAME_BYTES = 180
MP4_CRF = 12  # x264 constant quality: visually lossless, so VBench scores see the model, not the codec
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")
_SIDECAR = re.compile(r"-(\d+)\.json$")
SUFFIXES = {"mp4": ".mp4", "frames": ".frames.npz", "latents": ".latents.safetensors", "sidecar": ".json"}
VIDEO_OWNED = (PROMPTS_FILE, PROTOCOL_FILE, *(f"*-[0-9]*{suffix}" for suffix in SUFFIXES.values()))


@dataclass(frozen=True)
class VideoRecord:
    """One generated video: where its files are and what its call cost."""

    index: int
    prompt: str
    name: str
    paths: dict[str, Path]  # mp4, frames, latents, sidecar
    seconds_per_step: float
    peak_memory_bytes: int
    seed: int
    fingerprint: str  # of the protocol


def video_name(prompt: str) -> str:
    """The readable, filename-safe stem for a prompt (see the module docstring)."""
    name = " ".join(_UNSAFE.sub("_", prompt).split()).lstrip(".")
    raw = name.encode()
    if len(raw) > MAX_NAME_BYTES:
        name = raw[:MAX_NAME_BYTES].decode(errors="ignore")
        cut = name.rfind(" ")
        if cut > MAX_NAME_BYTES // 2:
            name = name[:cut]
        name = name.rstrip()
    return name or "untitled"


def generate_videos(
    pipe,
    prompts: list[str],
    protocol: Protocol,
    out_dir: str | Path,
    *,
    progress: bool = True,
    on_step: Callable[[], None] | None = None,
    source: str | None = None,
    replace_stale: bool = False,
    model_info: dict | None = None,
    indices: Collection[int] | None = None,
) -> list[VideoRecord]:
    """Generate (or resume) one video per prompt under ``protocol``; return their records in prompt order.

    ``indices``: only these prompts (seeds and file names still those of their index in ``prompts``), e.g. the
    drafts a router escalates; the others are neither generated nor returned.

    A prompt whose sidecar already holds this protocol and prompt is not generated again. ``out_dir``
    belongs to one protocol, one prompt list and one ``source`` (a fingerprint of the model and state
    that make the videos): another protocol, another prompt at an index already done, or another source
    raises a ValueError naming the directory. With ``replace_stale`` a folder of ours made from another
    source is emptied of its videos first (the main job's own folders), never anything else. ``model_info``
    (what made the videos: weight bytes, recipe) is recorded in ``protocol.json`` for `evaluate`.

    Under torchrun the prompts left to generate are dealt round-robin across ranks (`dist.deal`; prompt ``i``
    keeps seed ``protocol.seed + i``, so the videos are those of one process): rank 0 alone claims the folder,
    each rank writes only its own prompts' files, and after a barrier every rank returns every record and rank
    0 writes ``prompts.json``.
    """
    adapter_for(pipe).check_protocol(protocol)
    out = Path(out_dir)
    # under torchrun rank 0 alone claims the folder (and empties a stale one); every rank then reads the same records
    dist.on_main(lambda: _prepare(out, protocol, source, replace_stale, model_info))
    done = {r.index: r for r in load_records(out)}
    for index, prompt in enumerate(prompts):
        old = done.get(index)
        if old is not None and old.prompt != prompt:
            raise ValueError(
                f"{out}: video {index} was generated from another prompt ({old.prompt[:60]!r}, now {prompt[:60]!r}); "
                "use another directory for another prompt list"
            )
        if old is not None and not all(p.is_file() for p in old.paths.values()):
            logger.warning("%s: files of video %d are missing, generating it again", out, index)
            del done[index]
    wanted = range(len(prompts)) if indices is None else sorted(set(indices) & set(range(len(prompts))))
    todo = [i for i in wanted if i not in done]
    rank, world = dist.rank(), dist.world()
    mine = dist.deal(todo, rank, world)  # each rank writes the files of its own prompts only
    logger.info("%s: %d of %d videos to generate%s", out, len(todo), len(prompts),
                f", {len(mine)} by rank {rank}" if world > 1 else "")

    pipe.set_progress_bar_config(disable=True)
    with progress_bar(progress and dist.is_main()) as bar:
        video_task = bar.add_task("videos", total=len(wanted) - len(todo) + len(mine),
                                  completed=len(wanted) - len(todo))
        step_task = bar.add_task("steps", total=protocol.steps)

        def step_done() -> None:
            bar.advance(step_task)
            if on_step is not None:
                on_step()

        for index in mine:
            bar.reset(step_task)
            done[index] = _generate_one(pipe, prompts[index], index, protocol, out, step_done)
            if world == 1:
                _write_json(out / PROMPTS_FILE, {r.paths["mp4"].name: r.prompt for r in done.values()})
            bar.advance(video_task)
    if world > 1:  # the other ranks' videos are complete once their sidecars are: read them all back
        dist.barrier()
        done = {r.index: r for r in load_records(out)}
        missing = [i for i in wanted if i not in done]
        if missing:
            raise RuntimeError(f"{out}: videos {missing[:5]} are missing after every rank finished")
        dist.on_main(lambda: _write_json(out / PROMPTS_FILE, {done[i].paths["mp4"].name: done[i].prompt
                                                             for i in sorted(done)}))
    return [done[i] for i in wanted]


def _prepare(out: Path, protocol: Protocol, source: str | None, replace_stale: bool, model_info: dict | None) -> None:
    """Check ``out`` as a video folder, create it, empty it of another source's videos (``replace_stale``), and
    claim it for ``protocol`` and ``source`` (`_claim`)."""
    check_output(out, VIDEO_OWNED, "video folder")
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(out)
    if replace_stale and _stored_source(out) not in (None, source):
        logger.info("%s: videos of another model or state, generating them again", out)
        for entry in out.iterdir():
            if entry.is_file() and entry.name != LOCK_FILE:
                entry.unlink()
        records = []
    _claim(out, protocol, records, source, model_info)


def _generate_one(
    pipe, prompt: str, index: int, protocol: Protocol, out: Path, on_step: Callable[[], None]
) -> VideoRecord:
    name = video_name(prompt)
    seed = protocol.seed_for(index)
    logger.info("video %d (seed %d): %s", index, seed, prompt[:80])
    frames, latents, timer, memory = run_pipeline(pipe, prompt, protocol, seed, on_step)
    paths = _paths(out, name, index)
    with atomic_path(paths["frames"]) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, frames=frames)
    with atomic_path(paths["latents"]) as tmp:
        save_file({"latents": latents}, str(tmp), metadata={"protocol_fingerprint": protocol.fingerprint()})
    with atomic_path(paths["mp4"]) as tmp:
        write_mp4(tmp, frames, protocol.fps)
    sidecar = {
        "kind": SIDECAR_KIND,
        "vidquant_version": __version__,
        "protocol_fingerprint": protocol.fingerprint(),
        "protocol": protocol.model_dump(mode="json"),
        "index": index,
        "prompt": prompt,
        "name": name,
        "seed": seed,
        "seconds_per_step": timer.seconds_per_step,
        "step_seconds": timer.step_seconds,
        "peak_memory_bytes": memory.bytes,
        "peak_memory_kind": memory.kind,
        "files": {key: path.name for key, path in paths.items() if key != "sidecar"},
    }
    _write_json(paths["sidecar"], sidecar)
    return _record(sidecar, paths)


def run_pipeline(
    pipe, prompt: str, protocol: Protocol, seed: int, on_step: Callable[[], None] | None = None
) -> tuple[np.ndarray, torch.Tensor, StepTimer, PeakMemory]:
    """One pipeline call under the protocol: uint8 frames (T, H, W, 3), final latents, step timer, peak memory.

    The latents are read in ``callback_on_step_end``, which returns the pipeline's tensors untouched, so
    the frames are those of a plain call (a test holds them equal); decoding ourselves from
    ``output_type="latent"`` would duplicate the pipeline's VAE code.
    """
    device = pipe._execution_device
    timer = StepTimer(device)
    captured: dict[str, torch.Tensor] = {}

    def step_end(_pipe, _i, _t, callback_kwargs):
        timer.mark()
        captured["latents"] = callback_kwargs["latents"]
        if on_step is not None:
            on_step()
        return callback_kwargs

    with peak_memory(device) as memory:
        timer.start()
        video = pipe(
            **protocol.call_kwargs(pipe, prompt, seed),
            output_type="np",
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).frames[0]
    frames = to_uint8(video)
    expected = (protocol.frames, protocol.height, protocol.width, 3)
    if frames.shape != expected:
        raise RuntimeError(f"the pipeline returned frames of shape {frames.shape}, the protocol asks for {expected}")
    return frames, captured["latents"].detach().to("cpu", copy=True).contiguous(), timer, memory


def to_uint8(video: np.ndarray) -> np.ndarray:
    """Pipeline float frames in [0, 1] to uint8, rounded to nearest (as diffusers' ``numpy_to_pil``)."""
    return np.clip(np.round(np.asarray(video, dtype=np.float32) * 255), 0, 255).astype(np.uint8)


def write_mp4(path: str | Path, frames: np.ndarray, fps: int) -> None:
    """H.264 at CRF 12; yuv420p (what every player and VBench's own videos use) when both sides are even,
    yuv444p otherwise (4:2:0 needs even sizes; padding would change the size VBench sees).

    The container is forced to mp4, so ``path`` may be a temporary name without the extension.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width, height),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p",
        quality=None,
        macro_block_size=1,
        ffmpeg_log_level="error",
        output_params=["-crf", str(MP4_CRF), "-f", "mp4"],
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def load_frames(record: VideoRecord) -> np.ndarray:
    """The exact uint8 frames (T, H, W, 3) of a record."""
    with np.load(record.paths["frames"]) as data:
        return data["frames"]


def load_latents(record: VideoRecord) -> torch.Tensor:
    """The final denoised latents of a record (batch 1, channels, latent frames, height, width)."""
    return read_safetensors(record.paths["latents"], {"latents": TensorSpec()}, what="latents")[0]["latents"]


def load_records(directory: str | Path) -> list[VideoRecord]:
    """Every complete video in ``directory`` (those with a sidecar), by index."""
    directory = Path(directory)
    records = []
    for path in sorted(directory.glob("*.json")):
        if not _SIDECAR.search(path.name):
            continue
        try:
            sidecar = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: unreadable sidecar ({err})") from err
        if isinstance(sidecar, dict) and sidecar.get("kind") == SIDECAR_KIND:
            checked = _check_sidecar(sidecar, path)
            records.append(_record(sidecar, _paths(directory, checked.name, checked.index)))
    indices = [r.index for r in records]
    duplicated = sorted({i for i in indices if indices.count(i) > 1})
    if duplicated:
        raise ValueError(f"{directory}: several videos for prompt index {duplicated}; keep one prompt list a directory")
    return sorted(records, key=lambda r: r.index)


def check_pair(bf16_dir: str | Path, quant_dir: str | Path) -> list[tuple[VideoRecord, VideoRecord]]:
    """The (reference, quantized) record pairs of two video sets, or a ValueError saying why they do not match.

    Cheap (reads sidecars only), so the report stage calls it before any long work: both sets must hold
    the same prompts at the same indices, made under the same protocol, with every file present.
    """
    sets = {}
    for role, directory in (("reference (BF16)", Path(bf16_dir)), ("quantized", Path(quant_dir))):
        if not directory.is_dir():
            raise ValueError(f"{role} video directory {directory} does not exist")
        records = load_records(directory)
        if not records:
            raise ValueError(f"{role} video directory {directory} holds no generated videos")
        missing = [str(p) for r in records for p in r.paths.values() if not p.is_file()]
        if missing:
            raise ValueError(f"{role} videos in {directory} have missing files: {', '.join(missing[:5])}")
        sets[role] = {r.index: r for r in records}
    ref, test = sets.values()
    fingerprints = {r.fingerprint for r in ref.values()} | {r.fingerprint for r in test.values()}
    if len(fingerprints) > 1:
        diff = _protocol_diff(Path(bf16_dir), Path(quant_dir))
        raise ValueError(f"{bf16_dir} and {quant_dir} were generated under different protocols: {diff}")
    no_reference = sorted(set(test) - set(ref))
    if no_reference:
        names = ", ".join(test[i].paths["mp4"].name for i in no_reference[:5])
        raise ValueError(f"{bf16_dir} lacks the reference videos for {len(no_reference)} quantized videos: {names}")
    no_test = sorted(set(ref) - set(test))
    if no_test:
        names = ", ".join(ref[i].paths["mp4"].name for i in no_test[:5])
        raise ValueError(f"{quant_dir} lacks {len(no_test)} videos that {bf16_dir} has: {names}")
    differ = [i for i in ref if ref[i].prompt != test[i].prompt]
    if differ:
        i = differ[0]
        raise ValueError(
            f"{bf16_dir} and {quant_dir} have different prompt lists ({len(differ)} differ; "
            f"prompt {i}: {ref[i].prompt[:60]!r} vs {test[i].prompt[:60]!r})"
        )
    return [(ref[i], test[i]) for i in sorted(ref)]


def _protocol_diff(a: Path, b: Path) -> str:
    protocols = [json.loads(next(iter(load_records(d))).paths["sidecar"].read_text())["protocol"] for d in (a, b)]
    keys = [k for k in protocols[0] if protocols[0].get(k) != protocols[1].get(k)]
    return ", ".join(f"{k} {protocols[0].get(k)} vs {protocols[1].get(k)}" for k in keys) or "fingerprints differ"


class FolderInfo(BaseModel):
    """The schema of a video folder's ``protocol.json``: its protocol, its source and what made the videos."""

    model_config = ConfigDict(extra="allow")

    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    protocol: dict[str, Any]
    source: str | None = None  # fingerprint of the base model (and state); None: written before sources existed
    model: dict[str, Any] = {}  # family, bf16_weight_bytes, weight_bytes, recipe


def folder_info(out: str | Path) -> FolderInfo | None:
    """What ``protocol.json`` of a video folder says (None: no such file), validated."""
    file = Path(out) / PROTOCOL_FILE
    if not file.is_file():
        return None
    try:
        return FolderInfo.model_validate(json.loads(file.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: unreadable ({err})") from None
    except ValidationError as err:
        raise ValueError(f"{file}: invalid video-folder record: {describe(err)}") from None


def _stored_source(out: Path) -> str | None:
    info = folder_info(out)
    return None if info is None else info.source


def _claim(out: Path, protocol: Protocol, records: list[VideoRecord], source: str | None,
           model_info: dict | None) -> None:
    """Record the directory's protocol and source, or refuse one made under another protocol or source."""
    fingerprint = protocol.fingerprint()
    info = folder_info(out)
    stored = {r.fingerprint for r in records} | (set() if info is None else {info.fingerprint})
    if stored - {fingerprint}:
        raise ValueError(
            f"{out}: holds videos generated under another protocol than {protocol.model_dump()}; "
            "use another directory or delete it"
        )
    if info is not None and info.source != source:
        raise ValueError(f"{out}: holds videos of another model or state (source {str(info.source)[:12]} vs now "
                         f"{str(source)[:12]}); use another directory or delete it")
    if info is None:
        _write_json(out / PROTOCOL_FILE, {"fingerprint": fingerprint, "protocol": protocol.model_dump(mode="json"),
                                          "source": source, "model": model_info or {}})


def _paths(out: Path, name: str, index: int) -> dict[str, Path]:
    return {key: out / f"{name}-{index}{suffix}" for key, suffix in SUFFIXES.items()}


class Sidecar(BaseModel):
    """The schema of a video's sidecar: what `load_records` trusts before it builds any path from it."""

    model_config = ConfigDict(extra="allow")

    index: int = Field(ge=0)
    prompt: str
    name: str
    seed: int
    seconds_per_step: float = Field(ge=0, allow_inf_nan=False)
    peak_memory_bytes: int = Field(ge=0)
    protocol_fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    protocol: dict[str, Any]

    @model_validator(mode="after")
    def _name_is_the_prompts(self) -> Sidecar:
        if self.name != video_name(self.prompt):  # so a hand-edited name can never point outside the folder
            raise ValueError(f"name {self.name[:60]!r} is not the file name of its prompt "
                             f"({video_name(self.prompt)!r})")
        return self


def _check_sidecar(sidecar: dict, path: Path) -> Sidecar:
    try:
        return Sidecar.model_validate(sidecar)
    except ValidationError as err:
        raise ValueError(f"{path}: invalid video sidecar: {describe(err)}") from None


def _record(sidecar: dict, paths: dict[str, Path]) -> VideoRecord:
    return VideoRecord(
        index=sidecar["index"],
        prompt=sidecar["prompt"],
        name=sidecar["name"],
        paths=paths,
        seconds_per_step=sidecar["seconds_per_step"],
        peak_memory_bytes=sidecar["peak_memory_bytes"],
        seed=sidecar["seed"],
        fingerprint=sidecar["protocol_fingerprint"],
    )


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def generate(
    model: Any,
    prompts: list[str],
    protocol: Protocol,
    out: str | Path,
    *,
    state: Any = None,
    model_fingerprint: str | None = None,
    progress: bool = True,
    replace_stale: bool = False,
) -> list[VideoRecord]:
    """The `generate` stage: videos of ``model`` (with ``state`` applied to it first, when given) in ``out``.

    The folder records its source (the base fingerprint, and the state's) and the weight bytes of what made
    the videos, so `evaluate` can compare two folders alone. ``model_fingerprint`` saves hashing the base
    weights again when the caller knows it (the statistics record it).
    """
    adapter = adapter_for(model)
    adapter.check_protocol(protocol)
    source = model_fingerprint or adapter.fingerprint()
    info: dict[str, Any] = {"family": adapter.family, "bf16_weight_bytes": weight_bytes(model).bf16}
    if state is not None:
        apply(model, state)
        source = hashlib.sha256(f"{source}\n{state.fingerprint()}".encode()).hexdigest()
        info["recipe"] = state.recipe.get("name")
    info["weight_bytes"] = weight_bytes(model).stored
    return generate_videos(model, prompts, protocol, out, progress=progress, source=source,
                           replace_stale=replace_stale, model_info=info)
