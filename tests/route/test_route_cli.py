"""`vidquant route`: states from the command line, videos and report, clear errors, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import fresh
from typer.testing import CliRunner

import vidquant
from vidquant.cli import app

PROTOCOL = ["--steps", "2", "--height", "16", "--width", "16", "--frames", "5"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two saved states of the tiny Wan2.2, a policy naming them relatively, and a prompt file."""
    root = tmp_path_factory.mktemp("route-cli")
    pipe = fresh()
    vidquant.quantize(pipe, "rtn-hif4", None).save(root / "states" / "w4a4")
    vidquant.quantize(pipe, "hif8", None).save(root / "states" / "w8a8")
    (root / "policy.yaml").write_text("precisions: {w4a4: states/w4a4, w8a8: states/w8a8}\ndefault: w4a4\n"
                                      "rules: [{experts: [transformer], precision: w8a8}]\n"
                                      "escalation: {ladder: [mixed, bf16], threshold: 1.0}\n")
    (root / "prompts.txt").write_text("a calm mountain lake at dawn\nthe logo of a coffee brand on a cup\n")
    return root


def test_route_writes_videos_and_a_report_and_resumes(folders: Path, tmp_path: Path) -> None:
    args = ["route", "--model", "tiny", "--policy", str(folders / "policy.yaml"), "--prompts",
            str(folders / "prompts.txt"), "--num-prompts", "2", "--out", str(tmp_path / "routed"), *PROTOCOL]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 prompts routed: fallback 100.0 %" in " ".join(result.output.split())
    data = json.loads((tmp_path / "routed" / "route.json").read_text())
    assert [[a["rung"] for a in p["attempts"]] for p in data["prompts"]] == [["mixed", "bf16"], ["bf16"]]
    assert "products-logos" in data["prompts"][1]["gate_categories"]
    assert len(list((tmp_path / "routed" / "videos").glob("*.mp4"))) == 2
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "routed" / "precisions").rglob("*-[0-9].json")}
    again = CliRunner().invoke(app, args)  # everything is there: nothing is generated again
    assert again.exit_code == 0, again.output
    assert stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "routed" / "precisions").rglob("*-[0-9].json")}


@pytest.mark.parametrize(("extra", "policy_text", "message"), [
    ([], "precisions: {w4a4: {root}/states/w4a4}\ndefault: w4a4\nrules: [{blocks: [5], precision: w4a4}]\n",
     "rules.0.blocks: block 5 is out of range for expert 'transformer'"),
    ([], "precisions: {w4a4: {root}/states/w4a4}\ndefault: w4a4\nrules: [{steps: [0.5], precision: w4a4}]\n",
     "invalid routing policy: missing key 'rules.0.steps.1'"),
    ([], "precisions: {w4a4: nowhere}\ndefault: w4a4\n", "precision 'w4a4': .*nowhere: not a PTQ state"),
    (["--state", "w9=x"], "precisions: {w4a4: {root}/states/w4a4}\ndefault: w4a4\n",
     "--state w9=...: the policy has no precision 'w9'"),
    (["--threshold", "0.5", "--calibrate-gate"], "precisions: {w4a4: {root}/states/w4a4}\ndefault: w4a4\n",
     "give one of --threshold, --gate-calibration and --calibrate-gate"),
])
def test_bad_policies_and_options_fail_with_a_clear_error(folders: Path, tmp_path: Path, extra, policy_text,
                                                          message) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text.replace("{root}", str(folders)))
    result = CliRunner().invoke(app, ["route", "--model", "tiny", "--policy", str(policy), "--prompts",
                                      str(folders / "prompts.txt"), "--num-prompts", "1", "--out",
                                      str(tmp_path / "o"), *PROTOCOL, *extra])
    assert result.exit_code == 2
    assert re.search(message, " ".join(result.output.split())), result.output
