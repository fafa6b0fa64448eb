"""Timestep-aware SVDQuant-GPTQ end to end on the tiny pipeline: the state, its fidelity, and the wiring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import vidquant
from vidquant import formats
from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.prompts import default_prompts
from vidquant.eval.metrics import latent_rel_error
from vidquant.models import adapter_for, tiny, wan
from vidquant.nn import QuantLinear
from vidquant.ptq import svdquant_gptq
from vidquant.recipes import Recipe, load_recipe
from vidquant.state import MANIFEST

SETTINGS = CalibSettings(num_prompts=2, steps=6, height=32, width=32, frames=5, bins=2)
PROMPTS = default_prompts()


def recipe(name: str = "svdquant-gptq-hif4", **options) -> Recipe:
    """A bundled recipe with 2 timestep bins and ``options`` set in its method's section."""
    data = load_recipe(name).to_dict()
    if data["method"] == "svdquant-gptq":
        section = data["svdquant-gptq"]
        data["svdquant-gptq"] = {**section, "clip_search": {**section["clip_search"], "bins": 2}, **options}
    return Recipe.model_validate(data)


def run(pipe) -> np.ndarray:
    out = pipe(prompt="a red car with a licence plate", height=32, width=32, num_frames=5, num_inference_steps=6,
               guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="latent")
    return out.frames.float().numpy()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny.build_tiny_pipeline().save_pretrained(path)
    return path


def fresh(base_dir: Path):
    pipe = wan.load_pipeline(base_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stats(base_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return calibrate(fresh(base_dir), PROMPTS, SETTINGS, tmp_path_factory.mktemp("stats"), progress=False)


@pytest.fixture(scope="module")
def state(base_dir: Path, stats):
    return vidquant.quantize(fresh(base_dir), recipe(), stats)


def test_state_holds_packed_residuals_branches_and_bin_clips(base_dir: Path, state) -> None:
    pipe = fresh(base_dir)
    fmt = formats.get("hif4")
    assert set(state.timestep_bins) == {"transformer", "transformer_2"}
    assert all(len(edges) == 3 for edges in state.timestep_bins.values())
    for name, layer in state.layers.items():
        n, k = adapter_for(pipe).linear(name).weight.shape
        t = layer.tensors
        assert t["weight_packed"].dtype == torch.uint8 and t["weight_packed"].numel() == fmt.packed_nbytes(n, k)
        rank = load_recipe("svdquant-gptq-hif4").options.lowrank.rank_for(n, k)
        assert t["lowrank_down"].shape == (rank, k) and t["lowrank_up"].shape == (n, rank)
        assert t["act_clip"].shape == (2,) and ((t["act_clip"] > 0) & (t["act_clip"] <= 1)).all()
        assert "mask" in t
    assert any((layer.tensors["act_clip"] < 1).any() for layer in state.layers.values())  # the search clips somewhere


def test_save_load_apply_is_bit_identical_and_beats_tail_aware(base_dir: Path, stats, state, tmp_path: Path) -> None:
    pipe = fresh(base_dir)
    reference = run(pipe)
    tail_aware = fresh(base_dir)
    vidquant.apply(tail_aware, vidquant.quantize(tail_aware, "tail-aware-hif4", stats))
    vidquant.apply(pipe, state)
    in_memory = run(pipe)
    state.save(tmp_path / "state")
    restored = fresh(base_dir)
    vidquant.apply(restored, vidquant.load_state(tmp_path / "state"))
    assert run(restored).tobytes() == in_memory.tobytes()
    assert all(isinstance(m, QuantLinear) for m in (wan.experts(restored)["transformer"].get_submodule(n)
                                                    for n in state.plan["quantized"] if n.startswith("blocks")))
    ours, theirs = latent_rel_error(reference, in_memory), latent_rel_error(reference, run(tail_aware))
    assert 0 < ours < 0.8 * theirs, (ours, theirs)


def test_quantize_leaves_the_pipeline_unchanged_and_sequential_moves_only_the_second_expert(
    base_dir: Path, stats, state
) -> None:
    pipe = fresh(base_dir)
    before = adapter_for(pipe).fingerprint()
    sequential = vidquant.quantize(pipe, recipe(sequential_experts=True), stats)
    assert adapter_for(pipe).fingerprint() == before
    assert all(type(m) is nn.Linear for model in wan.experts(pipe).values() for m in wan.target_linears(model).values())
    assert all(not hasattr(model, "_vidquant_bin_hook") for model in wan.experts(pipe).values())
    for name, layer in state.layers.items():
        same = torch.equal(layer.tensors["weight_packed"], sequential.layers[name].tensors["weight_packed"])
        assert same if name.startswith("transformer.") else True
    assert any(not torch.equal(layer.tensors["weight_packed"], sequential.layers[name].tensors["weight_packed"])
               for name, layer in state.layers.items() if name.startswith("transformer_2."))


def test_passes_within_a_hessian_budget_and_resume_give_the_same_state(
    base_dir: Path, stats, state, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = svdquant_gptq.collect_layer_inputs

    def failing_second_pass(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and interrupt:
            raise Interrupted  # an interruption after the first pass was saved
        return real(*args, **kwargs)

    class Interrupted(Exception):
        pass

    interrupt = True

    monkeypatch.setattr(svdquant_gptq, "collect_layer_inputs", failing_second_pass)
    budget = 60 * 2**10 / 2**30  # 60 KiB: a third of the tiny model's Hessians (152 KiB), so three passes
    with pytest.raises(Interrupted):
        vidquant.quantize(fresh(base_dir), recipe(), stats, checkpoint=tmp_path / "partial", hessian_budget_gb=budget)
    saved = vidquant.load_state(tmp_path / "partial")
    assert 0 < len(saved.layers) < len(state.layers)
    calls.clear()
    interrupt = False
    resumed = vidquant.quantize(fresh(base_dir), recipe(), stats, checkpoint=tmp_path / "partial",
                                hessian_budget_gb=budget)
    assert len(calls) >= 2  # the remaining passes only
    for name, layer in saved.layers.items():  # what the checkpoint held is taken as is
        for key, tensor in layer.tensors.items():
            assert torch.equal(tensor, resumed.layers[name].tensors[key]), (name, key)
    # Against the one-pass state: equal up to BLAS rounding, whose last bits depend on how the process's
    # allocator aligned the Hessians (another test order gives other bits); codes may flip at a tie.
    for name, layer in state.layers.items():
        other = resumed.layers[name].tensors
        for key, tensor in layer.tensors.items():
            if key == "weight_packed":
                assert (tensor == other[key]).float().mean() > 0.97, (name, key)
            else:
                torch.testing.assert_close(tensor, other[key], rtol=1e-3, atol=1e-5, msg=f"{name} {key}")


def test_svdquant_needs_statistics_and_their_prompts(base_dir: Path, stats) -> None:
    with pytest.raises(ValueError, match="calibration protocol.*--stats"):
        vidquant.quantize(fresh(base_dir), recipe(), None)
    with pytest.raises(ValueError, match="other prompts"):
        vidquant.quantize(fresh(base_dir), recipe(), stats, prompts=PROMPTS[5:])


def test_a_checkpoint_made_from_other_statistics_is_not_resumed(
    base_dir: Path, stats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    other = calibrate(fresh(base_dir), PROMPTS, SETTINGS.model_copy(update={"seed": 7}), tmp_path / "other",
                      progress=False)
    real = svdquant_gptq.collect_layer_inputs
    calls = []

    def interrupted_after_one_pass(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(svdquant_gptq, "collect_layer_inputs", interrupted_after_one_pass)
    budget = 60 * 2**10 / 2**30  # three passes
    with pytest.raises(KeyboardInterrupt):
        vidquant.quantize(fresh(base_dir), recipe(), stats, checkpoint=tmp_path / "partial", hessian_budget_gb=budget)
    assert vidquant.load_state(tmp_path / "partial").layers
    monkeypatch.setattr(svdquant_gptq, "collect_layer_inputs", real)
    with caplog.at_level("WARNING"):
        state = vidquant.quantize(fresh(base_dir), recipe(), other, checkpoint=tmp_path / "partial",
                                  hessian_budget_gb=budget)
    assert "made from other inputs (base stats_fingerprint" in caplog.text
    assert state.base["stats_fingerprint"] == other.fingerprint() != stats.fingerprint()


def test_state_records_the_held_out_choices_and_warns_of_few_tokens(
    base_dir: Path, state, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every layer's info says what GPTQ / the branch / the clip search kept and on how many tokens; the tiny
    pipeline's few calibration tokens are warned about by layer name, in the manifest and in `inspect`."""
    from typer.testing import CliRunner

    from vidquant.cli import app

    pipe = fresh(base_dir)
    for name, layer in state.layers.items():
        info = layer.info
        k = adapter_for(pipe).linear(name).in_features
        assert info["tokens"] > 0 and info["held_out_tokens"] > 0
        assert info["gptq"].startswith(("rtn (", "damp=")), info
        assert "iterations, kept" in info["lowrank"]
        assert ("warning" in info) == (info["tokens"] < 4 * k)
        assert str(info["tokens"]) in info.get("warning", str(info["tokens"]))
    assert any("warning" in layer.info for layer in state.layers.values())  # 2 prompts of 32 x 32: few tokens
    state.save(tmp_path / "state")
    manifest = json.loads((tmp_path / "state" / MANIFEST).read_text())
    saved = {name: entry["info"] for name, entry in manifest["layers"].items()}
    assert saved == {name: layer.info for name, layer in state.layers.items()}
    loaded = vidquant.load_state(tmp_path / "state")
    assert {name: layer.info for name, layer in loaded.layers.items()} == saved
    assert loaded.fingerprint() == state.fingerprint()
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "state")], terminal_width=200)
    assert result.exit_code == 0, result.output
    warned = [name for name, layer in state.layers.items() if "warning" in layer.info]
    assert f"{len(warned)} layers warned at quantization" in result.output
    assert f"{warned[0]}: few calibration tokens" in result.output
    assert "GPTQ kept on" in result.output


def test_without_held_out_rows_gptq_runs_at_the_first_damping(base_dir: Path, stats) -> None:
    """``held_out.max_tokens: 0`` switches the rule off: one damping, as before, said so in the info."""
    plain = vidquant.quantize(fresh(base_dir), recipe(held_out={"max_tokens": 0}, gptq={"damp": 0.1}), stats)
    for layer in plain.layers.values():
        assert layer.info["gptq"] == "damp=0.1 (no held-out rows: not verified)"
        assert "held_out_tokens" not in layer.info and "calibration Hessian" in layer.info["lowrank"]


def test_recipe_damping_accepts_a_number_a_list_or_auto() -> None:
    grid = [0.01, 0.1, 1.0]
    assert recipe(gptq={"damp": "auto"}).options.gptq.damp == grid
    assert recipe(gptq={"damp": 0.05}).options.gptq.damp == [0.05]
    assert recipe(gptq={"damp": [1.0, 0.1, 1.0]}).options.gptq.damp == [1.0, 0.1]
    assert load_recipe("svdquant-gptq-hif4").options.gptq.damp == grid
    for bad in ([], [0.0], [float("nan")], "none"):
        with pytest.raises(ValueError, match="damp"):
            recipe(gptq={"damp": bad})
