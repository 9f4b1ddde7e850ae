"""Stage 2: K-fold cross-validation produces the medium quality tier from held-out restorations.

For fold k a restorer is trained (Ray Train) on the training shards of every other fold, then restores the
shards of fold k, whole images (tiled when large). A fold's medium tier therefore never comes from a restorer
that saw it; ``fold<k>/done.json`` records which shards trained it and which it restored. Folds run as
parallel Ray tasks when ``parallel_folds`` and the cluster has room, each logging a nested MLflow run. The tier
set (``tiers/*.tar`` + ``tiers/manifest.json``) is a versioned dataset: its manifest digest is logged as input.
"""

from __future__ import annotations

import logging
from typing import Any

from synth import storage
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.stages.common import ray_ready

log = logging.getLogger(__name__)


def restore_fold(model, held: list[str], out: str, fold: int, tile: int | None, overlap: int) -> list[dict]:
    """Write one tier shard per held-out shard; returns the shard records (name, sha256, samples, psnr...)."""
    import numpy as np

    from clearair.inference import restore_image, to_numpy, to_tensor
    from clearair.metrics import psnr, ssim
    from synth.read import iter_shard
    from synth.tiers import tier_members
    from synth.writer import publish_tar

    records = []
    for url in held:
        members, rows = [], []
        for s in iter_shard(url):
            medium = to_numpy(restore_image(model, to_tensor(s["lq"])[None], tile=tile, overlap=overlap)[0])
            scores = {t: (psnr(img, s["gt"]), ssim(img, s["gt"])) for t, img in (("low", s["lq"]), ("medium", medium))}
            meta = {
                "key": s["key"],
                "task": s["meta"]["task"],
                "fold": fold,
                "source_shard": storage.name(url),
                "psnr": {t: round(v[0], 4) for t, v in scores.items()},
                "ssim": {t: round(v[1], 5) for t, v in scores.items()},
            }
            members += tier_members(s["key"], s["lq"], medium, s["gt"], meta)
            rows.append(meta)
        name = f"f{fold}-{storage.name(url).removesuffix('.tar').rsplit('-', 1)[1]}.tar"
        sha, _ = publish_tar(storage.join(out, name), members)
        records.append(
            {
                "name": name,
                "sha256": sha,
                "samples": len(rows),
                "fold": fold,
                "psnr_low": float(np.mean([r["psnr"]["low"] for r in rows])) if rows else float("nan"),
                "psnr_medium": float(np.mean([r["psnr"]["medium"] for r in rows])) if rows else float("nan"),
                "rows": rows,
            }
        )
    return records


def restorer_module_args(cfg: PipelineConfig) -> dict[str, Any]:
    cv = cfg.crossval
    return {
        "arch": cv.model.arch,
        "model_config": dict(cv.model.config),
        "preset": cv.model.preset,
        "loss": "l1",
        "loss_weights": {},
        "priors": {"kind": "none"},
        "perceiver": None,
        "vgg": None,
        "lr": cv.fit.lr,
        "min_lr": cv.fit.min_lr,
        "weight_decay": cv.fit.weight_decay,
        "max_steps": cv.fit.steps,
    }


def run_fold(fold: int, job: dict[str, Any]) -> dict[str, Any]:
    """Train on the other folds, restore this one. Idempotent: a finished fold returns its record."""
    from synth.read import shard_paths
    from workflows.tracking import Tracker
    from workflows.training import fit_restorer, restorer_from_checkpoint

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
        {"train": train, "val": job["val"], "tasks": job["tasks"]},
        job["fit"],
        job["seed"] + fold,
        {**tr, "run_id": run_id},
    )
    model = restorer_from_checkpoint(fit["checkpoint"])
    shards = restore_fold(model, held, storage.join(out, "tiers"), fold, job["tile"], job["overlap"])
    record = {
        "fold": fold,
        "trained_on": [storage.name(u) for u in train],
        "restored": [storage.name(u) for u in held],
        "tier_shards": shards,
        "checkpoint": fit["checkpoint"],
        "val_psnr": fit["val_psnr"],
    }
    n = sum(s["samples"] for s in shards)
    for key in ("psnr_low", "psnr_medium"):
        record[key] = sum(s[key] * s["samples"] for s in shards) / max(n, 1)
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


def tier_manifest(records: list[dict[str, Any]], source_digest: str) -> dict[str, Any]:
    from synth.tiers import TIER_FORMAT, TIER_VERSION

    shards = [{k: s[k] for k in ("name", "sha256", "samples", "fold")} for r in records for s in r["tier_shards"]]
    by_task: dict[str, list[dict]] = {}
    for r in records:
        for s in r["tier_shards"]:
            for row in s["rows"]:
                by_task.setdefault(row["task"], []).append(row)
    per_task = {
        t: {
            "samples": len(rows),
            "psnr_low": sum(r["psnr"]["low"] for r in rows) / len(rows),
            "psnr_medium": sum(r["psnr"]["medium"] for r in rows) / len(rows),
        }
        for t, rows in by_task.items()
    }
    return {
        "format": TIER_FORMAT,
        "format_version": TIER_VERSION,
        "source_manifest_sha256": source_digest,
        "shards": shards,
        "tasks": dict(sorted(per_task.items())),
        "folds": [
            {k: r[k] for k in ("fold", "trained_on", "restored", "psnr_low", "psnr_medium", "val_psnr")}
            for r in records
        ],
    }


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:
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
        "tracking": ctx.tracking(),
    }
    ray_ready(ctx)
    records = run_folds(folds, job, cfg.crossval.parallel_folds)
    tiers = storage.join(ctx.out, "tiers")
    manifest_out = tier_manifest(records, inputs["synth"].outputs["manifest_sha256"])
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
    n = sum(s["samples"] for s in manifest_out["shards"])
    metrics = {
        "tier_samples": n,
        "psnr_low": sum(r["psnr_low"] * sum(s["samples"] for s in r["tier_shards"]) for r in records) / max(n, 1),
        "psnr_medium": sum(r["psnr_medium"] * sum(s["samples"] for s in r["tier_shards"]) for r in records) / max(n, 1),
    }
    tracker.log_metrics(ctx.run_id, metrics, step=0)
    return ctx.result({"tiers": tiers, "tiers_sha256": digest}, metrics)
