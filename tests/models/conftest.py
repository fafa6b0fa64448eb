"""Shared fixtures: tiny pipelines saved once per session, so every test loads through the real path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vidquant.models.tiny import build_tiny_pipeline


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: threads only add overhead, and OpenMP spin-waits badly when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _saved(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: bool) -> Path:
    path = tmp_path_factory.mktemp(name)
    build_tiny_pipeline(**kwargs).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def t2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _saved(tmp_path_factory, "t2v")


@pytest.fixture(scope="session")
def i2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _saved(tmp_path_factory, "i2v", i2v=True)
