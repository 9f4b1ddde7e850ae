"""Snow: a veil of scattered light plus layers of falling flakes at several distances.

The veil brightens and flattens the scene like thin fog: img (1 - veil) + veil * 0.95.
Flake layers, nearest first: layer i has flakes of Gaussian radius `size` * (1.0, 0.55, 0.3, 0.18)[i] px,
density `density` * (1, 3, 8, 16)[i] flakes per pixel and brightness U(0.6, 1) * (1.0, 0.9, 0.8, 0.7)[i]
(near flakes are big, sparse and bright; far ones small, dense and dim). A flake is a Gaussian blob whose peak
is its brightness, slightly flattened (x1.3, clipped), smeared along the fall direction by `fall` px of
motion (vertical, tilted by U(-15, 15) degrees per image; the light is spread, so smeared flakes are dimmer)
and screened onto the image.
  light:  layers 2,   density 0.0003-0.0008, size 1.0-2.0, veil 0.00-0.10, fall 0-2
  medium: layers 2-3, density 0.0006-0.0015, size 1.5-3.0, veil 0.05-0.20, fall 0-4
  heavy:  layers 3-4, density 0.0012-0.0025, size 2.0-3.5, veil 0.10-0.30, fall 2-8
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from synth.degradations.base import Context, Degradation

LAYER_SIZE = (1.0, 0.55, 0.3, 0.18)
LAYER_DENSITY = (1.0, 3.0, 8.0, 16.0)
LAYER_BRIGHTNESS = (1.0, 0.9, 0.8, 0.7)
VEIL_LEVEL = 0.95


class Snow(Degradation):
    name = "snow"
    params = {
        "light": {
            "layers": (2, 2),
            "density": (0.0003, 0.0008),
            "size": (1.0, 2.0),
            "veil": (0.0, 0.1),
            "fall": (0.0, 2.0),
        },
        "medium": {
            "layers": (2, 3),
            "density": (0.0006, 0.0015),
            "size": (1.5, 3.0),
            "veil": (0.05, 0.2),
            "fall": (0.0, 4.0),
        },
        "heavy": {
            "layers": (3, 4),
            "density": (0.0012, 0.0025),
            "size": (2.0, 3.5),
            "veil": (0.1, 0.3),
            "fall": (2.0, 8.0),
        },
    }
    limits = {
        "layers": (1, len(LAYER_SIZE)),
        "density": (0.0, 0.05),
        "size": (0.2, 20.0),
        "veil": (0.0, 1.0),
        "fall": (0.0, 50.0),
    }

    def apply(self, img: np.ndarray, params: dict, rng: np.random.Generator, ctx: Context) -> np.ndarray:
        h, w, _ = img.shape
        tilt = math.radians(rng.uniform(-15.0, 15.0))
        flakes = np.zeros((h, w), np.float32)
        for layer in range(params["layers"]):
            sigma = params["size"] * LAYER_SIZE[layer]
            density = params["density"] * LAYER_DENSITY[layer]
            fall = params["fall"] * LAYER_SIZE[layer]
            blobs = flake_layer((h, w), density, sigma, fall, tilt, LAYER_BRIGHTNESS[layer], rng)
            flakes = 1.0 - (1.0 - flakes) * (1.0 - blobs)
        veil = np.float32(params["veil"])
        out = img * (1.0 - veil) + veil * np.float32(VEIL_LEVEL)
        return 1.0 - (1.0 - out) * (1.0 - flakes[..., None])


def flake_layer(
    shape: tuple[int, int],
    density: float,
    sigma: float,
    fall: float,
    tilt: float,
    brightness: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Flakes of one distance as blurred points in [0, 1], (H, W) float32."""
    h, w = shape
    margin = int(math.ceil(3 * sigma + fall))  # flakes just outside the frame still reach into it
    ch, cw = h + 2 * margin, w + 2 * margin
    n = int(rng.poisson(density * ch * cw))
    canvas = np.zeros((ch, cw), np.float32)
    canvas[rng.integers(0, ch, n), rng.integers(0, cw, n)] = rng.uniform(0.6, 1.0, n).astype(np.float32) * brightness
    if fall >= 1.0:
        canvas = cv2.filter2D(canvas, -1, fall_kernel(fall, tilt), borderType=cv2.BORDER_CONSTANT)
    blobs = cv2.GaussianBlur(canvas, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    blobs *= np.float32(2.0 * math.pi * sigma * sigma * 1.3)  # blob peak = flake brightness, flattened
    return np.clip(blobs[margin : margin + h, margin : margin + w], 0.0, 1.0)


def fall_kernel(length: float, tilt: float) -> np.ndarray:
    """Line kernel of `length` px, `tilt` radians from vertical, summing to 1: a moving flake spreads its light."""
    half = int(math.ceil(length / 2))
    size = 2 * half + 1
    kernel = np.zeros((size, size), np.float32)
    steps = np.linspace(-length / 2, length / 2, max(2, int(math.ceil(length)) + 1))
    xs = np.rint(half + steps * math.sin(tilt)).astype(int)
    ys = np.rint(half + steps * math.cos(tilt)).astype(int)
    kernel[ys, xs] = 1.0
    return kernel / kernel.sum()
