"""Blur: camera motion along a random trajectory, defocus (disk) and Gaussian (isotropic or anisotropic).

All kernels sum to 1 (mean brightness is kept) and borders are reflected (cv2's BORDER_REFLECT_101).
Motion blur, `length` = extent of the trajectory in pixels: light 5-11, medium 11-21, heavy 21-35 (GoPro-like);
  `angle` = overall direction in degrees, any; `curvature` = std (radians) of the total change of heading
  over the exposure, a random walk: light 0-0.4, medium 0.3-0.9, heavy 0.6-1.5 (shake).
  The trajectory is a random walk of 64 steps with that heading drift and +-20% speed jitter, scaled to
  `length` and splatted bilinearly into the kernel.
Defocus blur, disk `radius` in pixels (anti-aliased edge): light 1.0-2.5, medium 2.5-4.5, heavy 4.5-8.0.
Gaussian blur, `sigma_x`/`sigma_y` in pixels rotated by `theta` degrees (BasicSR's anisotropic kernels);
  `isotropic` 1 (half the draws) uses sigma_x for both axes: light 0.5-1.5, medium 1.5-3.0, heavy 3.0-5.0.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from synth.degradations.base import Choice, Context, Degradation

DIRECT_MAX_KERNEL = 11  # cv2.filter2D convolves directly up to here; above, our own cv2.dft path is faster
TRAJECTORY_STEPS = 64


class MotionBlur(Degradation):
    name = "motion_blur"
    params = {
        "light": {"length": (5.0, 11.0), "angle": (0.0, 180.0), "curvature": (0.0, 0.4)},
        "medium": {"length": (11.0, 21.0), "angle": (0.0, 180.0), "curvature": (0.3, 0.9)},
        "heavy": {"length": (21.0, 35.0), "angle": (0.0, 180.0), "curvature": (0.6, 1.5)},
    }
    limits = {"length": (1.0, 101.0), "angle": (-360.0, 360.0), "curvature": (0.0, 10.0)}

    def apply(self, img: np.ndarray, params: dict, rng: np.random.Generator, ctx: Context) -> np.ndarray:
        kernel = motion_kernel(params["length"], params["angle"], params["curvature"], rng)
        return convolve(img, kernel)


class DefocusBlur(Degradation):
    name = "defocus_blur"
    params = {
        "light": {"radius": (1.0, 2.5)},
        "medium": {"radius": (2.5, 4.5)},
        "heavy": {"radius": (4.5, 8.0)},
    }
    limits = {"radius": (0.5, 50.0)}

    def apply(self, img: np.ndarray, params: dict, rng: np.random.Generator, ctx: Context) -> np.ndarray:
        return convolve(img, disk_kernel(params["radius"]))


class GaussianBlur(Degradation):
    name = "gaussian_blur"
    params = {
        "light": {"sigma_x": (0.5, 1.5), "sigma_y": (0.5, 1.5), "theta": (0.0, 180.0), "isotropic": Choice((1, 0))},
        "medium": {"sigma_x": (1.5, 3.0), "sigma_y": (1.5, 3.0), "theta": (0.0, 180.0), "isotropic": Choice((1, 0))},
        "heavy": {"sigma_x": (3.0, 5.0), "sigma_y": (3.0, 5.0), "theta": (0.0, 180.0), "isotropic": Choice((1, 0))},
    }
    limits = {"sigma_x": (0.1, 20.0), "sigma_y": (0.1, 20.0), "theta": (-360.0, 360.0)}

    def sample(self, rng: np.random.Generator, severity: str, fixed: dict) -> dict:
        """As the base sampler; fixing sigma_y or theta alone implies an anisotropic kernel."""
        fixed = dict(fixed or {})
        if "isotropic" not in fixed and ("sigma_y" in fixed or "theta" in fixed):
            fixed["isotropic"] = 0
        params = super().sample(rng, severity, fixed)
        if params["isotropic"]:
            params["sigma_y"], params["theta"] = params["sigma_x"], 0.0
        return params

    def apply(self, img: np.ndarray, params: dict, rng: np.random.Generator, ctx: Context) -> np.ndarray:
        if params["isotropic"]:
            return cv2.GaussianBlur(img, (0, 0), params["sigma_x"], borderType=cv2.BORDER_REFLECT_101)
        return convolve(img, gaussian_kernel(params["sigma_x"], params["sigma_y"], params["theta"]))


def convolve(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve (H, W, 3) float32 with an odd-sized 2-D kernel, reflect-101 borders, clipped to [0, 1]."""
    kh, kw = kernel.shape
    if kh <= DIRECT_MAX_KERNEL and kw <= DIRECT_MAX_KERNEL:
        out = cv2.filter2D(img, -1, cv2.flip(kernel, -1), borderType=cv2.BORDER_REFLECT_101)
        return np.clip(out, 0.0, 1.0)
    h, w, _ = img.shape
    fh, fw = cv2.getOptimalDFTSize(h + kh - 1), cv2.getOptimalDFTSize(w + kw - 1)
    # reflect-pad to the DFT size; the circular wrap only reaches outputs outside the kept (valid) window
    padded = cv2.copyMakeBorder(img, kh // 2, fh - h - kh // 2, kw // 2, fw - w - kw // 2, cv2.BORDER_REFLECT_101)
    kernel_padded = np.zeros((fh, fw), np.float32)
    kernel_padded[:kh, :kw] = kernel
    kernel_spectrum = cv2.dft(kernel_padded, nonzeroRows=kh)  # CCS-packed real spectrum
    out = np.empty_like(img)
    for c in range(img.shape[2]):
        spectrum = cv2.mulSpectrums(cv2.dft(np.ascontiguousarray(padded[..., c])), kernel_spectrum, 0)
        full = cv2.idft(spectrum, flags=cv2.DFT_SCALE | cv2.DFT_REAL_OUTPUT)  # (fh, fw)
        out[..., c] = full[kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w]
    return np.clip(out, 0.0, 1.0, out=out)


def motion_kernel(length: float, angle: float, curvature: float, rng: np.random.Generator) -> np.ndarray:
    """Camera-shake kernel from a random-walk trajectory of extent `length` px, (K, K) float32 summing to 1."""
    n = TRAJECTORY_STEPS
    heading = math.radians(angle) + np.cumsum(rng.normal(0.0, curvature / math.sqrt(n), n))
    speed = 1.0 + 0.2 * rng.uniform(-1.0, 1.0, n)
    path = np.cumsum(speed * np.exp(1j * heading))  # complex positions x + iy
    path -= (path.real.min() + path.real.max()) / 2 + 1j * (path.imag.min() + path.imag.max()) / 2
    extent = max(np.ptp(path.real), np.ptp(path.imag), 1e-6)
    path *= (length - 1.0) / extent if length > 1.0 else 0.0
    size = 2 * int(math.ceil(max(np.abs(path.real).max(), np.abs(path.imag).max()))) + 3
    centre = size // 2
    x, y = path.real + centre, path.imag + centre
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    kernel = np.zeros((size, size), np.float64)
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(kernel, (y0 + dy, x0 + dx), weight)
    return (kernel / kernel.sum()).astype(np.float32)


def disk_kernel(radius: float) -> np.ndarray:
    """Pillbox of `radius` px with a one-pixel linear edge, (K, K) float32 summing to 1."""
    half = int(math.ceil(radius + 0.5))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    kernel = np.clip(radius + 0.5 - np.hypot(xx, yy), 0.0, 1.0)
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_kernel(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Anisotropic Gaussian with axes sigma_x, sigma_y rotated by `theta` degrees, (K, K) float32 summing to 1."""
    half = int(math.ceil(3.0 * max(sigma_x, sigma_y)))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    c, s = math.cos(math.radians(theta)), math.sin(math.radians(theta))
    u, v = c * xx + s * yy, -s * xx + c * yy  # coordinates along the kernel's own axes
    kernel = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (kernel / kernel.sum()).astype(np.float32)
