"""The sweep comparison report on made-up evaluations: columns, best marks, categories, escaping, files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vidquant.eval.evaluate import Evaluation
from vidquant.eval.report import Metric, PromptResult
from vidquant.eval.sweep_report import CellResult, best_of, cell_values, columns, write_sweep_report

EVIL = '<script>alert("x")</script> & "logo"'
CATEGORIES = {"a cat": "animals-markings", "a face": "faces", "a storm": "scenery"}


def result(name: str, psnr: float, subject: float, per_prompt: dict[str, float], *, sqnr: list[float] = (),
           changes: dict | None = None) -> CellResult:
    metrics = [Metric("psnr", None, psnr), Metric("ssim", None, 0.9),
               Metric("subject_consistency_proxy", 0.8, subject),
               Metric("weight_bytes", 100.0, 30.0, group="cost"), Metric("seconds_per_step", 1.0, 2.0, group="cost")]
    prompts = [PromptResult(p, {"psnr": v, "ssim": 0.9, "subject_consistency_proxy": subject},
                            {"subject_consistency_proxy": 0.8}) for p, v in per_prompt.items()]
    evaluation = Evaluation("bf16", name, metrics, prompts, {"steps": 2})
    rows = [{"expert": "transformer", "layer": f"blocks.{i}.ffn", "sqnr_db": v} for i, v in enumerate(sqnr)]
    return CellResult(name, changes or {}, {"name": name}, None, evaluation, rows)


def test_columns_values_and_best_marks(tmp_path: Path) -> None:
    results = [result("p99", 30.0, 0.78, {"a cat": 29.0, "a face": 31.0, "a storm": 40.0}, sqnr=[20.0, 10.0]),
               result("max", 32.0, 0.70, {"a cat": 33.0, "a face": 31.0, "a storm": 30.0}, sqnr=[21.0, math.nan],
                      changes={"smoothing.statistic": EVIL})]
    cols = [c.key for c in columns(results)]
    assert cols == ["psnr", "ssim", "subject_consistency_proxy", "weight_bytes", "sqnr_mean", "sqnr_worst", "drop"]
    values, relative = cell_values(results[1])
    assert values["sqnr_mean"] == 21.0 and values["sqnr_worst"] == -math.inf  # NaN: a broken layer, the worst
    assert values["drop"] == pytest.approx(100 * 0.1 / 0.8)
    assert relative["subject_consistency_proxy"] == pytest.approx(-0.125)
    page = write_sweep_report(tmp_path, results, title="t", model="tiny", base_recipe="tail-aware-hif4",
                              categories=CATEGORIES)
    data = json.loads((tmp_path / "sweep.json").read_text())
    best = {c["name"]: set(c["best"]) for c in data["cells"]}
    assert best == {"p99": {"subject_consistency_proxy", "sqnr_worst", "drop"}, "max": {"psnr", "sqnr_mean"}}
    assert data["bf16"]["subject_consistency_proxy"] == 0.8
    cats = data["categories"]
    assert cats["columns"] == ["identity-sensitive", "scenery / motion", "animals-markings", "faces", "scenery"]
    assert cats["metrics"]["psnr"]["identity-sensitive"] == [30.0, 32.0]
    assert cats["metrics"]["psnr"]["scenery / motion"] == [40.0, 30.0]
    assert cats["best"]["psnr"]["faces"] == []  # a tie everywhere is no best
    assert cats["best"]["psnr"]["scenery"] == [0]
    html = page.read_text()
    assert EVIL not in html and "&lt;script&gt;" in html and html.count("<img") == 2
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [r["config"] for r in rows] == ["bf16", "p99", "max"] and rows[2]["best_in"] == "psnr;sqnr_mean"
    assert rows[0]["subject_consistency_proxy"] == "0.8" and rows[0]["psnr"] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.csv", "sweep.html", "sweep.json",
                                                          "sweep_categories.csv"]


def test_uncategorized_prompts_and_a_single_cell(tmp_path: Path) -> None:
    write_sweep_report(tmp_path, [result("only", 30.0, 0.8, {"mine": 30.0})], categories={})
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["categories"]["columns"] == ["uncategorized"] and data["cells"][0]["best"] == []
    with pytest.raises(ValueError, match="at least one configuration"):
        write_sweep_report(tmp_path, [])


values = st.lists(st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)), max_size=8)


@given(values, st.booleans())
def test_best_of_marks_exactly_the_best_values(xs: list[float | None], higher: bool) -> None:
    marked = best_of(xs, higher)
    finite = [x for x in xs if x is not None and not math.isnan(x)]
    if len(set(finite)) < 2:
        assert marked == set()
        return
    best = max(finite) if higher else min(finite)
    assert marked and all(xs[i] is not None and math.isclose(xs[i], best, rel_tol=1e-9, abs_tol=1e-9)
                          for i in marked)
    assert {i for i, x in enumerate(xs) if x == best} <= marked
