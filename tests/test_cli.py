"""The command line never deletes or moves what it did not create (regression tests of data-loss reports)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from vidquant.cli import app

runner = CliRunner()


def quantize(out: Path, *extra: str):
    return runner.invoke(app, ["quantize", "--model", "tiny", "--recipe", "rtn-hif4", "--out", str(out), *extra])


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_quantize_refuses_a_users_folder_and_leaves_it_intact(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("notes")
    (folder / "sub" / "data.csv").write_text("1,2,3")
    before = tree(folder)
    result = quantize(folder)
    assert result.exit_code == 2, result.output
    assert "not a PTQ state" in result.output and "notes.txt" in result.output
    assert tree(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_quantize_into_its_own_run_folder_keeps_the_runs_inputs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    calib = ["calibrate", "--model", "tiny", "--num-prompts", "1", "--steps", "2", "--out", str(run / "stats")]
    assert runner.invoke(app, calib).exit_code == 0
    (run / "videos").mkdir()
    (run / "videos" / "a-0.mp4").write_bytes(b"video")
    before = tree(run)
    result = runner.invoke(app, ["quantize", "--model", "tiny", "--stats", str(run / "stats"), "--out", str(run)])
    assert result.exit_code == 2 and "not a PTQ state" in result.output
    assert tree(run) == before


def test_quantize_refuses_a_file_or_a_link_as_out(tmp_path: Path) -> None:
    file = tmp_path / "state"
    file.write_text("precious")
    result = quantize(file)
    assert result.exit_code == 2 and "not a folder" in result.output
    link = tmp_path / "link"
    link.symlink_to(file)
    result = quantize(link)
    assert result.exit_code == 2 and "symbolic link" in result.output
    assert file.read_text() == "precious" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "state"]  # no hidden .old copies


def test_quantize_replaces_its_own_state(tmp_path: Path) -> None:
    assert quantize(tmp_path / "state").exit_code == 0
    first = tree(tmp_path / "state")
    result = runner.invoke(app, ["quantize", "--model", "tiny", "--recipe", "rtn-nvfp4", "--out",
                                 str(tmp_path / "state")])
    assert result.exit_code == 0, result.output
    assert tree(tmp_path / "state") != first and "rtn-nvfp4" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_each_stage_is_a_command(tmp_path: Path) -> None:
    """calibrate -> quantize -> apply -> generate (BF16, quantized) -> evaluate -> report, on a non-Wan DiT."""
    model = ["--model", "tiny-ltx"]
    size = ["--num-prompts", "1", "--steps", "2"]
    ok = [
        ["calibrate", *model, *size, "--out", str(tmp_path / "stats"), "--bins", "2"],
        ["quantize", *model, "--stats", str(tmp_path / "stats"), "--out", str(tmp_path / "state")],
        ["apply", *model, "--state", str(tmp_path / "state")],
        ["generate", *model, *size, "--out", str(tmp_path / "bf16")],
        ["generate", *model, *size, "--out", str(tmp_path / "quantized"), "--state", str(tmp_path / "state")],
        ["evaluate", "--bf16", str(tmp_path / "bf16"), "--quantized", str(tmp_path / "quantized"),
         "--out", str(tmp_path / "eval")],
        ["report", "--evaluation", str(tmp_path / "eval" / "evaluation.json"), "--out", str(tmp_path / "report"),
         "--state", str(tmp_path / "state"), "--stats", str(tmp_path / "stats")],
    ]
    outputs = []
    for args in ok:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args[0], result.output)
        outputs.append(result.output)
    assert "applies to tiny-ltx: 20 Linears quantized" in " ".join(outputs[2].split())
    html = (tmp_path / "report" / "report.html").read_text()
    assert "tail-aware-hif4" in html and "<img" in html
    metrics = {m["name"] for m in json.loads((tmp_path / "report" / "metrics.json").read_text())["metrics"]}
    assert {"psnr", "ssim", "weight_bytes", "seconds_per_step"} <= metrics
    # the same folder for another source is refused, naming it
    result = runner.invoke(app, ["generate", *model, *size, "--out", str(tmp_path / "bf16"), "--state",
                                 str(tmp_path / "state")])
    assert result.exit_code == 2 and "another model or state" in result.output


def test_bad_values_are_refused_up_front(tmp_path: Path) -> None:
    cases = [
        (["calibrate", "--model", "tiny", "--out", str(tmp_path / "s"), "--frames", "0"],
         "--frames must be at least 1"),
        (["calibrate", "--model", "tiny", "--out", str(tmp_path / "s"), "--cfg", "nan"], "cfg"),
        (["calibrate", "--model", "tiny", "--out", str(tmp_path / "s"), "--cfg", "-1"], "cfg"),
        (["calibrate", "--model", "tiny", "--out", str(tmp_path / "s"), "--num-prompts", "100"],
         "--num-prompts 100: the bundled prompt set has only 80 prompts"),
        (["run", "--out", str(tmp_path / "r"), "--num-calib-prompts", "100"], "--num-calib-prompts 100"),
        (["run", "--out", str(tmp_path / "r"), "--model", "tiny-ltx", "--height", "48"], "multiple of 32"),
        (["generate", "--model", "tiny", "--out", str(tmp_path / "g"), "--height", "0"], "--height must be at least 1"),
        (["calibrate", "--model", "tiny", "--out", str(tmp_path / "s"), "--steps", "1"],
         "never reaches expert transformer_2"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not (tmp_path / "s").exists() and not (tmp_path / "g").exists()


def test_evaluate_and_report_refuse_a_users_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = runner.invoke(app, ["evaluate", "--bf16", str(tmp_path), "--quantized", str(tmp_path), "--out",
                                 str(tmp_path / "mine")])
    assert result.exit_code == 2 and "not a report folder" in result.output
    (tmp_path / "e.json").write_text("{}")
    result = runner.invoke(app, ["report", "--evaluation", str(tmp_path / "e.json"), "--out", str(tmp_path / "mine")])
    assert result.exit_code == 2
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_analyze_ranks_the_blocks_of_tiny_wan21(tmp_path: Path) -> None:
    stats = tmp_path / "stats"
    calib = ["calibrate", "--model", "tiny-wan21", "--num-prompts", "1", "--steps", "2", "--bins", "1",
             "--out", str(stats)]
    assert runner.invoke(app, calib).exit_code == 0
    result = runner.invoke(app, ["analyze", "--model", "tiny-wan21", "--stats", str(stats), "--recipe", "hif8",
                                 "--held-out-prompts", "1", "--max-calls", "2", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "most sensitive first" in result.output
    assert {p.name for p in (tmp_path / "a").iterdir()} >= {"analysis.json", "analysis.csv", "analysis.html"}
    both = runner.invoke(app, ["analyze", "--model", "tiny-wan21", "--stats", str(stats), "--recipe", "hif8",
                               "--state", str(tmp_path), "--out", str(tmp_path / "b")])
    assert both.exit_code == 2 and "--recipe or --state, not both" in both.output
    assert not (tmp_path / "b").exists()
