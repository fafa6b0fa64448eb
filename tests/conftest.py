"""Suite-wide settings."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """The tests' tensors are tiny: extra torch threads only spin-wait, badly so when the CPU is shared.

    Session-scoped, so it is in force before any module fixture builds or runs a pipeline. (The numba
    kernels keep their own threads.)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
