"""Sensor noise: additive Gaussian noise (incl. the PromptIR protocol) and photon shot (Poisson) noise.

Gaussian noise, sigma in 0..255 units:  light 5-15, medium 15-30, heavy 30-50.
  mode "gaussian": x + N(0, 1) * sigma / 255 in float, clipped; `gray` 1 shares one noise field across RGB.
  mode "promptir": floor(clip(x_uint8 + N(0, 1) * sigma, 0, 255)), the model PromptIR/AirNet train and test on
  (numpy's astype(uint8) truncates); fix `sigma` to 15/25/50 for the papers' protocol.
Poisson noise, photons collected at linear intensity 1.0 (`peak`; fewer photons = more noise):
  light 300-1000, medium 60-300, heavy 10-60. Counted in linear light (sRGB decoded), then re-encoded;
  exact Poisson below 5 expected photons, its Gaussian limit N(lam, lam) above (see `shot_noise`).
"""

from __future__ import annotations

import cv2
import numpy as np

from synth.degradations.base import (
    Choice,
    Context,
    Degradation,
    linear_to_srgb,
    srgb_to_linear,
    standard_normal,
    to_uint8,
)

# Below this many expected photons the Poisson law is sampled exactly (numpy, ~90 ns a pixel); above it by
# N(lam, lam) (~5 ns a pixel), whose mass below 0 is under 1.3% and skewness 1/sqrt(lam) under 0.45 there.
EXACT_POISSON_BELOW = 5.0


class GaussianNoise(Degradation):
    name = "gaussian_noise"
    params = {
        "light": {"sigma": (5.0, 15.0), "mode": Choice(("gaussian",)), "gray": Choice((0,))},
        "medium": {"sigma": (15.0, 30.0), "mode": Choice(("gaussian",)), "gray": Choice((0,))},
        "heavy": {"sigma": (30.0, 50.0), "mode": Choice(("gaussian",)), "gray": Choice((0,))},
    }
    allowed = {"mode": ("gaussian", "promptir"), "gray": (0, 1)}
    limits = {"sigma": (0.0, 255.0)}

    def apply(self, img: np.ndarray, params: dict, rng: np.random.Generator, ctx: Context) -> np.ndarray:
        h, w, _ = img.shape
        noise = standard_normal(rng, (h, w, 1) if params["gray"] else (h, w, 3))  # (H, W, 1 or 3)
        if params["mode"] == "promptir":  # in float64, as PromptIR's numpy code computes it
            noisy = to_uint8(img).astype(np.float64) + noise.astype(np.float64) * float(params["sigma"])
            return (np.floor(np.clip(noisy, 0.0, 255.0)) * (1.0 / 255.0)).astype(np.float32)
        return np.clip(img + noise * np.float32(params["sigma"] / 255.0), 0.0, 1.0)


class PoissonNoise(Degradation):
    name = "poisson_noise"
    params = {
        "light": {"peak": (300.0, 1000.0)},
        "medium": {"peak": (60.0, 300.0)},
        "heavy": {"peak": (10.0, 60.0)},
    }
    limits = {"peak": (1e-3, 1e9)}

    def apply(self, img: np.ndarray, params: dict, rng: np.random.Generator, ctx: Context) -> np.ndarray:
        peak = np.float32(params["peak"])
        lam = srgb_to_linear(img) * peak  # expected photon counts, (H, W, 3)
        counts = shot_noise(lam, rng)
        return linear_to_srgb(counts / peak)


def shot_noise(lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photon counts with mean `lam`: exact Poisson where lam < EXACT_POISSON_BELOW, N(lam, lam) elsewhere."""
    counts = (lam + cv2.sqrt(lam) * standard_normal(rng, lam.shape)).ravel()
    dark = np.flatnonzero(lam < EXACT_POISSON_BELOW)
    if dark.size:
        counts[dark] = rng.poisson(lam.ravel()[dark].astype(np.float64))
    return np.maximum(counts, 0.0).reshape(lam.shape)
