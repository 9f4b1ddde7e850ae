"""Shared storage: the same code on a local directory and on an S3-compatible bucket (moto's server on 127.0.0.1)."""

from __future__ import annotations

import time

import boto3
import numpy as np
import pytest

from synth import storage
from synth.read import iter_shard, shard_paths
from tests.test_synth_run import config, run
from workflows.context import StageResult, Workdir


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_write_read_list_copy_and_remove_behave_alike(location, tmp_path):
    storage.write_json(storage.join(location, "a", "x.json"), {"k": [1, 2]})
    storage.write_bytes(storage.join(location, "a", "b", "y.bin"), b"\x00" * 3000)
    assert storage.read_json(storage.join(location, "a", "x.json")) == {"k": [1, 2]}
    assert storage.listdir(storage.join(location, "a")) == ["b", "x.json"]
    assert storage.size(storage.join(location, "a", "b", "y.bin")) == 3000
    assert storage.exists(storage.join(location, "a", "x.json"))
    assert not storage.exists(storage.join(location, "a", "nope.json"))
    assert storage.listdir(storage.join(location, "missing")) == []

    local = tmp_path / "src" / "w.bin"
    local.parent.mkdir()
    local.write_bytes(b"weights" * 1000)
    storage.put_file(local, storage.join(location, "w.bin"))
    copy = storage.local_copy(storage.join(location, "w.bin"))
    assert copy.read_bytes() == local.read_bytes()
    assert storage.sha256(storage.join(location, "w.bin")) == storage.sha256(local)

    with storage.local_output(storage.join(location, "model")) as out:
        (out / "config.json").write_text("{}")
        (out / "sub").mkdir()
        (out / "sub" / "t.bin").write_bytes(b"t")
    tree = storage.local_tree(storage.join(location, "model"))
    assert (tree / "config.json").read_text() == "{}" and (tree / "sub" / "t.bin").read_bytes() == b"t"
    assert storage.tree_size(storage.join(location, "model")) == 3

    storage.remove_tree(storage.join(location, "a"))
    assert storage.listdir(storage.join(location, "a")) == []


def test_a_failed_block_publishes_nothing(location):
    with pytest.raises(RuntimeError), storage.local_output(storage.join(location, "out")) as out:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("stage failed")
    if storage.is_remote(location):  # locally the directory is the output itself, and the stage's marker decides
        assert storage.listdir(storage.join(location, "out")) == []


def test_cached_copies_follow_a_republished_object(s3_bucket):
    """A stage rerun publishes a checkpoint of the same size under the same name: readers must see the new one."""
    uri = storage.join(s3_bucket, "ray", "train-best.ckpt")
    storage.write_bytes(uri, b"A" * 100)
    storage.write_bytes(storage.join(s3_bucket, "model", "w.bin"), b"A" * 100)
    assert storage.local_copy(uri).read_bytes() == b"A" * 100
    assert (storage.local_tree(storage.join(s3_bucket, "model")) / "w.bin").read_bytes() == b"A" * 100
    time.sleep(1.1)  # S3 timestamps have one-second resolution
    storage.write_bytes(uri, b"B" * 100)
    storage.write_bytes(storage.join(s3_bucket, "model", "w.bin"), b"B" * 100)
    assert storage.local_copy(uri).read_bytes() == b"B" * 100
    assert (storage.local_tree(storage.join(s3_bucket, "model")) / "w.bin").read_bytes() == b"B" * 100


def test_errors_name_the_location(s3_bucket):
    missing = storage.join(s3_bucket, "no", "such.json")
    with pytest.raises(FileNotFoundError, match=missing):
        storage.read_json(missing)
    with pytest.raises(OSError, match="clearair-no-such-bucket"):
        storage.write_bytes("s3://clearair-no-such-bucket/x", b"x")
    storage.write_bytes(storage.join(s3_bucket, "bad.json"), b"{not json")
    with pytest.raises(storage.StorageError, match="bad.json"):
        storage.read_json(storage.join(s3_bucket, "bad.json"))


def _objects(uri: str) -> dict[str, tuple[str, object]]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listing.get("Contents", [])}


def test_synthesis_into_a_bucket_matches_a_local_run_and_resumes(ray_session, photo_dir, tmp_path, s3_bucket):
    local, remote = tmp_path / "ds", f"{s3_bucket}/datasets/ds"
    m_local, m_remote = run(config(photo_dir, local)), run(config(photo_dir, remote))
    assert [s["sha256"] for s in m_remote["shards"]] == [s["sha256"] for s in m_local["shards"]]
    for s in m_local["shards"]:
        assert (
            storage.read_bytes(storage.join(remote, "shards", s["name"])) == (local / "shards" / s["name"]).read_bytes()
        )
    assert storage.exists(storage.join(remote, "contact_sheet.png"))

    # An interrupted run: one shard never got its completion record, and the manifest was not published.
    victim = m_remote["shards"][1]["name"].removesuffix(".tar")
    storage.remove(storage.join(remote, "state", f"{victim}.json"))
    storage.remove(storage.join(remote, "manifest.json"))
    before = _objects(remote + "/shards/")
    time.sleep(1.1)  # S3 timestamps have one-second resolution
    m_again = run(config(photo_dir, remote))
    after = _objects(remote + "/shards/")
    rewritten = {k for k in after if after[k][1] != before[k][1]}
    assert rewritten == {f"{remote.removeprefix(s3_bucket + '/')}/shards/{victim}.tar"}
    assert (
        m_again["shards"] == m_remote["shards"] and after[next(iter(rewritten))][0] == before[next(iter(rewritten))][0]
    )


def test_readers_stream_shards_from_a_bucket(ray_session, photo_dir, tmp_path, s3_bucket):
    from clearair.data import TaskIndex, restoration_loader

    local, remote = tmp_path / "ds", f"{s3_bucket}/ds"
    manifest = run(config(photo_dir, local, max_samples=10))
    run(config(photo_dir, remote, max_samples=10))
    urls_local, urls_remote = shard_paths(local, "train"), shard_paths(remote, "train")
    assert urls_remote[0].startswith("s3://") and len(urls_remote) == len(urls_local)
    for a, b in zip(urls_local, urls_remote, strict=True):
        for x, y in zip(iter_shard(a), iter_shard(b), strict=True):
            assert x["key"] == y["key"] and np.array_equal(x["lq"], y["lq"]) and np.array_equal(x["gt"], y["gt"])
    tasks = TaskIndex(manifest["counts"]["task"])
    batches = [list(restoration_loader(u, 32, 2, tasks, shuffle=0)) for u in (urls_local, urls_remote)]
    assert len(batches[0]) == len(batches[1]) > 0
    for x, y in zip(*batches, strict=True):
        assert x["key"] == y["key"] and bool((x["lq"] == y["lq"]).all())


def test_a_workdir_in_a_bucket_caches_lists_and_drops_stage_outputs(s3_bucket):
    wd = Workdir(f"{s3_bucket}/runs/a/")
    assert wd.root == f"{s3_bucket}/runs/a" and wd.cached("synth", "k" * 64) is None
    out = wd.stage_dir("synth", "k" * 64)
    storage.write_bytes(storage.join(out, "data", "shard.tar"), b"x" * 10)
    assert wd.entries() == [{"dir": "synth-kkkkkkkkkkkk", "complete": False, "bytes": 10}]
    wd.publish(StageResult("synth", "k" * 64, {"data": storage.join(out, "data")}))
    assert wd.cached("synth", "k" * 64).outputs["data"].startswith("s3://")
    assert wd.entries()[0]["complete"]
    wd.lock()
    try:
        assert wd.lock_path().exists() and not storage.is_remote(str(wd.lock_path()))
    finally:
        wd.unlock()
    assert wd.drop("synth") == ["synth-kkkkkkkkkkkk"] and wd.entries() == []


@pytest.mark.slow
def test_tiny_pipeline_on_a_bucket_tracked_by_a_postgres_backed_server(
    postgres_cluster, postgres_uri, s3_bucket, tmp_path
):
    """The cluster setup on one machine: workdir and artifacts in a bucket, MLflow server on PostgreSQL."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow import MlflowClient

    from tests.servers import start_mlflow_server
    from tests.test_pipeline_e2e import check_lineage

    tiny = str(Path(__file__).parent / "pipelines" / "tiny.yaml")
    workdir = f"{s3_bucket}/runs/tiny"
    env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with start_mlflow_server(postgres_uri, f"{s3_bucket}/mlartifacts") as server:
        cmd = [sys.executable, "-m", "workflows.cli", "run", tiny, "--workdir", workdir, "--tracking-uri", server.uri,
               "--no-progress"]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
        assert res.returncode == 0, res.stderr[-3000:]
        check_lineage(server.uri, workdir)
        again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert again.returncode == 0 and again.stdout.count("cached") == 6, again.stdout[-2000:]

        client = MlflowClient(tracking_uri=server.uri)
        exp = client.get_experiment_by_name("tiny")
        runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=500)}
        assert all(r.info.status == "FINISHED" for r in runs.values())
        artifacts = {a.path for a in client.list_artifacts(runs["evaluate"].info.run_id)}
        assert any(p.endswith(".md") for p in artifacts)

    wd = Workdir(workdir)
    assert [e["complete"] for e in wd.entries()] == [True] * 6
    (train_dir,) = [e["dir"] for e in wd.entries() if e["dir"].startswith("train-")]
    stage = storage.join(workdir, "stages", train_dir)
    assert storage.is_file(storage.join(stage, "model", "model.safetensors"))
    assert storage.is_file(storage.join(stage, "ray", "train-best.ckpt"))
    assert any(n.startswith("checkpoint_") for n in storage.listdir(storage.join(stage, "ray", "train")))
    assert _objects(f"{s3_bucket}/mlartifacts/")  # the server kept artifacts in the bucket
    (synth_dir,) = [e["dir"] for e in wd.entries() if e["dir"].startswith("synth-")]
    photo = storage.local_copy(storage.join(workdir, "stages", synth_dir, "data", "contact_sheet.png"))
    restore = [sys.executable, "-m", "workflows.cli", "restore", storage.join(stage, "model"), str(photo),
               "--out", str(tmp_path / "restored"), "--tile", "64", "--overlap", "16"]  # fmt: skip
    res = subprocess.run(restore, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and (tmp_path / "restored" / "contact_sheet.png").exists(), res.stderr[-2000:]
    dbname = postgres_uri.rsplit("/", 1)[1]
    conn = postgres_cluster.connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT run_uuid FROM runs WHERE status = 'FINISHED'")
            in_postgres = {row[0] for row in cur.fetchall()}
    finally:
        conn.close()
    assert {r.info.run_id for r in runs.values()} <= in_postgres
