"""torchrun scale-out: the rank helpers, and 2 gloo processes giving what one process gives.

The fast tests spawn processes with `torch.multiprocessing` (a file:// rendezvous in the test's folder); the
slow ones launch the real CLI under ``python -m torch.distributed.run``. Every process runs one torch thread,
so floating-point results do not depend on how work is split over threads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from vidquant import dist
from vidquant.eval.generate import PROMPTS_FILE, PROTOCOL_FILE, load_frames, load_latents, load_records
from vidquant.eval.protocol import Protocol
from vidquant.state import MANIFEST, load_state

PROTOCOL = Protocol(height=16, width=16, frames=5, steps=2)
PROMPTS = ["a red car with a licence plate", "a woman in a blue coat waves", "a logo on a shop sign at night"]


# ---------------------------------------------------------------- deal


@given(st.lists(st.integers(), max_size=40), st.integers(1, 9))
def test_deal_partitions_the_items_in_order(items: list[int], world: int) -> None:
    shares = [dist.deal(items, r, world) for r in range(world)]
    positions = [[i for i in range(len(items)) if i % world == r] for r in range(world)]
    assert shares == [[items[i] for i in p] for p in positions]  # round-robin: rank r takes r, r + world, ...


@given(st.lists(st.floats(0, 1e6), max_size=40), st.integers(1, 9))
def test_weighted_deal_partitions_and_bounds_the_heaviest_rank(weights: list[float], world: int) -> None:
    items = list(range(len(weights)))
    shares = [dist.deal(items, r, world, weights=weights) for r in range(world)]
    assert sorted(i for s in shares for i in s) == items  # every item once
    assert all(s == sorted(s) for s in shares)  # in their given order
    loads = [sum(weights[i] for i in s) for s in shares]
    if weights:  # greedy list scheduling: at most the mean load plus the heaviest item
        assert max(loads) <= sum(weights) / world + max(weights) + 1e-6
    assert shares == [dist.deal(items, r, world, weights=weights) for r in range(world)]  # the same on every rank


def test_deal_refuses_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="rank 2 of a world of 2"):
        dist.deal([1, 2, 3], 2, 2)
    with pytest.raises(ValueError, match="2 weights for 3 items"):
        dist.deal([1, 2, 3], 0, 2, weights=[1.0, 2.0])


def test_one_process_is_rank_0_of_1(tmp_path: Path) -> None:
    assert (dist.rank(), dist.world(), dist.is_main()) == (0, 1, True)
    assert dist.broadcast({"a": [1, 2]}) == {"a": [1, 2]} and dist.all_gather(3) == [3]
    assert dist.on_main(lambda: 5) == 5
    dist.barrier()
    assert dist.rank_path(tmp_path / "x", 0, 1) == tmp_path / "x"
    assert dist.rank_path(tmp_path / "x", 1, 4) == tmp_path / "x.rank1-of-4"
    for name in ("x", "x.rank0-of-2", "x.rank1-of-2", "xy.rank0-of-2", "y"):
        (tmp_path / name).mkdir()
    assert [p.name for p in dist.rank_paths(tmp_path / "x")] == ["x", "x.rank0-of-2", "x.rank1-of-2"]


# ---------------------------------------------------------------- 2 gloo processes, spawned


def _join(rank: int, world: int, folder: Path) -> None:
    torch.set_num_threads(1)
    if world > 1:
        tdist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=world)


def _primitives(rank: int, world: int, folder: Path) -> None:
    from vidquant.outputs import locked_output_ranks

    _join(rank, world, folder)
    result: dict = {"rank": dist.rank(), "world": dist.world()}
    result["broadcast"] = dist.broadcast({"from": dist.rank(), "text": "é" * rank} if rank == 1 else None, src=1)
    result["gathered"] = dist.all_gather({"rank": rank, "payload": "x" * (10 * rank)})
    try:
        dist.on_main(lambda: (_ for _ in ()).throw(ValueError("layer blocks.3 is broken")))
    except ValueError as err:
        result["error"] = str(err)
    with locked_output_ranks(folder / "out", ["*.json"], "test folder") as out:  # rank 1 is not refused
        (out / f"rank{rank}.json").write_text("{}")
        dist.barrier()
        result["entered"] = sorted(p.name for p in out.glob("rank*.json"))
    (folder / f"result{rank}.json").write_text(json.dumps(result))
    tdist.destroy_process_group()


def test_two_processes_share_objects_errors_and_one_output_lock(tmp_path: Path) -> None:
    mp.spawn(_primitives, args=(2, tmp_path), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert (result["rank"], result["world"]) == (rank, 2)
        assert result["broadcast"] == {"from": 1, "text": "é"}
        assert result["gathered"] == [{"rank": 0, "payload": ""}, {"rank": 1, "payload": "x" * 10}]
        assert result["error"] == "layer blocks.3 is broken"  # rank 0's reason, on every rank
        assert result["entered"] == ["rank0.json", "rank1.json"]


def _locked_elsewhere(rank: int, world: int, folder: Path) -> None:
    from vidquant.outputs import locked_output_ranks

    _join(rank, world, folder)
    try:
        with locked_output_ranks(folder / "out", ["*.json"], "test folder"):
            message = "entered"
    except ValueError as err:
        message = str(err)
    (folder / f"result{rank}.json").write_text(json.dumps(message))
    tdist.destroy_process_group()


def test_a_folder_locked_by_another_job_fails_on_every_rank(tmp_path: Path) -> None:
    from vidquant.outputs import locked_output

    with locked_output(tmp_path / "out", ["*.json"], "test folder"):  # another vidquant command holds it
        mp.spawn(_locked_elsewhere, args=(2, tmp_path), nprocs=2, join=True)
    for rank in range(2):
        assert f"in use by pid {os.getpid()}" in json.loads((tmp_path / f"result{rank}.json").read_text())


def _generate(rank: int, world: int, folder: Path) -> None:
    from vidquant.eval.generate import generate
    from vidquant.models import tiny

    _join(rank, world, folder)
    generate(tiny.build_tiny_pipeline(), PROMPTS, PROTOCOL, folder / "videos", progress=False)
    if world > 1:
        tdist.destroy_process_group()


def test_two_processes_generate_the_videos_of_one(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    mp.spawn(_generate, args=(1, one), nprocs=1, join=True)
    mp.spawn(_generate, args=(2, two), nprocs=2, join=True)  # 3 prompts: rank 0 takes 0 and 2, rank 1 takes 1
    a, b = load_records(one / "videos"), load_records(two / "videos")
    assert [r.index for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert np.array_equal(load_frames(ra), load_frames(rb))
        assert torch.equal(load_latents(ra), load_latents(rb))
        assert (ra.prompt, ra.seed, ra.name, ra.fingerprint) == (rb.prompt, rb.seed, rb.name, rb.fingerprint)
    for name in (PROMPTS_FILE, PROTOCOL_FILE):  # written once, by rank 0, for every video
        assert json.loads((one / "videos" / name).read_text()) == json.loads((two / "videos" / name).read_text())
    assert not list((two / "videos").glob(".*.tmp"))


def test_a_rerun_resumes_the_layers_that_every_rank_checkpointed(tmp_path: Path) -> None:
    from vidquant.outputs import check_output
    from vidquant.ptq import svdquant_gptq
    from vidquant.recipes import load_recipe
    from vidquant.state import STATE_OWNED, LayerState, PTQState, checkpoint_of, remove_state

    header = {"recipe": load_recipe("svdquant-gptq-hif4").to_dict(), "plan": {},
              "base": {"config_sha256": "0" * 64, "transformer_bf16_bytes": 1, "stats_model_fingerprint": None,
                       "stats_fingerprint": None}}
    edges = {"transformer": [0.0, 500.0, 1000.0]}
    names = [f"transformer.blocks.{i}.attn1.to_q" for i in range(3)]
    masks = {name: None for name in names}

    def layer(i: int) -> LayerState:
        return LayerState("hif4", "hif4", f"{i:064x}", {"act_clip": torch.full((2,), 0.5 + i / 10)})

    partial = checkpoint_of(tmp_path / "state")  # an interrupted 2-rank run left one folder per rank
    for rank, i in ((0, 0), (1, 2)):
        PTQState({names[i]: layer(i)}, **header, timestep_bins=edges).save(dist.rank_path(partial, rank, 2))
    check_output(tmp_path / "state", STATE_OWNED, "PTQ state")  # they belong to the state folder
    resumed = svdquant_gptq._resume(partial, header, edges, masks)
    assert sorted(resumed) == [names[0], names[2]]
    assert torch.equal(resumed[names[2]].tensors["act_clip"], layer(2).tensors["act_clip"])
    other = {**header, "base": {**header["base"], "config_sha256": "1" * 64}}  # another model: nothing resumed
    assert svdquant_gptq._resume(partial, other, edges, masks) == {}
    for path in dist.rank_paths(partial):
        remove_state(path)
    assert not list((tmp_path / "state").iterdir())


# ---------------------------------------------------------------- the CLI under torchrun (slow)


def run_cli(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "VIDQUANT_VBENCH": ""}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "vidquant", *args], env=env, capture_output=True, text=True, timeout=900)


def assert_same_state(a: Path, b: Path) -> None:
    one, two = load_state(a), load_state(b)
    manifests = [json.loads((p / MANIFEST).read_text()) for p in (a, b)]
    assert manifests[0]["layers"] == manifests[1]["layers"]  # formats, tensor names, the method's choices
    assert sorted(one.layers) == sorted(two.layers)
    for name, layer in one.layers.items():
        for key, tensor in layer.tensors.items():
            other = two.layers[name].tensors[key]
            assert tensor.dtype == other.dtype and torch.equal(tensor, other), (name, key)
    assert one.fingerprint() == two.fingerprint()


@pytest.mark.slow
def test_two_processes_quantize_the_state_of_one(tmp_path: Path) -> None:
    calib = ["calibrate", "--model", "tiny", "--num-prompts", "2", "--steps", "2", "--frames", "5", "--height", "32",
             "--width", "32", "--bins", "2", "--out", str(tmp_path / "stats")]
    done = run_cli(calib)
    assert done.returncode == 0, done.stderr
    args = ["quantize", "--model", "tiny", "--stats", str(tmp_path / "stats"), "--recipe", "svdquant-gptq-hif4"]
    one = run_cli([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = run_cli([*args, "--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr
    assert_same_state(tmp_path / "one", tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".vidquant.lock", MANIFEST, "tensors.safetensors"]
    assert two.stdout.count("layers per expert") == 1  # rank 0 prints


@pytest.mark.slow
def test_two_processes_run_the_job_of_one(tmp_path: Path) -> None:
    args = ["run", "--model", "tiny", "--num-prompts", "3", "--num-calib-prompts", "2", "--steps", "2", "--height",
            "16", "--width", "16", "--frames", "5", "--bins", "2", "--no-vbench", "--fidelity-prompts", "1"]
    one = run_cli([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = run_cli([*args, "--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("report: ") == 1
    assert_same_state(tmp_path / "one" / "state", tmp_path / "two" / "state")
    for kind in ("bf16", "quantized"):
        a, b = (load_records(tmp_path / side / "videos" / kind) for side in ("one", "two"))
        assert len(a) == len(b) == 3
        for ra, rb in zip(a, b, strict=True):
            assert np.array_equal(load_frames(ra), load_frames(rb)), (kind, ra.index)
            assert torch.equal(load_latents(ra), load_latents(rb)), (kind, ra.index)
    metrics = [json.loads((tmp_path / side / "report" / "evaluation.json").read_text()) for side in ("one", "two")]
    assert _without_timings(metrics[0]) == _without_timings(metrics[1])


def _without_timings(data: Any) -> Any:
    """Results without what the machine or the folder decides: cost metrics (clock, memory), the best-of marks
    they sway, folder paths."""
    if isinstance(data, dict):
        return {k: _without_timings(v) for k, v in data.items()
                if not k.endswith("_dir") and k != "best" and not any(w in k for w in ("second", "memory", "speed"))}
    if isinstance(data, list):
        return [_without_timings(v) for v in data if not (isinstance(v, dict) and v.get("group") == "cost")]
    return data


@pytest.mark.slow
def test_two_processes_sweep_the_grid_of_one(tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text("model: tiny\nbase_recipe: tail-aware-hif4\n"
                    "cells: {max: {smoothing.statistic: max}, p99: {smoothing.percentile: 99.0}}\n")
    args = ["sweep", "--grid", str(grid), "--num-prompts", "3", "--num-calib-prompts", "2", "--steps", "2",
            "--height", "16", "--width", "16", "--frames", "5", "--bins", "1", "--no-vbench", "--fidelity-prompts",
            "1", "--no-cell-reports"]
    one = run_cli([*args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    two = run_cli([*args, "--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("sweep report: ") == 1
    for folder in ("videos/bf16", "cells/max/videos", "cells/p99/videos"):
        a, b = (load_records(tmp_path / side / folder) for side in ("one", "two"))
        assert len(a) == len(b) == 3
        for ra, rb in zip(a, b, strict=True):
            assert np.array_equal(load_frames(ra), load_frames(rb)), (folder, ra.index)
            assert torch.equal(load_latents(ra), load_latents(rb)), (folder, ra.index)
    for cell in ("max", "p99"):
        assert_same_state(tmp_path / "one" / "cells" / cell / "state", tmp_path / "two" / "cells" / cell / "state")
    reports = [json.loads((tmp_path / side / "report" / "sweep.json").read_text()) for side in ("one", "two")]
    assert _without_timings(reports[0]["cells"]) == _without_timings(reports[1]["cells"])
