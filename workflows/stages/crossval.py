"""Stage 2: K-fold cross-validation produces the medium quality tier from held-out restorations.

For fold k a restorer is trained (Ray Train) on the training shards of every other fold, then restores the
shards of fold k, whole images (tiled when large). A fold's medium tier therefore never comes from a restorer
that saw it; ``fold<k>/done.json`` records which shards trained it and which it restored. Folds run as
parallel Ray tasks when ``parallel_folds`` and the cluster has room, each logging a nested MLflow run. The tier
set (``tiers/*.tar`` + ``tiers/manifest.json``) is a versioned dataset: its manifest digest is logged as input.

With ``restore_splits`` the restorer of fold 0 (which saw no validation or test image) also restores those
splits into tier shards named after their source (``val-000000.tar``): held-out tiers on which the perceiver
stage reports, never trained on. The manifest records every shard's split and, per task, the margin of the
medium tier over the low one; a task whose margin is below ``min_margin`` dB gets a warning (its tiers are
hard to tell apart, so prompts learned on them mean little).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from synth import storage
from synth.read import iter_shard, shard_paths
from synth.tiers import mean_psnr, tier_manifest, tier_meta, tier_shard_name, write_tier_shard
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.stages.common import ray_ready

if TYPE_CHECKING:
    from clearair.restorer import Restorer

log = logging.getLogger(__name__)


def _restored(restorer: Restorer, url: str, fold: int, tile: int | None, overlap: int, rows: list[dict]):
    """``(low, medium, high, meta)`` of every sample of shard ``url``, its json also appended to ``rows``."""
    from clearair.metrics import psnr, ssim

    for s in iter_shard(url):
        medium = restorer.restore(s["lq"], tile=tile, overlap=overlap)
        scores = {t: (psnr(img, s["gt"]), ssim(img, s["gt"])) for t, img in (("low", s["lq"]), ("medium", medium))}
        rows.append(tier_meta(s, fold, storage.name(url), scores))
        yield s["lq"], medium, s["gt"], rows[-1]


def restore_fold(
    restorer: Restorer,
    held: list[str],
    out: str,
    fold: int,
    tile: int | None,
    overlap: int,
    split: str = "train",
    progress: bool = False,
) -> list[dict]:
    """Write one tier shard per shard of ``held`` (restored by fold ``fold``'s restorer, named by
    :func:`synth.tiers.tier_shard_name`); returns the shard records (name, sha256, samples, fold, split, rows).
    ``progress``: a line per shard on stdout (this runs in a Ray task, whose stdout reaches the driver as lines;
    a bar would not)."""
    records, started = [], time.monotonic()
    for n, url in enumerate(held, 1):
        name, rows = tier_shard_name(url, fold, split), []
        sha = write_tier_shard(storage.join(out, name), _restored(restorer, url, fold, tile, overlap, rows))
        records.append({"name": name, "sha256": sha, "samples": len(rows), "fold": fold, "split": split, "rows": rows})
        if progress:
            took = time.monotonic() - started
            print(f"fold{fold}: restored {split} shard {n}/{len(held)} ({took:.0f} s)", flush=True)
    return records


def restorer_module_args(cfg: PipelineConfig) -> dict[str, Any]:
    cv = cfg.crossval
    return {
        "arch": cv.model.arch,
        "model_config": dict(cv.model.config),
        "preset": cv.model.preset,
        "loss": cv.loss,
        "pixel_loss": cv.pixel_loss,
        "loss_weights": dict(cv.loss_weights),
        "priors": dict(cv.priors),
        "allow_random_frozen": cv.allow_random_frozen,
        "perceiver": None,
        "vgg": None,
        "lr": cv.fit.lr,
        "min_lr": cv.fit.min_lr,
        "weight_decay": cv.fit.weight_decay,
        "max_steps": cv.fit.steps,
        # as in 0.1.0, so the fold restorers (and cached tiers) stay as they were
        "select_by": "image_mean",
        "con_labels": "task",
        "con_gather": False,
    }


def run_fold(fold: int, job: dict[str, Any]) -> dict[str, Any]:
    """Train on the other folds, restore this one. Idempotent: a finished fold returns its record."""
    from clearair.restorer import load_restorer
    from workflows.tracking import Tracker
    from workflows.training import fit_restorer

    out, data = job["out"], job["data"]
    done = storage.join(out, f"fold{fold}", "done.json")
    if storage.exists(done):
        return storage.read_json(done)
    storage.makedirs(storage.join(out, "tiers"))
    others = [k for k in range(job["folds"]) if k != fold]
    train, held = shard_paths(data, "train", others), shard_paths(data, "train", [fold])
    tr = job["tracking"]
    tracker = Tracker(tr["uri"], tr["experiment"], tr["artifact_root"])
    run_id = tracker.start_run(f"crossval-fold{fold}", parent_run_id=tr["run_id"], tags={"clearair.fold": str(fold)})
    fit = fit_restorer(
        f"fold{fold}",
        storage.join(out, "ray"),
        job["module"],
        {"train": train, "val": job["val"], "tasks": job["tasks"], "resample": job["resample"]},
        job["fit"],
        job["seed"] + fold,
        {**tr, "run_id": run_id},
        progress=job["progress"],
    )
    restorer = load_restorer(fit["checkpoint"], precision="fp32")  # with the frozen parts it trained with
    tiers, tile, overlap = storage.join(out, "tiers"), job["tile"], job["overlap"]
    shards = restore_fold(restorer, held, tiers, fold, tile, overlap, progress=job["progress"])
    heldout = [u for split in job["restore_splits"] for u in shard_paths(data, split)] if fold == 0 else []
    for split in job["restore_splits"] if fold == 0 else ():  # fold 0's restorer saw no val or test image
        urls = shard_paths(data, split)
        shards += restore_fold(restorer, urls, tiers, fold, tile, overlap, split, job["progress"])
    record = {
        "fold": fold,
        "trained_on": [storage.name(u) for u in train],
        "restored": [storage.name(u) for u in held],
        "restored_heldout": [storage.name(u) for u in heldout],
        "tier_shards": shards,
        "checkpoint": fit["checkpoint"],
        "val_psnr": fit["val_psnr"],
    }
    trained = [row for s in shards if s["split"] == "train" for row in s["rows"]]
    n = len(trained)
    record["psnr_low"], record["psnr_medium"] = mean_psnr(trained, "low"), mean_psnr(trained, "medium")
    tracker.log_metrics(
        run_id,
        {
            "psnr_low": record["psnr_low"],
            "psnr_medium": record["psnr_medium"],
            "val_psnr": fit["val_psnr"],
            "tier_samples": n,
        },
        step=job["fit"]["steps"],
    )
    tracker.close()
    tracker.end_run(run_id, "FINISHED")
    storage.write_json(done, record)
    return record


def run_folds(folds: int, job: dict[str, Any], parallel: bool) -> list[dict[str, Any]]:
    if not parallel:
        return [run_fold(k, job) for k in range(folds)]
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(run_fold)
    return ray.get([task.remote(k, job) for k in range(folds)])


def warn_on_margins(tasks: dict[str, dict[str, float]], min_margin: float) -> None:
    """A warning per task whose medium tier is less than ``min_margin`` dB above its low tier."""
    for task, row in tasks.items():
        if row["margin"] < min_margin:
            log.warning(
                "crossval: the medium tier of %s is only %.2f dB above its low tier (%.2f -> %.2f dB; want >= %.1f): "
                "its tiers are hard to tell apart; train the fold restorers longer (crossval.fit.steps)",
                task, row["margin"], row["psnr_low"], row["psnr_medium"], min_margin,
            )  # fmt: skip


def fold_tier_manifest(records: list[dict[str, Any]], source_digest: str) -> dict[str, Any]:
    """The tier manifest (:func:`synth.tiers.tier_manifest`) of the fold ``records``."""
    shards = [s for r in records for s in r["tier_shards"]]
    keep = ("fold", "trained_on", "restored", "psnr_low", "psnr_medium", "val_psnr")
    return tier_manifest(shards, [{k: r[k] for k in keep} for r in records], source_digest)


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:
    from clearair.data import check_resample

    data = inputs["synth"].outputs["data"]
    manifest = storage.read_json(storage.join(data, "manifest.json"))
    folds = cfg.synth.splits.folds
    job = {
        "out": ctx.out,
        "data": data,
        "folds": folds,
        "val": shard_paths(data, "val"),
        "tasks": sorted(manifest["counts"]["task"]),
        "module": restorer_module_args(cfg),
        "fit": cfg.crossval.fit.model_dump(),
        "seed": cfg.seed,
        "tile": cfg.crossval.tile,
        "overlap": cfg.crossval.overlap,
        "restore_splits": list(cfg.crossval.restore_splits),
        "progress": ctx.progress,
        "resample": check_resample(cfg.crossval.resample, manifest["counts"]["task"]),
        "tracking": ctx.tracking(),
    }
    ray_ready(ctx)
    records = run_folds(folds, job, cfg.crossval.parallel_folds)
    tiers = storage.join(ctx.out, "tiers")
    manifest_out = fold_tier_manifest(records, inputs["synth"].outputs["manifest_sha256"])
    warn_on_margins(manifest_out["tasks"], cfg.crossval.min_margin)
    storage.write_json(storage.join(tiers, "manifest.json"), manifest_out)  # published after every tier shard
    digest = storage.sha256(storage.join(tiers, "manifest.json"))
    tracker = ctx.tracker
    tracker.log_dataset(
        ctx.run_id, "synth", inputs["synth"].outputs["manifest_sha256"], inputs["synth"].outputs["data"], "training"
    )
    tracker.log_dataset(
        ctx.run_id,
        "tiers",
        digest,
        tiers,
        "output",
        {"samples": sum(s["samples"] for s in manifest_out["shards"])},
    )
    tracker.log_artifact(ctx.run_id, storage.local_copy(storage.join(tiers, "manifest.json")), "tiers")
    trained = [row for r in records for s in r["tier_shards"] if s["split"] == "train" for row in s["rows"]]
    metrics = {
        "tier_samples": len(trained),
        "psnr_low": mean_psnr(trained, "low"),
        "psnr_medium": mean_psnr(trained, "medium"),
        **{f"margin.{task}": row["margin"] for task, row in manifest_out["tasks"].items()},
    }
    tracker.log_metrics(ctx.run_id, metrics, step=0)
    return ctx.result({"tiers": tiers, "tiers_sha256": digest}, metrics)
