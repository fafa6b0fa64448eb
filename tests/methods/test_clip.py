"""Clip-ratio search: the grid point with the least output MSE, never worse than no clipping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vidquant.methods.clip import choose_clip, clip_search
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


def _output(w: torch.Tensor):
    def output(x, ratio):
        return F.linear(quantize_input(x, None, "hif4", ratio), w)

    return output


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), outliers=st.floats(1.0, 50.0))
def test_choice_is_never_worse_than_no_clipping_on_the_held_out_rows(seed: int, outliers: float) -> None:
    x, w, reference = _layer(seed, outliers)
    held, held_reference = x[:24], reference[:24]
    x, reference = x[24:], reference[24:]
    output = _output(w)
    choice = choose_clip(x, reference, output, GRID, held, held_reference)
    assert choice.searched == clip_search(x, reference, output, GRID)[0]
    mse = {r: float((output(held, r) - held_reference).double().square().mean()) for r in (choice.ratio, 1.0)}
    assert mse[choice.ratio] <= mse[1.0]
    assert choice.fell_back == (choice.ratio != choice.searched)
    assert choice.held_out_gain_db is not None


def test_a_ratio_fitted_to_calibration_outliers_falls_back_on_held_out_rows() -> None:
    """Calibration rows with one spike each (clipping it buys a finer grid for the rest); held-out rows of
    the same bin whose every value is at the row's max (clipping only cuts signal): the ratio falls back."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(32, 128, generator=g) * 0.05

    def output(x, ratio):  # a per-token INT4 grid on the clipped token
        bound = ratio * x.abs().amax(dim=-1, keepdim=True)
        s = bound / 7
        return F.linear(torch.round(x.clamp(-bound, bound) / s) * s, w)

    x = torch.randn(64, 128, generator=g)
    x[:, 0] = 30.0
    held = torch.randn(32, 128, generator=g).sign()
    choice = choose_clip(x, F.linear(x, w), output, GRID, held, F.linear(held, w))
    assert choice.searched < 1.0 and choice.ratio == 1.0 and choice.fell_back
    assert choice.held_out_gain_db < 0


def test_without_held_out_rows_the_search_is_kept() -> None:
    x, w, reference = _layer(7, 30.0)
    choice = choose_clip(x, reference, _output(w), GRID)
    assert choice.ratio == choice.searched and not choice.fell_back and choice.held_out_gain_db is None
    with pytest.raises(ValueError, match="reference"):
        choose_clip(x, reference, _output(w), GRID, x[:4]) if choice.searched < 1 else choose_clip(
            x, reference, lambda x, r: x[:, :32] * r, [0.5, 1.0], x[:4])
