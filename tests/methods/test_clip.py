"""Clip-ratio search: the grid point with the least output MSE, never worse than no clipping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vidquant.methods.clip import clip_search
from vidquant.methods.smoothing import quantize_input

GRID = [0.5, 0.7, 0.9, 1.0]


def _layer(seed: int, outliers: float):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 128, generator=g)
    x[:, :2] *= outliers  # a few large channels: clipping trades their error for a finer grid elsewhere
    w = torch.randn(32, 128, generator=g) * 0.05
    return x, w, F.linear(x, w)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), outliers=st.floats(1.0, 50.0))
def test_best_ratio_is_the_argmin_and_never_worse_than_none(seed: int, outliers: float) -> None:
    x, w, reference = _layer(seed, outliers)

    def output(x, ratio):
        return F.linear(quantize_input(x, None, "hif4", ratio), w)

    ratio, errors = clip_search(x, reference, output, GRID)
    assert len(errors) == len(GRID) and errors[GRID.index(ratio)] == min(errors)
    assert errors[GRID.index(ratio)] <= errors[GRID.index(1.0)]


def test_ties_go_to_less_clipping() -> None:
    x = torch.ones(2, 4)
    ratio, errors = clip_search(x, x, lambda x, r: x, [0.5, 1.0, 0.8])
    assert ratio == 1.0 and errors == [0.0, 0.0, 0.0]


def test_empty_grid() -> None:
    with pytest.raises(ValueError, match="empty"):
        clip_search(torch.ones(1, 1), torch.ones(1, 1), lambda x, r: x, [])
