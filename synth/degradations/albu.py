"""albumentations interop, both ways: a recipe step that runs an albumentations 2.0 pixel-level transform, and our
degradations as albumentations transforms.

A recipe step ``{degradation: albumentations, transform: ISONoise, params: {intensity: [0.1, 0.5]}}`` builds
``A.ISONoise(intensity=[0.1, 0.5], p=1.0)``: only ImageOnlyTransforms are accepted (geometric and dual transforms
move pixels, so lq would no longer line up with gt), a step always applies (p is 1), and the transform's own
generator is seeded from the sample's stream, so a sample seed gives the same pixels and ``--regenerate`` replays
them. The transform sees the chain's float32 (H, W, 3) RGB image in [0, 1], which albumentations 2.0 treats as
it treats uint8 (transforms that need uint8 convert internally). The record of the step:

    {"transform": "ISONoise", "args": {"intensity": [0.1, 0.5]}, "transform_seed": 3653403231,
     "resolved": {"color_shift": 0.022, "intensity": 0.335, "random_seed": 3036667210}}

``resolved`` holds the scalar parameters albumentations drew or derived for the image; array-valued ones (noise
maps, kernels, masks) are left out, since ``transform_seed`` reproduces them. The other way round,
``AsAlbumentations("gaussian_noise", sigma=25)`` is an ``A.ImageOnlyTransform`` drawing from albumentations' own
generator, so ``A.Compose([...], seed=...)`` is deterministic with our models inside.

This module imports albumentations (over a second); ``synth.degradations`` imports it only when a step needs it.
"""

from __future__ import annotations

import difflib
import inspect
import json

import albumentations as A
import numpy as np
from pydantic import ValidationError

from synth.degradations import DEGRADATIONS, SEVERITIES, Context, Degradation, apply_steps

# ImageOnlyTransforms that are not degradations: they leave [0, 1] RGB (value range, dtype)
NOT_DEGRADATIONS = ("FromFloat", "Normalize", "ToFloat")
MAX_RECORDED_ITEMS = 16  # longer resolved sequences (e.g. fog particle positions) stay out of the record
DRY_RUN_SIZE = 64  # side of the test image a recipe step is run on at load time
SEED_RANGE = 2**32


def pixel_transforms() -> list[str]:
    """Names of the albumentations transforms a recipe step may use."""
    return sorted(
        name
        for name, cls in vars(A).items()
        if _is_transform(cls)
        and issubclass(cls, A.ImageOnlyTransform)
        and cls is not A.ImageOnlyTransform
        and name not in NOT_DEGRADATIONS
    )


def transform_class(name: str) -> type[A.ImageOnlyTransform]:
    """The albumentations pixel-level transform called `name`; ValueError for an unknown name (with close
    matches), a geometric or dual transform, or one that is not a degradation."""
    cls = getattr(A, name, None)
    if not _is_transform(cls):
        lower = {n.lower(): n for n in pixel_transforms()}
        close = [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)]
        hint = f"did you mean {', '.join(close)}?" if close else f"pixel-level transforms: {', '.join(lower.values())}"
        raise ValueError(f"albumentations has no transform {name!r}; {hint}")
    if not issubclass(cls, A.ImageOnlyTransform) or cls is A.ImageOnlyTransform:
        kind = next((base.__name__ for base in cls.__mro__[1:] if base.__module__ == A.BasicTransform.__module__), "")
        raise ValueError(
            f"albumentations {name} is a {kind or 'transform'}, not a pixel-level ImageOnlyTransform: geometric and "
            f"dual transforms move pixels (or act on masks and boxes), which would misalign lq and gt"
        )
    if name in NOT_DEGRADATIONS:
        raise ValueError(f"albumentations {name} changes the value range or dtype; a step maps [0, 1] RGB to itself")
    return cls


def build_transform(name: str, args: dict) -> A.ImageOnlyTransform:
    """``A.<name>(**args, p=1.0)``, checked strictly: an unknown argument, a bad value, an explicit p other than 1
    or a transform that needs per-image reference data (FDA, HistogramMatching...) raise ValueError."""
    cls = transform_class(name)
    args = dict(args)
    if args.pop("p", 1.0) != 1.0:
        raise ValueError(f"albumentations {name}: p: a recipe step always applies (p is 1); drop it")
    valid = sorted(set(inspect.signature(cls.__init__).parameters) - {"self", "p", "strict"})
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise ValueError(f"albumentations {name}: unknown argument(s) {unknown}; valid: {valid}")
    strict = {"strict": True} if "InitSchema" in vars(cls) else {}  # others take no `strict`
    try:
        transform = cls(**args, p=1.0, **strict)
    except (ValueError, TypeError) as err:
        raise ValueError(f"albumentations {name}: {_describe(err)}") from None
    needs = sorted(set(transform.targets_as_params) - {"image"})
    if needs:
        raise ValueError(f"albumentations {name} needs per-image data ({', '.join(needs)}) a recipe cannot supply")
    return transform


def check_step(name: str, args: dict) -> None:
    """Everything a recipe can check before any work: the transform builds, runs on a small test image and keeps
    its shape. Raises ValueError saying what is wrong."""
    gradient = np.linspace(0.0, 1.0, DRY_RUN_SIZE * DRY_RUN_SIZE * 3, dtype=np.float32)
    run_transform(name, _as_json(name, args), 0, gradient.reshape(DRY_RUN_SIZE, DRY_RUN_SIZE, 3))


def run_transform(name: str, args: dict, seed: int, img: np.ndarray) -> tuple[np.ndarray, dict]:
    """Apply ``A.<name>(**args)`` seeded with `seed` to float32 (H, W, 3) `img` in [0, 1]; returns the float32
    result in [0, 1] and the JSON-able scalar parameters albumentations resolved."""
    transform = build_transform(name, args)
    transform.set_random_seed(seed)
    try:
        out = transform(image=np.ascontiguousarray(img))["image"]
    except Exception as err:  # albumentations raises whatever its functions do; say which transform
        raise ValueError(f"albumentations {name} failed on a {img.shape[1]}x{img.shape[0]} image: {err}") from err
    if out.shape != img.shape:
        raise ValueError(f"albumentations {name} returned shape {out.shape} for {img.shape}; a step keeps (H, W, 3)")
    out = out.astype(np.float32) * np.float32(1.0 / 255.0) if out.dtype == np.uint8 else out
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False), resolved(transform.params)


def resolved(params: dict) -> dict:
    """The scalar (and short flat sequence) entries of albumentations' applied params, as plain JSON values; the
    image shape, arrays and long sequences are left out."""
    record = {}
    for key, value in params.items():
        if isinstance(value, np.ndarray) and value.ndim <= 1 and value.size <= MAX_RECORDED_ITEMS:
            value = value.tolist()
        if key == "shape":
            continue
        if _is_scalar(value):
            record[key] = value
        elif isinstance(value, list | tuple) and len(value) <= MAX_RECORDED_ITEMS and all(map(_is_scalar, value)):
            record[key] = list(value)
    return json.loads(json.dumps(record, default=lambda v: v.item()))


class Albumentations(Degradation):
    """The recipe step that runs an albumentations transform; not a physical model, so in no random pool.

    `sample` takes {"transform": name, "args": {...}} and draws the transform's seed ("transform_seed"); `apply`
    runs it and adds the resolved parameters to the params it was given (the step's record) under "resolved".
    """

    name = "albumentations"
    info_keys = ("transform_seed", "resolved")

    @property
    def param_names(self) -> tuple[str, ...]:
        return ("transform", "args")

    def sample(self, rng: np.random.Generator, severity: str, fixed: dict) -> dict:
        if severity not in SEVERITIES:
            raise ValueError(f"{self.name}: severity {severity!r} is not one of {SEVERITIES}")
        fixed = dict(fixed or {})
        unknown = sorted(set(fixed) - set(self.param_names) - set(self.info_keys))
        if unknown or "transform" not in fixed:
            raise ValueError(
                f"{self.name}: takes transform (an albumentations class name) and args (its arguments); got "
                f"{sorted(fixed)}"
            )
        name = fixed["transform"]
        transform_class(name)
        return {"transform": name, "args": _as_json(name, fixed.get("args") or {}), "transform_seed": _draw_seed(rng)}

    def apply(self, img: np.ndarray, params: dict, rng: np.random.Generator, ctx: Context) -> np.ndarray:
        out, params["resolved"] = run_transform(params["transform"], params["args"], params["transform_seed"], img)
        return out


class AsAlbumentations(A.ImageOnlyTransform):
    """One of our degradations as an albumentations transform, for a user's own pipeline:

        A.Compose([A.HorizontalFlip(), AsAlbumentations("haze", severity="heavy", p=1.0)], seed=7)

    `params` fix parameters of the degradation as in `synth.degradations.degrade`; the rest are drawn for
    `severity`. Each application draws a seed from albumentations' generator (so Compose's `seed` makes it
    deterministic) and then equals ``degrade(img, degradation, seed, severity, **params)`` on uint8 images.
    Takes uint8 or float32 (in [0, 1]) (H, W, 3) RGB and returns the same dtype; p defaults to 0.5 as for
    albumentations' own transforms. Haze uses its depth fallback (no depth map reaches a transform).
    """

    def __init__(self, degradation: str, severity: str = "medium", p: float = 0.5, **params: object) -> None:
        super().__init__(p=p)
        if degradation not in DEGRADATIONS:
            raise ValueError(f"unknown degradation {degradation!r}; valid: {sorted(DEGRADATIONS)}")
        DEGRADATIONS[degradation].sample(np.random.default_rng(0), severity, params)  # bad params fail here
        self.degradation, self.severity, self.fixed = degradation, severity, dict(params)

    def get_params(self) -> dict:
        return {"seed": _draw_seed(self.random_generator)}

    def apply(self, img: np.ndarray, seed: int, **params: object) -> np.ndarray:
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype not in (np.uint8, np.float32):
            raise ValueError(
                f"{self.degradation}: expected uint8 or float32 (H, W, 3) RGB, got {img.dtype} {img.shape}"
            )
        rng = np.random.default_rng(seed)
        step = {"degradation": self.degradation, "severity": self.severity, "params": self.fixed}
        if img.dtype == np.uint8:
            return apply_steps(img, [step], rng, Context())[0]
        degradation = DEGRADATIONS[self.degradation]
        drawn = degradation.sample(rng, self.severity, self.fixed)
        return degradation.apply(np.clip(img, 0.0, 1.0), drawn, rng, Context())

    def get_transform_init_args(self) -> dict:
        return {"degradation": self.degradation, "severity": self.severity, **self.fixed}


def _is_transform(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, A.BasicTransform)


def _draw_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(SEED_RANGE))


def _as_json(name: str, args: dict) -> dict:
    """`args` as plain JSON values (tuples become lists), as the record stores and a replay reads them back."""
    try:
        return json.loads(json.dumps(dict(args)))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"albumentations {name}: arguments must be JSON values (numbers, strings, lists): {err}"
        ) from None


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, bool | int | float | str | np.bool_ | np.integer | np.floating)


def _describe(err: Exception) -> str:
    """albumentations' message, one line per field for its pydantic validation errors."""
    cause = err.__cause__
    if isinstance(cause, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in cause.errors()
        )
    return str(err)
