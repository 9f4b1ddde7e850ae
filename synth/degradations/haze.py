"""Haze by the atmospheric scattering model: I = J t + A (1 - t), t = exp(-beta d).

Depth d is normalised to [0, 1] per image, so `beta` is the optical thickness at the farthest point
(transmission there is exp(-beta)): light 0.3-0.8 (t_far 0.45-0.74), medium 0.8-1.6 (t_far 0.20-0.45),
heavy 1.6-3.0 (t_far 0.05-0.20). Airlight `A` (grey, in [0, 1]): light 0.70-0.85, medium 0.75-0.95,
heavy 0.80-1.00, within RESIDE's 0.7-1.0.

Depth: when given (any positive scale, larger = farther) it is divided by its maximum, keeping ratios
(non-finite values count as farthest). Otherwise a fallback is built from two cues, smoothed at low
resolution: the vertical position (the top of a photo is usually farther: sky, horizon) and the image's
dark channel (min over RGB: high for bright, colourless regions such as sky and distant surfaces, low for
saturated or dark near objects), mixed 0.6 / 0.4 and mapped to [0.1, 1]. The record says which was used
(`depth_source` "given" or "fallback").
"""

from __future__ import annotations

import cv2
import numpy as np

from synth.degradations.base import Context, Degradation

FALLBACK_VERTICAL_WEIGHT = 0.6
FALLBACK_NEAREST = 0.1


class Haze(Degradation):
    name = "haze"
    params = {
        "light": {"beta": (0.3, 0.8), "A": (0.70, 0.85)},
        "medium": {"beta": (0.8, 1.6), "A": (0.75, 0.95)},
        "heavy": {"beta": (1.6, 3.0), "A": (0.80, 1.00)},
    }
    limits = {"beta": (0.0, 50.0), "A": (0.0, 1.0)}
    info_keys = ("depth_source",)

    def annotate(self, params: dict, ctx: Context) -> dict:
        return {"depth_source": "fallback" if ctx.depth is None else "given"}

    def apply(self, img: np.ndarray, params: dict, rng: np.random.Generator, ctx: Context) -> np.ndarray:
        depth = fallback_depth(img) if ctx.depth is None else normalise_depth(ctx.depth, img.shape[:2])
        t = cv2.exp(depth * np.float32(-params["beta"]))[..., None]  # (H, W, 1)
        airlight = np.float32(params["A"])
        return np.clip(img * t + airlight * (np.float32(1.0) - t), 0.0, 1.0)


def normalise_depth(depth: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Scale a given depth map to [0, 1] by its maximum; checks its shape against the image's (H, W)."""
    depth = np.asarray(depth, dtype=np.float32)
    if depth.shape != tuple(shape):
        raise ValueError(f"depth map has shape {depth.shape}, expected the image's (H, W) = {tuple(shape)}")
    finite = np.isfinite(depth)
    far = float(depth[finite].max()) if finite.any() else 0.0
    if far <= 0.0:
        raise ValueError("depth map has no positive finite value; larger values must mean farther")
    depth = np.where(finite, depth, far)
    return np.clip(depth * np.float32(1.0 / far), 0.0, 1.0)


def fallback_depth(img: np.ndarray) -> np.ndarray:
    """Pseudo-depth in [0.1, 1] from vertical position and the dark channel, (H, W) float32."""
    h, w, _ = img.shape
    sh, sw = max(8, h // 4), max(8, w // 4)
    small = cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA)  # (h/4, w/4, 3)
    dark = small.min(axis=2)  # (h/4, w/4)
    vertical = np.linspace(1.0, 0.0, sh, dtype=np.float32)[:, None]  # top = far
    cue = FALLBACK_VERTICAL_WEIGHT * vertical + (1.0 - FALLBACK_VERTICAL_WEIGHT) * dark
    cue = cv2.GaussianBlur(cue.astype(np.float32), (0, 0), max(sh, sw) / 8.0)
    low, high = float(cue.min()), float(cue.max())
    cue = (cue - low) * np.float32(1.0 / max(high - low, 1e-6))
    depth = cv2.resize(cue, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.float32(FALLBACK_NEAREST) + np.float32(1.0 - FALLBACK_NEAREST) * np.clip(depth, 0.0, 1.0)
