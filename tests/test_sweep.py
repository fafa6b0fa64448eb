"""`vidquant sweep`: grid files and their validation, cell names, shared artifacts, resume, the comparison report."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import vidquant.eval.evaluate
import vidquant.eval.vbench
import vidquant.job
import vidquant.sweep
from vidquant.calib.calibrate import CalibSettings
from vidquant.calib.prompts import default_prompts, prompt_categories
from vidquant.cli import app
from vidquant.eval.protocol import Protocol
from vidquant.models import tiny
from vidquant.recipes import load_recipe, recipe_names
from vidquant.sweep import (
    MAX_CELLS,
    GridSpec,
    Sweep,
    cell_name,
    grid_names,
    held_out_prompts,
    load_grid,
    resolve_cells,
    run_sweep,
)

PROTOCOL = Protocol(height=32, width=32, frames=5, steps=2)
CALIB = CalibSettings(num_prompts=2, steps=2, height=32, width=32, frames=5, bins=2)
PROMPTS = default_prompts()


def cells_of(spec: dict[str, Any], recipe: str = "tail-aware-hif4", calib: CalibSettings = CALIB):
    return resolve_cells(GridSpec.model_validate(spec), load_recipe(recipe), calib, PROMPTS)


# ---------------------------------------------------------------- grids: parsing, validation, names


def test_a_grid_is_the_product_of_its_axes_plus_its_named_cells() -> None:
    cells = cells_of({"grid": {"smoothing.percentile": [99, 99.9], "calib.num_prompts": [1, 2]},
                      "cells": {"max": {"smoothing.statistic": "max"}}, "set": {"smoothing.alpha": 0.5}})
    assert [c.name for c in cells] == ["percentile-99__num_prompts-1", "percentile-99__num_prompts-2",
                                       "percentile-99.9__num_prompts-1", "percentile-99.9__num_prompts-2", "max"]
    assert [c.recipe.smoothing.percentile for c in cells[:4]] == [99, 99, 99.9, 99.9]
    assert [c.calib.num_prompts for c in cells] == [1, 2, 1, 2, 2]
    assert all(c.recipe.smoothing.alpha == 0.5 for c in cells)  # `set` applies to every cell
    assert cells[4].recipe.smoothing.statistic == "max" and cells[4].recipe.name == "tail-aware-hif4@max"
    # one calibration per distinct calibration setting: keyed by the settings and the prompts they take
    assert len({c.calib_key for c in cells}) == 2 and cells[1].calib_key == cells[4].calib_key
    assert cells[0].calib_key.startswith("prompts1-bins2-")


def test_method_sections_lists_and_formats_are_axes() -> None:
    cells = cells_of({"grid": {"svdquant-gptq.lowrank.rank": [4, 8], "weights": ["hif4", "nvfp4"]}},
                     "svdquant-gptq-hif4")
    assert [c.name for c in cells] == ["rank-4__weights-hif4", "rank-4__weights-nvfp4", "rank-8__weights-hif4",
                                       "rank-8__weights-nvfp4"]
    assert cells[3].recipe.options.lowrank.rank == 8 and cells[3].recipe.weights == "nvfp4"
    cells = cells_of({"grid": {"protect_blocks": [[], [0], [-1, 0]]}, "set": {"max_protected_blocks": None}})
    assert [c.name for c in cells] == ["protect_blocks-none", "protect_blocks-0", "protect_blocks--1_0"]
    assert cells_of({"grid": {"smoothing.statistic": ["max", "percentile"], "svdquant-gptq.gptq.damp": [0.01]}},
                    "svdquant-gptq-hif4")[0].recipe.options.gptq.damp == [0.01]  # a number is one candidate


@pytest.mark.parametrize(("spec", "message"), [
    ({"grid": {"smoothing.percentil": [99]}}, "unknown key 'smoothing.percentil'"),
    ({"grid": {"smoothng.percentile": [99]}}, "unknown key 'smoothng.percentile'"),
    ({"cells": {"a": {"calib.prompts": 4}}}, "unknown key 'calib.prompts'"),
    ({"cells": {"a": {"svdquant-gptq.lowrank.rnk": 4}}, "recipe": "svdquant-gptq-hif4"},
     "unknown key 'svdquant-gptq.lowrank.rnk'"),
    ({"cells": {"a": {"name": "x"}}}, "key 'name'"),
    ({"cells": {"bad-p": {"smoothing.percentile": 50}}}, "cell 'bad-p': invalid recipe: smoothing.percentile"),
    ({"cells": {"fmt": {"weights": "fp3"}}}, "cell 'fmt': invalid recipe: weights: unknown format 'fp3'"),
    ({"cells": {"many": {"calib.num_prompts": 10_000}}}, "cell 'many': calib.num_prompts 10000"),
    ({"cells": {"zero": {"calib.bins": 0}}}, "cell 'zero': invalid calibration setting: calib.bins"),
    ({"cells": {"a/b": {"smoothing.alpha": 0.5}, "a_b": {"smoothing.alpha": 0.6}}}, "same folder name 'a_b'"),
    ({"cells": {"x": {"smoothing.alpha": 0.5}, "y": {"smoothing.alpha": 0.5}}}, "'x' and 'y' are the same"),
    ({}, "no cells"),
])
def test_grid_errors_name_the_key_or_the_cell(spec: dict[str, Any], message: str) -> None:
    recipe = spec.pop("recipe", "tail-aware-hif4")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        cells_of(spec, recipe)


def test_grid_files_are_validated_and_bounded(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {smoothing.alpha: [0.4]}\ncell: {}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: invalid grid: unknown key 'cell'"):
        load_grid(bad)
    bad.write_text("grid: {smoothing.alpha: []}\n")
    with pytest.raises(ValueError, match="axis 'smoothing.alpha' has no values"):
        load_grid(bad)
    bad.write_text("grid: {smoothing.alpha: [0.4, 0.4]}\n")
    with pytest.raises(ValueError, match="repeats a value"):
        load_grid(bad)
    bad.write_text("grid: {smoothing.alpha: [0.4]}\ngrid: {smoothing.alpha: [0.5]}\n")
    with pytest.raises(ValueError, match="bad.yaml"):  # a key given twice is refused (safeyaml)
        load_grid(bad)
    with pytest.raises(ValueError, match="neither a bundled grid"):
        load_grid(tmp_path / "missing.yaml")
    axis = list(range(17))
    with pytest.raises(ValueError, match=f"more than {MAX_CELLS}"):
        cells_of({"grid": {"smoothing.alpha": [a / 20 for a in axis], "smoothing.eps": [1e-6 * (a + 1) for a in axis]}})
    good = tmp_path / "mine.yml"
    good.write_text("base_recipe: max-hif4\ncells: {a: {smoothing.alpha: 0.5}}\n")
    assert load_grid(good).name == "mine" and load_grid(good).base_recipe == "max-hif4"


@pytest.mark.parametrize("text", ["../../etc/passwd", "/abs/path", "..", ".hidden", "a b\tc\n", "x" * 300, "é<>|*?",
                                  "", "-rf"])
def test_cell_names_are_safe_folder_names(text: str) -> None:
    name = cell_name(text)
    assert name and len(name.encode()) <= 80 and "/" not in name and name not in (".", "..")
    assert not name.startswith((".", "-")) and all(ch.isalnum() or ch in "._+-" for ch in name)
    assert cell_name(text) == name  # stable
    assert len(name) < 80 or cell_name(text + "y") != name  # long names keep a hash of the whole text


def test_bundled_grids_resolve_against_their_base_recipes() -> None:
    assert {"hif8-protection", "hif4-percentile", "hif4-calib-prompts", "hif4-protected-blocks"} <= set(grid_names())
    for name in grid_names():
        spec = load_grid(name)
        assert spec.base_recipe in recipe_names(), name
        cells = resolve_cells(spec, load_recipe(spec.base_recipe), CALIB, PROMPTS)
        assert len(cells) >= 3, name
    hif8 = {c.name: c.recipe.protect_blocks for c in resolve_cells(load_grid("hif8-protection"), load_recipe("hif8"),
                                                                   CALIB, PROMPTS)}
    assert hif8 == {"none": [], "first-2": [0, 1], "last-3": [-3, -2, -1], "first-2+last-3": [0, 1, -3, -2, -1],
                    "auto": "auto", "auto-trajectory": "auto"}
    percentile = resolve_cells(load_grid("hif4-percentile"), load_recipe("tail-aware-hif4"), CALIB, PROMPTS)
    assert [(c.recipe.smoothing.statistic, c.recipe.smoothing.percentile) for c in percentile] == [
        ("percentile", 99.0), ("percentile", 99.9), ("percentile", 99.99), ("max", 99.9)]
    counts = resolve_cells(load_grid("hif4-calib-prompts"), load_recipe("tail-aware-hif4"), CALIB, PROMPTS)
    assert [c.calib.num_prompts for c in counts] == [4, 8, 16, 32] and len({c.calib_key for c in counts}) == 4


def test_evaluation_prompts_are_held_out_and_cover_categories() -> None:
    categories = prompt_categories()
    prompts = held_out_prompts(PROMPTS, 32, 6, categories)
    assert not set(prompts) & set(PROMPTS[:32])
    assert len({categories[p] for p in prompts}) == 6  # one from each of six categories, in file order
    with pytest.raises(ValueError, match="only 48 prompts are left"):
        held_out_prompts(PROMPTS, 32, 49, categories)


# ---------------------------------------------------------------- running a sweep


def sweep_of(out: Path, spec: dict[str, Any], recipe: str = "tail-aware-hif4", **kwargs: Any) -> Sweep:
    cells = cells_of(spec, recipe)
    return Sweep(cells, PROMPTS, PROMPTS[8:10], PROTOCOL, out, "tiny", recipe, "test",
                 **{"vbench": False, "fidelity_prompts": 0, "categories": prompt_categories(), "cell_reports": False,
                    **kwargs})


GRID = {"cells": {"max": {"smoothing.statistic": "max"}, "p99": {"smoothing.percentile": 99.0}}}


class Counter:
    """Wraps a function and counts its calls (with the arguments it was given)."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """One sweep of two cells sharing a calibration, with the stages counted."""
    out = tmp_path_factory.mktemp("sweep")
    mp = pytest.MonkeyPatch()
    counters = {name: Counter(getattr(vidquant.sweep, name)) for name in ("calibrate", "generate", "evaluate")}
    counters["quantize"] = Counter(vidquant.job.quantize_into)  # the quantize stage (on a miss) of `job.state_in`
    loads = Counter(tiny.build_tiny_pipeline)
    for name, counter in counters.items():
        mp.setattr(vidquant.job if name == "quantize" else vidquant.sweep,
                   "quantize_into" if name == "quantize" else name, counter)
    try:
        report = run_sweep(loads, sweep_of(out, GRID, fidelity_prompts=1, cell_reports=True), progress=False)
    finally:
        mp.undo()
    assert report == out / "report" / "sweep.html"
    calls = {name: len(c.calls) for name, c in counters.items()}
    calls["bf16_videos"] = sum(1 for args, kw in counters["generate"].calls if kw.get("state") is None)
    calls["loads"] = len(loads.calls)
    return out, calls


def test_a_sweep_shares_calibrations_and_bf16_videos(swept: tuple[Path, dict[str, int]]) -> None:
    out, calls = swept
    assert calls["calibrate"] == 1 and calls["quantize"] == 2 and calls["evaluate"] == 2
    assert calls["generate"] == 3 and calls["bf16_videos"] == 1  # one BF16 set, one quantized set per cell
    assert calls["loads"] == 2  # the model is loaded again only after a state was applied to it
    keys = {json.loads((out / "cells" / c / "cell.json").read_text())["calib_key"] for c in GRID["cells"]}
    assert [p.name for p in (out / "stats").iterdir()] == list(keys)
    assert sorted(p.name for p in (out / "cells").iterdir()) == ["max", "p99"]
    for cell in ("max", "p99"):
        for part in ("state/manifest.json", "videos/protocol.json", "report/evaluation.json", "report/report.html",
                     "sqnr.json", "cell.json"):
            assert (out / "cells" / cell / part).is_file(), (cell, part)
    grid = json.loads((out / "grid.json").read_text())
    assert [c["name"] for c in grid["cells"]] == ["max", "p99"] and grid["cells"][1]["calib"]["num_prompts"] == 2


def test_the_sweep_report_compares_every_cell(swept: tuple[Path, dict[str, int]]) -> None:
    out, _ = swept
    data = json.loads((out / "report" / "sweep.json").read_text())
    assert [c["name"] for c in data["cells"]] == ["max", "p99"]
    keys = [c["key"] for c in data["columns"]]
    assert keys[:3] == ["psnr", "ssim", "latent_rel_err"] and keys[-1] == "drop"
    assert {"subject_consistency_proxy", "sqnr_mean", "sqnr_worst"} <= set(keys)
    assert "subject_consistency_proxy" in data["bf16"] and "psnr" not in data["bf16"]
    for key in ("psnr", "ssim", "sqnr_mean"):
        values = [c["values"][key] for c in data["cells"]]
        marked = [c["name"] for c in data["cells"] if key in c["best"]]
        assert all(v is not None for v in values)
        if len(set(values)) > 1:
            higher = next(col["higher_is_better"] for col in data["columns"] if col["key"] == key)
            best = max(values) if higher else min(values)
            assert marked == [c["name"] for c in data["cells"] if c["values"][key] == best]
    # per category: both evaluation prompts (bundled 8 and 9) are products with logos, an identity-sensitive section
    cats = data["categories"]
    assert [p["category"] for p in cats["prompts"]] == ["products-logos", "products-logos"]
    assert cats["columns"] == ["identity-sensitive", "products-logos"] and cats["counts"]["products-logos"] == 2
    assert cats["metrics"]["psnr"]["products-logos"] == [c["values"]["psnr"] for c in data["cells"]]
    html = (out / "report" / "sweep.html").read_text()
    assert html.count("★") >= 2 and "Drop vs BF16" in html and "Per prompt category" in html
    assert html.count("<img") == 2 and 'href="../cells/p99/report/report.html"' in html
    rows = list(csv.DictReader((out / "report" / "sweep.csv").open()))
    assert [r["config"] for r in rows] == ["bf16", "max", "p99"]
    assert float(rows[2]["psnr"]) == pytest.approx(data["cells"][1]["values"]["psnr"])
    assert rows[1]["changes"] == '{"smoothing.statistic": "max"}'
    cat_rows = list(csv.DictReader((out / "report" / "sweep_categories.csv").open()))
    assert {r["metric"] for r in cat_rows} == {"psnr", "ssim", "identity_drift", "subject_consistency_drop"}


def test_an_interrupted_sweep_resumes_without_redoing_finished_cells(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    grid = {"cells": {"a": {"smoothing.statistic": "max"}, "b": {"smoothing.alpha": 0.5, "calib.num_prompts": 1}}}
    real_evaluate = vidquant.sweep.evaluate

    def interrupted(bf16: Path, quantized: Path, **kwargs: Any) -> Any:
        if Path(quantized).parent.name == "b":
            raise KeyboardInterrupt  # killed while evaluating the second cell: its state and videos are on disk
        return real_evaluate(bf16, quantized, **kwargs)

    monkeypatch.setattr(vidquant.sweep, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny.build_tiny_pipeline, sweep_of(tmp_path, grid), progress=False)
    assert (tmp_path / "cells" / "a" / "report" / "evaluation.json").is_file()
    assert not (tmp_path / "report").exists()
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").rglob("*") if p.is_file()}
    bf16 = {p: p.stat().st_mtime_ns for p in (tmp_path / "videos").rglob("*") if p.is_file()}

    monkeypatch.setattr(vidquant.sweep, "evaluate", Counter(real_evaluate))
    quantize, calibrate = Counter(vidquant.job.quantize_into), Counter(vidquant.sweep.calibrate)
    monkeypatch.setattr(vidquant.job, "quantize_into", quantize)
    monkeypatch.setattr(vidquant.sweep, "calibrate", calibrate)
    report = run_sweep(tiny.build_tiny_pipeline, sweep_of(tmp_path, grid), progress=False)
    assert report.is_file() and not quantize.calls  # both states reused
    assert [Path(args[1]).parent.name for args, _ in vidquant.sweep.evaluate.calls] == ["b"]
    changed = {p for p, t in finished.items() if p.stat().st_mtime_ns != t}
    assert all("b" in p.relative_to(tmp_path / "cells").parts[:1] for p in changed)  # cell a untouched
    assert not any(p.parts[-2] == "videos" for p in changed)  # b's videos were already complete
    assert {p: p.stat().st_mtime_ns for p in bf16} == bf16
    assert len(calibrate.calls) == 2  # one per calibration setting: loads the finished statistics
    assert len(list((tmp_path / "stats").iterdir())) == 2

    grid["cells"]["b"] = {"smoothing.alpha": 0.6, "calib.num_prompts": 1}  # another recipe in b: only b is redone
    run_sweep(tiny.build_tiny_pipeline, sweep_of(tmp_path, grid), progress=False)
    assert [args[1].name for args, _ in quantize.calls] == ["tail-aware-hif4@b"]


def test_a_cell_over_the_block_budget_is_refused_before_any_work(tmp_path: Path) -> None:
    grid = {"cells": {"ok": {"protect_blocks": [0]}, "too-many": {"protect_blocks": [0, -1]}}}
    with pytest.raises(ValueError, match=r"cell 'too-many': protect_blocks keeps 4 \(expert, block\) pairs"):
        run_sweep(tiny.build_tiny_pipeline, sweep_of(tmp_path / "out", grid), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a vidquant sweep folder"):
        run_sweep(tiny.build_tiny_pipeline, sweep_of(tmp_path, GRID), progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- the command


def test_cli_lists_grids_and_reports_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", "--list-grids"])
    assert result.exit_code == 0
    assert all(name in result.output for name in ("hif8-protection", "hif4-percentile", "hif4-calib-prompts",
                                                  "hif4-protected-blocks"))
    result = runner.invoke(app, ["sweep", "--grid", "no-such-grid", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no-such-grid" in result.output
    grid = tmp_path / "g.yaml"
    grid.write_text("base_recipe: tail-aware-hif4\ngrid: {smoothing.percentil: [99]}\n")
    result = runner.invoke(app, ["sweep", "--grid", str(grid), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown key 'smoothing.percentil'" in result.output
    grid.write_text("grid: {smoothing.percentile: [99]}\n")
    result = runner.invoke(app, ["sweep", "--grid", str(grid), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--base-recipe" in result.output
    assert not (tmp_path / "o").exists()


def test_cli_sweep_runs_a_grid_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    grid = tmp_path / "g.yaml"
    grid.write_text("model: tiny\nbase_recipe: rtn-hif4\ngrid: {weights: [hif4, int8]}\n")
    args = ["sweep", "--grid", str(grid), "--out", str(out), "--num-prompts", "2", "--steps", "2", "--height", "32",
            "--width", "32", "--frames", "5", "--no-vbench", "--fidelity-prompts", "0", "--no-cell-reports"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report" / "sweep.json").read_text())
    assert [c["name"] for c in data["cells"]] == ["weights-hif4", "weights-int8"]
    assert data["model"] == "tiny" and data["base_recipe"] == "rtn-hif4"
    evaluated = json.loads((out / "grid.json").read_text())["eval_prompts"]
    assert not set(evaluated) & set(PROMPTS[:8])  # held out from the 8 calibration prompts
    assert not (out / "stats").exists()  # round-to-nearest needs no calibration


def test_vbench_scores_the_bf16_videos_once_per_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cell compares with the same BF16 videos: VBench scores them once (`cached_vbench`), each cell's own."""
    scored: list[Path] = []

    def fake_vbench(videos: Path, out: Path, dimensions: Any = ("imaging_quality",), **_: Any) -> dict[str, dict]:
        scored.append(Path(videos))
        names = sorted(p.name for p in Path(videos).glob("*.mp4"))
        return {"imaging_quality": {"mean": 0.5, "per_video": dict.fromkeys(names, 0.5)}}

    monkeypatch.setattr(vidquant.eval.vbench, "run_vbench", fake_vbench)
    monkeypatch.setattr(vidquant.eval.evaluate, "run_vbench", fake_vbench)
    for module in (vidquant.sweep, vidquant.eval.evaluate):
        monkeypatch.setattr(module, "vbench_status", lambda: (True, "fake VBench"))
    no_calibration = {"cells": {"hif4": {}, "mxfp4": {"weights": "mxfp4", "activations": "mxfp4"}}}
    run_sweep(tiny.build_tiny_pipeline, sweep_of(tmp_path, no_calibration, "rtn-hif4", vbench=True), progress=False)
    bf16 = tmp_path / "videos" / "bf16"
    assert scored.count(bf16) == 1 and len(scored) == 3  # BF16 once, then each of the two cells
    assert (tmp_path / "vbench" / "bf16" / "scores.json").is_file()
