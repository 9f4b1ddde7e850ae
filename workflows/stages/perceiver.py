"""Stage 3: learn the three-tier quality prompts (terrible / mediocre / excellent) on the tier shards.

Prompts train on the cross-validated tiers with task-balanced batches. They are validated on held-out tiers:
the validation and test splits restored by cross-validation (``crossval.restore_splits``), photographs the prompts
never saw, or, without those, the last quarter of the tier shards. On held-out tiers the stage reports what
``clearair score`` would say (:mod:`clearair.scoring`: the view's crop grid, and the whole image resized): 3-way
accuracy, each tier's recall, per-task accuracy, how often the clean image beats its degraded input and the
Spearman correlation of the score with the tier, plus the confusion matrix as a heatmap and a tier contact sheet
(low | medium | high per task) as artifacts. The learned contexts are saved as safetensors (no pickle), with
the view they were learned on, for the CLIP-aware loss and for ``clearair score``.
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

    base = {"tiny": PerceiverConfig.tiny, "qclip": PerceiverConfig.qclip}.get(cfg.perceiver.preset, PerceiverConfig)()
    merged = {**asdict(base), **cfg.perceiver.perceiver}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in merged.items()}


def fit_perceiver(job: dict[str, Any]) -> dict[str, Any]:
    """Train the prompts; runs as a Ray task (on a GPU node when asked)."""
    import lightning.pytorch as L

    from clearair.data import TaskIndex, tier_loader
    from clearair.lightning import PerceiverModule
    from workflows.tracking import Tracker
    from workflows.tracking.callback import MetricsCallback

    tr = job["tracking"]
    tracker = Tracker(tr["uri"], tr["experiment"], tr["artifact_root"])
    L.seed_everything(job["seed"], workers=True, verbose=False)  # a Ray task's RNGs start from the OS otherwise
    module = PerceiverModule(
        job["perceiver"],
        max_steps=job["steps"],
        lr=job["lr"],
        min_lr=job["min_lr"],
        allow_random_frozen=job["allow_random"],
        seed=job["seed"],
    )
    tasks = TaskIndex(job["tasks"])
    size = job["perceiver"]["image_size"]
    batch = -(-job["batch"] // len(tasks)) * len(tasks)  # task-balanced: a multiple of the task count
    view, crop = job["view"], job["crop"]
    train = tier_loader(job["train"], batch, size, tasks, seed=job["seed"], view=view, crop=crop)
    val = tier_loader(job["val"], batch, size, tasks, seed=job["seed"], shuffle=0, balanced=False, view=view, crop=crop)
    keep = ("prompts.safetensors", *FIGURES)  # Lightning's working files stay local
    with storage.local_output(job["out"], keep=keep) as out:
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
        module.export_prompts(out / "prompts.safetensors", view={"view": view, "crop": score_crop(view, crop, size)})
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        metrics |= heldout_report(module.perceiver.eval(), job["val"], score_crop(view, crop, size), out)
    tracker.close()
    return {
        "prompts": storage.join(job["out"], "prompts.safetensors"),
        "confusion": module.confusion.tolist(),
        "metrics": metrics,
        "figures": [storage.join(job["out"], n) for n in FIGURES],
    }


FIGURES = ("confusion_matrix.png", "tier_examples.png")


def score_crop(view: str, crop: int | None, image_size: int) -> int | None:
    """The crop of the grid an image is scored on: the view's crop, or None (whole image) for ``resize``."""
    return {"train_crop": crop, "crop": image_size}.get(view)


def heldout_report(perceiver, urls: list[str], crop: int | None, out) -> dict[str, float]:
    """Scores of every held-out tier image on the view's crop grid (``heldout/...``) and whole (``whole/...``);
    writes the confusion heatmap and the tier contact sheet into ``out``."""
    from clearair.data import whole_images
    from clearair.models.perceiver import TIERS
    from clearair.scoring import confusion, score_tier_samples, tier_report
    from synth.figures import heatmap, labelled_grid, png_bytes, thumb

    samples = list(whole_images(urls))
    grid, whole = score_tier_samples(perceiver, samples, crop), score_tier_samples(perceiver, samples, None)
    metrics = {f"heldout/{k}": v for k, v in tier_report(grid).items()}
    metrics |= {f"whole/{k}": v for k, v in tier_report(whole).items()}
    names = list(TIERS)
    (out / FIGURES[0]).write_bytes(png_bytes(heatmap(confusion(grid), names, names, "true (rows) / predicted")))
    first = {s["meta"]["task"]: s for s in reversed(samples)}
    rows = [
        (f"{t}\nlow {s['meta']['psnr']['low']:.1f} dB\nmedium {s['meta']['psnr']['medium']:.1f} dB",
         [thumb(s[k], 96) for k in ("lq", "medium", "gt")])
        for t, s in sorted(first.items())
    ]  # fmt: skip
    (out / FIGURES[1]).write_bytes(png_bytes(labelled_grid(rows, names)))
    return metrics


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:
    from synth.tiers import tier_shard_paths

    tiers = inputs["crossval"].outputs["tiers"]
    manifest = storage.read_json(storage.join(tiers, "manifest.json"))
    urls, heldout = tier_shard_paths(tiers), tier_shard_paths(tiers, heldout=True)
    if heldout:
        train, val = urls, heldout
    else:  # no held-out restorations: the last quarter of the tier shards validates
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
        "crop": cfg.train.fit.crop,
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
    for path in (res["prompts"], *res["figures"]):
        tracker.log_artifact(ctx.run_id, storage.local_copy(path))
    tracker.log_metrics(ctx.run_id, res["metrics"], step=cfg.perceiver.steps)
    return ctx.result({"prompts": res["prompts"], "perceiver_config": json.dumps(job["perceiver"])}, res["metrics"])
