"""VBench's five paper dimensions, run in VBench's own environment as a subprocess.

VBench pins transformers 4.33 and numpy<2, which clash with diffusers, so it cannot be imported here: it lives
in a separate venv and we call its CLI (targeted: ``vbench==0.1.5``, the PyPI release of January 2025)::

    vbench evaluate --videos_path DIR --dimension DIM --mode custom_input --output_path OUT \
        --load_ckpt_from_local True

In ``custom_input`` mode VBench takes each video's prompt from its file name (``{prompt}-{i}.mp4`` -> prompt,
see `eval.generate.video_name`) and writes ``OUT/results_<time>_eval_results.json`` =
``{dimension: [aggregate, [{"video_path": ..., "video_results": score}, ...]]}``. Its CLI runs the real work in
a child ``torch.distributed.run`` through a shell and does not pass that child's exit status on, so a missing
result file is treated as a failure too; for the same reason the paths must be free of shell metacharacters.
``--load_ckpt_from_local True`` makes it read every weight from ``$VBENCH_CACHE_DIR`` (`WEIGHTS`) instead of
the hubs, which is what an offline GPU node needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_path
from ..checksum import file_sha256

logger = logging.getLogger(__name__)

VBENCH_VERSION = "0.1.5"
ENV_EXECUTABLE = "VIDQUANT_VBENCH"
ENV_CACHE = "VBENCH_CACHE_DIR"
PAPER_DIMENSIONS = (
    "subject_consistency",
    "motion_smoothness",
    "imaging_quality",
    "aesthetic_quality",
    "overall_consistency",
)
# Files VBench 0.1.5 reads from $VBENCH_CACHE_DIR for each paper dimension in local-checkpoint mode.
WEIGHTS = {
    "subject_consistency": ("dino_model/dino_vitbase16_pretrain.pth", "dino_model/facebookresearch_dino_main"),
    "motion_smoothness": ("amt_model/amt-s.pth",),
    "imaging_quality": ("pyiqa_model/musiq_spaq_ckpt-358bb6af.pth",),
    "aesthetic_quality": ("clip_model/ViT-L-14.pt", "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth"),
    "overall_consistency": ("ViCLIP/ViClip-InternVid-10M-FLT.pth",),
}
# Custom-input mode refuses the dimensions that need VBench's own prompt annotations.
CUSTOM_INPUT_DIMENSIONS = frozenset(PAPER_DIMENSIONS) | {
    "background_consistency",
    "temporal_flickering",
    "dynamic_degree",
    "temporal_style",
    "human_action",
}
_SHELL_SAFE = re.compile(r"^[A-Za-z0-9_./:+,=@%~-]+$")
_TAIL_CHARS = 3000

SETUP = f"""\
VBench runs in its own environment (its pins, transformers 4.33 and numpy<2, clash with diffusers) and needs a
CUDA GPU. To enable it:
  python3 -m venv ~/vbench-env
  ~/vbench-env/bin/pip install vbench=={VBENCH_VERSION}   # plus the torch/torchvision build for your CUDA
  export {ENV_EXECUTABLE}=~/vbench-env/bin/vbench
  export {ENV_CACHE}=/path/to/vbench-weights
and put these weights under ${ENV_CACHE} (read locally, nothing is fetched):
""" + "".join(f"  {dim}: {', '.join(files)}\n" for dim, files in WEIGHTS.items()) + (
    "  (dino_model/facebookresearch_dino_main is a clone of the facebookresearch/dino repository)\n"
)


class VBenchError(RuntimeError):
    """VBench is missing, failed, or wrote no usable result."""


def find_vbench() -> str | None:
    """The VBench CLI: ``$VIDQUANT_VBENCH`` if set (and then only that), else ``vbench`` on PATH."""
    configured = os.environ.get(ENV_EXECUTABLE)
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        logger.warning("%s=%s is not an executable file", ENV_EXECUTABLE, configured)
        return None
    return shutil.which("vbench")


def missing_weights(cache_dir: str | Path | None, dimensions: Sequence[str] = PAPER_DIMENSIONS) -> list[str]:
    """Weight files of `dimensions` absent from the cache (all of them when no cache is configured)."""
    wanted = [f for dim in dimensions for f in WEIGHTS.get(dim, ())]
    if not cache_dir:
        return wanted
    return [f for f in wanted if not (Path(cache_dir) / f).exists()]


def vbench_status() -> tuple[bool, str]:
    """Whether VBench can run, and a message saying what was found or exactly how to enable it."""
    exe = find_vbench()
    if exe is None:
        configured = os.environ.get(ENV_EXECUTABLE)
        why = f"{ENV_EXECUTABLE}={configured} is not an executable" if configured else (
            f"{ENV_EXECUTABLE} is not set and no `vbench` is on PATH"
        )
        return False, f"VBench is not available: {why}.\n{SETUP}"
    cache = os.environ.get(ENV_CACHE)
    missing = missing_weights(cache)
    if not cache:
        return True, f"VBench found at {exe}, but {ENV_CACHE} is not set: it will try to download its weights.\n{SETUP}"
    if missing:
        return True, f"VBench found at {exe}; {ENV_CACHE}={cache} lacks: {', '.join(missing)}.\n{SETUP}"
    return True, f"VBench found at {exe}, weights in {ENV_CACHE}={cache}."


def run_vbench(
    videos_dir: str | Path,
    out_dir: str | Path,
    dimensions: Sequence[str] = PAPER_DIMENSIONS,
    executable: str | None = None,
    *,
    cache_dir: str | Path | None = None,
    timeout: float | None = None,
) -> dict[str, dict]:
    """Score the ``*.mp4`` in `videos_dir`: ``{dimension: {"mean": float, "per_video": {file name: score}}}``.

    One VBench call per dimension, each into its own ``out_dir/<dimension>/`` (with its log), so a result file
    can never be mistaken for another run's. `cache_dir` overrides ``$VBENCH_CACHE_DIR`` for the child.
    """
    exe = executable or find_vbench()
    if exe is None:
        raise VBenchError(vbench_status()[1])
    unknown = [d for d in dimensions if d not in CUSTOM_INPUT_DIMENSIONS]
    if unknown:
        raise ValueError(f"VBench custom-input mode cannot score {unknown}; use {sorted(CUSTOM_INPUT_DIMENSIONS)}")
    videos = Path(videos_dir).resolve()
    out = Path(out_dir).resolve()
    if not videos.is_dir() or not any(videos.glob("*.mp4")):
        raise ValueError(f"no .mp4 videos in {videos}")
    check_vbench_paths(videos, out)
    env = dict(os.environ)
    if cache_dir is not None:
        env[ENV_CACHE] = str(cache_dir)
    if not env.get(ENV_CACHE):
        logger.warning("%s is not set: VBench will look for its weights in ~/.cache/vbench", ENV_CACHE)
    return {dim: _run_one(exe, videos, out / dim, dim, env, timeout) for dim in dimensions}


SCORES = "scores.json"  # a reusable `run_vbench` result, beside the dimension folders


def cached_vbench(videos_dir: str | Path, out_dir: str | Path, dimensions: Sequence[str] = PAPER_DIMENSIONS,
                  **kwargs: Any) -> dict[str, dict]:
    """`run_vbench`, or its earlier result in ``out_dir/scores.json`` when that was made from the same video files
    (names and sha256) and dimensions: the BF16 videos of a sweep are scored once, not once per cell (a 720p
    scoring pass costs minutes per dimension)."""
    key = _scores_key(Path(videos_dir), dimensions)
    path = Path(out_dir) / SCORES
    try:
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            logger.info("VBench: reusing the scores of %s in %s", videos_dir, path)
            return stored["scores"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: score again
    scores = run_vbench(videos_dir, out_dir, dimensions, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"key": key, "scores": scores}))
    return scores


def _scores_key(videos: Path, dimensions: Sequence[str]) -> str:
    parts = [VBENCH_VERSION, list(dimensions), [[p.name, file_sha256(p)] for p in sorted(videos.glob("*.mp4"))]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def check_vbench_paths(*paths: str | Path) -> None:
    """Refuse paths VBench's shell would split (spaces, quotes); cheap, so jobs call it before long work."""
    for path in paths:
        resolved = Path(path).resolve()
        if not _SHELL_SAFE.match(str(resolved)):
            raise ValueError(f"VBench passes paths through a shell; use a path without spaces or quotes: {resolved}")


def _run_one(exe: str, videos: Path, out: Path, dimension: str, env: dict, timeout: float | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*_eval_results.json"):
        stale.unlink()
    cmd = [exe, "evaluate", "--videos_path", str(videos), "--dimension", dimension, "--mode", "custom_input",
           "--output_path", f"{out}/", "--load_ckpt_from_local", "True"]
    shown = " ".join(cmd)
    logger.info("VBench %s: %s", dimension, shown)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise VBenchError(f"VBench timed out after {timeout} s on {dimension}: {shown}") from exc
    except OSError as exc:
        raise VBenchError(f"could not start VBench ({exc}): {shown}") from exc
    (out / "vbench.log").write_text(f"$ {shown}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    tail = (proc.stderr.strip() or proc.stdout.strip())[-_TAIL_CHARS:]
    if proc.returncode != 0:
        raise VBenchError(f"VBench failed on {dimension} (exit {proc.returncode}): {shown}\n--- stderr tail:\n{tail}")
    results = sorted(out.glob("*_eval_results.json"), key=lambda p: p.stat().st_mtime)
    if not results:
        raise VBenchError(
            f"VBench wrote no *_eval_results.json for {dimension} in {out} (its CLI hides its worker's exit status;"
            f" log in {out / 'vbench.log'}): {shown}\n--- output tail:\n{tail}"
        )
    parsed = parse_results(results[-1], dimension)
    unscored = sorted({p.name for p in videos.glob("*.mp4")} - set(parsed["per_video"]))
    if unscored:
        logger.warning("VBench %s scored no result for %d videos: %s", dimension, len(unscored), unscored[:5])
    return parsed


def parse_results(path: str | Path, dimension: str) -> dict:
    """One dimension of a VBench ``*_eval_results.json``, per video keyed by file name."""
    try:
        data = json.loads(Path(path).read_text())
        aggregate, per_video = data[dimension]
        scores = {Path(item["video_path"]).name: float(item["video_results"]) for item in per_video}
        mean = float(aggregate)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VBenchError(f"unreadable VBench result for {dimension} in {path}: {exc!r}") from exc
    return {"mean": mean, "per_video": scores}
