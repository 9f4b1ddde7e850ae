"""Stage 4: frozen, expensive priors computed once per whole image, read by training instead of recomputed.

Which parts can be precomputed depends on the model: DINOv2 CLS tokens of Perceive-IR are taken on each random
training crop, so they stay on the fly; an image-level quality embedding (the MLLM assessor) or region masks of a
ClearAIR model do not depend on the crop position. This stage records what it decided and why; parts a
pipeline computes on the fly are skipped automatically.
"""

from __future__ import annotations

from workflows.config import PipelineConfig
from workflows.context import RunContext, StageResult

ON_THE_FLY = {
    "none": "the model needs no frozen priors",
    "dino": "DINOv2 CLS tokens are taken on each random crop, so they are computed on the fly during training",
}


def run(cfg: PipelineConfig, ctx: RunContext, inputs: dict[str, StageResult]) -> StageResult:
    kind = cfg.train.priors.get("kind", "none")
    if not cfg.priors.enabled:
        reason = "disabled in the pipeline (priors.enabled: false): computed on the fly"
    elif kind in ON_THE_FLY:
        reason = ON_THE_FLY[kind]
    else:
        reason = (
            f"{kind} priors are computed on the fly in this version; precomputing them with Ray batch "
            f"inference is planned (see README, Status)"
        )
    ctx.tracker.set_tags(ctx.run_id, {"clearair.priors": "on_the_fly", "clearair.priors_reason": reason})
    return ctx.result({}, {}, skipped=reason)
