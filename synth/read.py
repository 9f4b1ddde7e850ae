"""Reading shards safely: only PNG, JSON and NPY (without pickle) members are ever decoded.

:func:`iter_raw` streams the samples of one tar from a local path or an ``s3://`` URI; :func:`iter_shard` decodes
them in order (cross-validation, evaluation, the contact sheet); ``clearair.data`` builds the training and
validation loaders on the same two. For on-the-fly recipes :func:`ensure_lq` degrades the stored GT afresh at
every epoch with the same code and seeds as materialized synthesis, so epoch 0 gives the materialized pixels.

Shards hold whole images (long side capped by ``max_side``), not fixed crops: training draws its crops at read
time, and cross-validation and evaluation restore whole images.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from synth import storage
from synth.degradations import Context, apply_steps
from synth.imageio import decode_png

SAFE_SUFFIXES = ("gt.png", "lq.png", "json", "depth.npy")


class ShardFormatError(ValueError):
    """A shard member that is not one of the safe types, or a sample without its required members."""


def decode_sample(raw: dict[str, Any], origin: str = "?") -> dict[str, Any]:
    """Decode a webdataset-style raw sample ({"__key__", "gt.png": bytes, ...}) into arrays and metadata."""
    key = raw.get("__key__", "?")
    out: dict[str, Any] = {"key": key}
    for name, data in raw.items():
        if name.startswith("__"):
            continue
        if name not in SAFE_SUFFIXES:
            raise ShardFormatError(f"shard {origin}: sample {key} has member {name!r}; only {SAFE_SUFFIXES} are read")
        if name.endswith(".png"):
            out[name[:-4]] = decode_png(data)
        elif name == "json":
            out["meta"] = json.loads(data)
        else:
            out["depth"] = np.load(io.BytesIO(data), allow_pickle=False)
    if "gt" not in out or "meta" not in out:
        raise ShardFormatError(f"shard {origin}: sample {key} lacks gt.png or json")
    return out


def iter_raw(location: str | Path) -> Iterator[dict[str, Any]]:
    """Raw samples (``{"__key__", "__url__", member: bytes}``) of one tar, streamed from a local path or an
    ``s3://`` URI, grouping consecutive members by key (the part of the name before the first dot)."""
    url = str(location)
    current: dict[str, Any] = {}
    try:
        with storage.open_read(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, suffix = info.name.partition(".")
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                current.update({"__key__": key, "__url__": url, suffix: tar.extractfile(info).read()})
    except tarfile.TarError as err:
        raise ShardFormatError(f"shard {url}: not a readable tar ({err})") from None
    if current:
        yield current


def iter_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard, in stored order."""
    for raw in iter_raw(path):
        yield decode_sample(raw, str(path))


def shard_paths(root: str | Path, split: str, folds: list[int] | None = None) -> list[str]:
    """Shard files of ``split`` (and, for train, of the given folds) listed in the dataset's manifest."""
    root = storage.resolve(root)
    manifest = storage.read_json(storage.join(root, "manifest.json"))
    return [
        storage.join(root, "shards", s["name"])
        for s in manifest["shards"]
        if s["split"] == split and (folds is None or s["fold"] in folds)
    ]


def ensure_lq(sample: dict[str, Any], recipe, epoch: int) -> dict[str, Any]:
    """Fill ``sample["lq"]`` of an on-the-fly sample by degrading its GT at ``epoch``; stored LQs are kept."""
    meta = sample["meta"]
    if meta.get("mode") != "on_the_fly":
        if "lq" not in sample:
            raise ShardFormatError(f"sample {sample['key']} has no lq.png and is not an on-the-fly sample")
        return sample
    if recipe is None:
        raise ValueError(f"sample {sample['key']} is synthesised on the fly: pass the recipe to the reader")
    from synth.writer import degrade_clean

    sample["lq"], sample["degradations"] = degrade_clean(
        sample["gt"], meta["task"], recipe, meta["seed"], meta["key"], meta["variant"], sample.get("depth"), epoch
    )
    return sample


# Degradations a reader may draw anew from the clean image alone (no depth map, no paired source).
RENEWABLE = ("gaussian_noise", "poisson_noise")


def fresh_lq(sample: dict[str, Any], stream: list[int]) -> np.ndarray | None:
    """A new draw of a synthetic noise sample's LQ from its GT: the recorded degradation steps with their recorded
    parameters (the same sigma or peak), new noise from ``stream`` (the caller's seed, key, epoch, repeat). None
    for samples that cannot be redrawn: paired data, or steps other than :data:`RENEWABLE` (haze needs depth)."""
    meta = sample["meta"]
    steps = meta.get("degradations") or []
    if meta.get("origin") != "synthetic" or not steps or any(st["degradation"] not in RENEWABLE for st in steps):
        return None
    lq, _ = apply_steps(sample["gt"], steps, np.random.default_rng(stream), Context())  # recorded params stay fixed
    return lq


def random_crops(gt: np.ndarray, lq: np.ndarray, size: int, rng: np.random.Generator, n: int = 1) -> list[tuple]:
    """``n`` aligned (lq, gt) crops of ``size`` at independent positions, each with a random flip."""
    h, w = gt.shape[:2]
    if h < size or w < size:
        raise ShardFormatError(f"image {w}x{h} is smaller than the crop size {size}")
    crops = []
    for _ in range(n):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        a, b = lq[y : y + size, x : x + size], gt[y : y + size, x : x + size]
        if rng.random() < 0.5:
            a, b = a[:, ::-1], b[:, ::-1]
        crops.append((np.ascontiguousarray(a), np.ascontiguousarray(b)))
    return crops


def to_tensor(img: np.ndarray):
    """(H, W, 3) uint8 -> (3, H, W) float32 tensor in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)
