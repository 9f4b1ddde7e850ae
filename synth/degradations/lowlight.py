"""Low light: an under-exposed capture of the scene, simulated in linear light with sensor noise.

x = linear(img); dark = scale * x ** gamma (exposure cut and a toe that crushes shadows further);
y = dark + sqrt(dark / peak + read^2) * N(0, 1), the Poissonian-Gaussian sensor model (photon shot noise with
`peak` photons at linear 1.0, as the heteroscedastic Gaussian of Foi et al. 2008 / Brooks et al. 2019, plus
read noise of std `read` in linear units); clipped at 0 and 1 (black level, saturation) and encoded to sRGB.
  light:  scale 0.25-0.50, gamma 1.0-1.3, peak 1500-4000, read 0.0005-0.002
  medium: scale 0.08-0.25, gamma 1.2-1.6, peak 500-1500,  read 0.001-0.004
  heavy:  scale 0.02-0.08, gamma 1.4-2.0, peak 150-500,   read 0.002-0.006
With gamma 1 the mean linear intensity falls by `scale` (less a small lift where noise is clipped at black).
"""

from __future__ import annotations

import cv2
import numpy as np

from synth.degradations.base import Context, Degradation, linear_to_srgb, lookup, srgb_tables, standard_normal


class LowLight(Degradation):
    name = "low_light"
    params = {
        "light": {"scale": (0.25, 0.50), "gamma": (1.0, 1.3), "peak": (1500.0, 4000.0), "read": (0.0005, 0.002)},
        "medium": {"scale": (0.08, 0.25), "gamma": (1.2, 1.6), "peak": (500.0, 1500.0), "read": (0.001, 0.004)},
        "heavy": {"scale": (0.02, 0.08), "gamma": (1.4, 2.0), "peak": (150.0, 500.0), "read": (0.002, 0.006)},
    }
    limits = {"scale": (0.0, 1.0), "gamma": (0.2, 5.0), "peak": (1e-3, 1e9), "read": (0.0, 1.0)}

    def apply(self, img: np.ndarray, params: dict, rng: np.random.Generator, ctx: Context) -> np.ndarray:
        # decoding, gamma and exposure are one curve of the sRGB value: apply it as a single table lookup
        curve = cv2.pow(srgb_tables()[0], params["gamma"]) * np.float32(params["scale"])
        dark = lookup(img, curve)  # (H, W, 3) linear
        std = cv2.sqrt(dark * np.float32(1.0 / params["peak"]) + np.float32(params["read"] ** 2))
        noisy = dark + std * standard_normal(rng, dark.shape)
        return linear_to_srgb(noisy)
