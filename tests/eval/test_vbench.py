"""VBench wiring, against a fake `vbench` CLI that checks what it is given and answers in VBench's format."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from vidquant.eval import vbench
from vidquant.eval.generate import video_name
from vidquant.eval.vbench import PAPER_DIMENSIONS, VBenchError, run_vbench, vbench_status

# Checks the call like VBench 0.1.5's CLI would, records it, and writes {dim: [mean, [per video]]}.
FAKE = """\
#!{python}
import argparse, json, os, re, sys, zlib
from pathlib import Path

args = sys.argv[1:]
with open({record!r}, "a") as f:
    f.write(json.dumps({{"argv": args, "cache": os.environ.get("VBENCH_CACHE_DIR")}}) + "\\n")
if not args or args[0] != "evaluate":
    sys.exit("usage: vbench evaluate ...")
p = argparse.ArgumentParser()
p.add_argument("--videos_path", required=True)
p.add_argument("--dimension", required=True)
p.add_argument("--mode", choices=["custom_input", "vbench_standard", "vbench_category"], required=True)
p.add_argument("--output_path", required=True)
p.add_argument("--load_ckpt_from_local", type=bool)
a = p.parse_args(args[1:])
if a.mode != "custom_input":
    sys.exit("expected custom_input mode")
names = sorted(os.listdir(a.videos_path))
bad = [n for n in names if not re.fullmatch(r".+-[0-9]+[.]mp4", n)]
if bad or not names:
    sys.exit(f"videos must be named {{{{prompt}}}}-{{{{i}}}}.mp4: {{bad or 'none'}}")
scores = {{n: zlib.crc32((a.dimension + n).encode()) / 2**32 for n in names}}
per = [{{"video_path": os.path.join(a.videos_path, n), "video_results": s}} for n, s in scores.items()]
os.makedirs(a.output_path, exist_ok=True)
out = Path(a.output_path) / "results_2025-01-01-00:00:00_eval_results.json"
out.write_text(json.dumps({{a.dimension: [sum(scores.values()) / len(scores), per]}}))
"""


def _script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def videos(tmp_path: Path) -> Path:
    folder = tmp_path / "videos"
    folder.mkdir()
    for prompt in ("a red fox runs through snow", "the courier, Ana, waves at the camera"):
        for i in range(2):
            (folder / f"{video_name(prompt)}-{i}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    return folder


@pytest.fixture
def fake(tmp_path: Path) -> tuple[str, Path]:
    record = tmp_path / "calls.jsonl"
    return _script(tmp_path / "vbench", FAKE.format(python=sys.executable, record=str(record))), record


def test_run_vbench_parses_every_dimension(videos: Path, fake: tuple[str, Path], tmp_path: Path) -> None:
    exe, record = fake
    results = run_vbench(videos, tmp_path / "out", executable=exe, cache_dir=tmp_path / "weights")
    assert list(results) == list(PAPER_DIMENSIONS)
    names = sorted(p.name for p in videos.glob("*.mp4"))
    for dim, res in results.items():
        assert sorted(res["per_video"]) == names
        assert res["mean"] == pytest.approx(sum(res["per_video"].values()) / len(names))
        assert (tmp_path / "out" / dim / "vbench.log").is_file()
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["argv"][c["argv"].index("--dimension") + 1] for c in calls] == list(PAPER_DIMENSIONS)
    assert all(c["cache"] == str(tmp_path / "weights") for c in calls)
    argv = calls[0]["argv"]
    assert argv[0] == "evaluate" and argv[argv.index("--mode") + 1] == "custom_input"
    assert argv[argv.index("--videos_path") + 1] == str(videos.resolve())
    assert argv[argv.index("--load_ckpt_from_local") + 1] == "True"


def test_cache_dir_comes_from_the_environment(videos: Path, fake: tuple[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    exe, record = fake
    monkeypatch.setenv("VBENCH_CACHE_DIR", "/models/vbench")
    run_vbench(videos, tmp_path / "out", dimensions=["imaging_quality"], executable=exe)
    assert json.loads(record.read_text())["cache"] == "/models/vbench"


def test_stale_results_are_not_reused(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "imaging_quality"
    out.mkdir(parents=True)
    (out / "old_eval_results.json").write_text(json.dumps({"imaging_quality": [0.9, []]}))
    silent = _script(tmp_path / "silent", f"#!{sys.executable}\nprint('done')\n")
    with pytest.raises(VBenchError, match="wrote no"):
        run_vbench(videos, tmp_path / "out", dimensions=["imaging_quality"], executable=silent)


def test_failing_vbench_raises_with_stderr_tail_and_command(videos: Path, tmp_path: Path) -> None:
    text = f"#!{sys.executable}\nimport sys\nsys.stderr.write('Traceback...\\nRuntimeError: CUDA not available\\n')\n"
    broken = _script(tmp_path / "broken", text + "sys.exit(3)\n")
    with pytest.raises(VBenchError) as info:
        run_vbench(videos, tmp_path / "out", dimensions=["motion_smoothness"], executable=broken)
    message = str(info.value)
    assert "exit 3" in message and "CUDA not available" in message
    assert f"{broken} evaluate --videos_path" in message and "--dimension motion_smoothness" in message


def test_missing_vbench_says_how_to_enable_it(videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIDQUANT_VBENCH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert vbench.find_vbench() is None
    available, message = vbench_status()
    assert not available
    for needle in ("pip install vbench==0.1.5", "VIDQUANT_VBENCH", "VBENCH_CACHE_DIR", "amt_model/amt-s.pth",
                   "venv", "ViClip-InternVid-10M-FLT.pth"):
        assert needle in message
    with pytest.raises(VBenchError, match="not available"):
        run_vbench(videos, tmp_path / "out")


def test_configured_executable_wins_and_must_be_executable(tmp_path: Path, fake: tuple[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    exe, _ = fake
    monkeypatch.setenv("VIDQUANT_VBENCH", exe)
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path))
    available, message = vbench_status()
    assert available and exe in message and "lacks" in message
    plain = tmp_path / "not-executable"
    plain.write_text("")
    monkeypatch.setenv("VIDQUANT_VBENCH", str(plain))
    assert vbench.find_vbench() is None
    assert "is not an executable" in vbench_status()[1]


def test_status_with_complete_cache(tmp_path: Path, fake: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDQUANT_VBENCH", fake[0])
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path))
    for files in vbench.WEIGHTS.values():
        for name in files:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).touch()
    assert vbench_status() == (True, f"VBench found at {fake[0]}, weights in VBENCH_CACHE_DIR={tmp_path}.")


def test_bad_inputs_are_refused(videos: Path, fake: tuple[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot score"):
        run_vbench(videos, tmp_path / "out", dimensions=["color"], executable=fake[0])
    with pytest.raises(ValueError, match="no .mp4"):
        run_vbench(tmp_path / "nowhere", tmp_path / "out", executable=fake[0])
    with pytest.raises(ValueError, match="shell"):
        run_vbench(videos, tmp_path / "out dir", executable=fake[0])


def test_unreadable_result_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "r_eval_results.json"
    path.write_text(json.dumps({"imaging_quality": 0.5}))
    with pytest.raises(VBenchError, match="unreadable VBench result for imaging_quality"):
        vbench.parse_results(path, "imaging_quality")


def test_filename_round_trips_through_vbench_prompt_rule() -> None:
    """VBench reads the prompt as the stem minus its trailing -index: the names generate.py writes."""
    assert f"{video_name('a cat / a dog')}-3.mp4" == "a cat _ a dog-3.mp4"
    long = " ".join(["word"] * 100)
    name = f"{video_name(long)}-0.mp4"
    assert len(name.encode()) < 255 and name.endswith("word-0.mp4")
    stem = os.path.splitext(f"{video_name('ünïcode prompt')}-12.mp4")[0]
    assert stem.rsplit("-", 1) == ["ünïcode prompt", "12"]


def test_cached_scores_are_reused_for_the_same_videos_only(videos: Path, fake: tuple[str, Path],
                                                           tmp_path: Path) -> None:
    """A sweep's BF16 videos are scored once: the same files reuse scores.json; another file scores again."""
    exe, record = fake
    first = vbench.cached_vbench(videos, tmp_path / "bf16", dimensions=["imaging_quality"], executable=exe)
    again = vbench.cached_vbench(videos, tmp_path / "bf16", dimensions=["imaging_quality"], executable=exe)
    assert again == first and len(record.read_text().splitlines()) == 1
    vbench.cached_vbench(videos, tmp_path / "bf16", dimensions=["imaging_quality", "aesthetic_quality"],
                         executable=exe)
    assert len(record.read_text().splitlines()) == 3  # other dimensions: scored again
    next(videos.glob("*.mp4")).write_bytes(b"\x00\x00\x00\x18ftypmp42 changed")
    vbench.cached_vbench(videos, tmp_path / "bf16", dimensions=["imaging_quality"], executable=exe)
    assert len(record.read_text().splitlines()) == 4
