"""Lightning inside Ray Train: one function trains any restorer on shards, resumably, on any worker count.

``fit_restorer`` builds a ``TorchTrainer`` whose workers run a native Lightning loop with Ray's DDP strategy.
Checkpoints are reported every ``val_every`` steps (one "epoch" of the step-based loader) with the validation
PSNR, the best ones kept; rebuilding the trainer with the same run name and storage path resumes from the last
checkpoint (Ray Train V2), with the same global step. A pipeline states its global batch; :func:`batch_plan`
keeps it on any worker count by per-worker batch and accumulation, and scales the learning rate (linearly) only
when there are more workers than samples in the global batch.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synth import storage
from workflows.records import BatchPlan, FitResult, TrackingRef, TrainingData

if TYPE_CHECKING:
    from clearair.specs import RestorerSpec

log = logging.getLogger(__name__)


def batch_plan(global_batch: int, workers: int, max_worker_batch: int) -> BatchPlan:
    """Per-worker batch x workers x accumulation = global batch, or the nearest with more workers than samples."""
    if workers >= global_batch:
        scale = workers / global_batch
        note = "" if scale == 1 else f"{workers} workers > global batch {global_batch}: lr scaled x{scale:g}"
        return BatchPlan(1, 1, scale, note)
    for accumulation in range(1, global_batch + 1):
        per, rest = divmod(global_batch, workers * accumulation)
        if rest == 0 and per <= max_worker_batch:
            return BatchPlan(per, accumulation, 1.0, "")
    per = min(max_worker_batch, math.ceil(global_batch / workers))
    accumulation = max(1, round(global_batch / (per * workers)))
    effective = per * workers * accumulation
    return BatchPlan(per, accumulation, 1.0, f"global batch {global_batch} not divisible; using {effective}")


@dataclass(frozen=True)
class RestorerJob:
    """One restorer's Ray Train run as every worker receives it."""

    name: str  # the Ray Train run name, also the label of its progress lines
    spec: RestorerSpec  # what every worker builds its module from (build_restorer_module), learning rate scaled
    data: TrainingData
    fit: dict[str, Any]  # a workflows.config.Fit as a dict
    seed: int
    plan: BatchPlan
    tracking: TrackingRef | None  # the MLflow run rank 0 logs to, or none
    progress: bool


def worker_nodes() -> list[str]:
    """Ray node id of every training worker, gathered over the process group Ray Train set up (all ranks call)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [node]
    nodes: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def _loaders(job: RestorerJob) -> tuple[Any, Any]:
    """The worker's training stream (two crops per sample, ``val_every`` optimizer steps per epoch) and its fixed
    validation set."""
    from clearair.data import TaskIndex, restoration_loader, validation_loader

    data, fit, tasks = job.data, job.fit, TaskIndex(job.data.tasks)
    train = restoration_loader(
        data.train,
        fit["crop"],
        job.plan.per_worker,
        tasks,
        num_workers=fit["data_workers"],
        seed=job.seed,
        two_crops=True,
        tiers=data.tiers,
        steps_per_epoch=fit["val_every"] * job.plan.accumulation,
        resample=data.resample,
        augment=fit["augment"],
        fresh_noise=fit["fresh_noise"],
    )
    return train, validation_loader(data.val, tasks, fit["val_crop"], fit["val_images"], tiers=False)


def torch_threads(cpus_per_worker: float) -> int:
    """Intra-op threads for a worker given ``cpus_per_worker`` CPUs: the whole CPUs it holds, at least one.

    Ray's workers inherit ``OMP_NUM_THREADS=1`` (synth's shard tasks want one thread each), so without this a
    worker that asked for four CPUs would train on one of them."""
    return max(1, math.floor(cpus_per_worker))


def _callbacks(job: RestorerJob, nodes: list[str]) -> list[Any]:
    """Ray Train's report callback on every rank; on rank 0 also MLflow metrics and progress lines."""
    import ray.train
    from ray.train.lightning import RayTrainReportCallback

    context, callbacks = ray.train.get_context(), [RayTrainReportCallback()]
    if context.get_world_rank() != 0:
        return callbacks
    if job.tracking is not None:
        from workflows.tracking.callback import MetricsCallback

        tracker, run_id = job.tracking.open(), job.tracking.run_id
        import torch

        tags = {
            "clearair.world_size": str(context.get_world_size()),
            "clearair.nodes": str(len(set(nodes))),
            "clearair.torch_threads": str(torch.get_num_threads()),
        }
        tracker.set_tags(run_id, tags)
        callbacks.append(MetricsCallback(tracker, run_id))
    if job.progress:
        from workflows.progress import ProgressLines

        callbacks.append(ProgressLines(job.name, job.fit["steps"], job.fit["global_batch"]))
    return callbacks


def _train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; ``config["job"]`` is the :class:`RestorerJob`."""
    import lightning.pytorch as L
    import ray.train
    import torch
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer

    from clearair.lightning import build_restorer_module, frozen_parts_in_eval

    job: RestorerJob = config["job"]
    torch.set_num_threads(torch_threads(job.fit["cpus_per_worker"]))
    torch.manual_seed(job.seed)
    nodes = worker_nodes()
    module = build_restorer_module(job.spec)
    train, val = _loaders(job)
    if job.data.probe is not None:
        module.set_probe(job.data.probe)
    # Lightning's own files (its last checkpoint, ~10 MB at the quickstart's size) live only as long as the fit:
    # the checkpoints that count are the ones Ray Train keeps under the run's storage.
    with tempfile.TemporaryDirectory(prefix="clearair-train-") as root:
        trainer = L.Trainer(
            max_steps=job.fit["steps"],
            max_epochs=-1,
            accelerator="gpu" if job.fit["use_gpu"] else "cpu",
            devices="auto",
            strategy=RayDDPStrategy(),
            plugins=[RayLightningEnvironment()],
            callbacks=_callbacks(job, nodes),
            precision=job.fit["precision"],
            accumulate_grad_batches=job.plan.accumulation,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
            log_every_n_steps=10,
        )
        trainer = prepare_trainer(trainer)
        checkpoint = ray.train.get_checkpoint()
        with frozen_parts_in_eval():
            if checkpoint is None:
                trainer.fit(module, train, val)
                return
            with checkpoint.as_directory() as d:
                ckpt = str(Path(d) / RayTrainReportCallback.CHECKPOINT_NAME)
                trainer.fit(module, train, val, ckpt_path=ckpt, weights_only=True)


def _trainer(job: RestorerJob, storage_path: str) -> Any:
    """The ``TorchTrainer`` of ``job``: its workers and resources, the best two checkpoints by ``val/psnr`` kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fit = job.fit
    resources = {"CPU": fit["cpus_per_worker"], **({"GPU": 1} if fit["use_gpu"] else {})}
    return TorchTrainer(
        _train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=fit["workers"], use_gpu=fit["use_gpu"], resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=storage.resolve(storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val/psnr", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=fit["max_failures"]),
        ),
    )


def fit_restorer(
    name: str,
    storage_path: str,
    spec: RestorerSpec,
    data: TrainingData,
    fit: dict[str, Any],
    seed: int,
    tracking: TrackingRef | None = None,
    progress: bool = True,
) -> FitResult:
    """Train (or resume) one restorer with Ray Train; returns the best checkpoint's location and its metrics.

    Args:
        name: the Ray Train run name; the same name and storage resume an interrupted run.
        storage_path: Ray Train ``storage_path``: a local or shared directory, or an ``s3://`` prefix (Ray Train
            writes checkpoints there through pyarrow, with the same AWS settings as ``synth.storage``); the best
            checkpoint is also published there as ``<name>-best.ckpt``.
        spec: the restorer, its loss, frozen parts and optimiser (``clearair.specs.RestorerSpec``); each worker
            builds its module from it (``clearair.lightning.build_restorer_module``).
        data: the shards, tasks, resampling and difficulty probe (given to every worker's module).
        fit: a ``workflows.config.Fit`` as a dict.
        tracking: the MLflow run that rank 0 logs metrics to.
        progress: rank 0 prints progress lines (:mod:`workflows.progress`), labelled ``name``.
    """
    plan = batch_plan(fit["global_batch"], fit["workers"], fit["max_worker_batch"])
    if plan.note:
        log.warning("%s: %s", name, plan.note)
    spec = replace(spec, optim=replace(spec.optim, lr=spec.optim.lr * plan.lr_scale))
    result = _trainer(RestorerJob(name, spec, data, fit, seed, plan, tracking, progress), storage_path).fit()
    best, metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get("val/psnr", float("-inf")))
    dest = storage.join(storage_path, f"{name}-best.ckpt")
    with best.as_directory() as d:
        storage.put_file(Path(d) / "checkpoint.ckpt", dest)
    return FitResult(dest, float(metrics.get("val/psnr", float("nan"))), int(metrics.get("step", 0)), plan)
