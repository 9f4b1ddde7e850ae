"""Stage 6: PSNR/SSIM of the trained restorer per task and benchmark, a results table and a figure.

Held-out synthetic shards (the test split by default) and standard test folders in known layouts are restored
whole (tiled beyond the memory budget) and measured on the float output (:mod:`workflows.evaluation`). Every
number says its convention: RGB on [0, 1] as scikit-image computes it (the PromptIR line of papers) and Y of
BT.601 (BasicSR). Means are image-weighted within a task or benchmark, macro (the mean of per-task means) across
a set's tasks, and the papers' Average over benchmarks.
"""

from __future__ import annotations

from typing import Any

from synth import storage
from synth.read import shard_paths
from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult
from workflows.evaluation import evaluate_model, protocol_for, write_figure, write_tables


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:
    data, ev = inputs["synth"].outputs["data"], cfg.evaluate
    sets: dict[str, Any] = {f"synthetic-{split}": shard_paths(data, split) for split in ev.splits}
    results = evaluate_model(
        storage.local_tree(inputs["train"].outputs["model"]),
        sets,
        [b.model_dump() for b in ev.benchmarks],
        protocol_for(ev),
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
    outputs = {"table_md": str(tables[0]), "table_csv": str(tables[1]), "table_images": str(tables[2])}
    return ctx.result({**outputs, "figure": str(figure)}, metrics)
