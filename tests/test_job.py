"""The main job end to end on the tiny pipeline: every stage, artifact reuse, and early errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vidquant.calib.calibrate import CalibSettings
from vidquant.calib.prompts import default_prompts
from vidquant.cli import app
from vidquant.eval.protocol import Protocol
from vidquant.job import Job, run
from vidquant.models import tiny
from vidquant.recipes import load_recipe

PROTOCOL = Protocol(height=32, width=32, frames=5, steps=3)
CALIB = CalibSettings(num_prompts=2, steps=3, height=32, width=32, frames=5, bins=2)


def job(out: Path) -> Job:
    prompts = default_prompts()
    return Job(load_recipe("tail-aware-hif4"), prompts[:2], prompts[2:4], PROTOCOL, CALIB, out, vbench=False)


def test_run_writes_every_artifact_and_reuses_them(tmp_path: Path) -> None:
    report = run(tiny.build_tiny_pipeline(), job(tmp_path), progress=False)
    assert report == tmp_path / "report" / "report.html"
    html = report.read_text()
    assert "Subject consistency" in html and "tail-aware-hif4" in html and html.count("<img") >= 3
    data = json.loads((tmp_path / "report" / "metrics.json").read_text())
    names = {m["name"] for m in data["metrics"]}
    assert {"psnr", "ssim", "temporal_flickering", "subject_consistency_proxy", "weight_bytes"} <= names
    assert len(data["prompts"]) == 2
    for stage in ("stats/stats.safetensors", "state/manifest.json", "videos/bf16/prompts.json",
                  "videos/quantized/prompts.json"):
        assert (tmp_path / stage).is_file(), stage
    sidecars = {p: p.stat().st_mtime_ns for p in (tmp_path / "videos").rglob("*-[0-9].json")}
    run(tiny.build_tiny_pipeline(), job(tmp_path), progress=False)  # a rerun reuses every artifact
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "videos").rglob("*-[0-9].json")} == sidecars


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
