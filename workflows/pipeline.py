"""The pipeline: stages in order, each cached by a key of its settings and its inputs' keys, all tracked.

One MLflow parent run per invocation; one nested run per stage that does work (and per cross-validation fold,
created by the fold's own process). ``--from STAGE`` reruns a stage and everything after it; ``--only STAGE``
runs one stage on cached inputs; ``--dry-run`` prints what would run and what is cached, and does nothing.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from clearair.data import resampled_shares
from synth import storage
from workflows.config import STAGES, PipelineConfig, config_digest
from workflows.context import RunContext, StageResult, StaleOutput, Workdir
from workflows.faults import storage_fault
from workflows.provenance import stamp
from workflows.stages import crossval, evaluate, perceiver, priors, synth, train
from workflows.stages.priors import skip_reason

log = logging.getLogger(__name__)
WORKDIR_TAG = "clearair.workdir"  # on every run of an invocation: its workdir, to find runs a killed one left

STAGE_RUN = {
    "synth": synth.run,
    "crossval": crossval.run,
    "perceiver": perceiver.run,
    "priors": priors.run,
    "train": train.run,
    "evaluate": evaluate.run,
}
DEPENDS: dict[str, tuple[str, ...]] = {
    "synth": (),
    "crossval": ("synth",),
    "perceiver": ("crossval",),
    "priors": ("synth", "perceiver"),
    "train": ("synth", "crossval", "perceiver", "priors"),
    "evaluate": ("synth", "train", "priors"),
}


class PipelineError(RuntimeError):
    """The pipeline cannot run as asked; the message says why."""


@dataclass(frozen=True)
class Options:
    workdir: str | Path  # a directory or an s3:// prefix
    tracking_uri: str | None = None
    ray_address: str | None = None
    start_from: str | None = None
    only: str | None = None
    dry_run: bool = False
    progress: bool = True  # progress lines and bars on stderr
    worker_output: bool = True  # Ray workers' stdout/stderr reach this terminal


def borrowed_settings(cfg: PipelineConfig, stage: str) -> dict[str, object]:
    """Settings outside a stage's own section that its output depends on. Each enters the stage's key only where
    it acts (a training crop for the ``train_crop`` view; the train stage's priors spec where the priors stage
    precomputes it), so configurations it does not act on keep the keys they had before it was counted."""
    if stage == "perceiver" and cfg.perceiver.view == "train_crop":
        return {"train.fit.crop": cfg.train.fit.crop}
    if stage == "priors" and priors.skip_reason(cfg) is None:
        t = cfg.train
        return {"train.priors": t.priors, "train.loss": t.loss, "train.allow_random_frozen": t.allow_random_frozen}
    return {}


def stage_keys(cfg: PipelineConfig) -> dict[str, str]:
    """Cache key of every stage: its settings' digest (:func:`borrowed_settings` included) chained with its
    inputs' keys."""
    keys: dict[str, str] = {}
    for stage in STAGES:
        borrowed = borrowed_settings(cfg, stage)
        body = cfg.section_digest(stage) + (config_digest(borrowed) if borrowed else "")
        body += "".join(keys[d] for d in DEPENDS[stage])
        keys[stage] = hashlib.sha256(body.encode()).hexdigest()
    return keys


def resources(cfg: PipelineConfig, stage: str, train_counts: dict[str, int] | None = None) -> str:
    """What a stage asks of the cluster, for --dry-run; for a training stage with per-task resampling, each
    task's share of draws and the data-epoch length (once the synth stage is cached and the counts are known)."""
    fit = {"crossval": cfg.crossval.fit, "train": cfg.train.fit}.get(stage)
    if fit is not None:
        per = f"{fit.cpus_per_worker:g} CPU" + (" + 1 GPU" if fit.use_gpu else "")
        count = f"{cfg.synth.splits.folds} folds x " if stage == "crossval" else ""
        line = f"{count}{fit.workers} worker(s) x ({per}), {fit.steps} steps, global batch {fit.global_batch}"
        resample = getattr(cfg, stage).resample
        if not resample:
            return line
        if not train_counts:
            return f"{line}; resample {resample} (shares once synth is cached)"

        shares, epoch = resampled_shares(train_counts, resample)
        parts = ", ".join(f"{t} {100 * v:.0f}%" for t, v in shares.items())
        return f"{line}; draws: {parts}; data epoch {epoch:.0f} samples"
    if stage == "synth":
        return "1 CPU per shard task, all CPUs of the cluster"
    if stage == "perceiver":
        return f"1 task ({'1 GPU' if cfg.perceiver.use_gpu else '1 CPU'}), {cfg.perceiver.steps} steps"
    if stage == "priors":
        reason = skip_reason(cfg)
        if reason:
            return f"nothing to precompute: {reason}"
        return f"1 Ray task per training shard ({'1 GPU' if cfg.priors.use_gpu else '1 CPU'} each)"
    return "1 task (CPU)"


def _train_counts(workdir: Workdir, keys: dict[str, str]) -> dict[str, int] | None:
    """Samples per task of the training split, from a cached synth stage's manifest (None before synthesis)."""
    try:
        synth = workdir.cached("synth", keys["synth"])
        manifest = storage.read_json(storage.join(synth.outputs["data"], "manifest.json")) if synth else None
    except (OSError, StaleOutput):
        return None
    return manifest["counts"].get("task_by_split", {}).get("train") if manifest else None


def selected(options: Options) -> tuple[list[str], set[str]]:
    """(stages to visit, stages forced to rerun)."""
    for name in (options.start_from, options.only):
        if name is not None and name not in STAGES:
            raise PipelineError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    if options.only:
        return [options.only], {options.only}
    if options.start_from:
        return list(STAGES), set(STAGES[STAGES.index(options.start_from) :])
    return list(STAGES), set()


def plan(cfg: PipelineConfig, options: Options) -> list[dict]:
    """One row per stage: key, cached or not, whether it will run, resources."""
    workdir, keys = Workdir(options.workdir), stage_keys(cfg)
    visit, forced = selected(options)
    counts = _train_counts(workdir, keys) if cfg.crossval.resample or cfg.train.resample else None
    rows = []
    for stage in STAGES:
        cached = workdir.complete(stage, keys[stage])
        runs = stage in visit and (stage in forced or not cached)
        rows.append(
            {
                "stage": stage,
                "key": keys[stage][:12],
                "cached": cached,
                "runs": runs,
                "resources": resources(cfg, stage, counts),
            }
        )
    return rows


def _inputs(stage: str, workdir: Workdir, keys: dict[str, str], done: dict[str, StageResult]) -> dict[str, StageResult]:
    inputs = {}
    for dep in DEPENDS[stage]:
        result = done.get(dep) or workdir.cached(dep, keys[dep])
        if result is None:
            raise PipelineError(
                f"stage {stage} needs the output of {dep}, which is not in {workdir.root}: "
                f"run without --only (or --from {dep}) first"
            )
        inputs[dep] = result
    return inputs


def run_pipeline(cfg: PipelineConfig, options: Options, config_text: str) -> dict[str, StageResult]:
    """Run the pipeline; returns every stage's result (cached or new)."""
    from workflows.tracking import Tracker, check_tracking, default_tracking_uri

    workdir, keys = Workdir(options.workdir), stage_keys(cfg)
    visit, forced = selected(options)
    try:
        uri = options.tracking_uri or default_tracking_uri(workdir.root)
    except ValueError as err:
        raise PipelineError(str(err)) from None
    check_tracking(uri)
    workdir.lock()
    try:
        for stage in sorted({s for v in visit for s in (v, *DEPENDS[v])}, key=STAGES.index):
            workdir.cached(stage, keys[stage])  # StaleOutput here, before any stage, for an old workdir's path
        ctx = RunContext(
            workdir,
            uri,
            cfg.tracking.experiment,
            ray_address=options.ray_address,
            progress=options.progress,
            worker_output=options.worker_output,
        )
        tracker = ctx.tracker = Tracker(uri, cfg.tracking.experiment, ctx.artifact_root())
        # the workdir's own store (a local workdir only): its artifacts live in the workdir too
        if not storage.is_remote(workdir.root) and uri == default_tracking_uri(workdir.root):
            tracker.check_artifact_location()
        killed = tracker.mark_killed(WORKDIR_TAG, workdir.root)  # we hold the lock: whoever left them is gone
        if killed:
            log.warning("marked %d run(s) left RUNNING by an interrupted run of this workdir as KILLED", len(killed))
        tags = {WORKDIR_TAG: workdir.root, "clearair.pipeline": cfg.name}
        parent = tracker.start_run(f"{cfg.name}", tags=tags)
        ctx.parent_run_id = parent
        tracker.log_params(parent, cfg.model_dump(mode="json"))
        tracker.log_text(parent, config_text, "pipeline.yaml")
        try:
            done = _run_stages(cfg, ctx, workdir, keys, visit, forced)
        except BaseException:
            _end_failed(tracker, parent)
            raise
        tracker.end_run(parent, "FINISHED")
        return done
    finally:
        workdir.unlock()


def _end_failed(tracker, run_id: str) -> None:
    """Mark a run FAILED if the store still takes writes; when it does not (a full disk), the original error is
    the one to report (MLflow's own traceback of the failed write is held back) and the next run on the workdir
    marks the run KILLED."""
    store_log = logging.getLogger("mlflow.store.db.utils")  # logs each failed write with its traceback
    level = store_log.level
    store_log.setLevel(logging.CRITICAL)
    try:
        tracker.end_run(run_id, "FAILED")
    except Exception as err:  # noqa: BLE001 - best effort on the way out
        why = storage_fault(err, tracker.uri, tracker.uri) or f"{type(err).__name__}: {str(err).splitlines()[0]}"
        log.warning("could not mark run %s FAILED (%s); the next run marks it KILLED", run_id, why)
    finally:
        store_log.setLevel(level)


def _run_stages(cfg, ctx: RunContext, workdir: Workdir, keys, visit, forced) -> dict[str, StageResult]:
    done: dict[str, StageResult] = {}
    tracker = ctx.tracker
    for n, stage in enumerate(visit, 1):
        say = _progress_line(ctx, f"[{n}/{len(visit)}] {stage}")
        cached = workdir.cached(stage, keys[stage])
        if cached is not None and stage not in forced:
            say(f"cached ({storage.name(workdir.stage_dir(stage, keys[stage]))})")
            done[stage] = replace(cached, seconds=None)  # printed as "cached"
            continue
        inputs = _inputs(stage, workdir, keys, done)
        out = workdir.stage_dir(stage, keys[stage])
        storage.makedirs(out)
        tags = {"clearair.stage": stage, "clearair.stage_key": keys[stage], WORKDIR_TAG: workdir.root}
        run_id = tracker.start_run(stage, parent_run_id=ctx.parent_run_id, tags=tags)
        tracker.log_params(run_id, {stage: getattr(cfg, stage).model_dump(mode="json")})
        stage_ctx = replace(ctx, stage=stage, key=keys[stage], out=out, run_id=run_id)
        started = time.perf_counter()
        say(f"started ({resources(cfg, stage)})")
        try:
            result = STAGE_RUN[stage](cfg, stage_ctx, inputs)
            result = replace(result, seconds=round(time.perf_counter() - started, 1), **stamp())
        except BaseException as err:
            say(f"failed after {time.perf_counter() - started:.0f} s ({type(err).__name__})")
            _end_failed(tracker, run_id)  # end_run sends the queued metrics first
            raise
        workdir.publish(result)
        tracker.log_dict(run_id, result.to_json(), "result.json")
        tracker.log_metrics(run_id, {"stage_seconds": result.seconds}, step=0)
        tracker.flush()
        tracker.end_run(run_id, "FINISHED")
        say(f"done in {_took(result.seconds)}" + (f" (skipped: {result.skipped})" if result.skipped else ""))
        done[stage] = result
    return done


def _progress_line(ctx: RunContext, prefix: str):
    """A function printing ``prefix: text`` on stderr (progress lines; off with --no-progress or -q)."""

    def say(text: str) -> None:
        if ctx.progress:
            print(f"{time.strftime('%H:%M:%S')} {prefix}: {text}", file=sys.stderr, flush=True)

    return say


def _took(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
