"""``MetricsCallback``: a Lightning callback that sends the trainer's scalar metrics to a :class:`Tracker` run.

Lightning's MLFlowLogger is not used: it cannot ride out a server outage, while the tracker's metric queue keeps
and replays what a store did not take. This module imports Lightning (seconds): training code imports it, the
processes that only log runs import :mod:`workflows.tracking`, which does not.
"""

from __future__ import annotations

import lightning.pytorch as pl

from workflows.tracking.tracker import Tracker


def _same(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)  # NaN equals NaN here


class MetricsCallback(pl.Callback):
    """Send ``trainer.callback_metrics`` to a :class:`Tracker` run from rank 0 only.

    Scalars whose value changed since they were last sent are logged every ``every_n_steps`` global steps,
    after each validation and at each epoch end, at the trainer's global step; the tracker's queue is flushed
    at epoch end and at train end.
    """

    def __init__(self, tracker: Tracker, run_id: str, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.tracker, self.run_id, self.every_n_steps = tracker, run_id, every_n_steps
        self._last: dict[str, float] = {}

    def _log(self, trainer: pl.Trainer) -> None:
        # callback_metrics keeps every key's latest value (validation results stay there all epoch): only
        # values that changed since they were last sent are logged, at the current global step.
        fresh = {}
        for key, value in trainer.callback_metrics.items():
            if getattr(value, "numel", lambda: 1)() != 1:
                continue
            number = float(value)
            if key not in self._last or not _same(self._last[key], number):
                fresh[key] = number
        if fresh:
            self._last.update(fresh)
            fresh["epoch"] = float(trainer.current_epoch)
            self.tracker.log_metrics(self.run_id, fresh, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0:
            self._log(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._log(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._log(trainer)
            self.tracker.flush()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.tracker.flush()
