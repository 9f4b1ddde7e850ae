"""Stage 4: frozen, expensive priors computed once per whole image, read by training instead of recomputed.

Which parts can be precomputed depends on the model. DINOv2 CLS tokens of Perceive-IR are taken on each random
training crop, so they stay on the fly. ClearAIR's priors are image-level: the quality embedding of an assessor
(the learned perceiver, or an MLLM) and the degradation embedding describe the whole degraded image, and its
region masks are cut with each crop's window. For ClearAIR this stage writes a copy of each training shard with
``KEY.prior.<name>.npy`` members added; training reads those (``clearair.data`` crops the masks with the image)
and never runs the frozen models.

The shards go to a pool of ``priors.workers`` Ray actors (one GPU each where the pipeline asks for one): each
loads the frozen models once and then takes shard after shard, so an MLLM assessor is loaded once per worker, not
once per shard. Inside a shard, images of one size go through the models ``priors.batch_size`` at a time; whole
images are not resized here, so images of different sizes never share a batch (each model resizes to its own
input, but an MLLM's token count follows the image size, and SAM2's masks keep its aspect ratio).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from clearair.inference import to_tensor
from clearair.priors import build_priors
from synth import storage
from synth.read import iter_raw, shard_paths
from synth.samples import degraded, raw_members, with_priors
from synth.writer import publish_tar
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.stages.common import ray_ready, resolved_priors

ON_THE_FLY = {
    "none": "the model needs no frozen priors",
    "dino": "DINOv2 CLS tokens are taken on each random crop, so they are computed on the fly during training",
}
RESTARTS = 2  # a worker lost (its node, its process) is restarted, and its shard retried, this many times
Record = TypeVar("Record")


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


def skip_reason(cfg: PipelineConfig) -> str | None:
    kind = cfg.train.priors.get("kind", "none")
    if not cfg.priors.enabled:
        return "disabled in the pipeline (priors.enabled: false): computed on the fly"
    if kind in ON_THE_FLY:
        return ON_THE_FLY[kind]
    if cfg.train.loss == "perceive_ir":
        return "image-level priors with tier-shard training are computed on the fly"
    return None


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:

    reason = skip_reason(cfg)
    if reason is not None:
        ctx.tracker.set_tags(ctx.run_id, {"clearair.priors": "on_the_fly", "clearair.priors_reason": reason})
        return ctx.result({}, {}, skipped=reason)
    spec = json.dumps(resolved_priors(cfg.train.priors, inputs), sort_keys=True)
    urls = shard_paths(inputs["synth"].outputs["data"], "train")
    out = storage.join(ctx.out, "shards")
    storage.makedirs(out)
    done = set(storage.listdir(out))
    todo = [(u, storage.join(out, storage.name(u))) for u in urls if storage.name(u) not in done]  # resumes
    ray_ready(ctx)
    resources = {"num_cpus": 1, "num_gpus": 1} if cfg.priors.use_gpu else {"num_cpus": 1}
    make = partial(ShardPriors, spec, cfg.train.allow_random_frozen, cfg.priors.batch_size)
    records, loads = run_pool(make, todo, cfg.priors.workers, resources)
    samples = sum(r.samples for r in records)
    batches = sum(r.batches for r in records)
    metrics = {"shards_written": len(records), "samples": samples, "batches": batches, "model_loads": loads}
    ctx.tracker.log_metrics(ctx.run_id, metrics, step=0)
    ctx.tracker.set_tags(ctx.run_id, {"clearair.priors": "precomputed"})
    return ctx.result(
        {"train_shards": json.dumps(sorted(storage.join(out, storage.name(u)) for u in urls))},
        {"shards": len(urls), "samples_computed": samples},
    )
