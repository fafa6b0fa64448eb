"""Memory, time and size probes for the report: peak memory of a call, seconds per step, weight bytes."""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch

from vidquant import formats
from vidquant.models import adapter_for
from vidquant.nn import Part, QuantLinear

logger = logging.getLogger(__name__)

RSS_INTERVAL_S = 0.005


@dataclass
class PeakMemory:
    """Filled in when the `peak_memory` block exits: ``bytes`` and what was measured (``kind``)."""

    kind: str
    bytes: int = 0


@contextmanager
def peak_memory(device: torch.device | str, interval: float = RSS_INTERVAL_S) -> Iterator[PeakMemory]:
    """Peak memory of the enclosed block, in bytes.

    CUDA: the caching allocator's peak of allocated tensor memory (``max_memory_allocated`` after
    ``reset_peak_memory_stats``), which counts every tensor on the device (weights included) and not the
    allocator's unused cache or the CUDA context. Elsewhere: the process's resident set size, sampled
    every ``interval`` seconds by a background thread (and at entry and exit). ``ru_maxrss`` is not
    usable here: it is the high-water mark of the whole process lifetime, so a call after a bigger one
    (the BF16 run before the quantized one) would report the earlier peak. Sampling can miss a spike
    shorter than the interval; at video sizes allocations live far longer than 5 ms.
    """
    device = torch.device(device)
    if device.type == "cuda":
        result = PeakMemory("cuda_max_allocated")
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = int(torch.cuda.max_memory_allocated(device))
        return
    result = PeakMemory("process_rss")
    peak = [current_rss()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], current_rss())

    sampler = threading.Thread(target=sample, name="vidquant-rss", daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result.bytes = max(peak[0], current_rss())


def current_rss() -> int:
    """Resident set size of this process now: /proc/self/statm (Linux), else psutil, else the lifetime max."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        logger.warning("no /proc and no psutil: CPU peak memory falls back to the process-lifetime ru_maxrss")
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return int(psutil.Process().memory_info().rss)


class StepTimer:
    """Seconds per denoising step, from timestamps taken at the end of every step.

    Call `start` before the pipeline and `mark` from ``callback_on_step_end``. On CUDA each timestamp
    waits for the device (kernels are asynchronous, so the host clock alone measures launches). The
    per-step figure is the mean interval between step ends, which leaves out the first step: it also
    holds text encoding, latent set-up and warm-up; with one step there is nothing else to report.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.marks: list[float] = []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self.marks = [self._now()]

    def mark(self) -> None:
        if not self.marks:
            raise RuntimeError("StepTimer.mark() before start()")
        self.marks.append(self._now())

    @property
    def step_seconds(self) -> list[float]:
        """Duration of each step (the first one measured from `start`)."""
        return [b - a for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]

    @property
    def seconds_per_step(self) -> float:
        steps = self.step_seconds
        if not steps:
            raise RuntimeError("StepTimer saw no step")
        return steps[0] if len(steps) == 1 else sum(steps[1:]) / (len(steps) - 1)


class WeightBytes(NamedTuple):
    """Transformer weight bytes: the BF16 reference and the representation as stored."""

    bf16: int
    stored: int


def weight_bytes(model) -> WeightBytes:
    """Bytes of every expert's weights: at BF16 (2 per parameter) and as stored.

    Stored: a `QuantLinear` weight counts its size in its format (the bytes it holds under the packed runtime,
    `packed_nbytes` under the fake one, scales included; BF16 when it has no weight format) plus its bias and
    its parts' tensors; every other parameter counts at BF16 too, the deployment dtype, so that a pipeline run
    in fp32 (on a CPU) is not compared at 4 bytes per value against a 2-byte reference. The BF16 figure is the
    same before and after quantization (a `QuantLinear` counts its weight's shape, held or not).
    """
    bf16 = stored = 0
    for expert in adapter_for(model).experts().values():
        seen: set[int] = set()
        for module in expert.modules():
            if isinstance(module, QuantLinear):
                stored += _quant_linear_bytes(module)
                bf16 += 2 * module.out_features * module.in_features
                seen.update(id(t) for t in module.buffers())
                seen.update(id(p) for p in module.parameters() if p is not module.bias)
        rest = sum(2 * p.numel() for p in expert.parameters() if id(p) not in seen)
        bf16 += rest
        stored += rest
    return WeightBytes(bf16, stored)


def _quant_linear_bytes(module: QuantLinear) -> int:
    if module.packed is not None:
        weight = module.packed.nbytes()
    elif module.weight_format is None:
        weight = 2 * module.weight.numel()
    else:
        weight = formats.get(module.weight_format).packed_nbytes(module.out_features, module.in_features)
    return weight + sum(part.deployed_nbytes() for part in module.modules() if isinstance(part, Part))
