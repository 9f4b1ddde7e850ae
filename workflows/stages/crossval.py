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
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.stages.common import ray_ready

if TYPE_CHECKING:
    from clearair.restorer import Restorer

log = logging.getLogger(__name__)


def _mean(rows: list[dict], key: str, tier: str) -> float:
    return sum(r[key][tier] for r in rows) / len(rows) if rows else float("nan")


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
    """Write one tier shard per shard of ``held`` (restored by fold ``fold``'s restorer); returns the shard
    records (name, sha256, samples, split, psnr...). Training shards become ``f<fold>-NNNNNN.tar``, shards of a
    held-out split keep their name. ``progress``: a line per shard on stdout (this runs in a Ray task, whose
    stdout reaches the driver as lines; a bar would not)."""
    from clearair.metrics import psnr, ssim
    from synth.read import iter_shard
    from synth.tiers import tier_members
    from synth.writer import publish_tar

    records, started = [], time.monotonic()
    for n, url in enumerate(held, 1):
        members, rows = [], []
        for s in iter_shard(url):
            medium = restorer.restore(s["lq"], tile=tile, overlap=overlap)
            scores = {t: (psnr(img, s["gt"]), ssim(img, s["gt"])) for t, img in (("low", s["lq"]), ("medium", medium))}
            meta = {
                "key": s["key"],
                "task": s["meta"]["task"],
                "fold": fold,
                "source_shard": storage.name(url),
                "psnr": {t: round(v[0], 4) for t, v in scores.items()},
                "ssim": {t: round(v[1], 5) for t, v in scores.items()},
            }
            provenance = {k: s["meta"][k] for k in ("origin", "seed", "variant", "degradations") if k in s["meta"]}
            members += tier_members(s["key"], s["lq"], medium, s["gt"], {**meta, **provenance})  # for fresh noise
            rows.append(meta)
        index = storage.name(url).removesuffix(".tar").rsplit("-", 1)[1]
        name = f"f{fold}-{index}.tar" if split == "train" else storage.name(url)
        sha, _ = publish_tar(storage.join(out, name), members)
        records.append(
            {
                "name": name,
                "sha256": sha,
                "samples": len(rows),
                "fold": fold,
                "split": split,
                "psnr_low": _mean(rows, "psnr", "low"),
                "psnr_medium": _mean(rows, "psnr", "medium"),
                "rows": rows,
            }
        )
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
    }


def run_fold(fold: int, job: dict[str, Any]) -> dict[str, Any]:
    """Train on the other folds, restore this one. Idempotent: a finished fold returns its record."""
    from clearair.restorer import load_restorer
    from synth.read import shard_paths
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
    record["psnr_low"], record["psnr_medium"] = _mean(trained, "psnr", "low"), _mean(trained, "psnr", "medium")
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


def tier_manifest(records: list[dict[str, Any]], source_digest: str, min_margin: float) -> dict[str, Any]:
    from synth.tiers import TIER_FORMAT, TIER_VERSION

    keep = ("name", "sha256", "samples", "fold", "split")
    shards = [{k: s[k] for k in keep} for r in records for s in r["tier_shards"]]
    by_split: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        for s in r["tier_shards"]:
            for row in s["rows"]:
                by_split.setdefault(s["split"], {}).setdefault(row["task"], []).append(row)

    def summary(rows: list[dict]) -> dict[str, float]:
        low, medium = _mean(rows, "psnr", "low"), _mean(rows, "psnr", "medium")
        return {"samples": len(rows), "psnr_low": low, "psnr_medium": medium, "margin": medium - low}

    per_task = {t: summary(rows) for t, rows in sorted(by_split.get("train", {}).items())}
    for task, row in per_task.items():
        if row["margin"] < min_margin:
            log.warning(
                "crossval: the medium tier of %s is only %.2f dB above its low tier (%.2f -> %.2f dB; want >= %.1f): "
                "its tiers are hard to tell apart; train the fold restorers longer (crossval.fit.steps)",
                task, row["margin"], row["psnr_low"], row["psnr_medium"], min_margin,
            )  # fmt: skip
    heldout = {split: {t: summary(rows) for t, rows in sorted(tasks.items())} for split, tasks in by_split.items()}
    heldout.pop("train", None)
    return {
        "format": TIER_FORMAT,
        "format_version": TIER_VERSION,
        "source_manifest_sha256": source_digest,
        "shards": shards,
        "tasks": per_task,
        "heldout": heldout,
        "folds": [
            {k: r[k] for k in ("fold", "trained_on", "restored", "psnr_low", "psnr_medium", "val_psnr")}
            for r in records
        ],
    }


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:
    from clearair.data import check_resample
    from synth.read import shard_paths

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
    manifest_out = tier_manifest(records, inputs["synth"].outputs["manifest_sha256"], cfg.crossval.min_margin)
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
        "psnr_low": _mean(trained, "psnr", "low"),
        "psnr_medium": _mean(trained, "psnr", "medium"),
        **{f"margin.{task}": row["margin"] for task, row in manifest_out["tasks"].items()},
    }
    tracker.log_metrics(ctx.run_id, metrics, step=0)
    return ctx.result({"tiers": tiers, "tiers_sha256": digest}, metrics)
