"""Stage 5: train the restorer (Perceive-IR with its quality-aware loss, ClearAIR, or plain L1) on Ray Train.

Perceive-IR trains on the tier shards, whose medium tier gives the difficulty-adaptive loss its negatives, with
the learned prompts frozen for the CLIP-aware loss. The best checkpoint by validation PSNR is exported as
safetensors + config (with the priors it needs and its provenance) and registered in MLflow under an alias.
"""

from __future__ import annotations

from synth import storage
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.restorer_job import export_restorer, restorer_spec, training_data
from workflows.stages.common import ray_ready
from workflows.training import fit_restorer


def log_datasets(ctx: RunContext, inputs: dict[str, StageResult], tiers: bool) -> None:
    """The tier set (when trained on) and the synth dataset (validated on) as the stage run's dataset inputs."""
    if tiers:
        cv = inputs["crossval"].outputs
        ctx.tracker.log_dataset(ctx.run_id, "tiers", cv["tiers_sha256"], cv["tiers"], "training")
    synth = inputs["synth"].outputs
    ctx.tracker.log_dataset(ctx.run_id, "synth", synth["manifest_sha256"], synth["data"], "validation")


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:
    spec, data = restorer_spec(cfg, inputs), training_data(cfg, inputs)
    ray_ready(ctx)
    ray_storage, fit_cfg = storage.join(ctx.out, "ray"), cfg.train.fit.model_dump()
    fit = fit_restorer("train", ray_storage, spec, data, fit_cfg, cfg.seed, ctx.tracking(), progress=ctx.progress)
    export = export_restorer(cfg, ctx, spec, fit)
    log_datasets(ctx, inputs, data.tiers)
    version = ctx.tracker.register_model(
        ctx.run_id, storage.local_tree(export), cfg.tracking.registered_model, cfg.tracking.alias
    )
    metrics = {"best_val_psnr": fit.val_psnr, "best_step": fit.step}
    ctx.tracker.log_metrics(ctx.run_id, metrics, step=cfg.train.fit.steps)
    return ctx.result({"model": export, "checkpoint": fit.checkpoint, "registered_version": str(version)}, metrics)
