"""torchrun scale-out, measured: 1 process vs N gloo processes for svdquant-gptq `quantize` and for `generate`.

Each side runs in fresh processes (torch.multiprocessing, gloo, file rendezvous), with the machine's threads
split evenly (1 process: all of them; N processes: 1/N each), so the ratio is what dealing buys on the same
cores. The quantize timing starts after the model is built (every rank builds its own) and includes the
per-rank Hessian passes, the layer solves, the checkpoint exchange and rank 0's assembly; the N-process
state is checked equal to the 1-process one (fingerprint). The generation timing covers the prompts only.

    python bench/dist.py [--model tiny|medium] [--nproc 2] [--prompts 4]

``medium`` is one full-width Wan2.1-14B block (5120 wide, FFN 13824; fp32 on CPU) calibrated at 64x64x5.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

import vidquant
from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.prompts import default_prompts
from vidquant.eval.generate import generate
from vidquant.eval.protocol import Protocol
from vidquant.models import tiny
from vidquant.ptq import quantize_into
from vidquant.recipes import load_recipe

SIZES = {"tiny": {"height": 32, "width": 32, "frames": 5}, "medium": {"height": 64, "width": 64, "frames": 5}}


def build(model: str):
    if model == "medium":
        return tiny.build_medium_pipeline(two_experts=False, dtype=torch.float32)
    return tiny.build_tiny_pipeline()


def worker(rank: int, world: int, folder: Path, model: str, threads: int, prompts: int) -> None:
    logging.getLogger("vidquant").setLevel(logging.ERROR)  # the tiny model's few-token warnings, once per layer
    torch.set_num_threads(threads)
    if world > 1:
        tdist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=world)
    pipe = build(model)
    pipe.set_progress_bar_config(disable=True)
    stats = vidquant.load_stats(folder.parent / "stats")
    recipe = load_recipe("svdquant-gptq-hif4")
    if world > 1:
        tdist.barrier()
    t0 = time.perf_counter()
    state = quantize_into(pipe, recipe, stats, folder / "state", progress=False)
    t1 = time.perf_counter()
    protocol = Protocol(steps=2, **SIZES[model])
    generate(build(model), default_prompts()[8:8 + prompts], protocol, folder / "videos", progress=False)
    t2 = time.perf_counter()
    if rank == 0:
        (folder / "times.json").write_text(json.dumps({"quantize": t1 - t0, "generate": t2 - t1,
                                                       "fingerprint": state.fingerprint()}))
    if world > 1:
        tdist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    args = parser.parse_args()
    logging.getLogger("vidquant").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = CalibSettings(num_prompts=2, steps=2, bins=2, **SIZES[args.model])
        calibrate(build(args.model), default_prompts(), settings, root / "stats", progress=False)
        times = {}
        for world in (1, args.nproc):
            folder = root / f"world{world}"
            folder.mkdir()
            mp.spawn(worker, args=(world, folder, args.model, max(1, threads // world), args.prompts), nprocs=world,
                     join=True)
            times[world] = json.loads((folder / "times.json").read_text())
    one, many = times[1], times[args.nproc]
    print(f"{args.model}, svdquant-gptq-hif4, {threads} threads on {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end; states equal: {one['fingerprint'] == many['fingerprint']}")
    print(f"{'stage':10} {'1 proc s':>9} {f'{args.nproc} procs s':>10} {'speed-up':>9}")
    for stage in ("quantize", "generate"):
        print(f"{stage:10} {one[stage]:9.2f} {many[stage]:10.2f} {one[stage] / many[stage]:8.2f}x")


if __name__ == "__main__":
    main()
