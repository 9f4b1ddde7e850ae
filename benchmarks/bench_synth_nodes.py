"""Synthesis throughput on a one-node against a two-node Ray cluster, and the same bytes from both.

Starts a real cluster with ``ray.cluster_utils.Cluster`` on this machine (a head, plus one worker node for the
two-node case; ``--cpus-per-node`` each, small object stores), joins it as the driver, runs one warm-up synthesis
(worker processes start and import once per node), then ``--repeats`` whole ``synthesize`` runs and as many
runs of the shard phase alone, each into a fresh directory. Prints samples/s and shards/s (medians), the scaling
efficiency (two-node throughput / (2 x one-node throughput)), the nodes that wrote shards, and whether every
run's shards and manifest are byte-identical.

    python benchmarks/bench_synth_nodes.py [--variants 8] [--samples-per-shard 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

from bench_synth import reexec_with_worker_malloc, timed_synthesis

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
NODE_MEMORY = 200 * 1024 * 1024


def demo_config(out: Path, args: argparse.Namespace, max_samples: int | None = None):
    from synth.config import validate_config

    return validate_config(
        {
            "sources": [{"path": "demo", "layout": "demo"}],
            "recipe": "mixed",
            "seed": 3,
            "variants": args.variants,
            "samples_per_shard": args.samples_per_shard,
            "max_samples": max_samples,
            "out": str(out),
        }
    )


def fingerprint(out: Path) -> str:
    """One digest of every shard's bytes and, after a whole run, of the manifest (its output path left out)."""
    h = hashlib.sha256()
    for shard in sorted((out / "shards").iterdir()):
        h.update(shard.name.encode() + hashlib.sha256(shard.read_bytes()).digest())
    if (out / "manifest.json").exists():
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["config"].pop("out")
        h.update(json.dumps(manifest, sort_keys=True).encode())
    return h.hexdigest()


def writer_nodes(out: Path) -> int:
    return len({json.loads(p.read_text())["node"] for p in (out / "state").glob("*-0*.json")})


def measure(nodes: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Medians of whole runs and of shard phases on a fresh ``nodes``-node cluster, with each run's fingerprint."""
    import ray
    from ray.cluster_utils import Cluster

    from synth.distribute import ensure_ray
    from synth.run import RunOptions

    per_node = {"num_cpus": args.cpus_per_node, "object_store_memory": NODE_MEMORY}
    cluster = Cluster(initialize_head=True, head_node_args={**per_node, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**per_node)
        cluster.wait_for_nodes()
        ensure_ray(cluster.address)
        options = RunOptions(ray_address=cluster.address, progress=False)
        warmup = demo_config(tmp / f"{nodes}-warmup", args, max_samples=2 * nodes * args.samples_per_shard)
        timed_synthesis(warmup, options)  # two shards per node: every node starts its worker
        runs = {"whole": [], "shards": []}
        prints: dict[str, set[str]] = {"whole": set(), "shards": set()}
        used = set()
        for phase in ("whole", "shards"):
            for i in range(args.repeats):
                out = tmp / f"{nodes}-{phase}-{i}"
                runs[phase].append(timed_synthesis(demo_config(out, args), options, phase == "shards"))
                prints[phase].add(fingerprint(out))
                used.add(writer_nodes(out))
        ray.shutdown()
    finally:
        cluster.shutdown()
    rates = {
        phase: (
            statistics.median(samples / s for s, samples, _ in r),
            statistics.median(shards / s for s, _, shards in r),
        )
        for phase, r in runs.items()
    }
    _, samples, shards = runs["whole"][0]
    return {"rates": rates, "fingerprints": prints, "nodes_used": used, "samples": samples, "shards": shards}


def main() -> None:
    reexec_with_worker_malloc()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", type=int, default=8, help="degraded variants per demo crop (sets the size)")
    ap.add_argument("--samples-per-shard", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per phase and cluster size (median)")
    ap.add_argument("--cpus-per-node", type=int, default=1)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        one, two = measure(1, args, Path(d)), measure(2, args, Path(d))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; both clusters run on this one machine, each node a "
        f"set of processes with {args.cpus_per_node} CPU; 1-min load average {load:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after"
    )
    print(
        f"workload: demo source, mixed recipe, {one['samples']} samples of 128x128 in {one['shards']} shards; "
        f"median of {args.repeats} runs after a warm-up"
    )
    print("| phase | 1 node samples/s | 2 nodes samples/s | 1 node shards/s | 2 nodes shards/s | scaling efficiency |")
    print("|---|---|---|---|---|---|")
    for phase, label in (("whole", "whole synthesize() run"), ("shards", "shard phase (Ray tasks)")):
        (s1, h1), (s2, h2) = one["rates"][phase], two["rates"][phase]
        print(f"| {label} | {s1:.1f} | {s2:.1f} | {h1:.2f} | {h2:.2f} | {s2 / (2 * s1):.2f} |")
    same = all(len(one["fingerprints"][p] | two["fingerprints"][p]) == 1 for p in ("whole", "shards"))
    print(f"nodes that wrote shards: 1-node cluster {sorted(one['nodes_used'])}, 2-node {sorted(two['nodes_used'])}")
    print(f"shards and manifests byte-identical across all runs on both clusters: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
