"""The main job end to end on the tiny pipeline: every stage, artifact reuse, and early errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vidquant.calib.calibrate import CalibSettings
from vidquant.calib.prompts import default_prompts
from vidquant.calib.stats import load_stats
from vidquant.cli import app
from vidquant.eval.protocol import Protocol
from vidquant.job import RUN_OWNED, Job, run
from vidquant.models import tiny
from vidquant.outputs import locked_output
from vidquant.recipes import load_recipe
from vidquant.state import load_state, verify

PROTOCOL = Protocol(height=32, width=32, frames=5, steps=3)
CALIB = CalibSettings(num_prompts=2, steps=3, height=32, width=32, frames=5, bins=2)


def job(out: Path, recipe: str = "tail-aware-hif4", calib: CalibSettings = CALIB, **kwargs) -> Job:
    prompts = default_prompts()
    return Job(load_recipe(recipe), prompts[:2], prompts[2:4], PROTOCOL, calib, out, **{"vbench": False, **kwargs})


def mtimes(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*-[0-9].json")}


def test_run_writes_every_artifact_and_reuses_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIDQUANT_VBENCH", raising=False)
    monkeypatch.setenv("PATH", "")  # no vbench anywhere: the report says how to enable it
    report = run(tiny.build_tiny_pipeline(), job(tmp_path, vbench=True), progress=False)
    assert report == tmp_path / "report" / "report.html"
    html = report.read_text()
    assert "Subject consistency" in html and "tail-aware-hif4" in html and html.count("<img") >= 3
    data = json.loads((tmp_path / "report" / "metrics.json").read_text())
    names = {m["name"] for m in data["metrics"]}
    assert {"psnr", "ssim", "temporal_flickering", "subject_consistency_proxy", "weight_bytes"} <= names
    assert len(data["prompts"]) == 2
    assert any("VBench is not available" in note for note in data["notes"])
    for stage in ("stats/stats.safetensors", "state/manifest.json", "videos/bf16/prompts.json",
                  "videos/quantized/prompts.json"):
        assert (tmp_path / stage).is_file(), stage
    sidecars = mtimes(tmp_path / "videos")
    run(tiny.build_tiny_pipeline(), job(tmp_path), progress=False)  # a rerun reuses every artifact
    assert mtimes(tmp_path / "videos") == sidecars

    # statistics rebuilt with other settings: the state and the quantized videos are redone, BF16 ones kept
    shutil.rmtree(tmp_path / "stats")
    other = CALIB.model_copy(update={"seed": 7})
    run(tiny.build_tiny_pipeline(), job(tmp_path, calib=other), progress=False)
    state = load_state(tmp_path / "state")
    assert state.base["stats_fingerprint"] == load_stats(tmp_path / "stats").fingerprint()
    assert mtimes(tmp_path / "videos" / "bf16") == {p: t for p, t in sidecars.items() if "bf16" in p.parts}
    assert all(mtimes(tmp_path / "videos" / "quantized")[p] != t for p, t in sidecars.items() if "quantized" in p.parts)


def test_another_base_model_redoes_the_state_and_every_video(tmp_path: Path) -> None:
    rtn = job(tmp_path, "rtn-hif4", fidelity_prompts=0)
    run(tiny.build_tiny_pipeline(), rtn, progress=False)
    sidecars = mtimes(tmp_path / "videos")
    other = tiny.build_tiny_pipeline(seed=1)
    run(other, rtn, progress=False)
    verify(tiny.build_tiny_pipeline(seed=1), load_state(tmp_path / "state"))  # made for the new base
    assert all(mtimes(tmp_path / "videos")[p] != t for p, t in sidecars.items())


def test_a_failing_vbench_costs_only_its_own_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing = tmp_path / "vbench"
    failing.write_text("#!/bin/sh\necho 'CUDA out of memory' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("VIDQUANT_VBENCH", str(failing))
    report = run(tiny.build_tiny_pipeline(), job(tmp_path / "out", "rtn-hif4", fidelity_prompts=0, vbench=True),
                 progress=False)
    data = json.loads((tmp_path / "out" / "report" / "metrics.json").read_text())
    assert report.is_file() and any("VBench failed" in note for note in data["notes"])
    assert "psnr" in {m["name"] for m in data["metrics"]}


def test_a_second_run_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    with locked_output(tmp_path, RUN_OWNED, "vidquant run folder"), \
            pytest.raises(ValueError, match=f"in use by pid {os.getpid()}"):
        run(tiny.build_tiny_pipeline(), job(tmp_path), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".vidquant.lock"]


def test_unwritable_output_fails_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        run(tiny.build_tiny_pipeline(), job(blocker / "out"), progress=False)


def test_cli_run_reports_bad_input() -> None:
    result = CliRunner().invoke(app, ["run", "--out", "/tmp/unused", "--recipe", "no-such-recipe"])
    assert result.exit_code == 2 and "no-such-recipe" in result.output
    result = CliRunner().invoke(app, ["run", "--out", "/tmp/unused", "--frames", "6"])
    assert result.exit_code == 2 and "frames" in result.output
