"""Physically motivated degradation models and the public API to apply them to uint8 images.

    from synth.degradations import degrade
    lq, params = degrade(gt, "haze", seed=7, severity="heavy")     # gt: uint8 (H, W, 3) RGB
    lq2, _ = degrade(gt, "haze", seed=7, **params)                  # replays the same pixels

Composites are applied in PHYSICAL_ORDER, the order light meets them on its way to the file: the scene and
the atmosphere first (haze attenuates what is behind it; rain and snow fall in front of the haze), then the
camera's optics and motion (blur spreads everything the lens sees, weather included), then the sensor
(exposure, photon and read noise are added to the blurred irradiance), and compression last (JPEG encodes
the noisy sensor output).

Besides these physical models a step may run an albumentations pixel-level transform: the step kind
ALBUMENTATIONS_STEP, in `synth.degradations.albu` (imported on first use), which also wraps our models as
albumentations transforms.
"""

from __future__ import annotations

import numpy as np

from synth.degradations.base import SEVERITIES, Context, Degradation, to_float, to_uint8
from synth.degradations.blur import DefocusBlur, GaussianBlur, MotionBlur
from synth.degradations.haze import Haze
from synth.degradations.jpeg import Jpeg
from synth.degradations.lowlight import LowLight
from synth.degradations.noise import GaussianNoise, PoissonNoise
from synth.degradations.rain import Rain
from synth.degradations.snow import Snow

DEGRADATIONS: dict[str, Degradation] = {
    "gaussian_noise": GaussianNoise(),
    "poisson_noise": PoissonNoise(),
    "haze": Haze(),
    "rain": Rain(),
    "motion_blur": MotionBlur(),
    "defocus_blur": DefocusBlur(),
    "gaussian_blur": GaussianBlur(),
    "low_light": LowLight(),
    "jpeg": Jpeg(),
    "snow": Snow(),
}

ALBUMENTATIONS_STEP = "albumentations"  # {"transform": class name, "args": {...}}: see synth.degradations.albu

PHYSICAL_ORDER: tuple[str, ...] = (
    "haze",
    "rain",
    "snow",
    "motion_blur",
    "defocus_blur",
    "gaussian_blur",
    "low_light",
    "gaussian_noise",
    "poisson_noise",
    "jpeg",
)

__all__ = [
    "ALBUMENTATIONS_STEP",
    "DEGRADATIONS",
    "PHYSICAL_ORDER",
    "SEVERITIES",
    "Context",
    "Degradation",
    "apply_steps",
    "degrade",
    "get_degradation",
    "to_float",
    "to_uint8",
]


def get_degradation(name: str) -> Degradation:
    """The degradation called `name` (or the albumentations step); an unknown name raises ValueError listing the
    valid ones."""
    if name == ALBUMENTATIONS_STEP:  # imported here: albumentations takes over a second to import
        from synth.degradations.albu import Albumentations

        return Albumentations()
    if name not in DEGRADATIONS:
        raise ValueError(
            f"unknown degradation {name!r}; valid: {sorted(DEGRADATIONS)}, or {ALBUMENTATIONS_STEP!r} with a transform"
        )
    return DEGRADATIONS[name]


def apply_steps(
    img: np.ndarray, steps: list[dict], rng: np.random.Generator, ctx: Context
) -> tuple[np.ndarray, list[dict]]:
    """Apply `steps` in the given order to uint8 (H, W, 3) `img`, drawing everything from `rng`.

    Each step is {"degradation": name, "severity": s, "params": fixed}; each record returned is
    {"degradation": name, "severity": s, "params": drawn}, the drawn params JSON-able. The image stays float32
    between steps and is rounded to uint8 once at the end.
    """
    out = to_float(img)  # (H, W, 3)
    if ctx.depth is not None and np.shape(ctx.depth) != img.shape[:2]:
        raise ValueError(f"depth map has shape {np.shape(ctx.depth)}, expected the image's (H, W) = {img.shape[:2]}")
    records = []
    for step in steps:
        degradation = get_degradation(step["degradation"])
        severity = step.get("severity", "medium")
        params = degradation.sample(rng, severity, step.get("params") or {})
        out = degradation.apply(out, params, rng, ctx)
        params.update(degradation.annotate(params, ctx))
        records.append({"degradation": degradation.name, "severity": severity, "params": params})
    return to_uint8(out), records


def degrade(
    img: np.ndarray, name: str, seed: int, severity: str = "medium", depth: np.ndarray | None = None, **params
) -> tuple[np.ndarray, dict]:
    """Apply one named degradation to uint8 (H, W, 3) RGB `img` with a seeded generator.

    `params` fixes named parameters (the rest are drawn for `severity`); `depth` (H, W), larger = farther,
    feeds haze. Returns the uint8 result and every drawn parameter plus `severity`; passing that dict back
    as keyword arguments with the same seed reproduces the result.
    """
    rng = np.random.default_rng(seed)
    step = {"degradation": name, "severity": severity, "params": params}
    out, records = apply_steps(img, [step], rng, Context(depth=depth))
    return out, {**records[0]["params"], "severity": severity}
