"""report.html / metrics.json: structure, escaping, numbers, atomic writes, and a real headless-Chromium render."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from vidquant.eval import report
from vidquant.eval.report import ActivationTail, Metric, PromptResult, ReportData, write_report

EVIL = '<script>alert("x")</script> & the courier\'s "logo"'
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _video(seed: int, frames: int = 9, size: int = 48, identity_shift: float = 0.0) -> np.ndarray:
    """A moving gradient with a 'subject' disc whose colour drifts by `identity_shift` over the clip."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for t in range(frames):
        base = np.stack([xx + t / frames, yy, 0.5 + 0.0 * xx], -1) % 1.0
        disc = (xx - 0.3 - 0.4 * t / frames) ** 2 + (yy - 0.5) ** 2 < 0.02
        base[disc] = [0.9, 0.75 - identity_shift * t / frames, 0.6 + identity_shift * t / frames]
        out.append(base + rng.normal(0, 0.01, base.shape))
    return (np.clip(np.stack(out), 0, 1) * 255).astype(np.uint8)


def sample_data(n_prompts: int = 6, frames: bool = True, channels: int = 512, blocks: int = 8) -> ReportData:
    """A plausible W4A4 run: VBench's subject-consistency collapse hidden in a modest average, one bad prompt."""
    metrics = [
        Metric("psnr", None, 24.8),
        Metric("ssim", 1.0, 0.81),
        Metric("latent_rel_err", 0.0, 0.21),
        Metric("temporal_flickering", 0.962, 0.951),
        Metric("motion_smoothness_proxy", 0.981, 0.975),
        Metric("subject_consistency_proxy", 0.944, 0.861),
        Metric("subject_consistency", 0.9331, 0.5324, group="vbench"),
        Metric("motion_smoothness", 0.9923, 0.9803, group="vbench"),
        Metric("imaging_quality", 0.7027, 0.6507, group="vbench"),
        Metric("aesthetic_quality", 0.5932, 0.5521, group="vbench"),
        Metric("overall_consistency", 0.1787, 0.1745, group="vbench"),
        Metric("weight_bytes", 28.6 * 2**30, 8.1 * 2**30, group="cost"),
        Metric("peak_memory_bytes", 59.8 * 2**30, 24.3 * 2**30, group="cost"),
        Metric("seconds_per_step", 26.0, 27.1, group="cost"),
    ]
    prompts = []
    for i in range(n_prompts):
        bad = i == 2
        text = EVIL if i == 1 else f"prompt {i}: the courier Ana rides a red scooter past the bakery sign"
        q = {"psnr": 25.0 - 6 * bad - i * 0.3, "ssim": 0.84 - 0.3 * bad - 0.01 * i, "latent_rel_err": 0.2 + 0.2 * bad,
             "subject_consistency_proxy": 0.85 - 0.3 * bad, "subject_consistency": 0.9 - 0.4 * bad}
        b = {"subject_consistency_proxy": 0.94, "subject_consistency": 0.93}
        video = _video(i) if frames else None
        prompts.append(PromptResult(text, q, b, video, _video(i, identity_shift=0.6 * bad) if frames else None))
    rng = np.random.default_rng(0)
    kinds = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
             "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    sqnr = [{"layer": f"blocks.{b}.{k}", "expert": e, "sqnr_db": float(18 + rng.normal(0, 1.5) - 6 * (k == "ffn.net.2")
                                                                         - 4 * (b in (0, blocks - 1)))}
            for e in ("transformer", "transformer_2") for b in range(blocks) for k in kinds]
    tails = []
    for j, name in enumerate(["blocks.0.ffn.net.2", "blocks.7.ffn.net.2", "blocks.3.attn1.to_q"]):
        absmax = rng.lognormal(0, 0.6, channels) * (1 + 40 * (rng.random(channels) < 0.01))
        counts, edges = np.histogram(rng.lognormal(1, 0.5, 4000), bins=np.geomspace(0.01, 100, 65))
        hist = {"token_counts": np.r_[3, counts, 1], "token_edges": np.r_[0, edges, np.inf]} if j == 0 else {}
        tails.append(ActivationTail(name, "transformer_2" if j else "transformer", absmax=absmax,
                                    percentile=absmax * rng.uniform(0.05, 0.4, channels), **hist))
    return ReportData(
        metrics=metrics, recipe={"name": "tail-aware-hif4", "alpha": 0.5, "percentile": 99.9},
        protocol={"height": 720, "width": 1280, "frames": 61, "steps": 40, "cfg": 3.5, "seed": 42},
        model="Wan-AI/Wan2.2-I2V-A14B-Diffusers", model_fingerprint="sha256:3f5c0d…", state_path="state/hif4",
        prompts=prompts, sqnr=sqnr, tails=tails, notes=["VBench scores measured on 5 prompts."],
        extra={"calibration prompts": 16}, created="2025-01-01 00:00 UTC",
    )


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(html: str) -> _Collector:
    c = _Collector()
    c.feed(html)
    return c


def test_page_structure(tmp_path: Path) -> None:
    data = sample_data()
    html = write_report(tmp_path, data).read_text()
    doc = _parse(html)
    tags = [t for t, _ in doc.tags]
    imgs = [a for t, a in doc.tags if t == "img"]
    assert tags.count("table") == 3  # metrics, prompts, lowest-SQNR layers
    assert len(imgs) == 2 + 3 * len(data.prompts)  # SQNR, tails, 3 strip rows per prompt
    assert all(a["src"].startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for a in imgs)
    prompt_rows = [a for t, a in doc.tags if t == "td" and a.get("class") == "prompt"]
    assert len(prompt_rows) == len(data.prompts)
    for m in data.metrics:
        assert m.label in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "<link" not in html
    assert "Content-Security-Policy" in html


def test_user_text_is_escaped(tmp_path: Path) -> None:
    data = sample_data(n_prompts=3, frames=False)
    data.model = "<b>model</b>"
    html = write_report(tmp_path, data).read_text()
    assert "<script>" not in html and "<b>model</b>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert EVIL in "".join(_parse(html).text)  # the text reads back exactly


def test_headline_names_worst_dimension_and_prompt(tmp_path: Path) -> None:
    data = sample_data()
    summary = report.summarize(data, report.rank_prompts(data))
    assert summary["worst_dimension"]["name"] == "subject_consistency"
    assert summary["worst_dimension"]["relative"] == pytest.approx(0.5324 / 0.9331 - 1)
    assert summary["worst_prompt"]["index"] == 2
    assert summary["vbench_mean"]["bf16"] == pytest.approx(np.mean([0.9331, 0.9923, 0.7027, 0.5932, 0.1787]))
    quality = [m for m in data.metrics if m.group != "cost" and m.drop is not None]
    assert summary["average_relative_drop"] == pytest.approx(np.mean([m.drop for m in quality]))
    assert summary["average_relative_drop"] < summary["worst_dimension"]["drop"] / 3  # the average hides it
    ranking = report.rank_prompts(data)
    assert ranking[0].index == 2 and ranking[0].worst and sum(r.worst for r in ranking) == 1
    html = write_report(tmp_path, data).read_text()
    assert html.index("Worst dimension") < html.index("<table")
    assert '<tr class="worst"><td>1</td><td>2</td>' in html


def _proxy_run(proxy_deltas: list[float]) -> ReportData:
    """Three prompts whose HOG proxy moved by the given amounts vs BF16 (0.80 each), nothing else changing."""
    prompts = [PromptResult(f"p{i}", {"psnr": 35.0, "subject_consistency_proxy": 0.8 + d},
                            {"subject_consistency_proxy": 0.8}) for i, d in enumerate(proxy_deltas)]
    mean = 0.8 + float(np.mean(proxy_deltas))
    return ReportData(metrics=[Metric("psnr", None, 35.0), Metric("subject_consistency_proxy", 0.8, mean)],
                      prompts=prompts)


def test_headline_does_not_call_a_proxy_move_within_noise_better(tmp_path: Path) -> None:
    """The demo's case: the HOG proxy up 1 % under W4A4 at 35 dB PSNR is noise, not an improvement."""
    data = _proxy_run([0.008, 0.008, 0.008])  # +1.0 %, under the 2 % floor
    summary = report.summarize(data, report.rank_prompts(data))
    assert summary["average_relative_drop"] == pytest.approx(-0.01)
    assert summary["average_settled_drop"] == 0.0 and summary["within_noise"] == ["subject_consistency_proxy"]
    html = write_report(tmp_path / "a", data).read_text()
    assert "no change" in html and " better</div>" not in html
    scattered = _proxy_run([0.2, -0.05, -0.02])  # +5.4 % on average, but the prompts disagree: 2 SE ~ 20 %
    assert report.summarize(scattered, [])["average_settled_drop"] == 0.0
    clear = _proxy_run([0.04, 0.04, 0.041])  # +5 %, every prompt agrees: a real change, said as such
    summary = report.summarize(clear, [])
    assert summary["average_relative_drop"] < 0
    assert summary["average_settled_drop"] == pytest.approx(summary["average_relative_drop"])
    assert "better</div>" in write_report(tmp_path / "b", clear).read_text()


def test_metrics_json_matches(tmp_path: Path) -> None:
    data = sample_data(frames=False)
    data.metrics.append(Metric("psnr_identical", float("inf"), float("nan")))
    write_report(tmp_path, data)
    doc = json.loads((tmp_path / "metrics.json").read_text())
    rows = {m["name"]: m for m in doc["metrics"]}
    assert rows["ssim"]["bf16"] == 1.0 and rows["ssim"]["quantized"] == 0.81
    assert rows["ssim"]["delta"] == pytest.approx(-0.19) and rows["ssim"]["relative"] == pytest.approx(-0.19)
    assert rows["latent_rel_err"]["relative"] is None and rows["latent_rel_err"]["higher_is_better"] is False
    assert rows["weight_bytes"]["relative"] == pytest.approx(8.1 / 28.6 - 1)
    assert rows["psnr_identical"]["bf16"] == "inf" and rows["psnr_identical"]["quantized"] is None
    assert doc["settings"]["recipe"]["name"] == "tail-aware-hif4"
    assert doc["settings"]["protocol"]["seed"] == 42 and doc["settings"]["library_version"]
    assert [p["prompt"] for p in doc["prompts"]] == [p.prompt for p in data.prompts]
    assert len(doc["sqnr"]) == len(data.sqnr) and doc["activation_tails"][0]["channels"] == 512
    assert doc["activation_tails"][0]["tokens"] == 4004
    assert doc["summary"]["worst_prompt"]["prompt"] == data.prompts[2].prompt


def test_minimal_report_and_bad_frames(tmp_path: Path) -> None:
    html = write_report(tmp_path, ReportData(metrics=[Metric("ssim", 1.0, 0.99)])).read_text()
    assert "<img" not in html and "SSIM vs BF16" in html
    data = ReportData(metrics=[], prompts=[PromptResult("p", {}, {}, np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)))])
    with pytest.raises(ValueError, match="uint8"):
        write_report(tmp_path, data)
    with pytest.raises(ValueError, match="group"):
        Metric("x", 1.0, 1.0, group="speed")
    with pytest.raises(ValueError, match="one more"):
        ActivationTail("l", token_counts=np.ones(4), token_edges=np.ones(4))


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_report(tmp_path, sample_data(n_prompts=2, frames=False))
    before = (tmp_path / "report.html").read_bytes()

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, sample_data(n_prompts=3, frames=False))
    assert (tmp_path / "report.html").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "report.html"]  # no temporary left


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=90, check=False)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (`make browser` or `apt-get install chromium`): "
                                             "the report's rendering in a real browser is not checked")
def test_renders_in_headless_chromium(tmp_path: Path) -> None:
    data = sample_data()
    page = write_report(tmp_path / "out", data)
    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    assert shot.is_file(), run.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1280) and float(pixels[..., :3].std()) > 0.05  # not blank
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri()).stdout
    doc = _parse(dom)
    imgs = [a for t, a in doc.tags if t == "img"]
    assert len(imgs) == 2 + 3 * len(data.prompts)
    assert sum(t == "tr" for t, _ in doc.tags) > len(data.metrics) + len(data.prompts)
    assert [t for t, _ in doc.tags].count("script") == 0
    assert EVIL in "".join(doc.text)


def test_non_finite_sqnr_and_strip_limit(tmp_path: Path) -> None:
    data = sample_data(n_prompts=4, blocks=2)
    data.sqnr += [{"layer": "blocks.1.broken", "expert": "transformer", "sqnr_db": float("nan")},
                  {"layer": "blocks.1.exact", "expert": "transformer", "sqnr_db": float("inf")}]
    html = write_report(tmp_path, data, max_strips=2).read_text()
    assert len([t for t, _ in _parse(html).tags if t == "img"]) == 2 + 3 * 2
    assert "2 more prompts have frames" in html
    assert html.index("blocks.1.broken") < html.index("blocks.0.ffn.net.2")  # NaN ranks as the worst layer
    rows = json.loads((tmp_path / "metrics.json").read_text())["sqnr"]
    assert rows[-2]["sqnr_db"] is None and rows[-1]["sqnr_db"] == "inf"
