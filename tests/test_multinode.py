"""The pipeline on a real two-node Ray cluster on one machine, logging to a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY = str(Path(__file__).parent / "pipelines" / "tiny.yaml")
NODE_MEMORY = 200 * 1024 * 1024


def test_pipeline_spreads_over_two_nodes_and_trains_with_world_size_two(tmp_path):
    from mlflow import MlflowClient
    from ray.cluster_utils import Cluster

    from tests.servers import start_mlflow_server

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": NODE_MEMORY})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=NODE_MEMORY)
        cluster.wait_for_nodes()
        with start_mlflow_server(f"sqlite:///{tmp_path}/server.db", tmp_path / "artifacts") as server:
            env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
            res = subprocess.run(
                [sys.executable, "-m", "workflows.cli", "run", TINY, "--workdir", str(tmp_path / "w"),
                 "--ray-address", cluster.address, "--tracking-uri", server.uri, "--no-progress",
                 "--set", "train.fit.workers=2"],
                capture_output=True, text=True, env=env, timeout=1200)
            assert res.returncode == 0, res.stderr[-3000:]
            states = [json.loads(p.read_text()) for p in (tmp_path / "w").glob("stages/synth-*/data/state/*-0*.json")]
            assert len({s["node"] for s in states}) == 2  # synthesis tasks ran on both nodes
            client = MlflowClient(tracking_uri=server.uri)
            exp = client.get_experiment_by_name("tiny")
            (train,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'train'")
            assert train.data.tags["clearair.world_size"] == "2" and train.data.tags["clearair.nodes"] == "2"
            assert 0.0 <= train.data.metrics["train/con_coverage"] <= 1.0  # InfoNCE over both workers' batches ran
            assert train.data.metrics["train/probe_psnr"] > 0  # the probe set measured in two shares and reduced
            assert client.get_model_version_by_alias("tiny-restorer", "champion").run_id == train.info.run_id
    finally:
        cluster.shutdown()
