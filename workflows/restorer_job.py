"""The train stage's job: the restorer spec it fits, the data it reads (tier shards or synth shards, the
difficulty probe), and the export of its best checkpoint."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from clearair.data import TaskIndex, check_resample, probe_set
from clearair.export import export_model
from clearair.restorer import read_checkpoint
from clearair.specs import LossSpec, NetworkSpec, OptimSpec, RestorerSpec
from synth import storage
from synth.read import shard_paths
from synth.tiers import tier_shard_paths
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.records import FitResult, TrainingData
from workflows.stages.common import learned_perceiver, resolved_priors


def restorer_spec(cfg: PipelineConfig, inputs: dict[str, StageResult]) -> RestorerSpec:
    """The restorer ``train`` fits: its network, loss (with the learned perceiver for the CLIP-aware part), priors
    and schedule."""
    t = cfg.train
    loss = LossSpec(
        name=t.loss,
        weights=dict(t.loss_weights),
        pixel=t.pixel_loss,
        clip_temperature=t.clip_temperature,
        con_labels=t.con_labels,
        con_gather=t.con_gather,
        vgg_taps=tuple(t.perceptual.taps),
        vgg_layer_weights=tuple(t.perceptual.layer_weights),
        negative_psnr=t.perceptual.negative_psnr,
        perceiver=learned_perceiver(inputs) if t.loss == "perceive_ir" else None,
        vgg=t.vgg,
    )
    optim = OptimSpec(t.fit.steps, t.fit.lr, t.fit.min_lr, t.fit.weight_decay, ema_decay=t.fit.ema)
    network = NetworkSpec(t.model.arch, dict(t.model.config), t.model.preset)
    priors = resolved_priors(t.priors, inputs)
    return RestorerSpec(network, optim, loss, priors, t.allow_random_frozen, select_by=t.select_by)


def training_data(cfg: PipelineConfig, inputs: dict[str, StageResult]) -> TrainingData:
    """What the restorer trains on: the tier shards for Perceive-IR (never the held-out ones), the shards with
    precomputed priors where the priors stage wrote them, the synth shards otherwise; validated on the synth
    validation split."""
    data = inputs["synth"].outputs["data"]
    tasks = sorted(storage.read_json(storage.join(data, "manifest.json"))["counts"]["task"])
    if cfg.train.loss == "perceive_ir":
        train, with_tiers = tier_shard_paths(inputs["crossval"].outputs["tiers"]), True  # never held-out tiers
    elif "train_shards" in inputs["priors"].outputs:  # shards with precomputed priors beside each sample
        train, with_tiers = inputs["priors"].outputs["train_shards"], False
    else:
        train, with_tiers = shard_paths(data, "train"), False
    val = shard_paths(data, "val")
    resample = check_resample(cfg.train.resample, tasks)  # a misspelt task fails here, not in a Ray worker
    return TrainingData(train, val, tasks, with_tiers, resample, difficulty_probe(cfg, val, tasks))


def difficulty_probe(cfg: PipelineConfig, val: list[str], tasks: list[str]) -> dict[str, Any] | None:
    """The perceptual loss's fixed probe set (:func:`clearair.data.probe_set`), built once here and handed to every
    worker; None where the loss has no perceptual part or ``train.perceptual.probe_per_task`` is 0."""
    t = cfg.train
    if "perceptual" in t.inert_fields() or t.perceptual.probe_per_task == 0:
        return None
    return probe_set(val, TaskIndex(tasks), t.fit.crop, t.perceptual.probe_per_task, seed=cfg.seed)


def export_restorer(cfg: PipelineConfig, ctx: RunContext, spec: RestorerSpec, fit: FitResult) -> str:
    """Export the best checkpoint (safetensors + config, with its priors, frozen parts, perceiver and how it was
    trained) into the stage's ``model``; returns that location."""
    model, record = read_checkpoint(storage.local_copy(fit.checkpoint))
    extra = {
        "priors": spec.priors,
        "frozen": record["extra"]["frozen"],
        "perceiver": spec.loss.perceiver,
        "pipeline": cfg.name,
        "allow_random_frozen": cfg.train.allow_random_frozen,
        "trained": {"val_psnr": fit.val_psnr, "step": fit.step, "batch_plan": asdict(fit.batch_plan)},
    }
    export = storage.join(ctx.out, "model")
    with storage.local_output(export) as local:
        export_model(model, local, extra=extra)
    return export
