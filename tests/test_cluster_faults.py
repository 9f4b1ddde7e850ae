"""Faults on a real two-node Ray cluster on one machine: a node lost mid-synthesis, a training worker killed.

Each test starts a head and a worker node (one CPU each, small object stores) with ``ray.cluster_utils.Cluster``
and drives the work from a separate process, as a user's driver would. Run as a script, this module is that
driver for the training test: ``python -m tests.test_cluster_faults ADDRESS ROOT STEPS``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
NODE_MEMORY = 200 * 1024 * 1024
TRAIN_STEPS, VAL_EVERY = 60, 10
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def two_nodes() -> Iterator[tuple]:
    """A head and one worker node; the head's dashboard on a free port (the state API needs one)."""
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 1, "object_store_memory": NODE_MEMORY, "dashboard_port": free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        worker = cluster.add_node(num_cpus=1, object_store_memory=NODE_MEMORY)
        cluster.wait_for_nodes()
        yield cluster, worker
    finally:
        cluster.shutdown()


def wait_for(condition: Callable[[], object], proc: subprocess.Popen, timeout: float = 240) -> object:
    """Poll ``condition`` until it returns something truthy; fail if ``proc`` ends first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := condition():
            return value
        assert proc.poll() is None, f"the driver ended (rc {proc.returncode}) before the fault could be injected"
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the moment to inject the fault")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- a node removed while it writes shards ----------------------------------------------------------------------


def synth_cli(out: Path, *args: str) -> list[str]:
    # 20 samples a shard: a shard task runs for seconds, longer than the state API takes to report it RUNNING
    # (with 8, a task could finish between that report and the node's removal, and nothing was lost)
    flags = "--source demo --recipe mixed --seed 3 --samples-per-shard 20 --variants 2 --no-progress".split()
    return [sys.executable, "-m", "workflows.cli", "synth", *flags, "--out", str(out), *args]


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").iterdir())}


def shards_written_on(out: Path, node_id: str) -> int:
    states = [json.loads(p.read_text()) for p in (out / "state").glob("*-0*.json")] if (out / "state").exists() else []
    return sum(s.get("node") == node_id for s in states)


# how the state API can name a task attempt lost with its node: NODE_DIED when the GCS marks the node dead first,
# WORKER_DIED when the owner sees the worker's connection drop first
DIED_WITH_NODE = ("NODE_DIED", "WORKER_DIED")


def running_on(address: str, node_id: str) -> list[int]:
    """Worker pids of the shard tasks the state API reports RUNNING on ``node_id``."""
    from ray.util.state import list_tasks

    filters = [("func_or_class_name", "=", "_write_shard_task"), ("state", "=", "RUNNING"), ("node_id", "=", node_id)]
    tasks = list_tasks(address=address, filters=filters, detail=True, limit=10, raise_on_missing_output=False)
    return [t.worker_pid for t in tasks if t.worker_pid]


def shard_attempts(address: str) -> list:
    from ray.util.state import list_tasks

    filters = [("func_or_class_name", "=", "_write_shard_task")]
    return list_tasks(address=address, filters=filters, detail=True, limit=1000, raise_on_missing_output=False)


def test_node_removed_mid_synthesis_gives_the_shards_of_an_undisturbed_run(tmp_path):
    out = tmp_path / "ds"  # both runs write to the same path, so even the manifests' configs agree
    subprocess.run(synth_cli(out), env=ENV, cwd=REPO, check=True, timeout=300)  # reference: its own local Ray
    reference = out.rename(tmp_path / "reference")
    with two_nodes() as (cluster, worker):
        proc = subprocess.Popen(
            synth_cli(out, "--ray-address", cluster.address), env=ENV, cwd=REPO, start_new_session=True
        )
        try:
            # a shard already written there, and another one the cluster knows is running there: its worker process
            # is killed first, then the node, so the fault always hits a task mid-write (removing the node alone
            # once lost nothing on CI: the reported task had finished in the state API's reporting lag)
            node = worker.node_id
            pids = wait_for(lambda: shards_written_on(out, node) and running_on(cluster.address, node), proc)
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            cluster.remove_node(worker, allow_graceful=False)  # raylet killed; its other workers die with it
            assert proc.wait(timeout=300) == 0
        finally:
            stop(proc)
        # the failed attempt's event reaches the state API asynchronously: give it a few seconds to land
        deadline = time.time() + 30
        while True:
            tasks = shard_attempts(cluster.address)
            lost = [t for t in tasks if t.state == "FAILED" and t.error_type in DIED_WITH_NODE]
            if lost or time.time() > deadline:
                break
            time.sleep(1)
    seen = [(t.attempt_number, t.state, t.error_type, t.node_id) for t in tasks if t.state != "FINISHED"]
    assert lost and all(t.node_id == worker.node_id for t in lost), seen  # a shard task died with its node ...
    retried = {t.task_id for t in tasks if t.attempt_number > 0 and t.state == "FINISHED"}
    assert {t.task_id for t in lost} <= retried  # ... and its retry finished elsewhere
    assert shard_digests(out) == shard_digests(reference)  # every shard, no partial file left behind
    assert (out / "manifest.json").read_text() == (reference / "manifest.json").read_text()
    assert 0 < shards_written_on(out, worker.node_id) < len(shard_digests(out))


# --- a training worker killed after a checkpoint -----------------------------------------------------------------


def train_on_cluster(address: str, root: Path, steps: int) -> None:
    """The driver of the training test: tiny shards, then a 2-worker ``fit_restorer`` on the cluster."""
    from clearair.specs import NetworkSpec, OptimSpec, RestorerSpec
    from synth.config import validate_config
    from synth.read import shard_paths
    from synth.run import RunOptions, synthesize
    from workflows.config import Fit
    from workflows.records import TrainingData
    from workflows.training import fit_restorer

    demo = {"sources": [{"path": "demo", "layout": "demo"}], "demo": {"long_side": 256, "crop": 64}}
    sizes = {"seed": 1, "max_samples": 48, "patch_size": 32, "samples_per_shard": 8}
    cfg = validate_config({**demo, **sizes, "recipe": "3task", "out": str(root / "data")})
    manifest = synthesize(cfg, RunOptions(ray_address=address, progress=False))
    data = TrainingData(shard_paths(cfg.out, "train"), shard_paths(cfg.out, "val"), sorted(manifest["counts"]["task"]))
    fit = Fit(steps=steps, global_batch=4, crop=32, val_every=VAL_EVERY, val_images=2, val_crop=64, workers=2)
    spec = RestorerSpec(NetworkSpec("restormer", preset="tiny"), OptimSpec(steps, lr=2e-3))  # l1, no priors
    result = fit_restorer("train", str(root / "ray"), spec, data, fit.model_dump(), seed=1)
    (root / "result.json").write_text(json.dumps(asdict(result)))


def registered_checkpoint(run_dir: Path) -> dict | None:
    """The latest checkpoint the Ray Train controller has registered (the one a restarted worker group gets)."""
    try:
        return json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):
        return None


def train_log_messages(cluster) -> list[str]:
    logs = Path(cluster.head_node.get_session_dir_path()) / "logs" / "train"
    return [json.loads(line)["message"] for p in sorted(logs.glob("*.log")) for line in p.read_text().splitlines()]


def test_killed_training_worker_resumes_from_the_registered_checkpoint(tmp_path):
    """SIGKILL the training worker on the worker node once the controller has registered a checkpoint (a checkpoint
    directory on disk is not enough: killed before registration, the group restarts from scratch). Removing the node
    instead would leave one CPU for two 1-CPU workers: the restarted group could not be placed. ``max_failures``: 2."""
    import torch

    run_dir = tmp_path / "ray" / "train"
    with two_nodes() as (cluster, worker):
        from ray.util.state import list_actors

        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.test_cluster_faults", cluster.address, str(tmp_path), str(TRAIN_STEPS)],
            env=ENV,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            before = wait_for(lambda: registered_checkpoint(run_dir), proc, timeout=400)
            workers = list_actors(
                address=cluster.address,
                detail=True,
                raise_on_missing_output=False,
                filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
            )
            assert len(workers) == 2 and {w.node_id for w in workers} == {cluster.head_node.node_id, worker.node_id}
            (victim,) = [w for w in workers if w.node_id == worker.node_id]
            os.kill(victim.pid, signal.SIGKILL)
            assert proc.wait(timeout=400) == 0
        finally:
            stop(proc)
        messages = train_log_messages(cluster)
    assert before["metrics"]["step"] < TRAIN_STEPS  # killed mid-run
    assert any("[FailurePolicy] RETRY" in m for m in messages)  # the controller saw the death and restarted
    (restored,) = [Path(m.split()[-1]).parent for m in messages if m.startswith("Restored all states from")]
    assert restored.parent == run_dir and restored.name.startswith("checkpoint_")
    assert restored.name >= before["checkpoint_dir_name"]  # a registered checkpoint; timestamped names sort in time
    final = registered_checkpoint(run_dir)
    ckpt = torch.load(run_dir / final["checkpoint_dir_name"] / "checkpoint.ckpt", map_location="cpu", weights_only=True)
    assert final["metrics"]["step"] == ckpt["global_step"] == TRAIN_STEPS
    assert Path(json.loads((tmp_path / "result.json").read_text())["checkpoint"]).exists()


if __name__ == "__main__":
    train_on_cluster(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
