"""Which results do not depend on the thread count (the README says so): formats, and a smoothing state's
quantize -> save -> load -> apply round trip (the state and the quantized weights). Matmuls (model outputs,
GPTQ, SVD) may round differently with another thread count. The suite runs with one torch thread (conftest)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numba
import pytest
import torch

import vidquant
from vidquant import formats
from vidquant.calib.calibrate import CalibSettings, calibrate
from vidquant.calib.prompts import default_prompts
from vidquant.models import tiny


@contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])


@pytest.mark.parametrize("name", formats.names())
def test_formats_give_the_same_bits_with_any_thread_count(name: str) -> None:
    x = torch.randn(257, 300, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 300)
    fmt = formats.get(name)
    with threads(1):
        one = fmt.quantize_dequantize(x, dim=-1)
    with threads(2):
        two = fmt.quantize_dequantize(x, dim=-1)
    assert torch.equal(one, two)


def test_a_smoothing_state_round_trip_is_thread_independent(tmp_path: Path) -> None:
    pipe = tiny.build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    stats = calibrate(pipe, default_prompts(), CalibSettings(num_prompts=1, steps=2, height=32, width=32, frames=5,
                                                             bins=1), progress=False)
    layer = "blocks.0.ffn.net.0.proj"
    weights, fingerprints = [], []
    for n in (1, 2):
        with threads(n):
            state = vidquant.quantize(pipe, "tail-aware-hif4", stats)
            state.save(tmp_path / f"s{n}")
            restored = tiny.build_tiny_pipeline()
            vidquant.apply(restored, vidquant.load_state(tmp_path / f"s{n}"))
            weights.append(restored.transformer.get_submodule(layer).dense_weight())  # what the layer multiplies by
            fingerprints.append(state.fingerprint())
    assert fingerprints[0] == fingerprints[1]
    assert torch.equal(weights[0], weights[1])
