"""A small PNG of LQ/GT pairs, one row per task, for a person to check a dataset at a glance."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageDraw

from synth import storage
from synth.read import iter_shard

THUMB = 128
LABEL_W = 150


def _thumb(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = THUMB / max(h, w)
    small = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((THUMB, THUMB, 3), np.uint8)
    canvas[: small.shape[0], : small.shape[1]] = small
    return canvas


def first_per_task(out: str, manifest: dict, recipe=None) -> dict[str, dict]:
    """The first stored sample of every task (on-the-fly samples are degraded at epoch 0)."""
    from synth.read import ensure_lq

    tasks = set(manifest["counts"]["task"])
    found: dict[str, dict] = {}
    for shard in manifest["shards"]:
        for sample in iter_shard(storage.join(out, "shards", shard["name"])):
            task = sample["meta"]["task"]
            if task not in found:
                found[task] = ensure_lq(sample, recipe, 0)
            if len(found) == len(tasks):
                return found
    return found


def write_contact_sheet(out: str, manifest: dict) -> str | None:
    """Write ``out/contact_sheet.png`` (rows: task; columns: label, LQ, GT); None for an empty dataset."""
    from synth.recipes import Recipe

    recipe = Recipe.model_validate(manifest["recipe"])
    samples = first_per_task(out, manifest, recipe)
    if not samples:
        return None
    rows = []
    for task in sorted(samples):
        s = samples[task]
        label = Image.new("RGB", (LABEL_W, THUMB), (255, 255, 255))
        steps = ", ".join(d["degradation"] for d in s["meta"]["degradations"]) or s["meta"]["origin"]
        ImageDraw.Draw(label).multiline_text((4, 4), f"{task}\n{s['meta']['severity']}\n{steps[:60]}", fill=(0, 0, 0))
        rows.append(np.concatenate([np.asarray(label), _thumb(s["lq"]), _thumb(s["gt"])], axis=1))
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(buf, format="PNG")
    path = storage.join(out, "contact_sheet.png")
    storage.write_bytes(path, buf.getvalue())
    return path
