"""Rain streaks: sparse noise -> motion blur along a direction -> levels -> screen blend, one pass per layer.

Each layer seeds drops as sparse points (`density` drops per pixel, brightness U(0.4, 1)) and smears them into
streaks with a tapered line kernel of `length` pixels at `angle` degrees from vertical. The layers are summed,
widened by a Gaussian of `width` pixels, their levels stretched (black 0.05, white 0.75) and the streak map is
screened onto the image at `opacity`: out = 1 - (1 - img)(1 - opacity * streaks).
Layers: light = 1 (Rain100L-like: thin, sparse, one direction), medium = 2, heavy = 3-4 (Rain100H-like);
layers after the first deviate by up to +-8 degrees and are shorter or longer (0.6-1.2 x), as depth varies.
  light:  density 0.0015-0.004, length 10-25 px, angle +-20, width 0.4-0.7, opacity 0.55-0.80
  medium: density 0.0015-0.003, length 15-35 px, angle +-30, width 0.5-0.9, opacity 0.65-0.90
  heavy:  density 0.0015-0.003, length 20-45 px, angle +-40, width 0.5-1.0, opacity 0.70-0.95
Streaks cover roughly 2-9% of the pixels at light, 7-25% at medium and 20-50% at heavy.
Lengths and densities are in pixels of the image given (streak sizes do not scale with resolution).

The line blur is computed in a rotated frame: drops are seeded on a canvas aligned with the streak direction,
blurred vertically by two cheap box filters (a triangular, tapered profile), and rotated into the image by a
single warpAffine; for i.i.d. seeds this equals convolving image-frame noise with a rotated line kernel.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from synth.degradations.base import Context, Degradation

LEVELS = (0.05, 0.75)


class Rain(Degradation):
    name = "rain"
    params = {
        "light": {
            "layers": (1, 1),
            "density": (0.0015, 0.004),
            "length": (10.0, 25.0),
            "angle": (-20.0, 20.0),
            "width": (0.4, 0.7),
            "opacity": (0.55, 0.80),
        },
        "medium": {
            "layers": (2, 2),
            "density": (0.0015, 0.003),
            "length": (15.0, 35.0),
            "angle": (-30.0, 30.0),
            "width": (0.5, 0.9),
            "opacity": (0.65, 0.90),
        },
        "heavy": {
            "layers": (3, 4),
            "density": (0.0015, 0.003),
            "length": (20.0, 45.0),
            "angle": (-40.0, 40.0),
            "width": (0.5, 1.0),
            "opacity": (0.70, 0.95),
        },
    }
    limits = {
        "layers": (1, 8),
        "density": (0.0, 0.1),
        "length": (1.0, 200.0),
        "angle": (-90.0, 90.0),
        "width": (0.0, 5.0),
        "opacity": (0.0, 1.0),
    }

    def apply(self, img: np.ndarray, params: dict, rng: np.random.Generator, ctx: Context) -> np.ndarray:
        h, w, _ = img.shape
        streaks = np.zeros((h, w), np.float32)
        for layer in range(params["layers"]):
            angle, length, density = params["angle"], params["length"], params["density"]
            if layer:
                angle += rng.uniform(-8.0, 8.0)
                length *= rng.uniform(0.6, 1.2)
                density *= rng.uniform(0.7, 1.3)
            streaks += streak_layer((h, w), density, length, angle, rng)
        width = params["width"]
        if width > 0:  # widen across the streaks; along them it adds ~width px to lengths of 10+ px
            streaks = cv2.GaussianBlur(streaks, (0, 0), width, borderType=cv2.BORDER_REFLECT_101)
            streaks *= np.float32(math.sqrt(2.0 * math.pi) * max(width, 0.4))  # keep a streak's peak
        black, white = LEVELS
        levels = np.clip((streaks - np.float32(black)) * np.float32(1.0 / (white - black)), 0.0, 1.0)
        veil = (np.float32(params["opacity"]) * levels)[..., None]  # (H, W, 1)
        return 1.0 - (1.0 - img) * (1.0 - veil)


def streak_layer(
    shape: tuple[int, int], density: float, length: float, angle: float, rng: np.random.Generator
) -> np.ndarray:
    """One layer of parallel one-pixel streaks whose peak is the drop's brightness, (H, W) float32."""
    h, w = shape
    theta = math.radians(angle)
    c, s = math.cos(theta), math.sin(theta)
    half = max(1, int(round(length / 2)))
    ch = int(math.ceil(abs(c) * h + abs(s) * w)) + 2 * half + 4  # canvas rows run along the streaks
    cw = int(math.ceil(abs(c) * w + abs(s) * h)) + 4
    canvas = np.zeros((ch, cw), np.float32)
    n = int(rng.poisson(density * ch * cw))
    rows, cols = rng.integers(0, ch, n), rng.integers(0, cw, n)
    canvas[rows, cols] = rng.uniform(0.4, 1.0, n).astype(np.float32)
    # two box filters of length/2 make a triangular profile whose peak equals the drop's brightness
    canvas = cv2.boxFilter(canvas, -1, (1, half), normalize=False, borderType=cv2.BORDER_CONSTANT)
    canvas = cv2.boxFilter(canvas, -1, (1, half), normalize=True, borderType=cv2.BORDER_CONSTANT)
    # canvas coordinate q = R(theta) (p - image centre) + canvas centre maps streak direction onto canvas rows
    icx, icy, ccx, ccy = (w - 1) / 2, (h - 1) / 2, (cw - 1) / 2, (ch - 1) / 2
    m = np.array(
        [[c, -s, ccx - (c * icx - s * icy)], [s, c, ccy - (s * icx + c * icy)]],
        dtype=np.float64,
    )
    return cv2.warpAffine(canvas, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
