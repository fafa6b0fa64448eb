"""Per-block analysis on the tiny Wan2.1 (8 blocks, boundary blocks planted unlike the middle ones)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import vidquant
from vidquant import ptq
from vidquant.calib.calibrate import CalibSettings
from vidquant.calib.capture import capture_calls
from vidquant.calib.prompts import default_prompts
from vidquant.eval.blocks import analyze, block_sensitivity, trajectory_sensitivity
from vidquant.models import adapter_for, load_pipeline
from vidquant.models.tiny_wan21 import boundary_blocks, build_tiny_wan21_pipeline
from vidquant.nn import QuantLinear
from vidquant.recipes import Recipe, load_recipe
from vidquant.state import PTQState

SETTINGS = CalibSettings(num_prompts=1, steps=3, height=32, width=32, frames=9, bins=2, seed=7)
FIRST, LAST = boundary_blocks(8)
MIDDLE = [i for i in range(8) if i not in FIRST + LAST]


@pytest.fixture(scope="module")
def wan21_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wan21")
    build_tiny_wan21_pipeline().save_pretrained(path)
    return path


def fresh(path: Path):
    pipe = load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def stats(wan21_dir: Path):
    return vidquant.calibrate(fresh(wan21_dir), default_prompts(), SETTINGS, progress=False)


def output(pipe) -> torch.Tensor:
    return pipe(prompt="a red car", height=32, width=32, num_frames=9, num_inference_steps=2, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(0), output_type="latent").frames


def test_captured_calls_are_bounded_deterministic_and_replay_exactly(wan21_dir: Path) -> None:
    pipe = fresh(wan21_dir)
    outputs: list[torch.Tensor] = []
    hook = pipe.transformer.register_forward_hook(lambda _m, _a, out: outputs.append(out[0].clone()))
    calls = capture_calls(pipe, default_prompts()[:1], SETTINGS, max_calls=4)
    hook.remove()
    assert list(calls) == ["transformer"] and len(calls["transformer"]) == 4  # of 3 steps x 2 CFG branches
    again = capture_calls(pipe, default_prompts()[:1], SETTINGS, max_calls=4)
    timesteps = [c.info.timestep for c in calls["transformer"]]
    assert timesteps == [c.info.timestep for c in again["transformer"]] and timesteps == sorted(timesteps, reverse=True)
    for call, other in zip(calls["transformer"], again["transformer"], strict=True):
        assert torch.equal(call.kwargs["hidden_states"], other.kwargs["hidden_states"])
    first = calls["transformer"][0]
    with torch.no_grad():
        replayed = first.replay(pipe.transformer)
    assert any(torch.equal(replayed, out) for out in outputs)  # the very call the pipeline made
    with pytest.raises(ValueError, match="max_calls must be >= 1"):
        capture_calls(pipe, default_prompts()[:1], SETTINGS, max_calls=0)


def test_statistics_tell_boundary_blocks_from_the_middle(wan21_dir: Path, stats, tmp_path: Path) -> None:
    pipe = fresh(wan21_dir)
    result = analyze(pipe, stats, max_calls=3, out=tmp_path / "a")
    table = {r["block"]: r for r in result.table()}
    assert sorted(table) == list(range(8)) and not result.sensitivity
    bins = {r["bin"] for r in result.rows}
    assert "all" in bins and bins - {"all"} and bins - {"all"} <= {0, 1}
    for r in table.values():
        assert r["values"] > 0 and 0 <= r["below_band"] + r["above_band"] == pytest.approx(r["out_of_band"])
        assert r["absmax"] >= r["p99_9"] >= r["median"] > 0 and r["kurtosis"] > 0
    # massive activations of the first blocks: HiF8 keeps 1 mantissa bit there
    assert max(table[i]["act_hif8_sqnr_db"] for i in FIRST) < min(table[i]["act_hif8_sqnr_db"] for i in MIDDLE)
    assert min(table[i]["absmax"] for i in FIRST) > 10 * max(table[i]["absmax"] for i in MIDDLE)
    saved = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert saved["meta"]["held_out_seed_offset"] == 10_000 and saved["library_version"] == vidquant.__version__
    assert (tmp_path / "a" / "analysis.csv").read_text().startswith("expert,block,bin,")
    assert "Blocks, most sensitive first" in (tmp_path / "a" / "analysis.html").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="notes.txt"):
        analyze(pipe, stats, max_calls=1, out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_hif8_sensitivity_is_highest_at_the_boundary_and_leaves_the_model_as_it_was(wan21_dir: Path, stats,
                                                                                    tmp_path: Path) -> None:
    pipe = fresh(wan21_dir)
    reference = output(pipe)
    state = vidquant.quantize(pipe, "hif8", stats)
    result = analyze(pipe, stats, state, max_calls=4)
    sens = result.sensitivity["transformer"]["blocks"]
    assert len(sens) == 8 and all(s > 0 for s in sens)
    boundary = [sens[i] for i in FIRST + LAST]
    assert sum(boundary) / len(boundary) > 2 * sum(sens[i] for i in MIDDLE) / len(MIDDLE)  # the paper's observation
    assert result.sensitivity["transformer"]["all"] > max(sens)
    assert all(not math.isnan(r["layer_sqnr_db"]) for r in result.table())
    assert torch.equal(output(pipe), reference)  # every swap undone, no QuantLinear left behind
    assert not any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())
    protected = vidquant.quantize(pipe, "boundary-hif8", stats)
    calls = capture_calls(pipe, default_prompts()[:1], SETTINGS, max_calls=2, seed_offset=10_000)
    kept = block_sensitivity(pipe, protected, calls)["transformer"]["blocks"]
    assert [kept[i] for i in FIRST + LAST] == [0.0] * 5 and all(kept[i] > 0 for i in MIDDLE)


@pytest.fixture
def few_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Auto protection ranks blocks on 4 replayed calls of one held-out prompt (the suite stays fast)."""
    monkeypatch.setattr(ptq, "AUTO_PROMPTS", 1)
    monkeypatch.setattr(ptq, "AUTO_CALLS", 4)


def test_auto_protection_keeps_the_blocks_that_stand_out(wan21_dir: Path, stats, tmp_path: Path, few_calls) -> None:
    pipe = fresh(wan21_dir)
    state = vidquant.quantize(pipe, "auto-boundary-hif8", stats)
    chosen = state.plan["protected_blocks"]["transformer"]
    sens = state.plan["sensitivity"]["transformer"]
    assert len(chosen) == 5 and set(FIRST) <= set(chosen)  # auto_stand_out 0: the whole budget, most sensitive
    assert all(sens[i] >= max(sens[j] for j in range(8) if j not in chosen) for i in chosen)
    assert not any(name.startswith(tuple(f"transformer.blocks.{i}." for i in chosen)) for name in state.layers)
    assert all(state.plan["protected"][name].startswith("protected block") for name in state.plan["protected"])
    state.save(tmp_path / "state")
    loaded = vidquant.load_state(tmp_path / "state")
    assert loaded.plan == state.plan and loaded.recipe["protect_blocks"] == "auto"
    vidquant.apply(pipe, loaded)
    assert sum(isinstance(m, QuantLinear) for m in pipe.transformer.modules()) == len(state.layers)
    with pytest.raises(ValueError, match="calibration statistics"):
        vidquant.quantize(fresh(wan21_dir), "auto-boundary-hif8")  # the held-out protocol comes from them


def test_a_budget_of_two_over_the_hif4_track(wan21_dir: Path, stats, few_calls) -> None:
    state = vidquant.quantize(fresh(wan21_dir), "auto-tail-aware-hif4", stats)
    chosen = state.plan["protected_blocks"]["transformer"]
    assert len(chosen) <= 2 and len(state.plan["sensitivity"]["transformer"]) == 8
    assert len(state.layers) == 10 * (8 - len(chosen))


def test_trajectory_sensitivity_is_the_latent_error_with_only_that_block_quantized(wan21_dir: Path, stats) -> None:
    """One block's value is exactly the final latents' relative error of a model with only that block's layers
    applied; blocks left out of the candidates are NaN; the model is left as it was."""
    pipe = fresh(wan21_dir)
    state = vidquant.quantize(pipe, "hif8", stats)
    prompts = default_prompts()[:1]
    got = trajectory_sensitivity(pipe, state, prompts, SETTINGS, 10_000, {"transformer": [0, 6]})["transformer"]
    assert math.isnan(got["blocks"][3]) and got["blocks"][0] > 0 and got["all"] > 0
    assert not any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())
    adapter = adapter_for(pipe)

    def latents(model) -> torch.Tensor:
        kwargs = adapter.call_kwargs(SETTINGS, prompts[0], SETTINGS.seed_for(10_000))
        return model(**kwargs, output_type="latent").frames.double()

    reference = latents(pipe)
    only = fresh(wan21_dir)
    vidquant.apply(only, PTQState({n: s for n, s in state.layers.items() if n.startswith("transformer.blocks.6.")},
                                  state.recipe, state.base, state.plan, timestep_bins=state.timestep_bins),
                   runtime="fake")
    expected = float((latents(only) - reference).square().sum() / reference.square().sum())
    assert got["blocks"][6] == pytest.approx(expected, rel=1e-9)


def test_auto_protection_by_trajectories(wan21_dir: Path, stats, few_calls, monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto_sensitivity: trajectory`` re-measures the one-call candidates over whole runs; the others keep a
    scaled one-call value (here 3 candidates of 8)."""
    monkeypatch.setattr(ptq, "AUTO_TRAJECTORY_CANDIDATES", 3)
    recipe = Recipe.model_validate({**load_recipe("auto-boundary-hif8").to_dict(), "auto_sensitivity": "trajectory"})
    assert recipe.to_dict()["auto_sensitivity"] == "trajectory"
    assert "auto_sensitivity" not in load_recipe("auto-boundary-hif8").to_dict()  # old manifests unchanged
    state = vidquant.quantize(fresh(wan21_dir), recipe, stats)
    sens = state.plan["sensitivity"]["transformer"]
    assert len(sens) == 8 and all(v >= 0 and math.isfinite(v) for v in sens)
    assert len(state.plan["protected_blocks"]["transformer"]) == 5
    with pytest.raises(ValueError, match="auto_sensitivity: trajectory runs whole denoising trajectories"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        vidquant.quantize(model, Recipe.model_validate({**recipe.to_dict(), "protect_blocks": "auto"}),
                          vidquant.calibrate(model, [torch.randn(2, 4)]), forward_loop=[torch.randn(2, 4)])
