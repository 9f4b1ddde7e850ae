"""Stage 2: K-fold cross-validation produces the medium quality tiers from held-out restorations.

For fold k a restorer is trained (Ray Train) on the training shards of every other fold, then restores the
shards of fold k, whole images (tiled when large). A fold's medium tier therefore never comes from a restorer
that saw it; ``fold<k>/done.json`` records which shards trained it and which it restored. Each further model of
``crossval.models`` (a plain restorer: the pixel loss alone, no priors) is trained beside it on the same shards
(Ray Train run ``fold<k>-m<i>``) and gives every sample one more medium tier (``medium<i>``, :mod:`synth.tiers`),
as Perceive-IR learns "medium" from several restorers' outputs. Folds run as
parallel Ray tasks when ``parallel_folds`` and the cluster has room, each logging a nested MLflow run. The tier
set (``tiers/*.tar`` + ``tiers/manifest.json``) is a versioned dataset: its manifest digest is logged as input.

With ``restore_splits`` the restorer of fold 0 (which saw no validation or test image) also restores those
splits into tier shards named after their source (``val-000000.tar``): held-out tiers on which the perceiver
stage reports, never trained on. The manifest records every shard's split and, per task, the margin of each
medium tier over the low one; a task whose margin is below ``min_margin`` dB gets a warning (its tiers are hard
to tell apart, so prompts learned on them mean little).
"""

from __future__ import annotations

import logging
from typing import Any

from clearair.data import check_resample
from synth import storage
from synth.read import shard_paths
from synth.tiers import margin_name, mean_psnr, medium_tiers, tier_manifest
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.folds import FoldJob, fold_restorer_spec, model_label, plain_restorer_spec, run_folds
from workflows.stages.common import ray_ready

log = logging.getLogger(__name__)


def warn_on_margins(tasks: dict[str, dict[str, float]], min_margin: float, mediums: list[str]) -> None:
    """A warning per task and medium tier (``mediums``: their restorers) less than ``min_margin`` dB above the
    task's low tier."""
    for task, row in tasks.items():
        for tier, label in zip(medium_tiers(len(mediums)), mediums, strict=True):
            if row[margin_name(tier)] < min_margin:
                log.warning(
                    "crossval: the %s tier of %s is only %.2f dB above its low tier (%.2f -> %.2f dB; want >= %.1f): "
                    "its tiers are hard to tell apart; train the fold restorers (%s) longer (crossval.fit.steps)",
                    tier, task, row[margin_name(tier)], row["psnr_low"], row[f"psnr_{tier}"], min_margin, label,
                )  # fmt: skip


def fold_tier_manifest(records: list[dict[str, Any]], source_digest: str, mediums: list[str]) -> dict[str, Any]:
    """The tier manifest (:func:`synth.tiers.tier_manifest`) of the fold ``records``, whose restorers ``mediums``
    describes."""
    shards = [s for r in records for s in r["tier_shards"]]
    keep = ("fold", "trained_on", "restored", "psnr_low", "psnr_medium", "val_psnr", "models")
    return tier_manifest(shards, [{k: r[k] for k in keep if k in r} for r in records], source_digest, mediums)


def tier_metrics(manifest: dict[str, Any], trained: list[dict]) -> dict[str, float]:
    """The stage's metrics: PSNRs of the ``trained`` rows per tier, and per task each medium's margin
    (``margin.<task>`` the first's, ``margin<i>.<task>`` the others')."""
    tiers = medium_tiers(len(manifest["mediums"]))
    return {
        "tier_samples": len(trained),
        "psnr_low": mean_psnr(trained, "low"),
        **{f"psnr_{tier}": mean_psnr(trained, tier) for tier in tiers},
        **{f"{margin_name(t)}.{task}": row[margin_name(t)] for t in tiers for task, row in manifest["tasks"].items()},
    }


def fold_job(cfg: PipelineConfig, ctx: RunContext, data: str, task_counts: dict[str, int]) -> FoldJob:
    """The folds' job on the synth dataset ``data``, whose manifest counts ``task_counts`` samples per task; a
    misspelt ``crossval.resample`` task fails here, not in a Ray task."""
    cv = cfg.crossval
    return FoldJob(
        out=ctx.out,
        data=data,
        folds=cfg.synth.splits.folds,
        val=shard_paths(data, "val"),
        tasks=sorted(task_counts),
        specs=[fold_restorer_spec(cfg), *(plain_restorer_spec(cfg, model) for model in cv.models)],
        model_labels=[model_label(spec) for spec in (cv.model, *cv.models)],
        fit=cv.fit.model_dump(),
        seed=cfg.seed,
        tile=cv.tile,
        overlap=cv.overlap,
        restore_splits=list(cv.restore_splits),
        resample=check_resample(cv.resample, task_counts),
        progress=ctx.progress,
        tracking=ctx.tracking(),
    )


def log_datasets(ctx: RunContext, synth: StageResult, tiers: str, digest: str, samples: int) -> None:
    """The synth dataset trained on and the tier set made, as the stage run's dataset inputs, and the tier
    manifest as an artifact."""
    ctx.tracker.log_dataset(ctx.run_id, "synth", synth.outputs["manifest_sha256"], synth.outputs["data"], "training")
    ctx.tracker.log_dataset(ctx.run_id, "tiers", digest, tiers, "output", {"samples": samples})
    ctx.tracker.log_artifact(ctx.run_id, storage.local_copy(storage.join(tiers, "manifest.json")), "tiers")


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:
    data = inputs["synth"].outputs["data"]
    manifest = storage.read_json(storage.join(data, "manifest.json"))
    job = fold_job(cfg, ctx, data, manifest["counts"]["task"])
    ray_ready(ctx)
    records = run_folds(job, cfg.crossval.parallel_folds)
    tiers = storage.join(ctx.out, "tiers")
    manifest_out = fold_tier_manifest(records, inputs["synth"].outputs["manifest_sha256"], job.model_labels)
    warn_on_margins(manifest_out["tasks"], cfg.crossval.min_margin, job.model_labels)
    storage.write_json(storage.join(tiers, "manifest.json"), manifest_out)  # published after every tier shard
    digest = storage.sha256(storage.join(tiers, "manifest.json"))
    log_datasets(ctx, inputs["synth"], tiers, digest, sum(s["samples"] for s in manifest_out["shards"]))
    trained = [row for r in records for s in r["tier_shards"] if s["split"] == "train" for row in s["rows"]]
    metrics = tier_metrics(manifest_out, trained)
    ctx.tracker.log_metrics(ctx.run_id, metrics, step=0)
    return ctx.result({"tiers": tiers, "tiers_sha256": digest}, metrics)
