"""Shared fixtures: tiny pipelines saved once per session, so every test loads through the real path."""

from __future__ import annotations

from pathlib import Path

import pytest

from vidquant.models.tiny import build_tiny_pipeline


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
