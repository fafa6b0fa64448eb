"""Weight-free video metrics: fidelity to the BF16 video and classical stand-ins for VBench dimensions.

Always available (no model weights, no network), so every run gets a report; VBench proper
(`vidquant.eval.vbench`) adds the learned dimensions where its weights are installed. Frames are uint8
arrays (T, H, W, 3); every temporal score is in [0, 1], higher is better, like VBench's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import cv2
import numpy as np
import torch
from skimage.feature import hog
from skimage.metrics import structural_similarity

from vidquant.eval.generate import VideoRecord, load_frames, load_latents
from vidquant.eval.identity import identity_consistency, identity_drift

logger = logging.getLogger(__name__)

SSIM_WINDOW = 7  # skimage's default
HOG_SIZE = 128  # frames are compared at 128 x 128: 4 x 4 cells of 32 px
HOG_CELL = 32


def _video(frames: np.ndarray, min_frames: int = 1) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"a video must be uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[0] < min_frames:
        raise ValueError(f"this metric needs at least {min_frames} frames, the video has {frames.shape[0]}")
    return frames


def _pair(ref: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, test = _video(ref), _video(test)
    if ref.shape != test.shape:
        raise ValueError(f"videos of different shapes cannot be compared: {ref.shape} vs {test.shape}")
    return ref, test


def psnr(ref: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB over the whole video: 10 log10(255^2 / MSE), MSE over every pixel of every frame.

    One MSE for the video (not a mean of per-frame PSNRs), so a few ruined frames weigh by their error;
    inf when the videos are equal. Fidelity to the BF16 video, not a VBench dimension.
    """
    ref, test = _pair(ref, test)
    mse = float(np.mean((ref.astype(np.float64) - test.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(ref: np.ndarray, test: np.ndarray) -> float:
    """Mean over frames of skimage's SSIM (RGB channels averaged, data range 255, 7 x 7 uniform window).

    Frames smaller than 7 px use the largest odd window that fits (SSIM needs at least 3 x 3). Structural
    fidelity to the BF16 video, not a VBench dimension.
    """
    ref, test = _pair(ref, test)
    side = min(ref.shape[1:3])
    if side < 3:
        raise ValueError(f"SSIM needs frames of at least 3 x 3 pixels, got {ref.shape[1]} x {ref.shape[2]}")
    win = min(SSIM_WINDOW, side if side % 2 else side - 1)
    scores = [
        structural_similarity(ref[t], test[t], channel_axis=-1, data_range=255, win_size=win) for t in range(len(ref))
    ]
    return float(np.mean(scores))


def latent_rel_error(ref_latents: torch.Tensor | np.ndarray, test_latents: torch.Tensor | np.ndarray) -> float:
    """||ref - test|| / ||ref|| (Frobenius, float64) of the final latents: what the transformer changed,
    before the VAE decoder can hide or amplify it. 0 when equal; inf when the reference is all zeros."""
    a = torch.as_tensor(ref_latents).double()
    b = torch.as_tensor(test_latents).double()
    if a.shape != b.shape:
        raise ValueError(f"latents of different shapes cannot be compared: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff, norm = float(torch.linalg.vector_norm(a - b)), float(torch.linalg.vector_norm(a))
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / norm


def temporal_flickering(frames: np.ndarray) -> float:
    """VBench's temporal flickering, same formula: (255 - mean_t MAE(frame t, frame t+1)) / 255.

    MAE is the mean absolute difference over pixels and channels of consecutive frames, averaged over
    the T - 1 pairs. 1.0 for a static video. VBench scores it on its static-scene prompts, where any
    change is flicker; on moving content it also falls with motion.
    """
    frames = _video(frames, min_frames=2).astype(np.int16)
    mae = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    return float((255.0 - mae.mean()) / 255.0)


def motion_smoothness_proxy(frames: np.ndarray) -> float:
    """Stand-in for VBench motion smoothness: how well each odd frame is predicted from its neighbours.

    VBench interpolates every odd frame from frames t - 1 and t + 1 with AMT (a learned interpolator) and
    scores (255 - mean |interpolated - real|) / 255. Here the interpolator is classical: Farneback
    optical flow both ways (F01: t-1 -> t+1, F10 back), the middle-time flows of Super SloMo's linear
    motion model (F_t0 = (F10 - F01) / 4, F_t1 = -F_t0), both neighbours backward-warped to time t and
    averaged, rounded to uint8; the same mapping to [0, 1]. Smooth, nearly linear motion is predicted
    well (score near 1); jerky or jumping content is not. Farneback misses motion much larger than its
    pyramid reaches, so absolute values sit below VBench's; compare the same videos' BF16 and quantized
    scores, not this number with published ones.
    """
    frames = _video(frames, min_frames=3)
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    height, width = gray[0].shape
    levels = 1 + int(np.clip(math.log2(min(height, width) / 16), 0, 4))  # pyramid layers, coarsest >= 16 px
    grid = np.stack(np.meshgrid(np.arange(width), np.arange(height)), axis=-1).astype(np.float32)
    errors = []
    for t in range(1, frames.shape[0] - 1, 2):
        f01 = cv2.calcOpticalFlowFarneback(gray[t - 1], gray[t + 1], None, 0.5, levels, 15, 3, 5, 1.2, 0)
        f10 = cv2.calcOpticalFlowFarneback(gray[t + 1], gray[t - 1], None, 0.5, levels, 15, 3, 5, 1.2, 0)
        ft0 = 0.25 * (f10 - f01)
        before = _warp(frames[t - 1], grid + ft0)
        after = _warp(frames[t + 1], grid - ft0)
        predicted = np.round((before + after) / 2).astype(np.int16)
        errors.append(np.abs(predicted - frames[t].astype(np.int16)).mean())
    return float((255.0 - np.mean(errors)) / 255.0)


def _warp(frame: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """frame sampled at ``coords`` (x, y per pixel), bilinear, borders replicated; float32."""
    return cv2.remap(
        frame.astype(np.float32), coords[..., 0], coords[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def subject_consistency_proxy(frames: np.ndarray) -> float:
    """Stand-in for VBench subject consistency: HOG descriptors in place of DINO features.

    VBench's formula, features swapped: for frames i >= 1, the mean of max(0, sim(f_i, f_{i-1})) and
    max(0, sim(f_i, f_0)), averaged over frames. f is the HOG descriptor (9 orientations, 32-px cells,
    2 x 2-cell blocks, L2-Hys) of the grayscale frame resized to 128 x 128, and sim is the cosine of the
    mean-centred descriptors (their correlation). Why HOG: like DINO's patch features it describes
    shapes and their layout rather than raw pixels, pooled over cells, so a subject that moves keeps a
    fairly high score while one that deforms, dissolves or is replaced (what W4A4 breaks first) lowers
    it; a pixel metric (SSIM) mostly measures camera motion instead. Why centred: noise gives every cell
    a similar, flat orientation histogram, so the plain cosine of two noisy frames *rises*; centring
    removes that shared part. Measured on a 128-px crop of a photograph panned 4 px per frame: 0.78
    still, 0.75 with noise of sigma 25, 0.59 when the subject is swapped halfway. It is not semantic:
    a different object of similar outline scores high. Two structureless (flat) frames count as equal.
    Measured against identity (bench/identity.py): it does not track it. Swaps and morphs are told from motion,
    noise and blur at AUC 0.46-0.72 (identity_consistency: 1.00), and on the tiny pipeline its mean moved at most
    0.63 % under any recipe, a broken INT4 one included; prefer `identity.identity_consistency`.
    """
    frames = _video(frames, min_frames=2)
    features = [_hog(f) for f in frames]
    scores = [
        (max(0.0, _cosine(features[i], features[i - 1])) + max(0.0, _cosine(features[i], features[0]))) / 2
        for i in range(1, len(features))
    ]
    return float(np.mean(scores))


def _hog(frame: np.ndarray) -> np.ndarray:
    """Mean-centred HOG descriptor of the frame at 128 x 128 grayscale."""
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    shrink = gray.shape[0] * gray.shape[1] > HOG_SIZE * HOG_SIZE
    gray = cv2.resize(gray, (HOG_SIZE, HOG_SIZE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    features = hog(
        gray, orientations=9, pixels_per_cell=(HOG_CELL, HOG_CELL), cells_per_block=(2, 2), block_norm="L2-Hys"
    )
    return features - features.mean()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


TEMPORAL: dict[str, Callable[[np.ndarray], float]] = {
    "temporal_flickering": temporal_flickering,
    "motion_smoothness": motion_smoothness_proxy,
    "subject_consistency": subject_consistency_proxy,
    "identity_consistency": identity_consistency,  # eval/identity.py: sees swaps and morphs the HOG proxy misses
}


def compare_videos(ref_record: VideoRecord, test_record: VideoRecord) -> dict[str, float]:
    """Fidelity of a quantized video to its BF16 reference, and each temporal score of both.

    Keys: psnr, ssim, latent_rel_error, identity_drift (test's subject vs ref's, 0 = same identity), and
    ``{name}_ref`` / ``{name}_test`` for every name in `TEMPORAL`.
    """
    ref, test = load_frames(ref_record), load_frames(test_record)
    row = {
        "psnr": psnr(ref, test),
        "ssim": ssim(ref, test),
        "latent_rel_error": latent_rel_error(load_latents(ref_record), load_latents(test_record)),
        "identity_drift": identity_drift(ref, test),
    }
    for name, metric in TEMPORAL.items():
        row[f"{name}_ref"] = metric(ref)
        row[f"{name}_test"] = metric(test)
    return row


def summarize(rows: list[dict[str, float]]) -> dict:
    """Mean of every metric over the videos, and for each ref/test pair the relative delta of the means.

    ``relative_delta[name] = (mean test - mean ref) / mean ref``: -0.01 is a 1 % loss against BF16, the
    way the papers quote VBench changes. A PSNR mean is inf if any video is identical to its reference.
    """
    if not rows:
        raise ValueError("no rows to summarize")
    keys = list(rows[0])
    if any(list(row) != keys for row in rows):
        raise ValueError("rows to summarize must all have the same metrics")
    mean = {key: float(np.mean([row[key] for row in rows])) for key in keys}
    delta = {}
    for key in keys:
        if key.endswith("_ref") and (name := key[: -len("_ref")]) + "_test" in mean:
            ref = mean[key]
            delta[name] = (mean[name + "_test"] - ref) / ref if ref else math.nan
    return {"count": len(rows), "mean": mean, "relative_delta": delta}
