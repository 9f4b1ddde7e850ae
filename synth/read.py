"""Reading shards safely: only PNG, JSON and NPY (without pickle) members are ever decoded.

Two readers share one decoder. :func:`iter_shard` walks one tar in order (cross-validation, evaluation, the
contact sheet). :func:`training_stream` is a webdataset pipeline for training that splits shards by node and by
DataLoader worker, draws random crops (two different crops of one degraded image when asked, for the CFE
contrastive loss) and, for on-the-fly recipes, degrades the stored GT afresh at every epoch with the same code
and seeds as materialized synthesis, so epoch 0 gives the materialized pixels.

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


def iter_raw(path: str | Path) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar, grouping consecutive members by key (the part of the name before the first dot)."""
    current: dict[str, Any] = {}
    with tarfile.open(path, "r") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, suffix = info.name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            current[suffix] = tar.extractfile(info).read()
    if current:
        yield current


def iter_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """Decoded samples of one shard, in stored order."""
    for raw in iter_raw(path):
        yield decode_sample(raw, str(path))


def shard_paths(root: str | Path, split: str, folds: list[int] | None = None) -> list[str]:
    """Shard files of ``split`` (and, for train, of the given folds) listed in the dataset's manifest."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text())
    return [
        str(root / "shards" / s["name"])
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


def training_stream(
    urls: list[str],
    crop: int,
    recipe=None,
    epoch: int = 0,
    seed: int = 0,
    two_crops: bool = False,
    shuffle: int = 0,
    resampled: bool = False,
):
    """A webdataset pipeline of training examples ``{"lq", "gt", ["lq2"], "task", "key"}`` as tensors.

    Shards are split by node (torch.distributed rank) and by DataLoader worker. Crops and flips come from a
    generator seeded by (seed, epoch, key), so a run is reproducible whatever the worker layout.
    """
    import webdataset as wds

    def prepare(raw: dict[str, Any]) -> dict[str, Any]:
        sample = ensure_lq(decode_sample(raw, raw.get("__url__", "?")), recipe, epoch)
        rng = np.random.default_rng([seed, epoch, int(sample["key"][:16], 16)])
        crops = random_crops(sample["gt"], sample["lq"], crop, rng, n=2 if two_crops else 1)
        example = {
            "lq": to_tensor(crops[0][0]),
            "gt": to_tensor(crops[0][1]),
            "task": sample["meta"]["task"],
            "key": sample["key"],
        }
        if two_crops:
            example["lq2"] = to_tensor(crops[1][0])
        return example

    dataset = wds.WebDataset(
        urls,
        resampled=resampled,
        shardshuffle=False if not shuffle else shuffle,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        empty_check=False,
        handler=wds.reraise_exception,
    )
    if shuffle:
        dataset = dataset.shuffle(shuffle, seed=seed * 100003 + epoch)
    return dataset.map(prepare)
