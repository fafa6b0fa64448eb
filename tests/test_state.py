"""The PTQ state: quantize -> save -> load -> apply gives the in-memory quantized pipeline, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import vidquant
from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.prompts import default_prompts
from vidquant.cli import app
from vidquant.models import adapter_for, tiny, wan
from vidquant.nn import QuantLinear

SETTINGS = CalibSettings(num_prompts=2, steps=3, height=32, width=32, frames=5, bins=2)


def run(pipe) -> np.ndarray:
    out = pipe(prompt="a red car with a licence plate", height=32, width=32, num_frames=5, num_inference_steps=3,
               guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="latent")
    return out.frames.float().numpy()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny.build_tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stats(base_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    pipe = wan.load_pipeline(base_dir)
    pipe.set_progress_bar_config(disable=True)
    return calibrate(pipe, default_prompts(), SETTINGS, tmp_path_factory.mktemp("stats"), progress=False)


def fresh(base_dir: Path):
    pipe = wan.load_pipeline(base_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_saved_state_reproduces_the_in_memory_quantized_pipeline(base_dir: Path, stats, tmp_path: Path) -> None:
    pipe = fresh(base_dir)
    reference = run(pipe)
    state = vidquant.quantize(pipe, "tail-aware-hif4", stats)
    assert run(pipe).tobytes() == reference.tobytes()  # quantize does not change the pipeline
    vidquant.apply(pipe, state)
    in_memory = run(pipe)
    assert not np.array_equal(in_memory, reference)
    state.save(tmp_path / "state")
    restored = fresh(base_dir)
    vidquant.apply(restored, vidquant.load_state(tmp_path / "state"))
    assert run(restored).tobytes() == in_memory.tobytes()
    for expert in wan.experts(restored).values():  # both experts, every target Linear
        assert all(isinstance(m, QuantLinear) for m in (expert.get_submodule(n) for n in wan.target_linears(expert)))


def test_manifest_records_what_made_the_state(base_dir: Path, stats, tmp_path: Path) -> None:
    pipe = fresh(base_dir)
    vidquant.quantize(pipe, "max-hif4", stats).save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["library_version"] == vidquant.__version__
    assert manifest["recipe"]["name"] == "max-hif4"
    assert manifest["base"]["config_sha256"] == adapter_for(pipe).config_fingerprint()
    assert manifest["base"]["stats_model_fingerprint"] == adapter_for(pipe).fingerprint()
    assert len(manifest["layers"]) == 40
    layer = manifest["layers"]["transformer.blocks.0.attn1.to_q"]
    assert layer["weight_format"] == "hif4" and layer["act_format"] == "hif4" and layer["tensors"] == ["mask"]


def test_another_base_checkpoint_is_refused(stats, base_dir: Path, tmp_path: Path) -> None:
    state = vidquant.quantize(fresh(base_dir), "tail-aware-hif4", stats)
    other = tiny.build_tiny_pipeline(seed=1)
    with pytest.raises(ValueError, match="weight differs"):
        vidquant.apply(other, state)
    assert not any(isinstance(m, QuantLinear) for m in other.transformer.modules())  # nothing half-applied
    with pytest.raises(ValueError, match="another model: config fingerprint"):
        vidquant.apply(tiny.build_tiny_pipeline(i2v=True), state)
    with pytest.raises(ValueError, match="calibrated on another model"):
        vidquant.quantize(other, "tail-aware-hif4", stats)
    pipe = fresh(base_dir)
    vidquant.apply(pipe, state)
    with pytest.raises(ValueError, match="found QuantLinear"):
        vidquant.apply(pipe, state)


def test_tampered_or_truncated_states_are_refused(base_dir: Path, stats, tmp_path: Path) -> None:
    vidquant.quantize(fresh(base_dir), "tail-aware-hif4", stats).save(tmp_path / "s")
    tensors = tmp_path / "s" / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1
    tensors.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum differs"):
        vidquant.load_state(tmp_path / "s")
    tensors.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="checksum differs"):
        vidquant.load_state(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="not a PTQ state"):
        vidquant.load_state(tmp_path / "s")


def test_rtn_needs_no_statistics_and_smoothing_does(base_dir: Path) -> None:
    state = vidquant.quantize(fresh(base_dir), "rtn-nvfp4", None)
    assert all("mask" not in layer.tensors for layer in state.layers.values())
    with pytest.raises(ValueError, match="--stats"):
        vidquant.quantize(fresh(base_dir), "tail-aware-hif4", None)


def test_cli_quantize_and_inspect(tmp_path: Path) -> None:
    runner = CliRunner()
    calib = ["calibrate", "--model", "tiny", "--num-prompts", "1", "--steps", "2", "--out", str(tmp_path / "stats")]
    assert runner.invoke(app, calib).exit_code == 0
    args = ["quantize", "--model", "tiny", "--stats", str(tmp_path / "stats"), "--out", str(tmp_path / "state")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "transformer_2" in result.output and "% of the BF16 transformer" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "state")])
    assert result.exit_code == 0 and "tail-aware-hif4" in result.output
    result = runner.invoke(app, ["quantize", "--model", "tiny", "--recipe", "nope", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "nope" in result.output
    assert not (tmp_path / "x").exists()


def test_an_edited_manifest_is_refused_and_old_states_still_load(base_dir: Path, tmp_path: Path) -> None:
    state = vidquant.quantize(fresh(base_dir), "rtn-hif4", None)
    state.save(tmp_path / "s")
    manifest_file = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["layers"]["transformer.blocks.0.attn1.to_q"]["weight_format"] = "int4"
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest_sha256.*does not match"):
        vidquant.load_state(tmp_path / "s")
    del manifest["manifest_sha256"]  # dropping the seal does not help either
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest_sha256"):
        vidquant.load_state(tmp_path / "s")
    manifest["format_version"] = 2  # a state written before the seal existed loads as it did
    manifest["layers"]["transformer.blocks.0.attn1.to_q"]["weight_format"] = "hif4"
    manifest_file.write_text(json.dumps(manifest))
    assert vidquant.load_state(tmp_path / "s").fingerprint() == state.fingerprint()


@pytest.mark.parametrize("recipe", ["tail-aware-hif4", "svdquant-gptq-hif4"])
def test_a_version_2_state_still_loads_and_applies_bit_identically(recipe: str) -> None:
    """States written by vidquant before the adapter/parts redesign (state format 2; svdquant-gptq options at the
    top level of the recipe), by tests/data/make_v2_states.py at commit a2f46cf: applied today, the tiny
    pipeline gives the latents that version gave, bit for bit."""
    data = Path(__file__).parent / "data"
    folder = data / f"state-v2-{recipe}"
    assert json.loads((folder / "manifest.json").read_text())["format_version"] == 2
    state = vidquant.load_state(folder)
    pipe = tiny.build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    vidquant.apply(pipe, state)
    expected = load_file(str(data / "state-v2-latents.safetensors"))[recipe]
    assert np.array_equal(run(pipe), expected.numpy())


def test_a_clip_ratio_shared_by_every_layer_saves(base_dir: Path, stats, tmp_path: Path) -> None:
    recipe = vidquant.load_recipe("tail-aware-hif4").model_copy(update={"act_clip": 0.9})
    state = vidquant.quantize(fresh(base_dir), recipe, stats)
    state.save(tmp_path / "s")
    loaded = vidquant.load_state(tmp_path / "s")
    assert loaded.fingerprint() == state.fingerprint()
    assert all(float(layer.tensors["act_clip"]) == pytest.approx(0.9) for layer in loaded.layers.values())
