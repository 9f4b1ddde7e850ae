"""Stage 3: learn the three-tier quality prompts (terrible / mediocre / excellent) on the tier shards.

Prompts train on the cross-validated tiers with task-balanced batches. They are validated on held-out tiers:
the validation and test splits restored by cross-validation (``crossval.restore_splits``), photographs the prompts
never saw, or, without those, the last quarter of the tier shards. On held-out tiers the stage reports what
``clearair score`` would say (:mod:`clearair.scoring`: the view's crop grid, and the whole image resized): 3-way
accuracy, each tier's recall, per-task accuracy, how often the clean image beats its degraded input and the
Spearman correlation of the score with the tier, plus the confusion matrix as a heatmap and a tier contact sheet
(low | medium | high per task) as artifacts. The learned contexts are saved as safetensors (no pickle), with
the view they were learned on, for the CLIP-aware loss and for ``clearair score``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from clearair.models.perceiver import PerceiverConfig
from synth import storage
from synth.tiers import tier_shard_paths
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.prompts import PerceiverJob, fit_perceiver
from workflows.stages.common import ray_ready, remote_call


def perceiver_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The full PerceiverConfig of the stage (preset + overrides) as plain types."""
    base = {"tiny": PerceiverConfig.tiny, "qclip": PerceiverConfig.qclip}.get(cfg.perceiver.preset, PerceiverConfig)()
    merged = {**asdict(base), **cfg.perceiver.perceiver}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in merged.items()}


def tier_split(tiers: str) -> tuple[list[str], list[str]]:
    """``(train, val)`` tier shards: all of them and the held-out ones, or without held-out restorations the first
    three quarters and the last quarter (one shard: the same shard for both)."""
    urls, heldout = tier_shard_paths(tiers), tier_shard_paths(tiers, heldout=True)
    if heldout:
        return urls, heldout
    held = max(1, len(urls) // 4) if len(urls) > 1 else 0
    return (urls[:-held], urls[-held:]) if held else (urls, urls)


def perceiver_job(cfg: PipelineConfig, ctx: RunContext, tiers: str) -> PerceiverJob:
    """The prompt-learning job on the tier set ``tiers``."""
    train, val = tier_split(tiers)
    p = cfg.perceiver
    return PerceiverJob(
        out=ctx.out,
        perceiver_config=perceiver_config(cfg),
        steps=p.steps,
        lr=p.lr,
        min_lr=p.min_lr,
        batch_per_tier=p.batch_per_tier,
        tasks=sorted(storage.read_json(storage.join(tiers, "manifest.json"))["tasks"]),
        train=train,
        val=val,
        seed=cfg.seed,
        use_gpu=p.use_gpu,
        allow_random_frozen=p.allow_random_frozen,
        view=p.view,
        crop=cfg.train.fit.crop,
        tracking=ctx.tracking(),
        wellposed_gain=p.wellposed_gain,
    )


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:
    tiers = inputs["crossval"].outputs["tiers"]
    job = perceiver_job(cfg, ctx, tiers)
    ray_ready(ctx)
    learned = remote_call(fit_perceiver, job, num_cpus=1, num_gpus=1 if cfg.perceiver.use_gpu else 0)
    tracker = ctx.tracker
    tracker.log_dataset(ctx.run_id, "tiers", inputs["crossval"].outputs["tiers_sha256"], tiers, "training")
    confusion = {"labels": ["low", "medium", "high"], "rows_true_cols_pred": learned.confusion}
    tracker.log_dict(ctx.run_id, confusion, "confusion_matrix.json")
    for path in (learned.prompts, *learned.figures):
        tracker.log_artifact(ctx.run_id, storage.local_copy(path))
    tracker.log_metrics(ctx.run_id, learned.metrics, step=cfg.perceiver.steps)
    outputs = {"prompts": learned.prompts, "perceiver_config": job.perceiver_config}
    return ctx.result(outputs, learned.metrics)
