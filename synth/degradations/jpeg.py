"""JPEG compression by real libjpeg through Pillow: encode at integer `quality`, decode.

Pillow's defaults are kept (baseline, 4:2:0 chroma subsampling, IJG quantisation tables scaled by quality),
so re-encoding the same pixels with `PIL.Image.save(..., "JPEG", quality=q)` reproduces the output exactly.
  light: quality 70-95, medium: 40-70, heavy: 10-40.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from synth.degradations.base import Context, Degradation, to_float, to_uint8


class Jpeg(Degradation):
    name = "jpeg"
    params = {
        "light": {"quality": (70, 95)},
        "medium": {"quality": (40, 70)},
        "heavy": {"quality": (10, 40)},
    }
    limits = {"quality": (1, 95)}

    def apply(self, img: np.ndarray, params: dict, rng: np.random.Generator, ctx: Context) -> np.ndarray:
        return to_float(jpeg_roundtrip(to_uint8(img), params["quality"]))


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode uint8 (H, W, 3) RGB as JPEG at `quality` with Pillow and decode it back."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buffer, format="JPEG", quality=int(quality))
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return np.asarray(decoded.convert("RGB"))
