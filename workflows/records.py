"""Small frozen records that stages hand to Ray tasks and to each other (stage-specific ones live beside their stage).

Plain types only, so a record pickles into any Ray worker; never a model. A record written to disk becomes the
same dict it always was (``dataclasses.asdict`` at the edge), so existing workdirs stay readable and cached.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workflows.tracking import Tracker


@dataclass(frozen=True)
class TrackingRef:
    """An MLflow run of this invocation as another process reaches it: the store, the experiment and the run."""

    uri: str
    experiment: str
    run_id: str | None
    artifact_root: str | None = None  # where a new experiment keeps artifacts; None: the tracking server decides

    def child(self, run_id: str) -> TrackingRef:
        """The same store and experiment, logging into ``run_id`` (a nested run)."""
        return replace(self, run_id=run_id)

    def open(self) -> Tracker:
        """A tracker on this store and experiment; the caller closes it."""
        from workflows.tracking import Tracker

        return Tracker(self.uri, self.experiment, self.artifact_root)


@dataclass(frozen=True)
class TrainingData:
    """The shards a restorer trains and validates on."""

    train: list[str]
    val: list[str]
    tasks: list[str]  # every task name, sorted: a sample's task index is its position here
    tiers: bool = False  # ``train`` holds tier shards (low, medium..., high), not synth shards
    resample: dict[str, float] | None = None  # per-task repeat factors of a data epoch (clearair.data.check_resample)
    probe: dict[str, Any] | None = None  # the perceptual loss's fixed batch (clearair.data.probe_set), every worker's


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is reached on a worker count: per-worker batch x workers x accumulation."""

    per_worker: int
    accumulation: int
    lr_scale: float  # above 1 only with more workers than samples in the global batch
    note: str  # why the plan departs from the configured batch or learning rate; empty when it does not


@dataclass(frozen=True)
class FitResult:
    """A trained restorer: its best checkpoint by validation PSNR, and the step and batch plan that made it."""

    checkpoint: str  # ``<storage_path>/<name>-best.ckpt``
    val_psnr: float
    step: int
    batch_plan: BatchPlan
