"""Stage 4: frozen, expensive priors computed once per whole image, read by training instead of recomputed.

Which parts can be precomputed depends on the model. DINOv2 CLS tokens of Perceive-IR are taken on each random
training crop, so they stay on the fly. ClearAIR's priors are image-level: the quality embedding of an assessor
(the learned perceiver, or an MLLM) and the degradation embedding describe the whole degraded image, and its
region masks are cut with each crop's window. For ClearAIR this stage writes a copy of each training shard with
``KEY.prior.<name>.npy`` members added; training reads those (``clearair.data`` crops the masks with the image)
and never runs the frozen models.

The shards go to a pool (:mod:`workflows.priors_pool`) of ``priors.workers`` Ray actors (one GPU each where the
pipeline asks for one): each loads the frozen models once and then takes shard after shard, so an MLLM assessor is
loaded once per worker, not once per shard. Inside a shard, images of one size go through the models
``priors.batch_size`` at a time; whole images are not resized here, so images of different sizes never share a batch
(each model resizes to its own input, but an MLLM's token count follows the image size, and SAM2's masks keep its
aspect ratio).
"""

from __future__ import annotations

import json
from functools import partial

from synth import storage
from synth.read import shard_paths
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.priors_pool import ShardPriors, run_pool
from workflows.stages.common import ray_ready, resolved_priors

ON_THE_FLY = {
    "none": "the model needs no frozen priors",
    "dino": "DINOv2 CLS tokens are taken on each random crop, so they are computed on the fly during training",
}


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
        {"train_shards": sorted(storage.join(out, storage.name(u)) for u in urls)},
        {"shards": len(urls), "samples_computed": samples},
    )
