"""Stage 1: synthesise the dataset's shards (resumes inside its own output like ``clearair synth``)."""

from __future__ import annotations

from synth import storage
from synth.config import SynthConfig
from synth.run import RunOptions, synthesize
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.stages.common import ray_ready


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:
    data = storage.join(ctx.out, "data")
    ray_ready(ctx)
    synth_cfg = SynthConfig(**cfg.synth.model_dump(), out=data)
    manifest = synthesize(
        synth_cfg, RunOptions(ray_address=ctx.ray_address, progress=ctx.progress, worker_output=ctx.worker_output)
    )
    digest = storage.sha256(storage.join(data, "manifest.json"))
    tracker = ctx.tracker
    tracker.log_dataset(
        ctx.run_id,
        "synth",
        digest,
        data,
        "training",
        {"samples": manifest["samples"], "shards": len(manifest["shards"])},
    )
    for name in ("manifest.json", "contact_sheet.png"):
        if storage.exists(path := storage.join(data, name)):
            tracker.log_artifact(ctx.run_id, storage.local_copy(path))
    splits = manifest["counts"]["split"]
    metrics = {
        "samples": manifest["samples"],
        "skipped": len(manifest["skipped"]),
        **{f"samples_{k}": v for k, v in splits.items()},
    }
    tracker.log_metrics(ctx.run_id, metrics, step=0)
    return ctx.result({"data": data, "manifest_sha256": digest}, metrics)
