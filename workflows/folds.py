"""Cross-validation's work on a fold, run as one Ray task per fold: train the fold's restorers on the other folds'
shards, then write tier shards of its held-out shards restored by each of them."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from clearair.metrics import psnr, ssim
from clearair.restorer import Restorer, load_restorer
from clearair.specs import LossSpec, NetworkSpec, OptimSpec, RestorerSpec
from synth import storage
from synth.read import iter_shard, shard_paths
from synth.tiers import mean_psnr, medium_tiers, tier_meta, tier_shard_name, write_tier_shard
from workflows.config import ModelSpec, PipelineConfig
from workflows.records import FitResult, TrackingRef, TrainingData
from workflows.training import fit_restorer

if TYPE_CHECKING:
    from workflows.tracking import Tracker


@dataclass(frozen=True)
class FoldJob:
    """What every fold's task needs (the fold number is the task's own argument)."""

    out: str  # the stage's output: tiers/, ray/ and fold<k>/done.json
    data: str  # the synth dataset
    folds: int
    val: list[str]  # the validation shards every fold restorer is validated on
    tasks: list[str]
    specs: list[RestorerSpec]  # every fold restorer: the model, then the models
    model_labels: list[str]  # their descriptions (model_label), the tier manifest's ``mediums``
    fit: dict[str, Any]  # crossval.fit as a dict
    seed: int  # the pipeline's; fold k trains with seed + k
    tile: int | None
    overlap: int
    restore_splits: list[str]  # held-out splits restored by fold 0's restorers
    resample: dict[str, float]
    progress: bool
    tracking: TrackingRef  # the stage's run, under which each fold nests its own


@dataclass(frozen=True)
class FoldShards:
    """The source shards of one fold: those its restorers trained on, and those they restored."""

    train: list[str]  # the training shards of every other fold
    held: list[str]  # this fold's training shards
    heldout: list[str]  # validation and test shards (``restore_splits``, fold 0 only)


def _restored(restorers: list[Restorer], url: str, fold: int, tile: int | None, overlap: int, rows: list[dict]):
    """``(low, mediums, high, meta)`` of every sample of shard ``url``, one medium per restorer in order, its json
    also appended to ``rows``."""
    for s in iter_shard(url):
        mediums = [restorer.restore(s["lq"], tile=tile, overlap=overlap) for restorer in restorers]
        tiers = [("low", s["lq"]), *zip(medium_tiers(len(mediums)), mediums, strict=True)]
        scores = {t: (psnr(img, s["gt"]), ssim(img, s["gt"])) for t, img in tiers}
        rows.append(tier_meta(s, fold, storage.name(url), scores))
        yield s["lq"], mediums, s["gt"], rows[-1]


def restore_fold(
    restorers: list[Restorer],
    held: list[str],
    out: str,
    fold: int,
    tile: int | None,
    overlap: int,
    split: str = "train",
    progress: bool = False,
) -> list[dict]:
    """Write one tier shard per shard of ``held``, each sample restored by every one of fold ``fold``'s
    ``restorers`` (named by :func:`synth.tiers.tier_shard_name`); returns the shard records (name, sha256, samples,
    fold, split, rows). ``progress``: a line per shard on stdout (this runs in a Ray task, whose stdout reaches the
    driver as lines; a bar would not)."""
    records, started = [], time.monotonic()
    for n, url in enumerate(held, 1):
        name, rows = tier_shard_name(url, fold, split), []
        sha = write_tier_shard(storage.join(out, name), _restored(restorers, url, fold, tile, overlap, rows))
        records.append({"name": name, "sha256": sha, "samples": len(rows), "fold": fold, "split": split, "rows": rows})
        if progress:
            took = time.monotonic() - started
            print(f"fold{fold}: restored {split} shard {n}/{len(held)} ({took:.0f} s)", flush=True)
    return records


def fold_restorer_spec(cfg: PipelineConfig) -> RestorerSpec:
    """The fold restorer ``crossval.model``: its loss without a perceiver or VGG16, its priors and schedule."""
    cv = cfg.crossval
    # con_labels, con_gather and select_by as in 0.1.0, so the fold restorers (and cached tiers) stay as they were
    loss = LossSpec(cv.loss, dict(cv.loss_weights), cv.pixel_loss, con_labels="task", con_gather=False)
    optim = OptimSpec(cv.fit.steps, cv.fit.lr, cv.fit.min_lr, cv.fit.weight_decay, ema_decay=cv.fit.ema)
    network = NetworkSpec(cv.model.arch, dict(cv.model.config), cv.model.preset)
    return RestorerSpec(network, optim, loss, dict(cv.priors), cv.allow_random_frozen, select_by="image_mean")


def plain_restorer_spec(cfg: PipelineConfig, model: ModelSpec) -> RestorerSpec:
    """:func:`fold_restorer_spec` of a further fold restorer ``model`` (``crossval.models``): a plain restorer
    trained with ``crossval.pixel_loss`` alone and no priors, on the same schedule."""
    base = fold_restorer_spec(cfg)
    network = NetworkSpec(model.arch, dict(model.config), model.preset)
    plain = replace(base.loss, name="l1", weights={})
    return replace(base, network=network, loss=plain, priors={"kind": "none"}, allow_random_frozen=False)


def model_label(spec: ModelSpec) -> str:
    """A short description of a fold restorer for the tier manifest: ``restormer/tiny``, plus its overrides."""
    return f"{spec.arch}/{spec.preset}" + (f" {json.dumps(spec.config, sort_keys=True)}" if spec.config else "")


def run_name(fold: int, model: int) -> str:
    """The Ray Train run of a fold's restorer: ``fold<k>`` for ``crossval.model`` (as before further models
    existed, so its runs resume), ``fold<k>-m<i>`` for the i-th of ``crossval.models``."""
    return f"fold{fold}" if model == 0 else f"fold{fold}-m{model}"


def fit_fold_restorers(fold: int, job: FoldJob, train: list[str], tracker: Tracker, run_id: str) -> list[FitResult]:
    """Train every restorer of fold ``fold`` on ``train``: the first logs to the fold's MLflow run ``run_id``, each
    further one to a nested run of its own (``crossval-m<i>-fold<k>``)."""
    data, ray, fits = TrainingData(train, job.val, job.tasks, resample=job.resample), storage.join(job.out, "ray"), []
    for i, spec in enumerate(job.specs):
        tags = {"clearair.fold": str(fold), "clearair.medium": job.model_labels[i]}
        rid = tracker.start_run(f"crossval-m{i}-fold{fold}", parent_run_id=run_id, tags=tags) if i else run_id
        seed, tracking = job.seed + fold, job.tracking.child(rid)
        fits.append(fit_restorer(run_name(fold, i), ray, spec, data, job.fit, seed, tracking, job.progress))
        if i:
            tracker.end_run(rid, "FINISHED")
    return fits


def restore_held_out(
    fold: int, job: FoldJob, restorers: list[Restorer], held: list[str]
) -> tuple[list[dict], list[str]]:
    """``(tier shard records, held-out source shards)``: fold ``fold`` restored by its ``restorers`` and, by fold 0's
    (which saw no validation or test image), the ``restore_splits``."""
    tiers, tile, overlap, progress = storage.join(job.out, "tiers"), job.tile, job.overlap, job.progress
    shards, heldout = restore_fold(restorers, held, tiers, fold, tile, overlap, progress=progress), []
    for split in job.restore_splits if fold == 0 else ():
        urls = shard_paths(job.data, split)
        heldout += urls
        shards += restore_fold(restorers, urls, tiers, fold, tile, overlap, split, progress)
    return shards, heldout


def fold_record(
    fold: int, sources: FoldShards, shards: list[dict], fits: list[FitResult], mediums: list[str]
) -> dict[str, Any]:
    """A fold's ``done.json``: its source shards, tier shards, the first restorer's checkpoint and PSNRs (as before
    further models existed), and per restorer ``models``."""
    trained = [row for s in shards if s["split"] == "train" for row in s["rows"]]
    models = [
        {"model": label, "run": run_name(fold, i), "checkpoint": fit.checkpoint, "val_psnr": fit.val_psnr,
         "psnr_medium": mean_psnr(trained, tier)}
        for i, (label, fit, tier) in enumerate(zip(mediums, fits, medium_tiers(len(fits)), strict=True))
    ]  # fmt: skip
    return {
        "fold": fold,
        "trained_on": [storage.name(u) for u in sources.train],
        "restored": [storage.name(u) for u in sources.held],
        "restored_heldout": [storage.name(u) for u in sources.heldout],
        "tier_shards": shards,
        "checkpoint": fits[0].checkpoint,
        "val_psnr": fits[0].val_psnr,
        "psnr_low": mean_psnr(trained, "low"),
        "psnr_medium": models[0]["psnr_medium"],
        "models": models,
    }


def fold_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The fold's MLflow metrics: PSNRs of the first restorer as before, ``psnr_medium<i>``/``val_psnr<i>`` of
    the others."""
    samples = sum(s["samples"] for s in record["tier_shards"] if s["split"] == "train")
    metrics = {k: record[k] for k in ("psnr_low", "psnr_medium", "val_psnr")} | {"tier_samples": samples}
    for i, model in enumerate(record["models"][1:], 1):
        metrics |= {f"psnr_medium{i}": model["psnr_medium"], f"val_psnr{i}": model["val_psnr"]}
    return metrics


def run_fold(fold: int, job: FoldJob) -> dict[str, Any]:
    """Train the fold's restorers on the other folds, restore this one with all of them; returns the fold's
    ``done.json`` record. Idempotent: a finished fold returns its record."""
    done = storage.join(job.out, f"fold{fold}", "done.json")
    if storage.exists(done):
        return storage.read_json(done)
    storage.makedirs(storage.join(job.out, "tiers"))
    others = [k for k in range(job.folds) if k != fold]
    train, held = shard_paths(job.data, "train", others), shard_paths(job.data, "train", [fold])
    tracker = job.tracking.open()
    tags = {"clearair.fold": str(fold)}
    run_id = tracker.start_run(f"crossval-fold{fold}", parent_run_id=job.tracking.run_id, tags=tags)
    fits = fit_fold_restorers(fold, job, train, tracker, run_id)
    restorers = [load_restorer(fit.checkpoint, precision="fp32") for fit in fits]  # with their frozen parts
    shards, heldout = restore_held_out(fold, job, restorers, held)
    record = fold_record(fold, FoldShards(train, held, heldout), shards, fits, job.model_labels)
    tracker.log_metrics(run_id, fold_metrics(record), step=job.fit["steps"])
    tracker.close()
    tracker.end_run(run_id, "FINISHED")
    storage.write_json(done, record)
    return record


def run_folds(job: FoldJob, parallel: bool) -> list[dict[str, Any]]:
    """Every fold's ``done.json`` record: the folds one after the other, or as parallel Ray tasks."""
    if not parallel:
        return [run_fold(k, job) for k in range(job.folds)]
    import ray

    task = ray.remote(num_cpus=0, max_retries=0)(run_fold)
    return ray.get([task.remote(k, job) for k in range(job.folds)])
