"""The perceiver stage's work, run as a Ray task: learn the three quality prompts on the tier shards (CLIP
frozen), then report the learned perceiver on held-out tiers (accuracy per task, a confusion matrix, a tier contact
sheet)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clearair.data import TaskIndex, tier_loader, whole_images
from clearair.models.perceiver import TIERS
from clearair.scoring import confusion, score_tier_samples, tier_report
from synth import storage
from synth.figures import heatmap, labelled_grid, png_bytes, thumb
from synth.tiers import medium_gains
from workflows.records import TrackingRef


@dataclass(frozen=True)
class PerceiverJob:
    """The prompt-learning run as its Ray task receives it."""

    out: str  # the stage's output: prompts.safetensors and the figures
    perceiver_config: dict[str, Any]  # the full PerceiverConfig as plain types (perceiver_config)
    steps: int
    lr: float
    min_lr: float
    batch_per_tier: int  # rounded up to a multiple of the task count (task-balanced batches)
    tasks: list[str]
    train: list[str]  # tier shards the prompts learn on
    val: list[str]  # tier shards validated and reported on
    seed: int
    use_gpu: bool
    allow_random_frozen: bool
    view: str  # crop, resize or train_crop (perceiver.view)
    crop: int  # train.fit.crop: the crop of the ``train_crop`` view
    tracking: TrackingRef  # the stage's run
    wellposed_gain: float | None  # perceiver.wellposed_gain: the heldout_wellposed report's threshold


@dataclass(frozen=True)
class LearnedPrompts:
    """What the prompt-learning task returns: where the prompts and figures are, and the held-out report."""

    prompts: str  # prompts.safetensors
    confusion: list[list[int]]  # the validation confusion matrix, rows true tier, columns predicted
    metrics: dict[str, float]  # val/..., heldout/... and whole/...
    figures: list[str]  # the confusion heatmap and the tier contact sheet


def tier_loaders(job: PerceiverJob) -> tuple[Any, Any]:
    """Task-balanced training batches of the tier shards and the fixed validation batches, on the job's view."""
    tasks, size, seed = TaskIndex(job.tasks), job.perceiver_config["image_size"], job.seed
    batch = -(-job.batch_per_tier // len(tasks)) * len(tasks)  # task-balanced: a multiple of the task count
    view, crop = job.view, job.crop
    train = tier_loader(job.train, batch, size, tasks, seed=seed, view=view, crop=crop)
    val = tier_loader(job.val, batch, size, tasks, seed=seed, shuffle=0, balanced=False, view=view, crop=crop)
    return train, val


def prompt_trainer(job: PerceiverJob, callbacks: list[Any], root: str) -> Any:
    """The Lightning trainer of the prompts: one device, no logger or checkpoints, validated every epoch."""
    import lightning.pytorch as L

    return L.Trainer(
        max_steps=job.steps,
        max_epochs=-1,
        accelerator="gpu" if job.use_gpu else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=root,
        check_val_every_n_epoch=1,
    )


def fit_perceiver(job: PerceiverJob) -> LearnedPrompts:
    """Train the prompts; runs as a Ray task (on a GPU node when asked)."""
    import lightning.pytorch as L

    from clearair.lightning import PerceiverModule, frozen_parts_in_eval
    from workflows.tracking.callback import MetricsCallback

    tracker = job.tracking.open()
    L.seed_everything(job.seed, workers=True, verbose=False)  # a Ray task's RNGs start from the OS otherwise
    module = PerceiverModule(
        job.perceiver_config,
        max_steps=job.steps,
        lr=job.lr,
        min_lr=job.min_lr,
        allow_random_frozen=job.allow_random_frozen,
        seed=job.seed,
    )
    train, val = tier_loaders(job)
    crop = score_crop(job.view, job.crop, job.perceiver_config["image_size"])
    keep = ("prompts.safetensors", *FIGURES)  # Lightning's working files stay local
    with storage.local_output(job.out, keep=keep) as out:
        trainer = prompt_trainer(job, [MetricsCallback(tracker, job.tracking.run_id)], str(out / "lightning"))
        with frozen_parts_in_eval():
            trainer.fit(module, train, val)
        trainer.validate(module, val, verbose=False)
        module.export_prompts(out / "prompts.safetensors", view={"view": job.view, "crop": crop})
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        metrics |= heldout_report(module.perceiver.eval(), job.val, crop, out, job.wellposed_gain)
    tracker.close()
    figures = [storage.join(job.out, n) for n in FIGURES]
    return LearnedPrompts(storage.join(job.out, "prompts.safetensors"), module.confusion.tolist(), metrics, figures)


FIGURES = ("confusion_matrix.png", "tier_examples.png")


def score_crop(view: str, crop: int | None, image_size: int) -> int | None:
    """The crop of the grid an image is scored on: the view's crop, or None (whole image) for ``resize``."""
    return {"train_crop": crop, "crop": image_size}.get(view)


def heldout_report(
    perceiver, urls: list[str], crop: int | None, out, min_gain: float | None = None
) -> dict[str, float]:
    """Scores of every held-out tier image on the view's crop grid (``heldout/...``) and whole (``whole/...``);
    with ``min_gain``, also on the samples whose (first) medium tier is that many dB above the low one
    (``heldout_wellposed/...``, and how many: ``heldout_wellposed/samples``). Writes the confusion heatmap and
    the tier contact sheet into ``out``."""
    samples = list(whole_images(urls))
    grid, whole = score_tier_samples(perceiver, samples, crop), score_tier_samples(perceiver, samples, None)
    metrics = {f"heldout/{k}": v for k, v in tier_report(grid).items()}
    metrics |= {f"whole/{k}": v for k, v in tier_report(whole).items()}
    if min_gain is not None:
        posed = {s["key"] for s in samples if medium_gains(s["meta"])[0] >= min_gain}
        metrics["heldout_wellposed/samples"] = float(len(posed))
        metrics |= {f"heldout_wellposed/{k}": v for k, v in tier_report([g for g in grid if g.key in posed]).items()}
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
