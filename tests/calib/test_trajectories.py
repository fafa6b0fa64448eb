"""Teacher trajectories: every timestep bin of every expert sampled, deterministic, replayable, stored safely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vidquant.calib.calibrate import CalibSettings
from vidquant.calib.prompts import default_prompts
from vidquant.calib.trajectories import (
    count_per_bin,
    load_trajectories,
    record_trajectories,
    save_trajectories,
)
from vidquant.models import adapter_for, tiny

SETTINGS = CalibSettings(num_prompts=1, steps=6, height=16, width=16, frames=5, bins=2)
PROMPTS = default_prompts()[:1]


@pytest.fixture(scope="module")
def pipe():
    return tiny.build_tiny_pipeline()


@pytest.fixture(scope="module")
def recorded(pipe):
    return record_trajectories(pipe, PROMPTS, SETTINGS, adapter_for(pipe).bin_edges(2), per_bin=1)


def test_every_bin_of_every_expert_is_sampled_and_replays_to_the_teacher(pipe, recorded) -> None:
    experts = adapter_for(pipe).experts()
    assert set(recorded) == set(experts)
    for expert, items in recorded.items():
        assert count_per_bin(items, 2) == [1, 1]
        for t in items:
            assert t.target.shape == t.call.kwargs["hidden_states"].shape
            with torch.no_grad():
                assert torch.equal(t.call.replay(experts[expert]), t.target)


def test_same_run_same_calls(pipe, recorded) -> None:
    again = record_trajectories(pipe, PROMPTS, SETTINGS, adapter_for(pipe).bin_edges(2), per_bin=1)
    for expert in recorded:
        assert [t.call.info for t in again[expert]] == [t.call.info for t in recorded[expert]]
        assert all(torch.equal(a.target, b.target) for a, b in zip(again[expert], recorded[expert], strict=True))


def test_a_bin_without_calls_is_an_error_naming_it(pipe) -> None:
    with pytest.raises(ValueError, match=r"expert transformer: no call fell into timestep bin\(s\)"):
        record_trajectories(pipe, PROMPTS, SETTINGS, adapter_for(pipe).bin_edges(8), per_bin=1)


def test_saved_and_loaded_they_replay_the_same(pipe, recorded, tmp_path: Path) -> None:
    path = save_trajectories(tmp_path / "t.safetensors", recorded, {"made_from": "test"})
    loaded, info = load_trajectories(path)
    assert info == {"made_from": "test"}
    experts = adapter_for(pipe).experts()
    for expert, items in recorded.items():
        for a, b in zip(items, loaded[expert], strict=True):
            assert a.call.info == b.call.info and a.bin == b.bin and torch.equal(a.target, b.target)
            with torch.no_grad():
                assert torch.equal(b.call.replay(experts[expert]), a.target)


def test_another_safetensors_file_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, tmp_path / "x.safetensors", metadata={"format": "other"})
    with pytest.raises(ValueError, match="not a trajectories file"):
        load_trajectories(tmp_path / "x.safetensors")
