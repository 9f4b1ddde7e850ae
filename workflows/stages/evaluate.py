"""Stage 6: PSNR/SSIM of the trained restorer per task and benchmark, a results table and a figure.

Held-out synthetic shards (the test split by default) and standard test folders in known layouts are restored
whole (tiled when large). Every number says its convention: RGB on [0, 1] as scikit-image computes it (the
PromptIR line of papers) and Y of BT.601 (BasicSR). Means are image-weighted within a task or benchmark and
macro (the mean of per-task means) across them.
"""

from __future__ import annotations

from typing import Any

from synth import storage
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:
    from synth.read import shard_paths
    from workflows.evaluation import evaluate_model, write_figure, write_tables

    data = inputs["synth"].outputs["data"]
    sets: dict[str, Any] = {f"synthetic-{split}": shard_paths(data, split) for split in cfg.evaluate.splits}
    results = evaluate_model(
        storage.local_tree(inputs["train"].outputs["model"]),
        sets,
        [b.model_dump() for b in cfg.evaluate.benchmarks],
        tile=cfg.evaluate.tile,
        overlap=cfg.evaluate.overlap,
        max_images=cfg.evaluate.max_images,
        seed=cfg.seed,
        device=cfg.evaluate.device,
        progress=ctx.progress,
    )
    tracker = ctx.tracker
    with storage.local_output(ctx.out) as local:
        tables = write_tables(results, local)
        figure = write_figure(results, local / "figure.png", cfg.evaluate.figure_crop)
        for path in (*tables, figure):
            if path is not None:
                tracker.log_artifact(ctx.run_id, path)
    tables = [storage.join(ctx.out, p.name) for p in tables]
    figure = storage.join(ctx.out, figure.name) if figure is not None else None
    metrics = results["metrics"]
    tracker.log_metrics(ctx.run_id, metrics, step=0)
    return ctx.result({"table_md": str(tables[0]), "table_csv": str(tables[1]), "figure": str(figure)}, metrics)
