"""Stage 3: learn the three-tier quality prompts (terrible / mediocre / excellent) on the tier shards.

The last quarter of the tier shards is held out for validation (tier accuracy and the 3x3 confusion matrix,
logged as metrics and artifacts); the rest train the prompts with task-balanced batches. The learned contexts
are saved as safetensors (no pickle) for the training stage's CLIP-aware loss and for ``clearair score``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from synth import storage
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.stages.common import ray_ready, remote_call


def perceiver_config(cfg: PipelineConfig) -> dict[str, Any]:
    """The full PerceiverConfig of the stage (preset + overrides) as plain types."""
    from clearair.models.perceiver import PerceiverConfig

    base = PerceiverConfig.tiny() if cfg.perceiver.preset == "tiny" else PerceiverConfig()
    merged = {**asdict(base), **cfg.perceiver.perceiver}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in merged.items()}


def fit_perceiver(job: dict[str, Any]) -> dict[str, Any]:
    """Train the prompts; runs as a Ray task (on a GPU node when asked)."""
    import lightning.pytorch as L

    from clearair.data import TaskIndex, tier_loader
    from clearair.lightning import PerceiverModule
    from workflows.tracking import MetricsCallback, Tracker

    tr = job["tracking"]
    tracker = Tracker(tr["uri"], tr["experiment"], tr["artifact_root"])
    module = PerceiverModule(
        job["perceiver"],
        max_steps=job["steps"],
        lr=job["lr"],
        min_lr=job["min_lr"],
        allow_random_frozen=job["allow_random"],
    )
    tasks = TaskIndex(job["tasks"])
    size = job["perceiver"]["image_size"]
    batch = -(-job["batch"] // len(tasks)) * len(tasks)  # task-balanced: a multiple of the task count
    train = tier_loader(job["train"], batch, size, tasks, seed=job["seed"], view=job["view"])
    val = tier_loader(job["val"], batch, size, tasks, seed=job["seed"], shuffle=0, balanced=False, view=job["view"])
    with storage.local_output(job["out"], keep=("prompts.safetensors",)) as out:  # Lightning's files stay local
        trainer = L.Trainer(
            max_steps=job["steps"],
            max_epochs=-1,
            accelerator="gpu" if job["use_gpu"] else "cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[MetricsCallback(tracker, tr["run_id"])],
            default_root_dir=str(out / "lightning"),
            check_val_every_n_epoch=1,
        )
        trainer.fit(module, train, val)
        trainer.validate(module, val, verbose=False)
        module.export_prompts(out / "prompts.safetensors")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    tracker.close()
    return {
        "prompts": storage.join(job["out"], "prompts.safetensors"),
        "confusion": module.confusion.tolist(),
        "metrics": metrics,
    }


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:
    tiers = inputs["crossval"].outputs["tiers"]
    manifest = storage.read_json(storage.join(tiers, "manifest.json"))
    urls = [storage.join(tiers, s["name"]) for s in manifest["shards"] if s["samples"]]
    held = max(1, len(urls) // 4) if len(urls) > 1 else 0
    train, val = (urls[:-held], urls[-held:]) if held else (urls, urls)
    job = {
        "out": ctx.out,
        "perceiver": perceiver_config(cfg),
        "lr": cfg.perceiver.lr,
        "min_lr": cfg.perceiver.min_lr,
        "steps": cfg.perceiver.steps,
        "batch": cfg.perceiver.batch_per_tier,
        "tasks": sorted(manifest["tasks"]),
        "train": train,
        "val": val,
        "seed": cfg.seed,
        "use_gpu": cfg.perceiver.use_gpu,
        "allow_random": cfg.perceiver.allow_random_frozen,
        "view": cfg.perceiver.view,
        "tracking": ctx.tracking(),
    }
    ray_ready(ctx)
    res = remote_call(fit_perceiver, job, num_cpus=1, num_gpus=1 if cfg.perceiver.use_gpu else 0)
    tracker = ctx.tracker
    tracker.log_dataset(ctx.run_id, "tiers", inputs["crossval"].outputs["tiers_sha256"], tiers, "training")
    tracker.log_dict(
        ctx.run_id,
        {"labels": ["low", "medium", "high"], "rows_true_cols_pred": res["confusion"]},
        "confusion_matrix.json",
    )
    tracker.log_artifact(ctx.run_id, storage.local_copy(res["prompts"]))
    tracker.log_metrics(ctx.run_id, res["metrics"], step=cfg.perceiver.steps)
    return ctx.result({"prompts": res["prompts"], "perceiver_config": json.dumps(job["perceiver"])}, res["metrics"])
