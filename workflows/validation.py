"""A small fixed validation set: the first ``n`` images of the val shards, centre-cropped, the same on every rank."""

from __future__ import annotations

from typing import Any

import numpy as np


def centre_crop(img: np.ndarray, size: int | None, multiple: int = 8) -> np.ndarray:
    """Centre crop to ``size`` (or the whole image) trimmed to a multiple of ``multiple``."""
    h, w = img.shape[:2]
    th = min(h, size or h) // multiple * multiple
    tw = min(w, size or w) // multiple * multiple
    y, x = (h - th) // 2, (w - tw) // 2
    return np.ascontiguousarray(img[y : y + th, x : x + tw])


def validation_items(urls: list[str], n: int, crop: int | None) -> list[dict[str, Any]]:
    from synth.read import iter_shard, to_tensor

    items = []
    for url in urls:
        for s in iter_shard(url):
            if "lq" not in s:
                continue
            items.append({"lq": to_tensor(centre_crop(s["lq"], crop)), "gt": to_tensor(centre_crop(s["gt"], crop))})
            if len(items) == n:
                return items
    return items


def validation_loader(urls: list[str], n: int, crop: int | None):
    """Batch size 1 (images may differ in size); Lightning shards it over ranks under DDP."""
    from torch.utils.data import DataLoader

    return DataLoader(validation_items(urls, n, crop), batch_size=1, shuffle=False)
