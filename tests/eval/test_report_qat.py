"""The report's PTQ vs PTQ + QAT section, fed by a fine-tuned state's ``qat`` record."""

from __future__ import annotations

import json
from pathlib import Path

from vidquant.eval.report import Metric, ReportData, write_report

QAT = {"kept": "qat", "best_step": 40, "steps": 60, "lr": 0.001, "rank": 4, "train": ["lora", "clips"],
       "loss": {"train_before": 0.01, "train_after": 0.005, "held_out_before": 0.008, "held_out_after": 0.006}}


def test_qat_section_shows_losses_before_and_after(tmp_path: Path) -> None:
    html = write_report(tmp_path, ReportData(metrics=[Metric("ssim", 1.0, 0.99)], qat=QAT)).read_text()
    assert "PTQ vs PTQ + QAT" in html and "best held-out step 40" in html
    assert "-50.0 %" in html and "-25.0 %" in html  # training and held-out loss change
    assert json.loads((tmp_path / "metrics.json").read_text())["qat"]["loss"]["held_out_after"] == 0.006


def test_kept_ptq_says_why_and_no_record_no_section(tmp_path: Path) -> None:
    kept = {**QAT, "kept": "ptq", "best_step": 0, "why": "no step beat the PTQ state's held-out loss"}
    html = write_report(tmp_path / "a", ReportData(metrics=[], qat=kept)).read_text()
    assert "the PTQ state unchanged: no step beat the PTQ state&#x27;s held-out loss" in html
    assert "PTQ vs PTQ + QAT" not in write_report(tmp_path / "b", ReportData(metrics=[])).read_text()
