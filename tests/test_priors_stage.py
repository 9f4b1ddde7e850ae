"""The priors stage: a copy of each shard with ClearAIR's image-level priors beside every sample, computed by a pool
of workers that load the frozen models once each and batch images of one size."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from clearair.data import TaskIndex, restoration_loader
from clearair.inference import to_tensor
from clearair.priors import build_priors
from synth import storage
from synth.config import ConfigError
from synth.imageio import decode_png
from synth.read import iter_raw, shard_paths
from tests.conftest import textured
from tests.test_synth_run import config, run
from tests.tiny import REGION_DINO
from workflows import priors_pool
from workflows.config import load_pipeline
from workflows.context import RunContext, StageResult, Workdir
from workflows.pipeline import stage_keys
from workflows.stages import priors as priors_stage

SPEC = {
    "kind": "clearair",
    "assessor": {
        "kind": "perceiver",
        "config": {"clip_model": "clearair-tiny-clip", "pretrained": None, "n_ctx": 4, "image_size": 32},
        "prompts": None,
    },  # fmt: skip
    "regions": {
        "kind": "dino_cluster",
        "n_regions": 4,
        "image_size": 32,
        "source": REGION_DINO,
    },
    "degradation": {"kind": "cfe_perceiver", "cfe": {"channels": [8, 8, 16, 16], "out_dim": 16}},
}


def test_prior_shards_keep_every_member_add_priors_and_are_the_same_in_a_bucket(
    ray_session, photo_dir, tmp_path, s3_bucket
):
    manifest = run(config(photo_dir, tmp_path / "ds", max_samples=6))
    (url, *_) = shard_paths(tmp_path / "ds", "train")
    spec = json.dumps(SPEC, sort_keys=True)
    local, remote = str(tmp_path / "priors" / "a.tar"), f"{s3_bucket}/priors/a.tar"
    shard_priors = priors_pool.ShardPriors(spec, True)  # the models loaded once for both copies
    record = shard_priors(url, local)
    assert shard_priors(url, remote) == record
    assert storage.read_bytes(remote) == storage.read_bytes(local)

    source, with_priors = list(iter_raw(url)), list(iter_raw(local))
    assert record.samples == len(source) == len(with_priors) > 0
    for a, b in zip(source, with_priors, strict=True):
        added = set(b) - set(a)
        assert {k: a[k] for k in a if k != "__url__"} == {k: b[k] for k in a if k != "__url__"}
        assert added == {"prior.quality_emb.npy", "prior.region_masks.npy", "prior.degradation_emb.npy"}, added
    tasks = TaskIndex(manifest["counts"]["task"])
    batch = next(iter(restoration_loader([remote], 32, 2, tasks, shuffle=0)))
    masks = batch["prior.region_masks"]
    assert masks.shape[:2] == (2, 4) and np.isfinite(batch["prior.quality_emb"].numpy()).all()  # 4 regions


# --- the stage: a pool of workers that load the models once -------------------------------------------------------

TINY = str(Path(__file__).parent / "pipelines" / "tiny.yaml")
CLEARAIR = {"train.model": {"arch": "clearair", "preset": "tiny"}, "train.loss": "clearair", "train.loss_weights": {},
            "train.priors": SPEC}  # fmt: skip
SIZES = ((160, 200), (128, 176))  # shards mix them: batches hold one size


class Recorder:
    """The tracker calls the stage makes, recorded."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.tags: dict[str, str] = {}

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self.metrics.update(metrics)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.tags.update(tags)


@pytest.fixture(scope="module")
def dataset(ray_session, tmp_path_factory) -> Path:
    """A synthesized dataset with more training shards than workers, its images of two sizes."""
    root = tmp_path_factory.mktemp("priors")
    (root / "photos").mkdir()
    for i in range(8):
        Image.fromarray(textured(*SIZES[i % 2], seed=i)).save(root / "photos" / f"img{i}.png")
    run(config(root / "photos", root / "ds", samples_per_shard=3))
    return root / "ds"


def run_stage(dataset: Path, out: Path, **priors: int) -> Recorder:
    cfg = load_pipeline(TINY, {**CLEARAIR, **{f"priors.{k}": v for k, v in priors.items()}})
    tracker = Recorder()
    ctx = RunContext(Workdir(out.parent), "", "priors", tracker=tracker, stage="priors", out=str(out), run_id="r")
    result = priors_stage.run(cfg, ctx, {"synth": StageResult("synth", "k" * 64, {"data": str(dataset)})})
    assert [storage.name(u) for u in result.outputs["train_shards"]] == names(dataset)
    return tracker


def names(dataset: Path) -> list[str]:
    return sorted(storage.name(u) for u in shard_paths(dataset, "train"))


def forward_passes(urls: list[str], batch_size: int) -> int:
    """Batches of up to ``batch_size`` images of one size in each shard."""
    sizes = [Counter(decode_png(raw["lq.png"]).shape for raw in iter_raw(url)) for url in urls]
    return sum(-(-n // batch_size) for shard in sizes for n in shard.values())


def priors_of(shard: Path) -> dict[str, dict[str, bytes]]:
    return {raw["__key__"]: {k: v for k, v in raw.items() if k.startswith("prior.")} for raw in iter_raw(shard)}


def one_image_at_a_time(url: str) -> dict[str, dict[str, bytes]]:
    """Each sample's prior members as the per-shard task before the pool wrote them: one image per forward pass,
    in a Ray worker (whose CPU kernels, capped at AVX2, round as the pool's do)."""
    return ray.get(ray.remote(_one_image_at_a_time).remote(url))


def _one_image_at_a_time(url: str) -> dict[str, dict[str, bytes]]:
    provider = build_priors(SPEC, allow_random=True)
    found = {}
    for raw in iter_raw(url):
        with torch.inference_mode():
            priors = provider(to_tensor(decode_png(raw["lq.png"]))[None])
        found[raw["__key__"]] = {f"prior.{k}.npy": npy_bytes(v[0].float().numpy()) for k, v in priors.items()}
    return found


def npy_bytes(value: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=False)
    return buf.getvalue()


def assert_close(a: dict[str, dict[str, bytes]], b: dict[str, dict[str, bytes]]) -> None:
    assert a.keys() == b.keys() and all(a[k].keys() == b[k].keys() for k in a)
    for key in a:
        for name in a[key]:
            x, y = (np.load(io.BytesIO(d[key][name])) for d in (a, b))
            assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, (key, name)
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=f"{key} {name}")


@pytest.fixture(scope="module")
def pooled(dataset, tmp_path_factory) -> tuple[Path, Recorder]:
    """The stage run by 2 workers, 4 images per batch."""
    out = tmp_path_factory.mktemp("pooled") / "shards"
    return out, run_stage(dataset, out.parent, workers=2, batch_size=4)


def test_each_worker_loads_the_models_once_and_takes_many_shards(dataset, pooled):
    _, tracker = pooled
    urls = shard_paths(dataset, "train")
    samples, batches = sum(1 for url in urls for _ in iter_raw(url)), forward_passes(urls, 4)
    assert len(urls) > 2 and samples > batches
    assert tracker.metrics == {"shards_written": len(urls), "samples": samples, "batches": batches, "model_loads": 2}
    assert tracker.tags == {"clearair.priors": "precomputed"}


def test_pooled_shards_are_the_shards_computed_alone(dataset, pooled):
    out, _ = pooled
    mixed = 0
    for url in shard_paths(dataset, "train"):
        source, written = list(iter_raw(url)), list(iter_raw(out / storage.name(url)))
        assert [s["__key__"] for s in source] == [w["__key__"] for w in written]  # the order of the source shard
        for s, w in zip(source, written, strict=True):
            assert {k: v for k, v in w.items() if not k.startswith(("prior.", "__url__"))} == {
                k: v for k, v in s.items() if k != "__url__"
            }
        assert_close(priors_of(out / storage.name(url)), one_image_at_a_time(url))
        mixed += len({decode_png(s["lq.png"]).shape for s in source}) > 1
    assert mixed  # a shard of two sizes went through batches of one size


def test_batch_size_changes_no_prior_and_one_image_per_batch_writes_the_same_bytes(dataset, pooled, tmp_path):
    out, _ = pooled
    tracker = run_stage(dataset, tmp_path, workers=1, batch_size=1)
    assert tracker.metrics["model_loads"] == 1 and tracker.metrics["batches"] == tracker.metrics["samples"]
    for url in shard_paths(dataset, "train"):
        single = priors_of(tmp_path / "shards" / storage.name(url))
        assert single == one_image_at_a_time(url)  # byte for byte: what the per-shard task wrote
        assert_close(priors_of(out / storage.name(url)), single)


def test_an_interrupted_run_computes_only_the_shards_not_yet_published(dataset, pooled, tmp_path):
    out, _ = pooled
    shutil.copytree(out, tmp_path / "shards")
    kept, *lost = names(dataset)
    for name in lost:
        (tmp_path / "shards" / name).unlink()
    (tmp_path / "shards" / f".{lost[0]}.partial").write_bytes(b"half a tar")  # what a killed worker leaves
    before = (tmp_path / "shards" / kept).stat().st_mtime_ns
    tracker = run_stage(dataset, tmp_path, workers=2, batch_size=4)
    assert tracker.metrics["shards_written"] == len(lost) and tracker.metrics["model_loads"] == min(2, len(lost))
    assert (tmp_path / "shards" / kept).stat().st_mtime_ns == before  # not rewritten
    for name in names(dataset):
        assert (tmp_path / "shards" / name).read_bytes() == (out / name).read_bytes(), name


def test_a_worker_lost_mid_run_is_restarted_and_its_shard_retried(dataset, pooled, tmp_path, monkeypatch):
    out, _ = pooled
    crashed = tmp_path / "crashed"

    class DiesOnce(priors_pool.ShardPriors):  # defined here, so Ray ships it by value to the worker
        def __call__(self, url: str, out: str) -> priors_pool.PriorShard:
            if not crashed.exists():
                crashed.touch()
                os._exit(1)  # the worker process dies mid-shard, as on a lost node
            return super().__call__(url, out)

    monkeypatch.setattr(priors_stage, "ShardPriors", DiesOnce)  # the name the stage builds its pool from
    tracker = run_stage(dataset, tmp_path, workers=1, batch_size=4)
    assert crashed.exists() and tracker.metrics["shards_written"] == len(names(dataset))
    assert tracker.metrics["model_loads"] == 2  # the first load and the restarted worker's
    for name in names(dataset):
        assert (tmp_path / "shards" / name).read_bytes() == (out / name).read_bytes(), name


def test_size_batches_hold_one_size_and_keep_every_image():
    images = [(i, np.zeros(SIZES[i % 3 == 0] + (3,), np.uint8)) for i in range(10)]
    batches = list(priors_pool.size_batches(images, 3))
    assert sorted(i for b in batches for i, _ in b) == list(range(10))
    assert all(len(b) <= 3 and len({a.shape for _, a in b}) == 1 for b in batches)
    assert [[i for i, _ in b] for b in batches] == [[1, 2, 4], [0, 3, 6], [5, 7, 8], [9]]  # full ones first


@pytest.mark.parametrize("key", ["priors.batch_size", "priors.workers"])
@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_a_bad_pool_setting_is_refused_before_any_stage_naming_its_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_pipeline(TINY, {key: value})


def test_the_worker_count_leaves_the_cache_key_alone():
    base = stage_keys(load_pipeline(TINY, CLEARAIR))
    assert stage_keys(load_pipeline(TINY, {**CLEARAIR, "priors.workers": 4})) == base  # a resumed run may differ
    assert stage_keys(load_pipeline(TINY, {**CLEARAIR, "priors.batch_size": 2}))["priors"] != base["priors"]
