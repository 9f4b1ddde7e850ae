"""One sample -> tensors, examples -> batches: restoration crops (with medium tiers and priors) and tier views.

Batches carry priors as ``"prior.<name>"`` (see :func:`clearair.priors.load_priors_from_batch`), map priors cut
with the image's window (:func:`clearair.data.windows.crop_prior`).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch

from clearair.data.tasks import TaskIndex
from clearair.data.windows import PRIOR_MAP_STRIDE, Window, crop_prior, random_windows
from synth.read import ShardFormatError, to_tensor, where
from synth.tiers import TIERS, medium_tiers


def restoration_example(
    sample: dict[str, Any], windows: list[Window] | None, tasks: TaskIndex, tiers: bool = False
) -> dict[str, Any]:
    """Tensors of one sample: ``lq``/``gt`` under the first window (the whole image when ``windows`` is None),
    ``lq2`` under the second window if any, ``prior.<name>`` and, when ``tiers``, ``medium`` ``(P, 3, c, c)``:
    every one of the sample's P medium tiers under ``gt``'s view, with ``medium_psnr`` their P stored PSNRs."""
    first, meta = (windows[0] if windows else None), sample["meta"]

    def view(img: np.ndarray) -> torch.Tensor:
        return to_tensor(first.apply(img) if first is not None else img)

    example = {
        "lq": view(sample["lq"]),
        "gt": view(sample["gt"]),
        "task": tasks.index(meta["task"]),
        "family": tasks.family_index(meta["task"]),
        "key": sample["key"],
    }
    if windows is not None and len(windows) > 1:
        example["lq2"] = to_tensor(windows[1].apply(sample["lq"]))
    if tiers:
        if "mediums" not in sample:
            raise ShardFormatError(f"{where(sample)} has no medium tier: tiers=True needs tier shards")
        names = medium_tiers(len(sample["mediums"]))
        if missing := [t for t in names if t not in meta.get("psnr", {})]:
            raise ShardFormatError(f"{where(sample)}: its json stores no PSNR of the medium tier(s) {missing}")
        example["medium"] = torch.stack([view(m) for m in sample["mediums"]])  # (P, 3, c, c)
        example["medium_psnr"] = [float(meta["psnr"][t]) for t in names]
    for name, prior in sample["priors"].items():
        if first is not None:
            prior = crop_prior(prior, first, sample["gt"].shape[:2], max(1, first.size // PRIOR_MAP_STRIDE))
        example[f"prior.{name}"] = torch.from_numpy(np.ascontiguousarray(prior))
    return example


def collate_restoration(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack examples into ``{"lq": (B, 3, c, c), ..., "task": LongTensor (B,), "family": LongTensor (B,), "key":
    list, ...}``."""
    names = set(examples[0])
    for ex in examples[1:]:
        if set(ex) != names:
            raise ShardFormatError(f"samples {examples[0]['key']} and {ex['key']} carry different members in one batch")
    mediums = {ex["key"]: len(ex["medium"]) for ex in examples if "medium" in ex}
    if len(set(mediums.values())) > 1:
        raise ShardFormatError(f"samples with different numbers of medium tiers in one batch (key: count): {mediums}")
    batch: dict[str, Any] = {}
    for name in examples[0]:
        values = [ex[name] for ex in examples]
        if name == "key":
            batch[name] = values
        elif name in ("task", "family"):
            batch[name] = torch.tensor(values, dtype=torch.long)
        elif name == "medium_psnr":
            batch[name] = torch.tensor(values, dtype=torch.float32)  # (B, P)
        else:
            batch[name] = torch.stack(values)
    return batch


VIEWS = ("crop", "resize", "train_crop")


def tier_views(
    sample: dict[str, Any], image_size: int, rng: np.random.Generator, view: str, crop: int | None = None
) -> list[np.ndarray]:
    """The low, a medium and the high image of a tier sample under one shared random view, each ``(S, S, 3)``
    uint8; of several medium tiers ``rng`` draws one (:func:`pick_medium`).

    ``view="crop"``: a random square of side ``min(H, W, image_size)`` at native resolution (resized up only when
    the image is smaller); ``"train_crop"``: a random square of side ``min(H, W, crop)`` (the restorer's training
    crop) resized to ``image_size``, which is what the CLIP-aware loss sees; ``"resize"``: the whole image
    squashed to ``image_size``. All flip horizontally at random.
    """
    h, w = sample["gt"].shape[:2]
    if view in ("crop", "train_crop"):
        if view == "train_crop" and crop is None:
            raise ValueError("view 'train_crop' needs the training crop size (crop=...)")
        window = random_windows(h, w, min(h, w, image_size if view == "crop" else crop), rng, origin=where(sample))[0]
        orient = window.apply
    elif view == "resize":
        orient = Window(0, 0, min(h, w), flip=bool(rng.random() < 0.5)).orient  # the whole image, maybe mirrored
    else:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    images = (sample["lq"], pick_medium(sample, rng), sample["gt"])  # drawn after the view: one medium, as before
    return [_resize_square(orient(img), image_size) for img in images]


def pick_medium(sample: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """One of a tier sample's medium tiers drawn with ``rng``, so over a stream every restorer's output is seen
    as "medium"; a sample with one medium draws nothing (its views are those of a single-medium tier set)."""
    mediums = sample["mediums"]
    return mediums[int(rng.integers(len(mediums)))] if len(mediums) > 1 else mediums[0]


def _resize_square(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[:2] == (size, size):
        return img
    shrink = img.shape[0] * img.shape[1] > size * size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def collate_tiers(groups: list[list[list[np.ndarray]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (3B, 3, S, S), labels (3B,))`` from per-task lists of [low, medium, high] views: all low images
    first, then medium, then high; labels 0, 1, 2."""
    samples = [views for group in groups for views in group]
    images = [to_tensor(views[tier]) for tier in range(len(TIERS)) for views in samples]
    labels = torch.arange(len(TIERS)).repeat_interleave(len(samples))
    return torch.stack(images), labels
