"""``clearair restore`` and ``clearair score``: a trained model or the learned perceiver on user images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from synth.imageio import IMAGE_EXTENSIONS


class RestoreError(RuntimeError):
    """A model, checkpoint or input that cannot be used; the message names it."""


def image_files(inputs: list[Path]) -> list[Path]:
    files, missing = image_files_and_missing(inputs)
    if missing:
        raise RestoreError(f"input {missing[0][0]} does not exist")
    return files


def restore_paths(
    model: str | Path, inputs: list[Path], out: Path, tile: int | None, overlap: int
) -> list[tuple[Path, Path]]:
    """Restore every image of ``inputs`` into ``out`` as PNG (any size: tiled with blending)."""
    from clearair.inference import save_image
    from clearair.restorer import RestorerLoadError, load_restorer
    from synth.imageio import BadImage, load_rgb

    try:
        restorer = load_restorer(model)
    except RestorerLoadError as err:
        raise RestoreError(str(err)) from None
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for path in image_files(inputs):
        try:
            img, _ = load_rgb(path)
        except BadImage as err:
            raise RestoreError(f"cannot read image {path}: {err}") from None
        dst = out / f"{path.stem}.png"
        save_image(dst, restorer.restore(img, tile=tile, overlap=overlap))
        done.append((path, dst))
    return done


@dataclass(frozen=True)
class Scored:
    """One scored image: P(excellent) as its quality score, its most likely tier, the three probabilities."""

    path: Path
    score: float
    tier: str
    probs: dict[str, float]


def load_scorer(prompts: str | Path):
    """The frozen perceiver of a prompts file and the crop it scores with (the view the prompts learned on)."""
    from safetensors import SafetensorError, safe_open

    from clearair.models.perceiver import build_perceiver
    from clearair.models.pretrained import MissingWeightsError
    from clearair.priors import perceiver_config
    from synth import storage

    try:
        prompts = storage.local_copy(prompts)
    except OSError as err:
        raise RestoreError(f"cannot read prompts {prompts}: {err}") from None
    if not prompts.is_file():
        raise RestoreError(f"prompts file {prompts} not found (the perceiver stage writes prompts.safetensors)")
    try:
        with safe_open(str(prompts), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise RestoreError(f"{prompts} is not a safetensors prompts file: {err}") from None
    if "config" not in meta:
        raise RestoreError(f"{prompts} holds no perceiver config in its metadata: not a clearair prompts file")
    view = json.loads(meta.get("view", "null")) or {"crop": None}  # prompts of 0.1.0: whole images
    try:
        perceiver = build_perceiver(perceiver_config(json.loads(meta["config"])))
        perceiver.load_prompts(prompts)
    except (MissingWeightsError, ValueError) as err:
        raise RestoreError(str(err)) from None
    return perceiver.eval(), view.get("crop")


def score_paths(prompts: str | Path, inputs: list[Path]) -> tuple[list[Scored], list[tuple[Path, str]]]:
    """Quality score, tier and probabilities of every readable image of ``inputs``, and ``(path, reason)`` for
    each one that could not be read. Images are decoded as synthesis decodes them and scored on the crop grid of
    the prompts' view (:func:`clearair.scoring.grid_probabilities`)."""
    from clearair.models.perceiver import TIERS
    from clearair.scoring import grid_probabilities, quality_score
    from synth.imageio import BadImage, load_rgb

    perceiver, crop = load_scorer(prompts)
    files, failed = image_files_and_missing(inputs)
    rows = []
    for path in tqdm(files, desc="score", unit="image", disable=len(files) < 2):
        try:
            img, _ = load_rgb(path)
        except BadImage as err:
            failed.append((path, str(err)))
            continue
        probs = grid_probabilities(perceiver, img, crop)
        tier = TIERS[int(probs.argmax())]
        rows.append(Scored(path, quality_score(probs), tier, dict(zip(TIERS, map(float, probs), strict=True))))
    return rows, failed


def image_files_and_missing(inputs: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files of ``inputs`` (folders walked, sorted) and the inputs that do not exist."""
    files, missing = [], []
    for p in inputs:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            missing.append((p, "no such file or folder"))
    return files, missing
