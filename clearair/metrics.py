"""PSNR and SSIM under two named conventions, on numpy images and on batched torch tensors.

Two conventions are in use in the all-in-one restoration literature, and the numbers differ by up to a dB, so every
table we print names the one it used (see :data:`METRIC_CONVENTIONS`):

- ``rgb`` (the PromptIR line: PromptIR, Perceive-IR, AdaIR, MoCE-IR): PSNR on the three RGB channels of images in
  [0, 1]; SSIM as scikit-image's ``structural_similarity(channel_axis=-1, data_range=1.0)``, i.e. a 7x7 uniform
  window, sample covariance, computed per channel on the region the window fully covers, then averaged.
- ``y`` (the BasicSR convention): both metrics on the BT.601 luma of the image,
  ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255`` for R, G, B in [0, 1]; SSIM with an 11x11 Gaussian window
  (sigma 1.5), population covariance, on the valid region, as in BasicSR's ``calculate_ssim``.

Identical images have an infinite PSNR: both paths return ``inf`` (never a capped value), so an average over a
test set that contains a perfect restoration is ``inf`` and a table should report such images apart.

The numpy functions take (H, W, 3) arrays, uint8 (divided by 255) or float in [0, 1]; the torch functions take
(B, 3, H, W) tensors and return one value per image, computed in float64 on the tensors' device. Nothing is
clamped or quantised here: restore, clamp (and round to uint8 if a protocol asks for it) before measuring.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

METRIC_CONVENTIONS: dict[str, str] = {
    "psnr_rgb": "PSNR on RGB in [0, 1], data_range 1 (= skimage.metrics.peak_signal_noise_ratio); inf if identical",
    "ssim_rgb": "SSIM on RGB in [0, 1] (= skimage.metrics.structural_similarity, channel_axis=-1, data_range=1.0: "
    "7x7 uniform window, sample covariance, K1 0.01, K2 0.03, mean over valid region and channels)",
    "psnr_y": "PSNR on BT.601 Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 (BasicSR, test_y_channel=True)",
    "ssim_y": "SSIM on BT.601 Y, 11x11 Gaussian window sigma 1.5, population covariance, valid region "
    "(BasicSR calculate_ssim, test_y_channel=True)",
}

# BT.601 luma on [0, 1] RGB, giving Y in [16/255, 235/255] (BasicSR's rgb2ycbcr with y_only=True).
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0
_K1, _K2 = 0.01, 0.03
_UNIFORM_WIN = 7
_GAUSS_WIN, _GAUSS_SIGMA = 11, 1.5


def convention(y_channel: bool) -> str:
    """The name tables use for a metric convention: ``"y"`` or ``"rgb"``."""
    return "y" if y_channel else "rgb"


# ----------------------------------------------------------------------------------------------- numpy


def _as_float01(img: np.ndarray) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float64)
    raise TypeError(f"expected a uint8 or float image, got dtype {arr.dtype}")


def _prepare(pred: np.ndarray, target: np.ndarray, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_float01(pred), _as_float01(target)
    if a.shape != b.shape:
        raise ValueError(f"pred and target shapes differ: {a.shape} vs {b.shape}")
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) images, got shape {a.shape}")
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    return a, b


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma (H, W) in [16/255, 235/255] of an (H, W, 3) RGB image (uint8 or float in [0, 1])."""
    rgb = _as_float01(img)
    return (rgb @ np.asarray(_Y_WEIGHTS) + _Y_OFFSET) / 255.0


def _psnr_from_mse(mse: float, data_range: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def psnr(
    pred: np.ndarray, target: np.ndarray, data_range: float = 1.0, crop_border: int = 0, y_channel: bool = False
) -> float:
    """PSNR in dB of ``pred`` against ``target``; ``inf`` when they are identical.

    Args:
        data_range: the dynamic range after uint8 inputs are scaled to [0, 1]; keep 1.0.
        crop_border: pixels removed from every side before measuring (super-resolution protocols).
        y_channel: measure on BT.601 Y (BasicSR convention) instead of RGB.
    """
    a, b = _prepare(pred, target, crop_border, y_channel)
    return _psnr_from_mse(float(np.mean((a - b) ** 2)), data_range)


def _gaussian_kernel_1d(size: int = _GAUSS_WIN, sigma: float = _GAUSS_SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _ssim_gaussian_2d(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """BasicSR's SSIM of two (H, W) float64 images: Gaussian window, population covariance, valid region."""
    from scipy.ndimage import correlate1d

    k = _gaussian_kernel_1d()
    r = _GAUSS_WIN // 2
    if min(a.shape) < _GAUSS_WIN:
        raise ValueError(f"SSIM on Y needs images of at least {_GAUSS_WIN}x{_GAUSS_WIN}, got {a.shape}")

    def blur(x: np.ndarray) -> np.ndarray:
        return correlate1d(correlate1d(x, k, axis=0), k, axis=1)[r:-r, r:-r]

    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim(
    pred: np.ndarray, target: np.ndarray, data_range: float = 1.0, crop_border: int = 0, y_channel: bool = False
) -> float:
    """SSIM of ``pred`` against ``target`` (1.0 when identical): scikit-image's on RGB, BasicSR's on Y.

    Arguments as for :func:`psnr`. Images must be at least 7x7 (RGB) or 11x11 (Y) after cropping.
    """
    a, b = _prepare(pred, target, crop_border, y_channel)
    if y_channel:
        return _ssim_gaussian_2d(a, b, data_range)
    from skimage.metrics import structural_similarity

    if min(a.shape[:2]) < _UNIFORM_WIN:
        raise ValueError(f"SSIM on RGB needs images of at least {_UNIFORM_WIN}x{_UNIFORM_WIN}, got {a.shape[:2]}")
    return float(structural_similarity(a, b, channel_axis=-1, data_range=data_range))


# ----------------------------------------------------------------------------------------------- torch


def _as_float01_torch(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.to(torch.float64) / 255.0
    if not x.is_floating_point():
        raise TypeError(f"expected a uint8 or float tensor, got {x.dtype}")
    return x.to(torch.float64)


def rgb_to_y_torch(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma (B, 1, H, W) of (B, 3, H, W) RGB in [0, 1]; same formula as :func:`rgb_to_y`."""
    w = torch.tensor(_Y_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x * w).sum(dim=1, keepdim=True) + _Y_OFFSET) / 255.0


def _prepare_torch(
    pred: torch.Tensor, target: torch.Tensor, crop_border: int, y_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) tensors, got shape {tuple(pred.shape)}")
    a, b = _as_float01_torch(pred.detach()), _as_float01_torch(target.detach())
    if crop_border:
        a = a[..., crop_border:-crop_border, crop_border:-crop_border]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border]
    if y_channel:
        a, b = rgb_to_y_torch(a), rgb_to_y_torch(b)
    return a, b


def psnr_torch(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, crop_border: int = 0, y_channel: bool = False
) -> torch.Tensor:
    """PSNR (B,) in dB, float64, one value per image of (B, 3, H, W) batches; ``inf`` where identical."""
    a, b = _prepare_torch(pred, target, crop_border, y_channel)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse 0 -> inf


def _window_torch(y_channel: bool, channels: int, like: torch.Tensor) -> torch.Tensor:
    if y_channel:
        k = torch.from_numpy(_gaussian_kernel_1d()).to(like)
        win = torch.outer(k, k)
    else:
        win = torch.full((_UNIFORM_WIN, _UNIFORM_WIN), 1.0 / _UNIFORM_WIN**2, dtype=like.dtype, device=like.device)
    return win.expand(channels, 1, *win.shape)  # (C, 1, k, k), depthwise


def ssim_torch(
    pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, crop_border: int = 0, y_channel: bool = False
) -> torch.Tensor:
    """SSIM (B,) float64 per image, equal to :func:`ssim` on each image (same convention per ``y_channel``).

    Only the region the window fully covers is averaged, which is what scikit-image's border crop and BasicSR's
    ``[5:-5, 5:-5]`` both amount to, so no padding mode enters the result.
    """
    a, b = _prepare_torch(pred, target, crop_border, y_channel)
    c = a.shape[1]
    win = _window_torch(y_channel, c, a)
    if min(a.shape[-2:]) < win.shape[-1]:
        raise ValueError(f"SSIM needs images of at least {win.shape[-1]} pixels a side, got {tuple(a.shape[-2:])}")
    n = win.shape[-1] ** 2
    cov_norm = 1.0 if y_channel else n / (n - 1)  # skimage: sample covariance; BasicSR: population

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, win, groups=c)  # (B, C, H-k+1, W-k+1)

    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = cov_norm * (blur(a * a) - mu_a**2)
    var_b = cov_norm * (blur(b * b) - mu_b**2)
    cov = cov_norm * (blur(a * b) - mu_a * mu_b)
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(dim=1)  # (B,)


def mod_crop(img: np.ndarray, base: int) -> np.ndarray:
    """Centre-crop an (H, W, ...) image to the largest multiples of ``base`` (the remainder split as floor / ceil
    between the two sides): the test-time crop of the PromptIR line (``base`` 16), also used by SwinIR and
    Restormer, applied to input and target alike before restoring and measuring."""
    if base < 1:
        raise ValueError(f"mod_crop base must be >= 1, got {base}")
    h, w = img.shape[:2]
    if h < base or w < base:
        raise ValueError(f"a {h}x{w} image is smaller than the mod-crop base {base}")
    dh, dw = h % base, w % base
    return img[dh // 2 : h - (dh - dh // 2), dw // 2 : w - (dw - dw // 2)]
