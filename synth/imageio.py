"""Reading source images of any mode into 8-bit RGB, and fast deterministic PNG encoding.

Every conversion that changes what the file holds is reported, so a sample's metadata says exactly how its
pixels were obtained: EXIF orientation applied, greyscale expanded, alpha composited on black, 16-bit scaled,
CMYK/palette converted. Anything PIL cannot decode raises :class:`BadImage` with the reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

Image.MAX_IMAGE_PIXELS = 400_000_000  # large scans are fine; decompression bombs beyond this are refused


class BadImage(ValueError):
    """A file that cannot become an RGB image; ``str(err)`` is the reason recorded in the manifest."""


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as err:  # PIL raises many types for bad files
        raise BadImage(f"cannot read image header: {type(err).__name__}: {err}") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _to_rgb(im: Image.Image, notes: list[str]) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        if mode == "F" and arr.size and arr.max() <= 1.0:
            scale = 1.0  # a float image in [0, 1], as float TIFFs from image tools hold
        else:
            scale = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        notes.append(f"{mode} greyscale scaled from 0..{scale:g} to 8 bit")
        grey = np.clip(np.rint(arr / scale * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA")).astype(np.uint16)
        notes.append(f"{mode} alpha composited on black")
        rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255
        return rgb.astype(np.uint8)
    if mode != "RGB":
        notes.append(f"{mode} converted to RGB")
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def pil_to_rgb(im: Image.Image) -> tuple[np.ndarray, list[str]]:
    """An open PIL image as (H, W, 3) uint8 RGB by the rules of :func:`load_rgb` (EXIF orientation applied)."""
    notes: list[str] = []
    transposed = ImageOps.exif_transpose(im)
    if transposed is not im:
        orientation = im.getexif().get(0x0112, 1)
        if orientation != 1:
            notes.append(f"EXIF orientation {orientation} applied")
    return _to_rgb(transposed, notes), notes


def load_rgb(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Decode ``path`` fully into (H, W, 3) uint8 RGB; returns the array and the conversions applied."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return pil_to_rgb(im)
    except BadImage:
        raise
    except Exception as err:
        raise BadImage(f"cannot decode: {type(err).__name__}: {err}") from None


def fit_long_side(img: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """Downscale (area interpolation) so the longer side is at most ``max_side``; returns the image and the scale."""
    h, w = img.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return img, 1.0
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA), scale


def encode_png(img: np.ndarray, level: int = 1) -> bytes:
    """PNG bytes of an RGB uint8 image, via libpng at zlib ``level`` (deterministic for the same input)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, level])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    """RGB uint8 array of PNG ``data``."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise BadImage("cannot decode PNG member")
    return np.ascontiguousarray(arr[..., ::-1])
