"""Calibration on the tiny pipelines: coverage of every layer, resume, exact merging, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vidquant.calib import calibrate as calib_run
from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.prompts import default_prompts
from vidquant.calib.stats import InputStats, load_stats
from vidquant.cli import app
from vidquant.models import bin_edges, timestep_bin, tiny, wan

SETTINGS = CalibSettings(num_prompts=3, steps=3, height=32, width=32, frames=5, bins=2)


def stats_tensors(stats) -> dict[str, torch.Tensor]:
    out = {}
    for expert, observers in stats.inputs.items():
        for name, obs in observers.items():
            out.update(obs.tensors(f"{expert}/{name}"))
    return out


def assert_same_stats(a, b) -> None:
    ta, tb = stats_tensors(a), stats_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def t2v(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tiny-t2v")
    tiny.build_tiny_pipeline().save_pretrained(path)
    return wan.load_pipeline(str(path))


@pytest.fixture(scope="module")
def reference(t2v, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("stats")
    return calibrate(t2v, default_prompts(), SETTINGS, out, progress=False), out


def test_every_target_linear_of_both_experts_has_statistics(t2v, reference) -> None:
    stats, out = reference
    assert stats.experts() == ["transformer", "transformer_2"]
    for expert, model in wan.experts(t2v).items():
        assert sorted(stats.layers(expert)) == sorted(wan.target_linears(model))
        for layer in stats.layers(expert):
            obs = stats.input_of(expert, layer)
            assert obs.tokens[:, 0].sum() > 0 and obs.tokens[:, 1].sum() > 0  # both CFG branches
            assert torch.equal(obs.tokens[:, 0], obs.tokens[:, 1])
            amax = stats.absmax(expert, layer)
            assert (amax > 0).float().mean() > 0.9  # a planted spike unit may stay silent: all zero
            p = stats.percentile(expert, layer, 99)
            assert (p <= amax).all() and (p >= 0).all()
    # q/k/v of self-attention share one observer
    assert stats.input_of("transformer", "blocks.0.attn1.to_q") is stats.input_of("transformer", "blocks.0.attn1.to_k")
    assert_same_stats(load_stats(out), stats)
    assert load_stats(out).meta["prompts_done"] == 3


def test_timestep_bins_follow_each_experts_share() -> None:
    edges = bin_edges(875.0, 1000.0, 2)
    assert edges == [875.0, 937.5, 1000.0]
    assert [timestep_bin(t, edges) for t in (999.0, 937.5, 900.0, 875.0)] == [1, 1, 0, 0]


def test_resume_after_interruption_equals_one_run(t2v, reference, tmp_path: Path, monkeypatch) -> None:
    real = calib_run.generate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(calib_run, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        calibrate(t2v, default_prompts(), SETTINGS, tmp_path, progress=False)
    assert load_stats(tmp_path).meta["prompts_done"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(calib_run, "generate", real)
    resumed = calibrate(t2v, default_prompts(), SETTINGS, tmp_path, progress=False)
    assert_same_stats(resumed, reference[0])


def test_resume_refuses_other_settings_or_prompts(t2v, reference) -> None:
    _, out = reference
    with pytest.raises(ValueError, match="different settings"):
        calibrate(t2v, default_prompts(), SETTINGS.model_copy(update={"steps": 4}), out, progress=False)
    with pytest.raises(ValueError, match="different prompt set hash"):
        calibrate(t2v, list(reversed(default_prompts())), SETTINGS, out, progress=False)


def test_nonfinite_values_are_counted_and_excluded() -> None:
    obs = InputStats.empty(["l"], 4, bins=1, tail_keys="total", device=torch.device("cpu"))
    x = torch.tensor([[1.0, float("nan"), 2.0, float("inf")], [-3.0, 1.0, 0.5, 1.0]])
    obs.update(x, 0, 0)
    assert obs.nonfinite == 2 and obs.tokens.sum() == 2
    assert obs.absmax[0, 0].tolist() == [3.0, 1.0, 2.0, 1.0]


def test_per_key_tails_merge_to_the_totals(t2v, tmp_path: Path) -> None:
    settings = SETTINGS.model_copy(update={"num_prompts": 1, "tail_keys": "bin_branch"})
    stats = calibrate(t2v, default_prompts(), settings, tmp_path, progress=False)
    total = load_stats(tmp_path)
    layer = "blocks.1.ffn.net.2"
    p = total.percentile("transformer", layer, 99)
    assert torch.equal(p, stats.percentile("transformer", layer, 99))
    assert stats.percentile("transformer", layer, 99, bin=0, branch="cond").shape == p.shape
    assert torch.equal(
        stats.absmax("transformer", layer),
        torch.maximum(stats.absmax("transformer", layer, branch=0), stats.absmax("transformer", layer, branch=1)),
    )


def test_percentile_by_bin_needs_per_key_tails(reference) -> None:
    with pytest.raises(ValueError, match="--tail-keys bin_branch"):
        reference[0].percentile("transformer", "blocks.0.ffn.net.2", 99, bin=0)


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["calibrate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "nope: no such directory" in result.output
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"cap": "ok"}\n{not json\n')
    result = runner.invoke(app, ["calibrate", "--model", "tiny", "--prompts", str(bad), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and "prompts.jsonl" in result.output and "line 2" in result.output
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2 and "no stats.safetensors" in result.output


def run_cli(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    return subprocess.run([*launcher, "-m", "vidquant", *args], env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_give_the_statistics_of_one(tmp_path: Path) -> None:
    args = ["calibrate", "--model", "tiny", "--num-prompts", "4", "--steps", "2", "--frames", "5", "--bins", "2"]
    one = run_cli([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = run_cli([*args, "--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr
    assert_same_stats(load_stats(tmp_path / "one"), load_stats(tmp_path / "two"))
    summary = run_cli(["inspect", str(tmp_path / "two")])
    assert summary.returncode == 0 and "worst tails" in summary.stdout


def test_fused_cpu_update_equals_the_torch_ops(monkeypatch) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 24, generator=g) * torch.exp2(torch.randint(-40, 40, (3, 50, 1), generator=g).float())
    x[0, 3, 5], x[1, 7, 2], x[2, 9, :] = float("nan"), float("-inf"), 0.0
    fused = InputStats.empty(["l"], 24, bins=2, tail_keys="total", device=torch.device("cpu"))
    plain = InputStats.empty(["l"], 24, bins=2, tail_keys="total", device=torch.device("cpu"))
    for i in range(3):
        fused.update(x[i], i % 2, 1)
    monkeypatch.setenv("VIDQUANT_NO_KERNELS", "1")
    for i in range(3):
        plain.update(x[i], i % 2, 1)
    for name in ("absmax", "tokens", "token_absmax"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name


def test_a_flipped_byte_or_an_edited_header_is_refused(reference, tmp_path: Path) -> None:
    stats, _ = reference
    stats.save(tmp_path)
    file = tmp_path / "stats.safetensors"
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x40  # a byte of the last tensor's data
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum differs"):
        load_stats(tmp_path)
    stats.save(tmp_path)
    data = file.read_bytes()
    edited = data.replace(b'\\"seed\\": 42', b'\\"seed\\": 43', 1)  # in the JSON metadata of the header
    assert edited != data
    file.write_bytes(edited)
    with pytest.raises(ValueError, match="checksum differs"):
        load_stats(tmp_path)


def test_calibrate_refuses_a_foreign_folder(t2v, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a statistics folder"):
        calibrate(t2v, default_prompts(), SETTINGS, tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
