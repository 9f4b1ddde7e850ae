"""The priors stage's shard task: a copy of each shard with ClearAIR's image-level priors beside every sample."""

from __future__ import annotations

import json

import numpy as np

from clearair.data import TaskIndex, restoration_loader
from synth import storage
from synth.read import iter_raw, shard_paths
from tests.test_synth_run import config, run
from workflows.stages.priors import precompute_shard

SPEC = {
    "kind": "clearair",
    "assessor": {"kind": "perceiver", "config": {"clip_model": "clearair-tiny-clip", "pretrained": None, "n_ctx": 4,
                                                 "image_size": 32}, "prompts": None},  # fmt: skip
    "regions": {
        "kind": "dino_cluster",
        "n_regions": 4,
        "image_size": 32,
        "source": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8},
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
    record = precompute_shard(url, local, spec, True)
    assert precompute_shard(url, remote, spec, True) == record
    assert storage.read_bytes(remote) == storage.read_bytes(local)

    source, with_priors = list(iter_raw(url)), list(iter_raw(local))
    assert record["samples"] == len(source) == len(with_priors) > 0
    for a, b in zip(source, with_priors, strict=True):
        added = set(b) - set(a)
        assert {k: a[k] for k in a if k != "__url__"} == {k: b[k] for k in a if k != "__url__"}
        assert added == {"prior.quality_emb.npy", "prior.region_masks.npy", "prior.degradation_emb.npy"}, added
    tasks = TaskIndex(manifest["counts"]["task"])
    batch = next(iter(restoration_loader([remote], 32, 2, tasks, shuffle=0)))
    masks = batch["prior.region_masks"]
    assert masks.shape[:2] == (2, 4) and np.isfinite(batch["prior.quality_emb"].numpy()).all()  # 4 regions
