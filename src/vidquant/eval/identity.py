"""A weight-free identity signal: does the salient subject stay the same subject through a clip?

Why a new signal: the HOG subject-consistency proxy (`metrics.subject_consistency_proxy`) pools edge
orientations over 32-px cells, so a subject replaced by another of similar outline, or one that slowly
morphs, keeps its score (in the demo it went *up* 1 % under W4A4 while VBench's DINO-based subject
consistency falls 0.93 -> 0.53 in the HiF4 paper). Identity is carried by local detail, colour and texture
at the subject's place, so each frame is compared with the first by three cues, none needing weights:

- **local features** (SIFT, ratio test 0.75, RANSAC similarity transforms, up to two motions: the subject
  and the camera): the fraction of frame 0's keypoints that reappear as geometric inliers, over those
  still inside the frame under the dominant motion (a pan that pushes half the scene out does not count
  against identity). Lowe 2004 for the ratio test; RANSAC's own RNG is seeded, so results repeat.
- **aligned structure**: the saliency-weighted normalised cross-correlation of 64 x 64 blurred grey frames
  after a translation found by phase correlation of the saliency-weighted frames (lighting gain/offset,
  noise and blur move it little; another subject at the same place makes it ~0).
- **subject colour**: the Bhattacharyya coefficient of hue-saturation histograms weighted by saliency
  (chromatic pixels by saturation, grey ones in value bins), so a recoloured subject is seen even when
  its shape is kept.

Saliency is the spectral residual (Hou & Zhang, CVPR 2007) times a centre prior. Frames are compared at a
working size (short side `WORK_SIDE`: tiny 16-64 px frames are upscaled, 720p ones downscaled) and at most
`MAX_FRAMES` evenly spaced frames, so a 61-frame 720 x 1280 clip costs about as much as a 16-frame one.
Where a frame has fewer than `MIN_KEYPOINTS` keypoints (tiny or flat frames), the feature cue is dropped and
the two region cues carry the score (logged at debug level; `feature_coverage` says how often it happened), and
between `MIN_KEYPOINTS` and `FULL_KEYPOINTS` the feature cue's weight grows with the keypoint count. Upscaled
frames are smoothed first so that pixel noise does not become keypoints.
The cue maps and weights were set on synthetic clips of two subjects (astronaut, cat) and are judged on
held-out subjects and backgrounds (`bench/identity.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

logger = logging.getLogger(__name__)

WORK_SIDE = 192  # short side of the frames the features are found on
REGION_SIDE = 64  # side of the square grey/saliency/colour maps
MAX_FRAMES = 16  # frames sampled evenly (the first and last included)
MIN_KEYPOINTS = 12  # fewer on either frame: the feature cue is not used
MAX_KEYPOINTS = 500
FULL_KEYPOINTS = 60  # the feature cue has its full weight when both frames have this many keypoints
PRESMOOTH = 1.0  # Gaussian sigma (px) before upscaling a small frame
RATIO = 0.75  # Lowe's ratio test
RANSAC_PX = 3.0  # inlier distance at the working size
MIN_INLIERS = 6  # a second motion needs at least this many inliers
MATCH_FULL = 0.5  # inlier fraction that counts as "all of it": same-subject frames reach 0.5-0.9
COLOUR_FLOOR = 0.6  # Bhattacharyya coefficient of unrelated subjects' histograms sits around 0.5-0.7
WEIGHTS = {"features": 0.4, "structure": 0.3, "colour": 0.3}
SEED = 0

_HUE_BINS, _SAT_BINS, _GREY_BINS = 18, 3, 4


@dataclass
class _Frame:
    """What one frame contributes to the comparisons, computed once."""

    size: tuple[int, int]  # (width, height) at the working size
    points: np.ndarray  # (N, 2) float32 keypoint positions
    descriptors: np.ndarray | None  # (N, 128) float32
    grey: np.ndarray  # (REGION_SIDE, REGION_SIDE) float32, blurred
    saliency: np.ndarray  # same shape, sums to 1
    colour: np.ndarray  # normalised histogram


def identity_consistency(frames: np.ndarray) -> float:
    """(T, H, W, 3) uint8 -> [0, 1], higher = the salient subject keeps its identity through the clip.

    Mean over sampled frames t >= 1 of `frame_similarity(frame t, frame 0)`: computed on one video alone, the
    production draft gate (no reference exists). Frame-to-first, not frame-to-previous: a gradual morph
    changes little between neighbours but a lot from the start.
    """
    from .metrics import _video  # metrics imports this module

    video = _video(frames, min_frames=2)
    index = _sample(len(video))
    feats = [_features(video[i]) for i in index]
    return float(np.mean([_similarity(feats[0], f) for f in feats[1:]]))


def identity_drift(ref: np.ndarray, test: np.ndarray) -> float:
    """Two videos of the same prompt and seed -> [0, 1], 0 = same identity: how far test's subject moved from ref's.

    Per sampled frame t, the mean of (1 - similarity(test t, ref t)) and the loss of similarity to ref's first
    frame beyond ref's own, max(0, sim(ref t, ref 0) - sim(test t, ref 0)); averaged over frames. Used against
    BF16 in evaluation and to validate the draft gate.
    """
    from .metrics import _pair

    ref, test = _pair(ref, test)
    index = _sample(len(ref))
    ref_feats = [_features(ref[i]) for i in index]
    drifts = []
    for k, i in enumerate(index):
        if np.array_equal(ref[i], test[i]):
            drifts.append(0.0)
            continue
        t = _features(test[i])
        same_time = 1.0 - _similarity(ref_feats[k], t)
        to_first = max(0.0, _similarity(ref_feats[0], ref_feats[k]) - _similarity(ref_feats[0], t)) if k else 0.0
        drifts.append((same_time + to_first) / 2 if k else same_time)
    return float(np.clip(np.mean(drifts), 0.0, 1.0))


def frame_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Identity similarity in [0, 1] of two (H, W, 3) uint8 frames of the same size: 1 for equal frames."""
    from .metrics import _pair

    pa, pb = _pair(a[None], b[None])
    return 1.0 if np.array_equal(pa, pb) else _similarity(_features(pa[0]), _features(pb[0]))


def cue_scores(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    """Each cue's score for two frames (features is None where keypoints were too few): for diagnostics."""
    fa, fb = _features(a), _features(b)
    return {"features": _feature_score(fa, fb), "structure": _structure_score(fa, fb), "colour": _colour_score(fa, fb)}


def feature_coverage(frames: np.ndarray) -> float:
    """Fraction of the sampled frames with enough keypoints for the feature cue (0: region cues only)."""
    from .metrics import _video

    video = _video(frames)
    feats = [_features(video[i]) for i in _sample(len(video))]
    return float(np.mean([len(f.points) >= MIN_KEYPOINTS for f in feats]))


# ---------------------------------------------------------------- internals


def _sample(count: int) -> list[int]:
    """At most MAX_FRAMES evenly spaced frame indices, first and last included."""
    if count <= MAX_FRAMES:
        return list(range(count))
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, MAX_FRAMES)})


def _working(frame: np.ndarray) -> np.ndarray:
    """The frame at the working size. A frame that is upscaled is first smoothed (sigma `PRESMOOTH` px at its own
    size): upscaling would turn pixel noise into blobs that SIFT takes for keypoints; downscaling averages it."""
    height, width = frame.shape[:2]
    scale = WORK_SIDE / min(height, width)
    if scale > 1:
        frame = cv2.GaussianBlur(frame, (0, 0), PRESMOOTH)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def _features(frame: np.ndarray) -> _Frame:
    work = _working(np.ascontiguousarray(frame))
    grey = cv2.cvtColor(work, cv2.COLOR_RGB2GRAY)
    sift = cv2.SIFT_create(nfeatures=MAX_KEYPOINTS)
    keypoints, descriptors = sift.detectAndCompute(grey, None)
    points = np.array([k.pt for k in keypoints], dtype=np.float32).reshape(-1, 2)
    small = cv2.resize(work, (REGION_SIDE, REGION_SIDE), interpolation=cv2.INTER_AREA)
    small_grey = cv2.GaussianBlur(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32), (0, 0), 1.0)
    saliency = _saliency(small_grey)
    return _Frame((work.shape[1], work.shape[0]), points, descriptors, small_grey, saliency,
                  _histogram(small, saliency))


def _saliency(grey: np.ndarray) -> np.ndarray:
    """Spectral-residual saliency (Hou & Zhang 2007, eq. 5-7) times a centre prior, normalised to sum 1."""
    spectrum = np.fft.fft2(grey.astype(np.float64))
    log_amp = np.log(np.abs(spectrum) + 1e-8)
    residual = log_amp - cv2.blur(log_amp, (3, 3), borderType=cv2.BORDER_REPLICATE)
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    sal = cv2.GaussianBlur(sal, (0, 0), REGION_SIDE / 24)
    yy, xx = np.mgrid[0:REGION_SIDE, 0:REGION_SIDE] / (REGION_SIDE - 1) - 0.5
    sal = sal * np.exp(-(xx**2 + yy**2) / (2 * 0.3**2))
    total = float(sal.sum())
    if not np.isfinite(total) or total <= 0:  # a flat frame: no salient region, the centre prior alone
        sal = np.exp(-(xx**2 + yy**2) / (2 * 0.3**2))
        total = float(sal.sum())
    return (sal / total).astype(np.float32)


def _histogram(small_rgb: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Saliency-weighted colour histogram: hue x saturation bins weighted by saturation, bins of brightness relative
    to the subject's mean for grey pixels (so a global lighting gain changes no bin)."""
    hsv = cv2.cvtColor(small_rgb, cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(np.float64)
    w = weights.reshape(-1).astype(np.float64)
    sat = hsv[:, 1] / 255.0
    hue_bin = np.minimum((hsv[:, 0] * _HUE_BINS / 180).astype(int), _HUE_BINS - 1)
    sat_bin = np.minimum((sat * _SAT_BINS).astype(int), _SAT_BINS - 1)
    relative = hsv[:, 2] / max(float(np.dot(w, hsv[:, 2])), 1.0)  # brightness relative to the subject's: a gain
    grey_bin = np.minimum((relative * _GREY_BINS / 2).astype(int), _GREY_BINS - 1)  # of the light moves no bin
    chroma = np.bincount(hue_bin * _SAT_BINS + sat_bin, weights=w * sat, minlength=_HUE_BINS * _SAT_BINS)
    grey = np.bincount(grey_bin, weights=w * (1 - sat), minlength=_GREY_BINS)
    hist = np.concatenate([chroma, grey])
    return hist / max(float(hist.sum()), 1e-12)


def _similarity(a: _Frame, b: _Frame) -> float:
    """Weighted mean of the available cues, in [0, 1]."""
    scores = {"features": _feature_score(a, b), "structure": _structure_score(a, b), "colour": _colour_score(a, b)}
    used = {k: v for k, v in scores.items() if v is not None}
    if "features" not in used:
        logger.debug("too few keypoints (%d, %d): region cues only", len(a.points), len(b.points))
    weights = dict(WEIGHTS)  # a match count over few keypoints is weak evidence: the feature cue weighs less
    weights["features"] *= min(1.0, min(len(a.points), len(b.points)) / FULL_KEYPOINTS)
    total = sum(weights[k] for k in used)
    return float(np.clip(sum(weights[k] * v for k, v in used.items()) / total, 0.0, 1.0))


def _feature_score(a: _Frame, b: _Frame) -> float | None:
    """Saliency-weighted fraction of a's keypoints found again in b under up to two similarity motions, over
    what both frames show, saturating at MATCH_FULL; None when either frame has too few keypoints to say."""
    if len(a.points) < MIN_KEYPOINTS or len(b.points) < MIN_KEYPOINTS:
        return None
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(a.descriptors, b.descriptors, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < MIN_INLIERS:
        return 0.0
    src = a.points[[m.queryIdx for m in good]]
    dst = b.points[[m.trainIdx for m in good]]
    weight = _point_weights(a)
    src_w = weight[[m.queryIdx for m in good]]
    inliers, visible = 0.0, float(weight.sum())
    for motion in range(2):  # dominant motion (camera or subject), then the other one among the rest
        if len(src) < MIN_INLIERS:
            break
        cv2.setRNGSeed(SEED)
        model, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX,
                                                  maxIters=2000, confidence=0.995)
        if model is None or mask is None:
            break
        keep = mask.reshape(-1).astype(bool)
        count = int(keep.sum())
        if count < MIN_INLIERS:
            break
        if motion == 0:
            visible = float(weight[_visible(a.points, model, b.size)].sum())
        inliers += float(src_w[keep].sum())
        src, dst, src_w = src[~keep], dst[~keep], src_w[~keep]
    # Over what both frames could show: a's points still in view, or b's own (fewer when b is blurred or smaller).
    shown = min(visible, float(_point_weights(b).sum()))
    fraction = inliers / max(shown, float(np.sort(weight)[-MIN_KEYPOINTS:].sum()))
    return float(min(1.0, fraction / MATCH_FULL))


def _point_weights(a: _Frame) -> np.ndarray:
    """Each keypoint of ``a`` weighted by the saliency at its place: the subject's points count, the
    background's little."""
    scale = np.array([REGION_SIDE / a.size[0], REGION_SIDE / a.size[1]], dtype=np.float32)
    cells = np.clip((a.points * scale).astype(int), 0, REGION_SIDE - 1)
    return a.saliency[cells[:, 1], cells[:, 0]].astype(np.float64)


def _visible(points: np.ndarray, model: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Which of ``points`` land inside a frame of ``size`` under the 2 x 3 ``model`` (boolean mask)."""
    mapped = points @ model[:, :2].T + model[:, 2]
    inside = (mapped[:, 0] >= 0) & (mapped[:, 0] < size[0]) & (mapped[:, 1] >= 0) & (mapped[:, 1] < size[1])
    return inside


def _structure_score(a: _Frame, b: _Frame) -> float:
    """Best normalised correlation of a's salient box (half the side, around the saliency centroid) anywhere
    in b: follows the subject wherever it moved, indifferent to a lighting gain or offset."""
    half = REGION_SIDE // 4
    ys, xs = np.mgrid[0:REGION_SIDE, 0:REGION_SIDE]
    cx = int(round(float((a.saliency * xs).sum())))
    cy = int(round(float((a.saliency * ys).sum())))
    x0 = min(max(cx - half, 0), REGION_SIDE - 2 * half)
    y0 = min(max(cy - half, 0), REGION_SIDE - 2 * half)
    template = a.grey[y0 : y0 + 2 * half, x0 : x0 + 2 * half]
    floor = 1e-3
    flat_a, flat_b = float(template.std()) < floor, float(b.grey.std()) < floor
    if flat_a or flat_b:  # flat: equal only if both are
        return 1.0 if flat_a and flat_b else 0.0
    scores = cv2.matchTemplate(b.grey, template, cv2.TM_CCOEFF_NORMED)
    best = float(np.nanmax(scores)) if np.isfinite(scores).any() else 0.0
    return max(0.0, min(1.0, best))


def _colour_score(a: _Frame, b: _Frame) -> float:
    """Bhattacharyya coefficient of the subject colour histograms, rescaled so unrelated subjects sit near 0."""
    coefficient = float(np.sum(np.sqrt(a.colour * b.colour)))
    return float(np.clip((coefficient - COLOUR_FLOOR) / (1 - COLOUR_FLOOR), 0.0, 1.0))
