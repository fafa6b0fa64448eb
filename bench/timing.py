"""Shared by the benchmark scripts: one way to time a call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call (compilation, allocator)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
