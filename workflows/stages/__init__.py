"""One module per pipeline stage; each exposes ``run(cfg, ctx, inputs) -> StageResult`` and only orchestrates."""
