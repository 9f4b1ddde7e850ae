"""Ray at the edge: one task per shard, a bounded number in flight, retries on worker loss, a progress bar.

``write_shard`` is a plain function; this module only schedules it. Without ``--ray-address`` a local Ray
starts with its dashboard on 127.0.0.1; with one, the driver joins that cluster (token authentication as the
cluster is configured, see the README's cluster section) and tasks spread over its nodes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from tqdm import tqdm

from synth.config import SynthConfig
from synth.errors import SynthError
from synth.plan import ShardSpec
from synth.portable import portable_cpu_env
from synth.recipes import Recipe
from synth.writer import write_shard

log = logging.getLogger(__name__)


# Worker processes keep freed memory instead of returning it to the OS after every image: without this, glibc
# page-faults afresh on each large array and every degradation runs ~1.8x slower. One library thread per worker.
WORKER_ENV = {
    "MALLOC_TRIM_THRESHOLD_": "268435456",
    "MALLOC_MMAP_THRESHOLD_": "268435456",
    "OMP_NUM_THREADS": "1",
    **portable_cpu_env(),
}


def ensure_ray(address: str | None, num_cpus: int | None = None, worker_output: bool = True) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``, set inside a Ray job) or start a new local Ray bound to loopback,
    unless this process already has one. A cluster some earlier ``ray start`` left on the machine is never joined
    by accident: without an address the run gets its own Ray. ``worker_output``: the workers' stdout and stderr
    (warnings, training progress) are printed here, prefixed with their task."""
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": WORKER_ENV}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=worker_output, runtime_env=runtime_env)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=worker_output,
            configure_logging=False,
            runtime_env=runtime_env,
        )


def pin_threads() -> None:
    """One library thread per worker process, so parallel shard tasks do not fight over cores."""
    import cv2

    cv2.setNumThreads(1)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def _write_shard_task(spec: ShardSpec, cfg: SynthConfig, recipe: Recipe, out: str) -> dict:
    import ray

    pin_threads()
    return write_shard(spec, cfg, recipe, out, {"node": ray.get_runtime_context().get_node_id()})


def run_shards(pending: list[ShardSpec], cfg: SynthConfig, recipe: Recipe, out: str, options) -> Iterator[dict]:
    """Yield each shard's state record as it completes; raise SynthError on the first filesystem error."""
    import ray

    ensure_ray(options.ray_address, options.num_workers, options.worker_output)
    task = ray.remote(num_cpus=1, max_retries=3)(_write_shard_task)
    limit = options.num_workers or max(1, int(ray.available_resources().get("CPU", 1)))
    cfg_ref, recipe_ref = ray.put(cfg), ray.put(recipe)
    queue, running = list(reversed(pending)), {}
    bar = tqdm(total=len(pending), unit="shard", desc="synth", disable=not options.progress)
    try:
        while queue or running:
            while queue and len(running) < limit:
                spec = queue.pop()
                running[task.remote(spec, cfg_ref, recipe_ref, out)] = spec.name
            ready, _ = ray.wait(list(running), num_returns=1)
            name = running.pop(ready[0])
            try:
                state = ray.get(ready[0])
            except ray.exceptions.RayError as err:
                raise SynthError(f"shard {name} failed: {err}") from None
            if "error" in state:
                raise SynthError(
                    f"cannot write shard {state['name']} in {out}: {state['error']}. Finished shards are kept; "
                    f"free space (or fix the mount) and rerun the same command to resume."
                )
            bar.update(1)
            yield state
    finally:
        bar.close()
        for ref in running:
            ray.cancel(ref)
