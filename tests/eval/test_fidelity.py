"""Per-layer fidelity and the (alpha, p) search on the tiny pipeline: coverage, consistency, clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.capture import capture_inputs
from vidquant.calib.prompts import default_prompts
from vidquant.eval.fidelity import layer_fidelity, search
from vidquant.methods.fidelity import tail_rows
from vidquant.models import tiny, wan

SETTINGS = CalibSettings(num_prompts=2, steps=3, height=32, width=32, frames=5, bins=1)




@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    pipe = tiny.build_tiny_pipeline()
    prompts = default_prompts()
    stats = calibrate(pipe, prompts, SETTINGS, Path(tmp_path_factory.mktemp("stats")), progress=False)
    inputs = capture_inputs(pipe, prompts[2:3], SETTINGS, max_tokens=48, seed_offset=2)
    return pipe, stats, inputs


def test_one_finite_row_per_target_linear(setup) -> None:
    pipe, stats, inputs = setup
    rows = layer_fidelity(pipe, stats, inputs, "hif4", "hif4", alpha=0.5, percentile=99.9, eps=1e-6)
    expected = [(e, name) for e, model in wan.experts(pipe).items() for name in wan.target_linears(model)]
    assert [(r["expert"], r["layer"]) for r in rows] == expected
    for r in rows:
        assert 0 < r["tokens"] <= 48
        assert all(math.isfinite(r[k]) for k in ("rtn_db", "max_db", "pct_db"))
        assert r["range_ratio"] >= 1.0 and 0 <= r["tail_tokens"] <= r["tokens"]
        assert math.isnan(r["pct_tail_db"]) == (r["tail_tokens"] == 0)
    assert sum(r["max_db"] for r in rows) > sum(r["rtn_db"] for r in rows)  # smoothing helps on planted outliers


def test_search_grid_agrees_with_layer_fidelity(setup) -> None:
    pipe, stats, inputs = setup
    scales = (1.0, 2**0.5)
    table = search(pipe, stats, inputs, "mxfp4", "mxfp4", alphas=(0.4, 0.6), percentiles=(99.0, 100.0),
                   mask_scales=scales)
    assert [(r["alpha"], r["percentile"]) for r in table] == [(0.4, 99.0), (0.6, 99.0), (0.4, 100.0), (0.6, 100.0)]
    rows = layer_fidelity(pipe, stats, inputs, "mxfp4", "mxfp4", 0.6, 99.0, mask_scales=scales)
    cell = {(r["alpha"], r["percentile"]): r for r in table}
    assert cell[0.6, 100.0]["mean_db"] == pytest.approx(sum(r["max_db"] for r in rows) / len(rows))
    assert cell[0.6, 99.0]["mean_db"] == pytest.approx(sum(r["pct_db"] for r in rows) / len(rows))
    assert cell[0.6, 99.0]["worst_db"] == pytest.approx(min(r["pct_db"] for r in rows))
    for r in table:
        assert r["layers"] == len(rows) and r["worst_db"] <= r["mean_db"]
        assert r["nmse_db"] <= r["mean_db"] + 1e-9  # the arithmetic mean of errors is never below the geometric


def test_activation_range_and_its_guard(setup) -> None:
    _, stats, _ = setup
    expert, layer = "transformer", "blocks.0.ffn.net.2"
    a_max = stats.absmax(expert, layer)
    assert torch.equal(stats.activation_range(expert, layer, 100.0), a_max)
    plain = stats.activation_range(expert, layer, 99.0)
    guarded = stats.activation_range(expert, layer, 99.0, max_ratio=4.0)
    assert torch.equal(guarded, torch.maximum(plain, a_max / 4))
    with pytest.raises(ValueError, match="max_ratio"):
        stats.activation_range(expert, layer, 99.0, max_ratio=0.5)


def test_tail_rows() -> None:
    x = torch.tensor([[1.0, -1.0], [3.0, 0.0], [0.0, -5.0]])
    assert tail_rows(x, torch.tensor([1.0, 2.0])).tolist() == [False, True, True]


def test_fidelity_argument_errors(setup) -> None:
    pipe, stats, inputs = setup
    with pytest.raises(ValueError, match="mask_scales"):
        search(pipe, stats, inputs, "hif4", "hif4", mask_scales=(1.0, 0.0))
    with pytest.raises(ValueError, match="not target Linears"):
        layer_fidelity(pipe, stats, {"transformer": {"proj_out": torch.ones(2, 32)}}, "hif4", "hif4", 0.5, 99.0)
    with pytest.raises(ValueError, match="unknown expert"):
        layer_fidelity(pipe, stats, {"transformer_9": {}}, "hif4", "hif4", 0.5, 99.0)
