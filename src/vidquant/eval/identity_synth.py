"""Synthetic clips with a known identity story, to validate identity signals (tests and ``bench/identity.py``).

A textured subject (a crop of one of scikit-image's bundled photographs, shipped offline) moves over a
textured background, with nuisances that keep identity (camera pan, noise, blur, a lighting ramp) and changes
that do not (the subject swapped halfway, a gradual morph into another subject, a hue rotation of the subject,
its silhouette changing). Same arguments -> same clip.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import cv2
import numpy as np
from skimage import data

logger = logging.getLogger(__name__)

# name -> (loader, crop rows, crop cols): faces, an animal, objects with text and logos
_SUBJECTS = {
    "astronaut": (data.astronaut, slice(20, 220), slice(150, 330)),
    "cat": (data.chelsea, slice(20, 260), slice(90, 330)),
    "coffee": (data.coffee, slice(40, 360), slice(150, 470)),
    "rocket": (data.rocket, slice(60, 400), slice(260, 460)),
    "motorcycle": (lambda: data.stereo_motorcycle()[0], slice(60, 460), slice(120, 620)),
    "stain": (data.immunohistochemistry, slice(0, 300), slice(100, 400)),
}
_BACKGROUNDS = {"grass": data.grass, "brick": data.brick, "gravel": data.gravel, "moon": data.moon}
SUBJECTS = tuple(_SUBJECTS)
BACKGROUNDS = tuple(_BACKGROUNDS)
CHANGES = (None, "swap", "morph", "colour", "shape")


@dataclass(frozen=True)
class Clip:
    """How to draw a clip. ``change`` in `CHANGES`; ``other`` is the subject it changes into (swap, morph)."""

    subject: str = "astronaut"
    background: str = "grass"
    frames: int = 16
    size: int = 64
    travel: float = 0.25  # the subject's path, as a fraction of the frame side
    pan: float = 0.0  # camera pan over the whole clip, fraction of the frame side
    noise: float = 0.0  # Gaussian noise sigma, in 8-bit levels
    blur: float = 0.0  # Gaussian blur sigma in pixels at 64 px (scaled with size)
    light: float = 0.0  # brightness ramps from 1 to 1 + light over the clip
    busy: float = 0.5  # background texture: 1 sharp as the subject, below 1 blurred and flattened (depth of field)
    change: str | None = None
    other: str = "cat"
    seed: int = 0


@functools.lru_cache(maxsize=16)
def _subject(name: str) -> np.ndarray:
    if name not in _SUBJECTS:
        raise ValueError(f"unknown synthetic subject {name!r}; known: {', '.join(_SUBJECTS)}")
    load, rows, cols = _SUBJECTS[name]
    image = np.asarray(load())[rows, cols]
    return np.ascontiguousarray(image[..., :3])


@functools.lru_cache(maxsize=8)
def _background(name: str) -> np.ndarray:
    if name not in _BACKGROUNDS:
        raise ValueError(f"unknown synthetic background {name!r}; known: {', '.join(_BACKGROUNDS)}")
    grey = np.asarray(_BACKGROUNDS[name]()).astype(np.float32)
    tint = np.array([0.75, 0.95, 0.7], dtype=np.float32)  # a muted green-grey, so subject colours stand out
    return np.clip(grey[..., None] * tint, 0, 255).astype(np.uint8)


def render(clip: Clip) -> np.ndarray:
    """The clip's frames, (T, size, size, 3) uint8."""
    if clip.change not in CHANGES:
        raise ValueError(f"unknown change {clip.change!r}; known: {CHANGES}")
    if clip.frames < 2 or clip.size < 8:
        raise ValueError(f"a synthetic clip needs >= 2 frames of >= 8 px, got {clip.frames} x {clip.size}")
    rng = np.random.default_rng(clip.seed)
    side = clip.size
    bg = _background(clip.background)
    span = int(round(side * (1 + abs(clip.pan))))
    bg = cv2.resize(bg, (span * 2, span * 2), interpolation=cv2.INTER_AREA)[:span, :span]  # 2x zoom-out of it
    if clip.busy < 1:  # depth of field: the background softer and flatter than the subject
        soft = cv2.GaussianBlur(bg.astype(np.float32), (0, 0), side / 32)
        bg = np.clip(soft.mean() + clip.busy * (soft - soft.mean()) * 2, 0, 255).astype(np.uint8)
    sub_side = int(round(side * 0.55))
    first = cv2.resize(_subject(clip.subject), (sub_side, sub_side), interpolation=cv2.INTER_AREA)
    second = cv2.resize(_subject(clip.other), (sub_side, sub_side), interpolation=cv2.INTER_AREA)
    out = np.empty((clip.frames, side, side, 3), dtype=np.uint8)
    for t in range(clip.frames):
        p = t / (clip.frames - 1)
        patch, mask = _subject_at(clip, first, second, p, t)
        offset = int(round(p * clip.pan * side)) if clip.pan >= 0 else int(round((1 - p) * -clip.pan * side))
        frame = bg[:side, offset : offset + side].astype(np.float32)
        cx = side * (0.5 - clip.travel / 2 + clip.travel * p)
        cy = side * (0.5 + 0.08 * np.sin(2 * np.pi * p))
        x0, y0 = int(round(cx - sub_side / 2)), int(round(cy - sub_side / 2))
        _paste(frame, patch.astype(np.float32), mask, x0, y0)
        frame *= 1 + clip.light * p
        if clip.blur > 0:
            frame = cv2.GaussianBlur(frame, (0, 0), clip.blur * side / 64)
        if clip.noise > 0:
            frame += rng.normal(0, clip.noise, frame.shape).astype(np.float32)
        out[t] = np.clip(np.round(frame), 0, 255).astype(np.uint8)
    return out


def _subject_at(clip: Clip, first: np.ndarray, second: np.ndarray, p: float, t: int) -> tuple[np.ndarray, np.ndarray]:
    """The subject's pixels and soft mask (sub_side x sub_side) at progress ``p`` in [0, 1]."""
    n = first.shape[0]
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n - 0.5
    ellipse = (xx / 0.5) ** 2 + (yy / 0.42) ** 2 <= 1
    patch = first
    mask = ellipse
    if clip.change == "swap" and t >= clip.frames // 2:
        patch = second
    elif clip.change == "morph":
        patch = np.clip(first * (1 - p) + second.astype(np.float32) * p, 0, 255).astype(np.uint8)
    elif clip.change == "colour":
        hsv = cv2.cvtColor(first, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0].astype(int) + int(round(90 * p))) % 180  # up to half the hue circle
        hsv[..., 1] = np.clip(hsv[..., 1].astype(np.float32) * (1 + p), 0, 255).astype(np.uint8)
        patch = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    elif clip.change == "shape":  # the silhouette turns into a thin cross: the same texture, cut otherwise
        cross = (np.abs(xx) < 0.5 - 0.4 * p) | (np.abs(yy) < 0.5 - 0.4 * p)
        mask = ellipse & cross if p > 0 else ellipse
    return patch, cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(0.5, n / 48))


def _paste(frame: np.ndarray, patch: np.ndarray, mask: np.ndarray, x0: int, y0: int) -> None:
    """Alpha-blend ``patch`` into ``frame`` with its top-left corner at (x0, y0), clipped to the frame."""
    h, w = frame.shape[:2]
    n = patch.shape[0]
    fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(w, x0 + n), min(h, y0 + n)
    if fx0 >= fx1 or fy0 >= fy1:
        return
    px0, py0 = fx0 - x0, fy0 - y0
    alpha = mask[py0 : py0 + fy1 - fy0, px0 : px0 + fx1 - fx0, None]
    region = frame[fy0:fy1, fx0:fx1]
    frame[fy0:fy1, fx0:fx1] = region * (1 - alpha) + patch[py0 : py0 + fy1 - fy0, px0 : px0 + fx1 - fx0] * alpha
