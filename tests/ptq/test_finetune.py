"""QAT with compact deltas on the tiny Wan2.2 pipeline: it learns, it keeps PTQ when it does not help on held-out
calls, its state round-trips and applies (fake = packed), and a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vidquant
from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.prompts import default_prompts
from vidquant.calib.stats import load_stats
from vidquant.calib.trajectories import record_trajectories
from vidquant.cli import app
from vidquant.eval.fidelity import HELD_OUT_SEED_OFFSET
from vidquant.models import adapter_for, tiny, wan
from vidquant.ptq.finetune import DELTAS, QATSettings, finetune
from vidquant.state import load_state

SETTINGS = CalibSettings(num_prompts=2, steps=6, height=16, width=16, frames=5, bins=2)
FAST = {"calls_per_bin": 1, "held_out_prompts": 1, "held_out_per_bin": 1}


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
def stats_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stats")
    calibrate(fresh(base_dir), default_prompts(), SETTINGS, path, progress=False)
    return path


@pytest.fixture(scope="module")
def stats(stats_dir: Path):
    return load_stats(stats_dir)


@pytest.fixture(scope="module")
def state(base_dir: Path, stats):
    return vidquant.quantize(fresh(base_dir), "tail-aware-hif4", stats)


@pytest.fixture(scope="module")
def tuned(base_dir: Path, stats, state):
    qat = QATSettings(steps=16, lr=1e-3, train=("lora", "masks", "clips"), eval_every=4, **FAST)
    return finetune(fresh(base_dir), state, stats, qat)


@pytest.mark.slow  # a QAT run with its teacher trajectories: ~1 min on a shared 2-core CPU
def test_qat_lowers_the_loss_and_adds_compact_deltas(base_dir: Path, state, tuned) -> None:
    record = tuned.qat
    assert record["kept"] == "qat" and record["best_step"] > 0
    assert record["loss"]["held_out_after"] < record["loss"]["held_out_before"]
    assert record["loss"]["train_after"] < record["loss"]["train_before"]
    assert record["train"] == ["lora", "masks", "clips"] and record["rank"] == 4
    for name, layer in tuned.layers.items():
        t, before = layer.tensors, state.layers[name].tensors
        assert t["lora_down"].shape[0] == 4 and t["lora_up"].abs().sum() > 0  # up starts at 0: it moved
        assert t["act_clip"].shape == (2,) and ((t["act_clip"] >= 0.05) & (t["act_clip"] <= 1)).all()
        assert not torch.equal(t["mask"], before["mask"])
        assert layer.weight_sha256 == state.layers[name].weight_sha256
    assert set(tuned.timestep_bins) == {"transformer", "transformer_2"}
    assert tuned.nbytes() < 0.5 * tuned.base["transformer_bf16_bytes"]  # deltas, not a weight copy
    assert state.qat == {}  # the input state is left as it was


@pytest.mark.slow  # a QAT run with its teacher trajectories: ~1 min on a shared 2-core CPU
def test_saved_state_round_trips_applies_and_reproduces_the_held_out_loss(base_dir: Path, stats, tuned,
                                                                           tmp_path: Path) -> None:
    tuned.save(tmp_path / "qat")
    loaded = load_state(tmp_path / "qat")
    assert loaded.fingerprint() == tuned.fingerprint() and loaded.qat == tuned.qat
    teacher = fresh(base_dir)
    held = record_trajectories(teacher, default_prompts()[:1], SETTINGS, loaded.timestep_bins, 1,
                               HELD_OUT_SEED_OFFSET)
    outputs = {}
    for runtime in ("fake", "packed"):
        pipe = fresh(base_dir)
        vidquant.apply(pipe, loaded, runtime=runtime)
        experts = adapter_for(pipe).experts()
        with torch.no_grad():
            outputs[runtime] = {e: [t.call.replay(experts[e]) for t in items] for e, items in held.items()}
    for e in held:
        assert all(torch.equal(a, b) for a, b in zip(outputs["fake"][e], outputs["packed"][e], strict=True))
    losses = [torch.nn.functional.mse_loss(y.float(), t.target.float()).item()
              for e, items in held.items() for y, t in zip(outputs["fake"][e], items, strict=True)]
    assert sum(losses) / len(losses) == pytest.approx(tuned.qat["loss"]["held_out_after"], rel=1e-5)


def test_held_out_rule_keeps_the_ptq_state_when_qat_hurts(base_dir: Path, stats, state) -> None:
    # a learning rate far too large: the deltas blow up after one step, the held-out loss never beats PTQ's
    qat = QATSettings(steps=4, lr=0.5, rank=8, train=("lora",), eval_every=2, **FAST)
    result = finetune(fresh(base_dir), state, stats, qat)
    assert result.qat["kept"] == "ptq" and "kept unchanged" in result.qat["why"]
    assert all(h["held_out"] > result.qat["loss"]["held_out_before"] for h in result.qat["history"][1:])
    assert result.qat["loss"]["held_out_after"] == result.qat["loss"]["held_out_before"]
    for name, layer in state.layers.items():
        got = result.layers[name].tensors
        assert got.keys() == layer.tensors.keys() and all(torch.equal(got[k], v) for k, v in layer.tensors.items())


@pytest.mark.slow  # a QAT run with its teacher trajectories: ~1 min on a shared 2-core CPU
def test_resume_ends_where_an_uninterrupted_run_does(base_dir: Path, stats, state, tmp_path: Path) -> None:
    qat = dict(lr=3e-3, train=("lora", "clips"), eval_every=2, checkpoint_every=2, **FAST)
    whole = finetune(fresh(base_dir), state, stats, QATSettings(steps=4, **qat), checkpoint_dir=tmp_path / "a")
    finetune(fresh(base_dir), state, stats, QATSettings(steps=2, **qat), checkpoint_dir=tmp_path / "b")
    assert (tmp_path / "b" / DELTAS).is_file()
    resumed = finetune(fresh(base_dir), state, stats, QATSettings(steps=4, **qat), checkpoint_dir=tmp_path / "b")
    assert resumed.fingerprint() == whole.fingerprint()
    assert resumed.qat["history"] == whole.qat["history"]


def test_bad_settings_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown weights"):
        QATSettings(train=("lora", "weights"))


@pytest.mark.slow  # a QAT run with its teacher trajectories: ~1 min on a shared 2-core CPU
def test_cli_finetune_writes_a_state(base_dir: Path, stats_dir: Path, state, tmp_path: Path) -> None:
    state.save(tmp_path / "ptq")
    out = tmp_path / "qat"
    result = CliRunner().invoke(app, ["finetune", "--model", str(base_dir), "--state", str(tmp_path / "ptq"),
                                      "--stats", str(stats_dir), "--out", str(out), "--steps", "2",
                                      "--eval-every", "1", "--calls-per-bin", "1", "--held-out-prompts", "1"])
    assert result.exit_code == 0, result.output
    assert "QAT" in result.output and load_state(out).qat["steps"] == 2
    assert not (out / ".partial").exists()
    again = CliRunner().invoke(app, ["finetune", "--model", str(base_dir), "--state", str(out),
                                     "--stats", str(stats_dir), "--out", str(out)])
    assert again.exit_code == 2 and "must differ" in again.output
