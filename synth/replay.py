"""Regenerating one sample from its key: the proof that a shard can be reproduced from its sources."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synth import storage
from synth.config import SynthConfig
from synth.plan import SampleSpec
from synth.read import iter_shard
from synth.recipes import Recipe
from synth.run import SynthError, load_states, read_manifest
from synth.sources import SourceItem, demo_item
from synth.writer import produce


@dataclass
class Replay:
    key: str
    shard: str
    stored: dict
    regenerated: dict
    identical: bool


def _find(out: str, key: str) -> tuple[str, dict]:
    for state in load_states(out).values():
        if key in state["keys"]:
            for sample in iter_shard(storage.join(out, "shards", state["name"])):
                if sample["key"] == key:
                    return state["name"], sample
    raise SynthError(f"no sample with key {key!r} in {out}")


def _source_item(cfg: SynthConfig, meta: dict) -> SourceItem:
    src = meta["source"]
    if meta["dataset"] == "demo":
        return demo_item(src["gt"], src["gt_sha256"])
    for spec in cfg.sources:
        root = Path(spec.path).expanduser().resolve()
        if (spec.name or root.name) != meta["dataset"]:
            continue
        gt, lq = root / src["gt"], (root / src["lq"]) if src["lq"] else None
        for path, want in ((gt, src["gt_sha256"]), (lq, src["lq_sha256"])):
            if path is not None and (not path.exists() or storage.sha256(path) != want):
                raise SynthError(f"source file {path} is missing or changed since synthesis")
        depth = gt.with_name(gt.stem + ".depth.npy")
        return SourceItem(
            meta["dataset"],
            str(root),
            str(gt),
            src["gt_sha256"],
            str(lq) if lq else None,
            src["lq_sha256"],
            meta["task"],
            depth=str(depth) if depth.exists() else None,
        )
    raise SynthError(f"dataset {meta['dataset']!r} of the sample is not among the config's sources")


def replay(out: str | Path, key: str) -> Replay:
    """Rebuild sample ``key`` of the dataset in ``out`` from its source and compare it with the stored one."""
    out = storage.resolve(out)
    manifest = read_manifest(out)
    if manifest is None:
        raise SynthError(f"{out} has no manifest.json")
    cfg, recipe = SynthConfig.model_validate(manifest["config"]), Recipe.model_validate(manifest["recipe"])
    shard, stored = _find(out, key)
    meta = stored["meta"]
    item = _source_item(cfg, meta)
    produced = produce(SampleSpec(key, item, meta["variant"], meta["task"], meta["split"], meta["fold"]), cfg, recipe)
    regenerated = {"gt": produced.gt, "lq": produced.lq, "meta": produced.meta}
    same = np.array_equal(stored["gt"], produced.gt) and produced.meta == meta
    if produced.lq is not None:
        same = same and np.array_equal(stored["lq"], produced.lq)
    return Replay(key, shard, stored, regenerated, same)
