"""Crop windows: where a sample is cut, how it is flipped and turned, and how map priors follow the image.

A prior with three dimensions ``(M, h, w)`` is a map over the whole image (e.g. region masks): it is cropped with
the image window (nearest sampling) to ``crop // PRIOR_MAP_STRIDE`` a side and flipped with it. Any other prior is
image-level (``(D,)``, ``(4, D)``) and passed through. Random windows come from a generator the caller seeds
(per sample with :func:`key_seed`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from synth.read import ShardFormatError

PRIOR_MAP_STRIDE = 4
AUGMENTS = ("hflip", "dihedral")


@dataclass(frozen=True)
class Window:
    """A square crop ``[y, y + size) x [x, x + size)`` of an image, then a horizontal flip if ``flip``, then
    ``rot`` quarter turns counter-clockwise: with ``rot`` in 0..3 the eight symmetries of the square."""

    y: int
    x: int
    size: int
    flip: bool = False
    rot: int = 0

    def apply(self, img: np.ndarray) -> np.ndarray:
        return self.orient(img[self.y : self.y + self.size, self.x : self.x + self.size])

    def orient(self, img: np.ndarray, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
        """The flip and rotation on the two image axes ``axes`` (rows, columns) of an already cropped array."""
        out = np.flip(img, axes[1]) if self.flip else img
        return np.ascontiguousarray(np.rot90(out, self.rot, axes) if self.rot else out)


def check_augment(augment: str) -> str:
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    return augment


def random_windows(
    h: int, w: int, size: int, rng: np.random.Generator, n: int = 1, augment: str = "hflip", origin: str = "image"
) -> list[Window]:
    """``n`` independent random windows of ``size``, each with a random horizontal flip (``augment="hflip"``) or
    one of the eight dihedral symmetries (``"dihedral"``, as PromptIR's training data code draws); ShardFormatError
    naming ``origin`` (e.g. :func:`synth.read.where` of the sample) if the image is smaller than ``size``."""
    check_augment(augment)
    _check_size(h, w, size, origin)
    windows = []
    for _ in range(n):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        flip = bool(rng.random() < 0.5)
        windows.append(Window(y, x, size, flip, int(rng.integers(0, 4)) if augment == "dihedral" else 0))
    return windows


def center_window(h: int, w: int, size: int, origin: str = "image") -> Window:
    """The centred window of ``size`` (no flip)."""
    _check_size(h, w, size, origin)
    return Window((h - size) // 2, (w - size) // 2, size)


def _check_size(h: int, w: int, size: int, origin: str) -> None:
    if h < size or w < size:
        raise ShardFormatError(f"{origin}: image {w}x{h} is smaller than the crop size {size}")


def crop_prior(prior: np.ndarray, window: Window, image_hw: tuple[int, int], out_size: int) -> np.ndarray:
    """A ``(M, h, w)`` map over the whole image cut to ``window`` and sampled to ``(M, out_size, out_size)``
    (nearest, so binary masks stay binary); other priors are image-level and returned unchanged."""
    if prior.ndim != 3:
        return prior
    (big_h, big_w), (h, w) = image_hw, prior.shape[1:]
    centres = (np.arange(out_size) + 0.5) * window.size / out_size  # window pixels
    rows = np.clip(((window.y + centres) * h / big_h).astype(int), 0, h - 1)
    cols = np.clip(((window.x + centres) * w / big_w).astype(int), 0, w - 1)
    return window.orient(prior[:, rows][:, :, cols], axes=(1, 2))


def key_seed(key: str) -> int:
    """A 64-bit number from a sample key, stable across processes (Python's ``hash`` is not)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16)
