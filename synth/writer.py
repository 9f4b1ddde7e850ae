"""One shard = one unit of work: produce its samples and write a deterministic tar under a temporary name.

A shard is published by renaming ``.NAME.tar.partial`` to ``NAME.tar`` and only then writing its state record
``state/NAME.json`` (keys, counts, skipped files, sha256), which is the completion marker a rerun trusts. Tar
members have fixed order, mtime, owner and mode, and PNG encoding is deterministic, so the same spec gives the
same bytes on any worker. Errors of the filesystem (full disk, read-only mount) are returned, not raised, so the
driver can stop cleanly and say why; a bad image is skipped and listed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from synth import storage
from synth.config import SynthConfig
from synth.degradations import Context, apply_steps
from synth.imageio import BadImage, encode_png, fit_long_side, load_rgb
from synth.plan import SampleSpec, ShardSpec, sample_rng
from synth.recipes import Recipe
from synth.sources import load_demo_crop, load_depth, relative

TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: a fixed mtime keeps shards byte-identical across runs
SEVERITY_RANK = {"light": 0, "medium": 1, "heavy": 2}


@dataclass
class Produced:
    gt: np.ndarray
    lq: np.ndarray | None
    depth: np.ndarray | None
    meta: dict


def degrade_clean(
    gt: np.ndarray,
    task: str,
    recipe: Recipe,
    seed: int,
    key: str,
    variant: int,
    depth: np.ndarray | None,
    epoch: int = 0,
) -> tuple[np.ndarray, list[dict]]:
    """The LQ of a clean sample: the recipe's task drawn from the sample's own stream. The on-the-fly reader calls
    this with the stored GT and a later ``epoch``; at epoch 0 it reproduces the materialized shard exactly."""
    rng = sample_rng(seed, key.split("_v")[0], variant, epoch)
    steps = recipe.resolve(recipe_task(recipe, task), rng)
    return apply_steps(gt, steps, rng, Context(depth=depth))


def recipe_task(recipe: Recipe, name: str):
    for task in recipe.tasks:
        if task.name == name:
            return task
    raise KeyError(f"task {name!r} is not in recipe {recipe.name!r} (tasks: {[t.name for t in recipe.tasks]})")


def _load_pair(sample: SampleSpec, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray | None, list[str], float]:
    item = sample.item
    if item.gt.startswith("skimage:"):
        return load_demo_crop(item.gt, cfg.demo), None, [], 1.0
    gt, notes = load_rgb(item.gt)
    lq = None
    if item.lq is not None:
        lq, lq_notes = load_rgb(item.lq)
        notes += [f"input: {n}" for n in lq_notes]
        if lq.shape != gt.shape:
            raise BadImage(f"input {lq.shape[1]}x{lq.shape[0]} and target {gt.shape[1]}x{gt.shape[0]} differ in size")
        lq, _ = fit_long_side(lq, cfg.max_side)
    gt, scale = fit_long_side(gt, cfg.max_side)
    if min(gt.shape[:2]) < cfg.patch_size:
        raise BadImage(f"smaller than the patch size {cfg.patch_size} after scaling (got {gt.shape[1]}x{gt.shape[0]})")
    return gt, lq, notes, scale


def _load_depth(sample: SampleSpec, cfg: SynthConfig, shape: tuple[int, ...]) -> np.ndarray | None:
    if sample.item.depth is None:
        return None
    depth = load_depth(sample.item.depth, sample.item.gt, cfg.demo)
    if depth.shape != shape[:2]:
        depth = cv2.resize(depth, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return depth


def produce(sample: SampleSpec, cfg: SynthConfig, recipe: Recipe) -> Produced:
    """Load, convert, scale and (materialized mode, clean sources) degrade one sample."""
    gt, lq, notes, scale = _load_pair(sample, cfg)
    depth = _load_depth(sample, cfg, gt.shape)
    applied: list[dict] = []
    if lq is None and cfg.mode == "materialized":
        lq, applied = degrade_clean(gt, sample.task, recipe, cfg.seed, sample.key, sample.variant, depth)
    item = sample.item
    meta = {
        "key": sample.key,
        "dataset": item.dataset,
        "source": {
            "gt": relative(item, item.gt),
            "gt_sha256": item.gt_hash,
            "lq": relative(item, item.lq),
            "lq_sha256": item.lq_hash,
        },
        "origin": "paired" if item.lq else "synthetic",
        "recipe": recipe.name if item.lq is None else None,
        "mode": cfg.mode if item.lq is None else "materialized",
        "task": sample.task,
        "severity": _severity(applied, item.lq is not None),
        "degradations": applied,
        "split": sample.split,
        "fold": sample.fold,
        "variant": sample.variant,
        "seed": cfg.seed,
        "size": [int(gt.shape[0]), int(gt.shape[1])],
        "scale": round(scale, 6),
        "conversions": notes,
        "depth": "given" if depth is not None else None,
    }
    return Produced(gt, lq, depth, meta)


def _severity(applied: list[dict], paired: bool) -> str:
    if paired:
        return "dataset"
    if not applied:
        return "none"
    return max((a["severity"] for a in applied), key=lambda s: SEVERITY_RANK.get(s, -1))


def sample_members(p: Produced, png_level: int) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in a fixed order: depth.npy, gt.png, json, lq.png."""
    key = p.meta["key"]
    members = []
    if p.depth is not None:
        buf = io.BytesIO()
        np.save(buf, p.depth.astype(np.float32), allow_pickle=False)
        members.append((f"{key}.depth.npy", buf.getvalue()))
    members.append((f"{key}.gt.png", encode_png(p.gt, png_level)))
    members.append((f"{key}.json", json.dumps(p.meta, sort_keys=True).encode()))
    if p.lq is not None:
        members.append((f"{key}.lq.png", encode_png(p.lq, png_level)))
    return members


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.h.update(b)
        return self.f.write(b)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    """Write a deterministic tar of ``members`` to ``path``, fsync it, and return its sha256."""
    with open(path, "wb") as raw:
        hw = _HashingWriter(raw)
        with tarfile.open(fileobj=hw, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
        raw.flush()
        os.fsync(raw.fileno())
        return hw.h.hexdigest()


def publish_tar(location: str, members: list[tuple[str, bytes]]) -> tuple[str, int]:
    """Write a deterministic tar and publish it at ``location`` all-or-nothing; returns (sha256, bytes).

    See :func:`synth.storage.staged`: beside its final name and renamed, or in scratch space and uploaded.
    """
    with storage.staged(location) as tmp:
        sha = write_tar(tmp, members)
        n = tmp.stat().st_size
    return sha, n


def write_shard(spec: ShardSpec, cfg: SynthConfig, recipe: Recipe, out: str, extra: dict | None = None) -> dict:
    """Produce and publish one shard. Returns its state record, or ``{"name", "error"}`` on a filesystem error.

    ``extra`` goes into the state record only (e.g. the node that wrote it), never into the shard or manifest.
    """
    members, keys, skipped = [], [], []
    counts: dict[str, Counter] = {"task": Counter(), "degradation": Counter(), "severity": Counter()}
    for sample in spec.samples:
        try:
            produced = produce(sample, cfg, recipe)
        except BadImage as err:
            skipped.append({"path": sample.item.lq or sample.item.gt, "reason": str(err)})
            continue
        members += sample_members(produced, cfg.png_compression)
        keys.append(sample.key)
        _count(counts, produced.meta)
    try:
        sha, n = publish_tar(storage.join(out, "shards", f"{spec.name}.tar"), members)
        state = {
            "name": f"{spec.name}.tar",
            "sha256": sha,
            "bytes": n,
            "samples": len(keys),
            "split": spec.split,
            "fold": spec.fold,
            "keys": keys,
            "skipped": skipped,
            "counts": {k: dict(sorted(v.items())) for k, v in counts.items()},
            **(extra or {}),
        }
        storage.write_json(storage.join(out, "state", f"{spec.name}.json"), state)  # the completion record, last
        return state
    except OSError as err:
        return {"name": f"{spec.name}.tar", "error": f"{type(err).__name__}: {err.strerror or err}"}


def _count(counts: dict[str, Counter], meta: dict) -> None:
    counts["task"][meta["task"]] += 1
    counts["severity"][meta["severity"]] += 1
    for step in meta["degradations"]:
        counts["degradation"][step["degradation"]] += 1
    if meta["origin"] == "paired":
        counts["degradation"][f"dataset:{meta['task']}"] += 1
