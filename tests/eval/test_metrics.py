"""Weight-free metrics on synthetic videos with known answers, tiny frames included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vidquant.eval import metrics
from vidquant.eval.metrics import (
    latent_rel_error,
    motion_smoothness_proxy,
    psnr,
    ssim,
    subject_consistency_proxy,
    summarize,
    temporal_flickering,
)


def square_video(positions: list[tuple[int, int]], size: int = 64, side: int = 12) -> np.ndarray:
    """A red square at each (y, x) over a fixed gradient background."""
    yy, xx = np.mgrid[:size, :size]
    background = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 80)], axis=-1).astype(np.uint8)
    frames = np.repeat(background[None], len(positions), axis=0)
    for frame, (y, x) in zip(frames, positions, strict=True):
        frame[y : y + side, x : x + side] = (255, 40, 40)
    return frames


def noisy(frames: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(frames + rng.normal(0, sigma, frames.shape), 0, 255).astype(np.uint8)


SMOOTH = square_video([(20, 4 + 3 * t) for t in range(9)])
JUMPY = square_video([tuple(pos) for pos in np.random.default_rng(1).integers(0, 50, (9, 2))])


def test_constant_video_does_not_flicker() -> None:
    video = np.full((5, 8, 8, 3), 77, np.uint8)
    assert temporal_flickering(video) == 1.0
    assert motion_smoothness_proxy(video) == 1.0
    assert subject_consistency_proxy(video) == 1.0


def test_alternating_frames_flicker_by_hand() -> None:
    video = np.zeros((6, 4, 4, 3), np.uint8)
    video[1::2] = 51  # every consecutive pair differs by 51 everywhere
    assert temporal_flickering(video) == pytest.approx((255 - 51) / 255)
    video[::2, :2] = 51  # now only half the pixels differ: MAE 25.5
    assert temporal_flickering(video) == pytest.approx((255 - 25.5) / 255)


def test_psnr_by_hand_and_identical_videos() -> None:
    ref = np.full((2, 4, 4, 3), 100, np.uint8)
    test = ref.copy()
    assert psnr(ref, test) == math.inf
    assert ssim(ref, test) == pytest.approx(1.0)
    test[0] = 110  # MSE = 100 / 2 over the video
    assert psnr(ref, test) == pytest.approx(10 * math.log10(255**2 / 50))


def test_ssim_drops_with_noise_and_takes_tiny_frames() -> None:
    assert ssim(SMOOTH, SMOOTH) == pytest.approx(1.0)
    assert ssim(SMOOTH, noisy(SMOOTH, 30)) < 0.5
    small = noisy(np.full((3, 5, 6, 3), 128, np.uint8), 20)
    assert -1 <= ssim(small, noisy(small, 10, seed=1)) < 1  # 5 px: a 5 x 5 window
    with pytest.raises(ValueError, match="3 x 3"):
        ssim(small[:, :2], small[:, :2])


def test_latent_relative_error() -> None:
    a = torch.tensor([3.0, 4.0])
    assert latent_rel_error(a, a) == 0.0
    assert latent_rel_error(a, torch.tensor([3.0, 3.0])) == pytest.approx(1 / 5)
    assert latent_rel_error(np.zeros(2), np.zeros(2)) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        latent_rel_error(a, a[:1])


def test_smooth_motion_is_smoother_than_jumps() -> None:
    smooth, jumpy = motion_smoothness_proxy(SMOOTH), motion_smoothness_proxy(JUMPY)
    assert 0.99 < smooth <= 1.0
    assert jumpy < smooth - 0.01


def test_noise_and_jumps_lower_subject_consistency() -> None:
    clean = subject_consistency_proxy(SMOOTH)
    assert clean > 0.9
    assert subject_consistency_proxy(noisy(SMOOTH, 40)) < clean - 0.05
    assert subject_consistency_proxy(JUMPY) < clean - 0.05


@pytest.mark.parametrize("metric", [*metrics.TEMPORAL.values()])
def test_tiny_frames_work(metric) -> None:
    video = noisy(square_video([(2, 1 + t) for t in range(5)], size=16, side=5), 5)
    assert 0.0 <= metric(video) <= 1.0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        temporal_flickering(SMOOTH.astype(np.float32))
    with pytest.raises(ValueError, match="at least 3 frames"):
        motion_smoothness_proxy(SMOOTH[:2])
    with pytest.raises(ValueError, match="different shapes"):
        psnr(SMOOTH, SMOOTH[:3])


def test_summarize_means_and_relative_deltas() -> None:
    rows = [
        {"psnr": 30.0, "temporal_flickering_ref": 0.9, "temporal_flickering_test": 0.8},
        {"psnr": 40.0, "temporal_flickering_ref": 1.0, "temporal_flickering_test": 0.9},
    ]
    summary = summarize(rows)
    assert summary["count"] == 2
    assert summary["mean"]["psnr"] == pytest.approx(35.0)
    assert summary["relative_delta"] == {"temporal_flickering": pytest.approx((0.85 - 0.95) / 0.95)}
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError, match="same metrics"):
        summarize([rows[0], {"psnr": 1.0}])
