"""Generation under a protocol on the tiny pipelines: files, exactness, resume, pairing; the probes."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from vidquant import formats
from vidquant.eval import generate as gen
from vidquant.eval.generate import (
    check_pair,
    generate_videos,
    load_frames,
    load_latents,
    load_records,
    to_uint8,
    video_name,
    write_mp4,
)
from vidquant.eval.metrics import TEMPORAL, compare_videos, summarize
from vidquant.eval.probes import StepTimer, current_rss, peak_memory, weight_bytes
from vidquant.eval.protocol import Protocol
from vidquant.models import adapter_for, tiny, wan
from vidquant.nn import QuantLinear, swap

PROTOCOL = Protocol(height=16, width=32, frames=5, steps=2)
LONG = "A very long prompt about a red fox " * 12
PROMPTS = ["A red car drives down a wet city street at night.", "AC/DC on stage, smoke\nand lights", LONG]


@pytest.fixture(scope="module")
def pipe():
    return tiny.build_tiny_pipeline()


@pytest.fixture(scope="module")
def bf16_dir(pipe, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bf16")
    generate_videos(pipe, PROMPTS, PROTOCOL, out, progress=False)
    return out


@pytest.fixture(scope="module")
def twin_dir(pipe, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second run of the same prompts and protocol (stands in for the quantized set)."""
    out = tmp_path_factory.mktemp("twin")
    generate_videos(pipe, PROMPTS, PROTOCOL, out, progress=False)
    return out


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Prompts of every WanPipeline call made during the test."""
    seen: list[str] = []
    original = WanPipeline.__call__

    def counting(self, *args, **kwargs):
        seen.append(kwargs["prompt"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WanPipeline, "__call__", counting)
    return seen


def plain_call(pipe, prompt: str, seed: int, output_type: str, **kwargs):
    return pipe(
        prompt=prompt,
        height=PROTOCOL.height,
        width=PROTOCOL.width,
        num_frames=PROTOCOL.frames,
        num_inference_steps=PROTOCOL.steps,
        guidance_scale=PROTOCOL.cfg,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
        **kwargs,
    ).frames


def read_mp4(path: Path) -> tuple[dict, np.ndarray]:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return meta, np.stack([np.frombuffer(b, np.uint8).reshape(height, width, 3) for b in reader])


def test_protocol_fingerprint_and_grid() -> None:
    assert PROTOCOL.fingerprint() == Protocol(height=16, width=32, frames=5, steps=2).fingerprint()
    assert PROTOCOL.fingerprint() != PROTOCOL.model_copy(update={"cfg": 5.0}).fingerprint()
    assert Protocol().model_dump()["frames"] == 61
    wan = adapter_for(tiny.build_tiny_pipeline(outliers=False))  # the grid is the model family's
    with pytest.raises(ValueError, match="4k"):
        wan.check_protocol(Protocol(frames=60))
    with pytest.raises(ValueError, match="multiple of 16"):
        wan.check_protocol(Protocol(width=1000))
    wan.check_protocol(Protocol())
    with pytest.raises(ValueError):
        Protocol(steps=40, guidance=3.0)
    for bad in ({"cfg": float("nan")}, {"cfg": float("inf")}, {"cfg": -1.0}, {"frames": 0}, {"height": 0}):
        with pytest.raises(ValueError):
            Protocol(**bad)


def test_video_names_are_readable_safe_and_short() -> None:
    assert video_name("A cat, sitting.") == "A cat, sitting."
    assert video_name("AC/DC on stage, smoke\nand lights") == "AC_DC on stage, smoke_and lights"
    assert video_name(".hidden  prompt ") == "hidden prompt"
    assert video_name("") == "untitled"
    long = video_name("é" * 300)
    assert len(long.encode()) <= gen.MAX_NAME_BYTES and set(long) == {"é"}
    assert len(video_name(LONG).encode()) <= gen.MAX_NAME_BYTES and not video_name(LONG).endswith(" ")


def test_files_follow_vbench_naming_with_a_prompt_map(bf16_dir: Path) -> None:
    records = load_records(bf16_dir)
    assert [r.prompt for r in records] == PROMPTS
    mapping = json.loads((bf16_dir / gen.PROMPTS_FILE).read_text())
    assert mapping == {f"{video_name(p)}-{i}.mp4": p for i, p in enumerate(PROMPTS)}
    for record in records:
        assert all(path.is_file() for path in record.paths.values())
        # VBench custom mode: prompt = file stem without its trailing -<index>
        assert re.sub(r"-\d+$", "", record.paths["mp4"].stem) == record.name == video_name(record.prompt)
        sidecar = json.loads(record.paths["sidecar"].read_text())
        assert sidecar["protocol_fingerprint"] == PROTOCOL.fingerprint()
        assert sidecar["seed"] == PROTOCOL.seed + record.index
        assert record.seconds_per_step > 0 and record.peak_memory_bytes > 0
    assert records[0].paths["mp4"].name == f"{PROMPTS[0]}-0.mp4"
    assert not list(bf16_dir.glob(".*"))  # no temporary file left


def test_frames_and_latents_are_those_of_a_plain_call(pipe, bf16_dir: Path) -> None:
    record = load_records(bf16_dir)[0]
    frames = load_frames(record)
    assert frames.dtype == np.uint8 and frames.shape == (5, 16, 32, 3)
    np.testing.assert_array_equal(frames, to_uint8(plain_call(pipe, PROMPTS[0], PROTOCOL.seed, "np")[0]))
    assert torch.equal(load_latents(record), plain_call(pipe, PROMPTS[0], PROTOCOL.seed, "latent"))


def test_mp4_decodes_to_the_frames(bf16_dir: Path) -> None:
    record = load_records(bf16_dir)[1]
    meta, decoded = read_mp4(record.paths["mp4"])
    frames = load_frames(record)
    assert decoded.shape == frames.shape and meta["fps"] == PROTOCOL.fps
    # the tiny VAE's frames are pixel noise, the worst case for 4:2:0 chroma
    assert np.abs(decoded.astype(int) - frames).mean() < 12


def test_mp4_round_trip_on_smooth_odd_sized_frames(tmp_path: Path) -> None:
    yy, xx = np.mgrid[:15, :17]
    frames = np.stack([np.stack([xx * 15 + t, yy * 16, np.full_like(xx, 90)], -1) for t in range(4)]).astype(np.uint8)
    write_mp4(tmp_path / "v.mp4", frames, fps=16)
    _, decoded = read_mp4(tmp_path / "v.mp4")
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 2


def test_same_protocol_and_seed_reproduce_the_frames(bf16_dir: Path, twin_dir: Path) -> None:
    for a, b in zip(load_records(bf16_dir), load_records(twin_dir), strict=True):
        np.testing.assert_array_equal(load_frames(a), load_frames(b))


def test_resume_skips_what_is_done(pipe, bf16_dir: Path, calls: list[str], tmp_path: Path) -> None:
    before = load_records(bf16_dir)
    assert generate_videos(pipe, PROMPTS, PROTOCOL, bf16_dir, progress=False) == before
    assert calls == []
    out = tmp_path / "grow"
    generate_videos(pipe, PROMPTS[:1], PROTOCOL, out, progress=False)
    records = generate_videos(pipe, PROMPTS[:2], PROTOCOL, out, progress=False)
    assert calls == PROMPTS[:2] and [r.prompt for r in records] == PROMPTS[:2]


def test_another_protocol_or_prompt_in_the_same_dir_is_refused(pipe, bf16_dir: Path, calls: list[str]) -> None:
    with pytest.raises(ValueError, match=re.escape(str(bf16_dir))):
        generate_videos(pipe, PROMPTS, PROTOCOL.model_copy(update={"steps": 3}), bf16_dir, progress=False)
    with pytest.raises(ValueError, match="another prompt"):
        generate_videos(pipe, ["something else"], PROTOCOL, bf16_dir, progress=False)
    assert calls == []


def test_check_pair_accepts_matching_sets(bf16_dir: Path, twin_dir: Path) -> None:
    pairs = check_pair(bf16_dir, twin_dir)
    assert [(a.index, b.index) for a, b in pairs] == [(0, 0), (1, 1), (2, 2)]


def test_check_pair_finds_mismatches(pipe, bf16_dir: Path, twin_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        check_pair(tmp_path / "nothing", twin_dir)
    partial = tmp_path / "partial"
    generate_videos(pipe, PROMPTS[:1], PROTOCOL, partial, progress=False)
    with pytest.raises(ValueError, match="lacks the reference videos"):
        check_pair(partial, twin_dir)
    with pytest.raises(ValueError, match="lacks 2 videos"):
        check_pair(bf16_dir, partial)
    other_prompt = tmp_path / "other-prompt"
    generate_videos(pipe, ["A cat."], PROTOCOL, other_prompt, progress=False)
    with pytest.raises(ValueError, match="different prompt lists"):
        check_pair(partial, other_prompt)
    other_protocol = tmp_path / "other-protocol"
    generate_videos(pipe, PROMPTS[:1], PROTOCOL.model_copy(update={"seed": 7}), other_protocol, progress=False)
    with pytest.raises(ValueError, match="different protocols: seed 42 vs 7"):
        check_pair(partial, other_protocol)
    next(partial.glob("*.mp4")).unlink()
    with pytest.raises(ValueError, match="missing files"):
        check_pair(partial, twin_dir)


def test_compare_and_summarize_real_videos(bf16_dir: Path, twin_dir: Path) -> None:
    pairs = check_pair(bf16_dir, twin_dir)
    twins = compare_videos(*pairs[0])
    assert twins["psnr"] == math.inf and twins["ssim"] == pytest.approx(1.0) and twins["latent_rel_error"] == 0
    for name in TEMPORAL:
        assert 0 < twins[f"{name}_ref"] == twins[f"{name}_test"] <= 1
    strangers = compare_videos(pairs[0][0], pairs[1][1])  # another prompt and seed
    assert math.isfinite(strangers["psnr"]) and strangers["ssim"] < 1 and strangers["latent_rel_error"] > 0.1
    summary = summarize([twins, strangers])
    assert summary["count"] == 2 and set(summary["relative_delta"]) == set(TEMPORAL)


def test_i2v_uses_the_placeholder_image(tmp_path: Path) -> None:
    pipe = tiny.build_tiny_pipeline(i2v=True)
    (record,) = generate_videos(pipe, PROMPTS[:1], PROTOCOL, tmp_path, progress=False)
    image = wan.placeholder_image(PROTOCOL.height, PROTOCOL.width, PROTOCOL.image_color)
    expected = to_uint8(plain_call(pipe, PROMPTS[0], PROTOCOL.seed, "np", image=image)[0])
    np.testing.assert_array_equal(load_frames(record), expected)


def test_step_timer_leaves_the_first_step_out() -> None:
    timer = StepTimer("cpu")
    timer.start()
    timer.marks = [0.0]
    timer.marks += [5.0, 6.0, 8.0]  # first step 5 s (text encoding and warm-up), then 1 s and 2 s
    assert timer.step_seconds == [5.0, 1.0, 2.0]
    assert timer.seconds_per_step == pytest.approx(1.5)
    timer.marks = [0.0, 3.0]
    assert timer.seconds_per_step == 3.0
    with pytest.raises(RuntimeError):
        StepTimer("cpu").mark()


def test_peak_memory_sees_a_short_allocation_and_forgets_it() -> None:
    size = 200 * 2**20
    with peak_memory("cpu") as big:
        block = np.ones(size // 8)
        time.sleep(0.05)
        del block
    with peak_memory("cpu") as small:
        time.sleep(0.02)
    assert big.kind == "process_rss"
    assert big.bytes >= current_rss() + size // 2
    assert small.bytes < big.bytes - size // 2  # a lifetime high-water mark would repeat the first peak


def test_weight_bytes_counts_packed_quantized_weights(pipe) -> None:
    experts = wan.experts(pipe)
    numel = sum(p.numel() for m in experts.values() for p in m.parameters())
    assert weight_bytes(pipe) == (2 * numel, 2 * numel)  # tiny pipelines are float32: counted at BF16 anyway
    quantized = tiny.build_tiny_pipeline()
    model = wan.experts(quantized)["transformer"]
    linear = model.get_submodule("blocks.0.attn1.to_q")
    mask = torch.full((linear.in_features,), 2.0)
    swap(model, "blocks.0.attn1.to_q", QuantLinear(linear, "hif4", "hif4", mask=mask))
    packed = formats.get("hif4").packed_nbytes(linear.out_features, linear.in_features)
    expected = 2 * numel - 2 * linear.weight.numel() + packed + 4 * linear.in_features  # + the fp32 mask
    assert weight_bytes(quantized) == (2 * numel, expected)


def test_an_edited_sidecar_cannot_point_outside_its_folder(tmp_path: Path) -> None:
    pipe = tiny.build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    (record,) = generate_videos(pipe, PROMPTS[:1], PROTOCOL, tmp_path / "v", progress=False)
    sidecar = json.loads(record.paths["sidecar"].read_text())
    for field, value, message in (("name", "../x", "not the file name of its prompt"), ("index", -1, "index"),
                                  ("seconds_per_step", "fast", "seconds_per_step"), ("prompt", None, "prompt")):
        record.paths["sidecar"].write_text(json.dumps({**sidecar, field: value}))
        with pytest.raises(ValueError, match=message):
            load_records(tmp_path / "v")
