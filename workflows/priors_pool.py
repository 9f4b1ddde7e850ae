"""The priors stage's worker pool: Ray actors that each load the frozen prior models once, then compute the priors
of shard after shard (same-size images batched), restarted when a worker is lost."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from clearair.inference import to_tensor
from clearair.priors import build_priors
from synth import storage
from synth.read import iter_raw
from synth.samples import degraded, raw_members, with_priors
from synth.writer import publish_tar

Record = TypeVar("Record")
RESTARTS = 2  # a worker lost (its node, its process) is restarted, and its shard retried, this many times


@dataclass(frozen=True)
class PriorShard:
    """A shard written with priors: its name, digest, sample count and forward passes of the frozen models."""

    name: str
    sha256: str
    samples: int
    batches: int


def size_batches(images: Iterable[tuple[int, np.ndarray]], batch_size: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Batches of up to ``batch_size`` ``(index, image)`` pairs whose images have one shape: each batch as soon as
    it is full, then the partial ones. Only the images of unfinished batches are held."""
    pending: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    for index, image in images:
        group = pending.setdefault(image.shape, [])
        group.append((index, image))
        if len(group) == batch_size:
            yield pending.pop(image.shape)
    yield from pending.values()


class ShardPriors:
    """The frozen prior models, loaded once, and what they add to a shard: ``self(url, out)`` copies shard ``url``
    to ``out`` with each sample's priors (computed on its whole LQ image) added. A plain class; the stage runs it
    as a Ray actor.

    Args:
        spec_json: the ``clearair.priors`` spec as JSON.
        allow_random: allow random-init frozen parts (tiny test models).
        batch_size: images of one size per forward pass; the priors of an image do not depend on its batch (up
            to float rounding).
    """

    def __init__(self, spec_json: str, allow_random: bool, batch_size: int = 1) -> None:
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.provider = build_priors(json.loads(spec_json), allow_random=allow_random).to(self.device)
        self.batch_size = batch_size

    def priors(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        """``{name: (B, ...) float32}`` of same-size RGB uint8 images ``(H, W, 3)``."""
        import torch

        lq = torch.stack([to_tensor(image) for image in images]).to(self.device)  # (B, 3, H, W)
        with torch.inference_mode():
            return {name: value.float().cpu().numpy() for name, value in self.provider(lq).items()}

    def __call__(self, url: str, out: str) -> PriorShard:
        raws = list(iter_raw(url))
        lqs = ((i, degraded(raw, url)) for i, raw in enumerate(raws))
        batches = 0
        for batch in size_batches(lqs, self.batch_size):
            priors = self.priors([image for _, image in batch])
            for row, (i, _) in enumerate(batch):
                raws[i] = with_priors(raws[i], {name: value[row] for name, value in priors.items()})
            batches += 1
        sha, _ = publish_tar(out, [m for raw in raws for m in raw_members(raw)])
        return PriorShard(storage.name(out), sha, len(raws), batches)


class _Loads:
    """How many times a pool's workers built their shard worker (a restarted worker builds it again)."""

    def __init__(self) -> None:
        self.count = 0

    def add(self) -> None:
        self.count += 1

    def total(self) -> int:
        return self.count


class _PoolWorker:
    """One actor of the pool: ``make()`` (the expensive model load) once per process, then shard after shard."""

    def __init__(self, make: Callable[[], Callable[[str, str], Any]], loads: Any) -> None:
        import ray

        self.work = make()
        ray.get(loads.add.remote())  # before any shard it computes, so counted once all shards are back

    def shard(self, url: str, out: str) -> Any:
        return self.work(url, out)


def run_pool(
    make: Callable[[], Callable[[str, str], Record]],
    jobs: list[tuple[str, str]],
    workers: int,
    resources: dict[str, float],
) -> tuple[list[Record], int]:
    """Each ``(url, out)`` job done by one of ``workers`` actors (fewer if there are fewer jobs), the next job
    going to whichever is free; each actor calls ``make()`` once and the result for each of its jobs. A lost actor
    is restarted and its job retried, :data:`RESTARTS` times. Returns the job records and how many times ``make``
    ran."""
    import ray
    from ray.util import ActorPool

    if not jobs:
        return [], 0
    loads = ray.remote(num_cpus=0)(_Loads).remote()
    worker = ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS, **resources)(_PoolWorker)
    actors = [worker.remote(make, loads) for _ in range(min(workers, len(jobs)))]
    try:
        records = list(ActorPool(actors).map_unordered(lambda actor, job: actor.shard.remote(*job), jobs))
        return records, ray.get(loads.total.remote())
    finally:
        for actor in [*actors, loads]:
            ray.kill(actor)  # frees the GPUs now, not when the handles are collected
