"""Stage 4: frozen, expensive priors computed once per whole image, read by training instead of recomputed.

Which parts can be precomputed depends on the model. DINOv2 CLS tokens of Perceive-IR are taken on each random
training crop, so they stay on the fly. ClearAIR's priors are image-level: the quality embedding of an assessor
(the learned perceiver, or an MLLM) and the degradation embedding describe the whole degraded image, and its
region masks are cut with each crop's window. For ClearAIR this stage runs one Ray task per training shard (on
a GPU where the pipeline asks for one) and writes a copy of each shard with ``KEY.prior.<name>.npy`` members
added; training reads those (``clearair.data`` crops the masks with the image) and never runs the frozen models.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from synth import storage
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.stages.common import ray_ready

ON_THE_FLY = {
    "none": "the model needs no frozen priors",
    "dino": "DINOv2 CLS tokens are taken on each random crop, so they are computed on the fly during training",
}


@lru_cache(maxsize=2)
def _provider(spec_json: str, allow_random: bool):
    """One frozen provider per worker process and spec (loading an assessor is the expensive part)."""
    from clearair.priors import build_priors

    return build_priors(json.loads(spec_json), allow_random=allow_random)


def precompute_shard(url: str, out: str, spec_json: str, allow_random: bool) -> dict[str, Any]:
    """Copy shard ``url`` to ``out`` with each sample's priors (computed on its whole LQ image) added."""
    import io

    import numpy as np
    import torch

    from clearair.inference import to_tensor
    from synth.imageio import decode_png
    from synth.read import iter_raw
    from synth.writer import publish_tar

    provider = _provider(spec_json, allow_random)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    provider.to(device)
    members, samples = [], 0
    for raw in iter_raw(url):
        key = raw.pop("__key__")
        lq = decode_png(raw.get("lq.png") or raw["low.png"])
        with torch.inference_mode():
            priors = provider(to_tensor(lq)[None].to(device))
        for name, value in priors.items():
            buf = io.BytesIO()
            np.save(buf, value[0].float().cpu().numpy(), allow_pickle=False)
            raw[f"prior.{name}.npy"] = buf.getvalue()
        members += [(f"{key}.{suffix}", raw[suffix]) for suffix in sorted(raw) if not suffix.startswith("__")]
        samples += 1
    sha, _ = publish_tar(out, members)
    return {"name": storage.name(out), "sha256": sha, "samples": samples}


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
    import ray

    from synth.read import shard_paths
    from workflows.stages.train import resolved_priors

    reason = skip_reason(cfg)
    if reason is not None:
        ctx.tracker.set_tags(ctx.run_id, {"clearair.priors": "on_the_fly", "clearair.priors_reason": reason})
        return ctx.result({}, {}, skipped=reason)
    spec = json.dumps(resolved_priors(cfg.train.priors, inputs), sort_keys=True)
    urls = shard_paths(inputs["synth"].outputs["data"], "train")
    out = storage.join(ctx.out, "shards")
    storage.makedirs(out)
    done = set(storage.listdir(out))
    todo = [u for u in urls if storage.name(u) not in done]  # published shards of an interrupted run stay
    ray_ready(ctx)
    resources = {"num_gpus": 1} if cfg.priors.use_gpu else {"num_cpus": 1}
    task = ray.remote(max_retries=2, **resources)(precompute_shard)
    records = ray.get(
        [task.remote(u, storage.join(out, storage.name(u)), spec, cfg.train.allow_random_frozen) for u in todo]
    )
    samples = sum(r["samples"] for r in records)
    ctx.tracker.log_metrics(ctx.run_id, {"shards_written": len(records), "samples": samples}, step=0)
    ctx.tracker.set_tags(ctx.run_id, {"clearair.priors": "precomputed"})
    return ctx.result(
        {"train_shards": json.dumps(sorted(storage.join(out, storage.name(u)) for u in urls))},
        {"shards": len(urls), "samples_computed": samples},
    )
