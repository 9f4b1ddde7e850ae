"""Stage 5: train the restorer (Perceive-IR with its quality-aware loss, ClearAIR, or plain L1) on Ray Train.

Perceive-IR trains on the tier shards, whose medium tier gives the difficulty-adaptive loss its negatives, with
the learned prompts frozen for the CLIP-aware loss. The best checkpoint by validation PSNR is exported as
safetensors + config (with the priors it needs and its provenance) and registered in MLflow under an alias.
"""

from __future__ import annotations

import json
from typing import Any

from synth import storage
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.stages.common import ray_ready


def learned_perceiver(inputs: dict[str, StageResult]) -> dict[str, Any]:
    """The perceiver the previous stage learned: its config and its prompts file."""
    p = inputs["perceiver"].outputs
    return {"config": json.loads(p["perceiver_config"]), "prompts": p["prompts"]}


def resolved_priors(spec: dict[str, Any], inputs: dict[str, StageResult]) -> dict[str, Any]:
    """ClearAIR's default assessor is the learned perceiver: fill in its config and prompts unless given."""
    spec = dict(spec)
    assessor = dict(spec.get("assessor") or {})
    if spec.get("kind") == "clearair" and assessor.get("kind") == "perceiver" and "config" not in assessor:
        spec["assessor"] = {**assessor, **learned_perceiver(inputs)}
    return spec


def module_args(cfg: PipelineConfig, inputs: dict[str, StageResult]) -> dict[str, Any]:
    t = cfg.train
    return {
        "arch": t.model.arch,
        "model_config": dict(t.model.config),
        "preset": t.model.preset,
        "loss": t.loss,
        "pixel_loss": t.pixel_loss,
        "loss_weights": dict(t.loss_weights),
        "clip_temperature": t.clip_temperature,
        "select_by": t.select_by,
        "con_labels": t.con_labels,
        "con_gather": t.con_gather,
        "vgg_taps": tuple(t.perceptual.taps),
        "vgg_layer_weights": tuple(t.perceptual.layer_weights),
        "negative_psnr": t.perceptual.negative_psnr,
        "priors": resolved_priors(t.priors, inputs),
        "perceiver": learned_perceiver(inputs) if t.loss == "perceive_ir" else None,
        "vgg": t.vgg,
        "allow_random_frozen": t.allow_random_frozen,
        "lr": t.fit.lr,
        "min_lr": t.fit.min_lr,
        "weight_decay": t.fit.weight_decay,
        "max_steps": t.fit.steps,
        "ema_decay": t.fit.ema,
    }


def training_data(cfg: PipelineConfig, inputs: dict[str, StageResult]) -> dict[str, Any]:
    from clearair.data import check_resample
    from synth.read import shard_paths

    data = inputs["synth"].outputs["data"]
    tasks = sorted(storage.read_json(storage.join(data, "manifest.json"))["counts"]["task"])
    if cfg.train.loss == "perceive_ir":
        from synth.tiers import tier_shard_paths

        train, with_tiers = tier_shard_paths(inputs["crossval"].outputs["tiers"]), True  # never held-out tiers
    elif "train_shards" in inputs["priors"].outputs:  # shards with precomputed priors beside each sample
        train, with_tiers = json.loads(inputs["priors"].outputs["train_shards"]), False
    else:
        train, with_tiers = shard_paths(data, "train"), False
    val = shard_paths(data, "val")
    resample = check_resample(cfg.train.resample, tasks)  # a misspelt task fails here, not in a Ray worker
    out = {"train": train, "val": val, "tasks": tasks, "tiers": with_tiers, "resample": resample}
    return out | {"probe": difficulty_probe(cfg, val, tasks)}


def difficulty_probe(cfg: PipelineConfig, val: list[str], tasks: list[str]) -> dict[str, Any] | None:
    """The perceptual loss's fixed probe set (:func:`clearair.data.probe_set`), built once here and handed to every
    worker; None where the loss has no perceptual part or ``train.perceptual.probe_per_task`` is 0."""
    from clearair.data import TaskIndex, probe_set

    t = cfg.train
    if "perceptual" in t.inert_fields() or t.perceptual.probe_per_task == 0:
        return None
    return probe_set(val, TaskIndex(tasks), t.fit.crop, t.perceptual.probe_per_task, seed=cfg.seed)


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:
    from clearair.export import export_model
    from clearair.restorer import read_checkpoint
    from workflows.training import fit_restorer

    module, data = module_args(cfg, inputs), training_data(cfg, inputs)
    ray_ready(ctx)
    fit = fit_restorer(
        "train",
        storage.join(ctx.out, "ray"),
        module,
        data,
        cfg.train.fit.model_dump(),
        cfg.seed,
        ctx.tracking(),
        progress=ctx.progress,
    )
    model, record = read_checkpoint(storage.local_copy(fit["checkpoint"]))
    extra = {
        "priors": module["priors"],
        "frozen": record["extra"]["frozen"],
        "perceiver": module["perceiver"],
        "pipeline": cfg.name,
        "allow_random_frozen": cfg.train.allow_random_frozen,
        "trained": {"val_psnr": fit["val_psnr"], "step": fit["step"], "batch_plan": fit["batch_plan"]},
    }
    export = storage.join(ctx.out, "model")
    with storage.local_output(export) as local:
        export_model(model, local, extra=extra)
    tracker = ctx.tracker
    if data["tiers"]:
        tracker.log_dataset(
            ctx.run_id,
            "tiers",
            inputs["crossval"].outputs["tiers_sha256"],
            inputs["crossval"].outputs["tiers"],
            "training",
        )
    tracker.log_dataset(
        ctx.run_id, "synth", inputs["synth"].outputs["manifest_sha256"], inputs["synth"].outputs["data"], "validation"
    )
    version = tracker.register_model(
        ctx.run_id, storage.local_tree(export), cfg.tracking.registered_model, cfg.tracking.alias
    )
    metrics = {"best_val_psnr": fit["val_psnr"], "best_step": fit["step"]}
    tracker.log_metrics(ctx.run_id, metrics, step=cfg.train.fit.steps)
    return ctx.result({"model": export, "checkpoint": fit["checkpoint"], "registered_version": str(version)}, metrics)
