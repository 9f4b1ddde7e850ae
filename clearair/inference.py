"""Restoration of images of any size: whole-image or tiled, within a memory budget; image file helpers.

Whole-image inference reflect-pads the input on the bottom and right to the model's ``size_multiple`` and crops
the output back. Tiled inference cuts that padded image into ``tile`` x ``tile`` windows with at least
``overlap`` pixels shared between neighbours (the last row and column of tiles are shifted to end at the image
border, so no tile needs padding of its own) and blends the outputs with a window that is 1 in a tile's interior,
0 in a ``overlap // 4`` margin along every side shared with another tile, and a raised-cosine ramp in between.
Image borders get no ramp. For a translation-equivariant network whose receptive-field radius is at most that
margin, tiled and whole-image outputs are equal; networks with global operations (Restormer's channel attention
normalises over the whole tile) differ slightly, by an amount the tests measure.

Memory estimate: activation memory of a whole-image pass = ``bytes_per_pixel x batch x padded pixels``. On CUDA
``bytes_per_pixel`` is measured once per (model, device, dtype) with a 256x256 probe (peak allocated memory above
the baseline, divided by the probe's pixels, times a 1.25 safety factor; the probe resets CUDA's peak-memory
statistics); elsewhere it is a constant per architecture measured that way on an H100 (:data:`BYTES_PER_PIXEL`).
A model can state its own figure in an ``inference_bytes_per_pixel`` attribute.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

PriorsFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]

# Activation bytes per input pixel (batch 1) of a whole-image inference pass, for devices where no probe runs: the
# peak allocated on an H100 by the paper configurations in float32 (torch 2.11, slope between 256^2 and 512^2:
# restormer 6037, perceive_ir 6427, nafnet(_guided) 1200, clearair 6043; `bench_models.py --inference-memory`)
# times 1.25, used for every dtype (bf16 measured 0.53x for the Restormer family but 0.9x for NAFNet). Wider
# configurations need proportionally more; an unknown architecture gets "default".
BYTES_PER_PIXEL: dict[str, float] = {
    "restormer": 7_600.0,
    "perceive_ir": 8_100.0,
    "nafnet": 1_500.0,
    "nafnet_guided": 1_500.0,
    "clearair": 7_600.0,
    "default": 16_000.0,
}
_PROBE_SAFETY = 1.25
_PROBE_SIDE = 256
_probe_cache: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], float]] = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------------- padding, windows


def size_multiple(model: nn.Module) -> int:
    """The side multiple the model needs (its ``size_multiple`` attribute; 1 for a model without one)."""
    return int(getattr(model, "size_multiple", 1))


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad (B, C, H, W) on the bottom and right so both sides are multiples of ``multiple``.

    Sides shorter than the padding they need are reflected repeatedly (and replicated if only one pixel wide).
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    while ph > 0 or pw > 0:
        h, w = x.shape[-2:]
        step_h, step_w = min(ph, h - 1), min(pw, w - 1)
        if (ph and step_h == 0) or (pw and step_w == 0):
            return F.pad(x, (0, pw, 0, ph), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        ph, pw = ph - step_h, pw - step_w
    return x


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` shared pixels."""
    if tile >= length:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    starts = [i * stride for i in range(n - 1)] + [length - tile]
    return sorted(set(starts))


def _ramp_1d(size: int, overlap: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """Blending weights along one tile side: 0 margin, raised-cosine ramp, 1 interior (each side as flagged)."""
    w = torch.ones(size, dtype=torch.float64)
    margin = overlap // 4
    ramp_len = max(overlap - 2 * margin, 1)
    t = (torch.arange(ramp_len, dtype=torch.float64) + 0.5) / ramp_len
    ramp = 0.5 - 0.5 * torch.cos(math.pi * t)  # (ramp_len,) rising, strictly inside (0, 1)
    profile = torch.cat([torch.zeros(margin, dtype=torch.float64), ramp])[:size]
    if ramp_start:
        w[: profile.numel()] = torch.minimum(w[: profile.numel()], profile)
    if ramp_end:
        w[size - profile.numel() :] = torch.minimum(w[size - profile.numel() :], profile.flip(0))
    return w


def blend_window(th: int, tw: int, overlap: int, edges: tuple[bool, bool, bool, bool]) -> torch.Tensor:
    """(th, tw) blending window; ``edges`` flags (top, bottom, left, right) sides shared with another tile."""
    top, bottom, left, right = edges
    wy = _ramp_1d(th, overlap, top, bottom)
    wx = _ramp_1d(tw, overlap, left, right)
    return torch.outer(wy, wx)


# ----------------------------------------------------------------------------------------------- memory


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else fallback


def _probe_bytes_per_pixel(
    model: nn.Module, device: torch.device, dtype: torch.dtype | None, priors_fn: PriorsFn | None
) -> float:
    m = size_multiple(model)
    side = max(_PROBE_SIDE // m, 1) * m
    probe = torch.rand(1, 3, side, side, device=device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        _forward(model, probe, priors_fn, dtype)
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - base
    return _PROBE_SAFETY * extra / (side * side)


def bytes_per_pixel(
    model: nn.Module, device: torch.device, dtype: torch.dtype | None = None, priors_fn: PriorsFn | None = None
) -> float:
    """Estimated activation bytes per input pixel (batch 1) of a whole-image pass; see the module docstring."""
    declared = getattr(model, "inference_bytes_per_pixel", None)
    if declared is not None:
        return float(declared)
    if device.type == "cuda":
        key = (str(device), str(dtype))
        cache = _probe_cache.setdefault(model, {})
        if key not in cache:
            cache[key] = _probe_bytes_per_pixel(model, device, dtype, priors_fn)
            log.info("probed %s: %.0f activation bytes per pixel on %s", type(model).__name__, cache[key], key)
        return cache[key]
    return BYTES_PER_PIXEL.get(getattr(model, "arch", "default"), BYTES_PER_PIXEL["default"])


def estimate_memory_mb(
    model: nn.Module,
    batch: int,
    height: int,
    width: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    priors_fn: PriorsFn | None = None,
) -> float:
    """Estimated activation memory in MiB of a pass over a (batch, 3, height, width) input (padded to the multiple)."""
    m = size_multiple(model)
    pixels = math.ceil(height / m) * m * math.ceil(width / m) * m
    return bytes_per_pixel(model, device, dtype, priors_fn) * batch * pixels / 2**20


def _tile_for_budget(
    model: nn.Module,
    batch: int,
    device: torch.device,
    dtype: torch.dtype | None,
    priors_fn: PriorsFn | None,
    budget_mb: float,
    overlap: int,
) -> int:
    """The largest square tile (a multiple of the model's size multiple) whose estimate fits ``budget_mb``."""
    m = size_multiple(model)
    bpp = bytes_per_pixel(model, device, dtype, priors_fn)
    side = int(math.sqrt(budget_mb * 2**20 / (bpp * batch))) // m * m
    smallest = math.ceil((overlap + 1) / m) * m
    if side < smallest:
        log.warning("memory budget %.0f MiB is below one %d-pixel tile; using %d anyway", budget_mb, smallest, smallest)
    return max(side, smallest)


def plan_tile(
    model: nn.Module,
    batch: int,
    height: int,
    width: int,
    tile: int | None = None,
    overlap: int = 32,
    memory_budget_mb: float | None = None,
    dtype: torch.dtype | None = None,
    priors_fn: PriorsFn | None = None,
) -> int | None:
    """The tile side :func:`restore_image` uses for a (batch, 3, height, width) input, or None for one whole-image
    pass. Without a memory budget: ``tile`` as given (None: whole). With one: whole when the estimated activation
    memory fits it, else tiles of ``tile``, or of the largest square tile that fits when ``tile`` is None. A tile
    at least as large as the padded image is one whole-image pass, so it is reported as None."""
    run_device = _model_device(model, torch.device("cpu"))
    if memory_budget_mb is not None:
        need = estimate_memory_mb(model, batch, height, width, run_device, dtype, priors_fn)
        if need <= memory_budget_mb:
            return None
        if tile is None:
            tile = _tile_for_budget(model, batch, run_device, dtype, priors_fn, memory_budget_mb, overlap)
        log.info("whole image needs ~%.0f MiB > budget %.0f MiB: tiles of %d", need, memory_budget_mb, tile)
    m = size_multiple(model)
    if tile is not None and tile >= math.ceil(height / m) * m and tile >= math.ceil(width / m) * m:
        return None
    return tile


# ----------------------------------------------------------------------------------------------- restoration


def _forward(model: nn.Module, x: torch.Tensor, priors_fn: PriorsFn | None, dtype: torch.dtype | None) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        if priors_fn is None:
            out = model(x)
        else:
            out = model(x, priors=priors_fn(x))
    return out.float()


def _restore_whole(
    model: nn.Module, x: torch.Tensor, priors_fn: PriorsFn | None, dtype: torch.dtype | None
) -> torch.Tensor:
    h, w = x.shape[-2:]
    padded = pad_to_multiple(x, size_multiple(model))
    return _forward(model, padded, priors_fn, dtype)[..., :h, :w]


def _restore_tiled(
    model: nn.Module,
    x: torch.Tensor,
    priors_fn: PriorsFn | None,
    dtype: torch.dtype | None,
    tile: int,
    overlap: int,
    run_device: torch.device,
) -> torch.Tensor:
    h, w = x.shape[-2:]
    padded = pad_to_multiple(x, size_multiple(model))  # (B, 3, Hp, Wp), on the caller's device
    hp, wp = padded.shape[-2:]
    th, tw = min(tile, hp), min(tile, wp)
    ys, xs = tile_starts(hp, th, overlap), tile_starts(wp, tw, overlap)
    out = torch.zeros(padded.shape[0], 3, hp, wp, dtype=torch.float32, device=x.device)
    weight = torch.zeros(1, 1, hp, wp, dtype=torch.float32, device=x.device)
    log.debug("tiling %dx%d into %d x %d tiles of %dx%d", hp, wp, len(ys), len(xs), th, tw)
    for y in ys:
        for x0 in xs:
            edges = (y > 0, y + th < hp, x0 > 0, x0 + tw < wp)
            win = blend_window(th, tw, overlap, edges).to(out)  # (th, tw)
            crop = padded[..., y : y + th, x0 : x0 + tw].to(run_device)
            restored = _forward(model, crop, priors_fn, dtype).to(x.device)  # (B, 3, th, tw)
            out[..., y : y + th, x0 : x0 + tw] += restored * win
            weight[..., y : y + th, x0 : x0 + tw] += win
    return (out / weight)[..., :h, :w]


def restore_image(
    model: nn.Module,
    lq: torch.Tensor,
    priors_fn: PriorsFn | None = None,
    tile: int | None = None,
    overlap: int = 32,
    memory_budget_mb: float | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    clamp: bool = True,
) -> torch.Tensor:
    """Restore (B, 3, H, W) images in [0, 1] of any size; returns float32 (B, 3, H, W) on ``lq``'s device.

    The model runs on its own device; with tiling only one tile at a time is moved there, so ``lq`` may stay in
    host memory. Runs under ``torch.inference_mode``; the model is put in eval mode.

    Args:
        priors_fn: maps the network's input (the padded image, or one tile) to the ``priors`` dict of the
            model's forward; called per tile, since guidance must describe the tile's own content. To use
            priors computed once on the whole image instead (vector priors such as DINO CLS tokens or a quality
            embedding), pass a closure that ignores its argument and returns them.
        tile: tile side, a multiple of the model's ``size_multiple``: always used without a memory budget
            (None: a whole-image pass), only beyond the budget with one (see :func:`plan_tile`).
        overlap: minimum pixels shared by neighbouring tiles; blending ramps live inside it.
        memory_budget_mb: a whole-image pass when its estimated activation memory fits; beyond it tiles of
            ``tile``, or of the largest square tile whose estimate fits when ``tile`` is None.
        dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``), or None for float32.
        channels_last: run in channels-last memory format (converts the model in place).
        clamp: clip the output to [0, 1].
    """
    if lq.ndim != 4 or lq.shape[1] != 3:
        raise ValueError(f"expected lq of shape (B, 3, H, W), got {tuple(lq.shape)}")
    m = size_multiple(model)
    run_device = _model_device(model, lq.device)
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        x = lq.float()
        if tile is not None and (tile % m or tile <= overlap):
            raise ValueError(f"tile {tile} must be a multiple of the model's size multiple {m} and > overlap")
        tile = plan_tile(model, x.shape[0], *x.shape[-2:], tile, overlap, memory_budget_mb, dtype, priors_fn)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if tile is None:
            out = _restore_whole(model, x.to(run_device), priors_fn, dtype).to(lq.device)
        else:
            out = _restore_tiled(model, x, priors_fn, dtype, tile, overlap, run_device)
        return out.clamp(0.0, 1.0) if clamp else out


# ----------------------------------------------------------------------------------------------- image files


def save_image(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write (H, W, 3) uint8 RGB (or float in [0, 1], rounded) atomically; format from the file suffix."""
    path = Path(path)
    data = np.asarray(arr)
    if data.dtype != np.uint8:
        data = np.clip(np.round(data.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    from PIL import Image  # image I/O stays out of `import clearair` (see clearair/__init__)

    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"unknown image format for {path} (suffix {path.suffix!r})")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        Image.fromarray(data).save(tmp, format=fmt)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 (or float in [0, 1]) -> (3, H, W) float32 in [0, 1]; ``[None]`` makes it a batch."""
    data = np.asarray(arr)
    if data.ndim != 3 or data.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {data.shape}")
    scale = 255.0 if data.dtype == np.uint8 else 1.0
    t = torch.tensor(data, dtype=torch.float32) / scale  # (H, W, 3), a copy: PIL-backed arrays are read-only
    return t.permute(2, 0, 1).contiguous()  # (3, H, W)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) float in [0, 1] -> (H, W, 3) uint8 RGB, clipped and rounded."""
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"to_numpy takes one image, got a batch of {x.shape[0]}")
        x = x[0]
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(x.shape)}")
    arr = x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return arr.permute(1, 2, 0).numpy()
