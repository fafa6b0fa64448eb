"""Draft, gate, escalate: every prompt's path and why, the accepted videos, resume, and the threshold choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SIZE, STEPS, fresh
from hypothesis import given, settings
from hypothesis import strategies as st

import vidquant.route.route as route_module
from vidquant.eval.generate import load_frames, load_records
from vidquant.eval.protocol import Protocol
from vidquant.route import BF16, RoutedModel, parse_policy
from vidquant.route.gate import PromptGate
from vidquant.route.route import (
    GATE_JSON,
    VIDEOS_DIR,
    calibrate_threshold,
    choose_threshold,
    load_threshold,
    route_prompts,
)

PROTOCOL = Protocol(height=SIZE, width=SIZE, frames=5, steps=STEPS)
PROMPTS = ["a close-up portrait of a smiling woman with freckles", "a calm mountain lake at dawn"]
POLICY = parse_policy({"name": "ladder", "precisions": {"w4a4": "a", "w8a8": "b"}, "default": "w4a4",
                       "rules": [{"experts": ["transformer"], "precision": "w8a8"}],
                       "escalation": {"ladder": ["mixed", "w8a8", BF16], "critical": BF16}})


@pytest.fixture(scope="module")
def routed(states):
    with RoutedModel.build(fresh(), dict(states)) as model:
        yield model


@pytest.fixture(scope="module")
def gate() -> PromptGate:
    return PromptGate.load(None)


def test_every_prompt_is_routed_and_the_report_says_why(routed, gate, tmp_path: Path) -> None:
    assert [gate.decide(p).critical for p in PROMPTS] == [True, False]
    data = route_prompts(routed, POLICY, PROMPTS, PROTOCOL, tmp_path, gate=gate, threshold=1.0, compare=True,
                         progress=False)
    paths = [[a["rung"] for a in p["attempts"]] for p in data["prompts"]]
    assert paths == [[BF16], ["mixed", "w8a8", BF16]]  # no draft reaches identity 1.0
    first = data["prompts"][1]["attempts"][0]
    assert first["score"] is not None and first["reason"].startswith("draft: identity") and "< 1.000" in first["reason"]
    assert data["prompts"][0]["attempts"][0]["reason"] == "prompt gate: critical"
    assert "faces" in data["prompts"][0]["gate_categories"]
    t = data["totals"]
    assert t["fallback_rate"] == 1.0 and t["rejection_rate"] == 1.0 and t["drafts_judged"] == 2
    assert t["generations"] == 4 and t["final_rungs"] == {BF16: 2} and t["psnr"] == 100.0  # capped: identical
    assert t["draft_psnr"] < 100.0 and set(t["gate_held_out"]) >= {"precision", "recall"}
    accepted = {r.index: r for r in load_records(tmp_path / VIDEOS_DIR)}
    bf16 = {r.index: r for r in load_records(tmp_path / "precisions" / BF16)}
    assert sorted(accepted) == [0, 1]
    for i in accepted:  # the accepted video is the escalated one: same seed, same frames as all-BF16
        assert np.array_equal(load_frames(accepted[i]), load_frames(bf16[i]))
        assert json.loads(accepted[i].paths["sidecar"].read_text())["route"]["rung"] == BF16
    page = (tmp_path / "route.html").read_text()
    saved = json.loads((tmp_path / "route.json").read_text())
    assert all(p in page for p in PROMPTS) and len(saved["prompts"]) == 2
    assert saved["precision_costs"]["w4a4"]["resident_bytes"] > 0
    assert set(saved["reference_costs"]) == {BF16, "mixed"} and "Routed vs all-BF16 and all-draft" in page


def test_drafts_above_the_threshold_are_accepted_and_a_rerun_generates_nothing(routed, gate, tmp_path: Path) -> None:
    data = route_prompts(routed, POLICY, PROMPTS, PROTOCOL, tmp_path, gate=gate, threshold=0.0, progress=False)
    assert [p["final"] for p in data["prompts"]] == [BF16, "mixed"]
    assert data["totals"]["fallback_rate"] == 0.5 and data["totals"]["rejection_rate"] == 0.0
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "precisions").rglob("*.json")}
    calls = []
    handle = routed.model.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again = route_prompts(routed, POLICY, PROMPTS, PROTOCOL, tmp_path, gate=gate, threshold=0.0, progress=False)
    finally:
        handle.remove()
    assert not calls and stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "precisions").rglob("*.json")}
    assert again["prompts"] == data["prompts"]
    with pytest.raises(ValueError, match="another model or state"):  # the mix changed: its folder is refused
        other = parse_policy({**POLICY.model_dump(), "rules": []})
        route_prompts(routed, other, PROMPTS, PROTOCOL, tmp_path, gate=gate, threshold=0.0, progress=False)


def test_the_threshold_is_calibrated_saved_and_reused_only_for_its_draft(routed, tmp_path: Path) -> None:
    strict = parse_policy({**POLICY.model_dump(), "escalation": {**POLICY.escalation.model_dump(), "bad_drift": 1e-6}})
    result = calibrate_threshold(routed, strict, PROMPTS[1:], PROTOCOL, tmp_path, progress=False)
    rows = result["rows"]
    assert len(rows) == 1 and all(r["bad"] for r in rows)  # every draft drifts a little from BF16
    assert result["recall"] == 1.0 and result["threshold"] > max(r["score"] for r in rows)
    assert load_threshold(tmp_path / GATE_JSON, routed, strict) == result["threshold"]
    bf16_draft = parse_policy({**strict.model_dump(), "escalation": {**strict.escalation.model_dump(),
                                                                      "ladder": ["w8a8", BF16]}})
    with pytest.raises(ValueError, match="calibrated for another draft"):
        load_threshold(tmp_path / GATE_JSON, routed, bf16_draft)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a gate calibration"):
        load_threshold(tmp_path / "x.json", routed, strict)


def _fbeta(p: float | None, r: float | None, beta: float = 2.0) -> float:
    p, r = p or 0.0, r or 0.0
    return 0.0 if p + r == 0 else (1 + beta**2) * p * r / (beta**2 * p + r)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=30),
       st.lists(st.floats(0, 1.01), max_size=10))
def test_the_chosen_threshold_is_the_best_f2_at_catching_bad_drafts(pairs, others) -> None:
    scores, bad = [s for s, _ in pairs], [b for _, b in pairs]
    best = choose_threshold(scores, bad)
    flagged = [s < best["threshold"] for s in scores]
    assert best["flagged"] == sum(flagged) and best["caught"] == sum(f and b for f, b in zip(flagged, bad, strict=True))
    if not any(bad):
        assert best["threshold"] == 0.0 and best["flagged"] == 0 and best["recall"] is None
        return
    assert best["recall"] == best["caught"] / sum(bad)
    for t in others + scores:  # no other threshold does better
        f = [s < t for s in scores]
        caught = sum(x and b for x, b in zip(f, bad, strict=True))
        assert _fbeta(best["precision"], best["recall"]) >= _fbeta(caught / sum(f) if any(f) else None,
                                                                   caught / sum(bad)) - 1e-12


def test_threshold_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="one bad/good label per score"):
        choose_threshold([0.5], [True, False])
    with pytest.raises(ValueError, match="finite"):
        choose_threshold([float("nan")], [True])


def test_the_draft_gate_can_use_vbench_subject_consistency(routed, gate, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``escalation.signal: vbench`` scores each draft folder with VBench's subject consistency (faked here: the
    real one needs its own environment); without VBench the policy is refused before anything is generated."""
    vbench_policy = parse_policy({**POLICY.model_dump(), "escalation": {**POLICY.escalation.model_dump(),
                                                                       "signal": "vbench"}})
    monkeypatch.setattr(route_module, "vbench_status", lambda: (False, "VBench is not available: test."))
    with pytest.raises(ValueError, match="escalation.signal: vbench needs the optional VBench environment"):
        route_prompts(routed, vbench_policy, PROMPTS, PROTOCOL, tmp_path, gate=gate, threshold=0.5, progress=False)
    assert not (tmp_path / "precisions").exists()
    scored = []

    def fake(folder: Path, out: Path, dimensions: list[str]) -> dict:
        scored.append(Path(folder).name)
        names = sorted(p.name for p in Path(folder).glob("*.mp4"))
        return {"subject_consistency": {"mean": 0.3, "per_video": dict.fromkeys(names, 0.3)}}

    monkeypatch.setattr(route_module, "vbench_status", lambda: (True, "fake"))
    monkeypatch.setattr(route_module, "cached_vbench", fake)
    data = route_prompts(routed, vbench_policy, PROMPTS, PROTOCOL, tmp_path, gate=gate, threshold=0.5,
                         progress=False)
    draft = data["prompts"][1]["attempts"]
    assert [a["rung"] for a in draft] == ["mixed", "w8a8", BF16] and draft[0]["score"] == 0.3
    assert draft[0]["reason"] == "draft: vbench 0.300 < 0.500" and scored == ["mixed", "w8a8"]
