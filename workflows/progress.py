"""Training progress as plain lines on stdout, from rank 0: what a user watching a long stage needs to see.

Each line: ``<label>: step 120/500 (24%) loss 0.0412 val/psnr 26.31 | 38.2 samples/s, ETA 3.1 min``. A line is
printed when ``every_s`` seconds (10 by default) passed since the last one, after a validation when at least
``min_gap_s`` (5) passed (a later line shows its PSNR otherwise), and at the end unless the last line said the
same. Lines go to stdout, which Ray sends to the driver's terminal unless ``clearair -q``; Lightning's bar is off
because it redraws in place, which a log file or a driver's prefixed output cannot show.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

import lightning.pytorch as L

SHOWN = ("train/loss", "val/psnr")  # the metrics a line shows, when the module logs them


class ProgressLines(L.Callback):
    """Print progress lines (see the module docstring) on the global-zero rank.

    Args:
        label: what the line is about (e.g. the Ray Train run name, ``train`` or ``crossval-fold1``).
        total_steps: optimizer steps the run will take (the trainer's ``max_steps``).
        samples_per_step: crops per optimizer step over all workers (the global batch).
        every_s: seconds between lines during training.
        min_gap_s: the shortest gap before a line after validation.
        clock: monotonic seconds (a parameter so tests can drive time).
        out: where lines go (stdout when None).
    """

    def __init__(
        self,
        label: str,
        total_steps: int,
        samples_per_step: int,
        every_s: float = 10.0,
        min_gap_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        out: TextIO | None = None,
    ) -> None:
        if every_s <= 0 or total_steps < 1 or samples_per_step < 1:
            raise ValueError(f"need every_s > 0, total_steps >= 1, samples_per_step >= 1 (got {every_s}, "
                             f"{total_steps}, {samples_per_step})")  # fmt: skip
        self.label, self.total, self.samples_per_step = label, total_steps, samples_per_step
        self.every_s, self.min_gap_s, self.clock, self.out = every_s, min_gap_s, clock, out
        self._start: tuple[float, int] | None = None  # (time, step) when this process started training
        self._last = float("-inf")
        self._shown = ""  # the last line up to its rate: what a repeat of it would add nothing to

    def line(self, trainer: L.Trainer) -> str:
        """The current progress line."""
        step = trainer.global_step
        parts = [f"{self.label}: step {step}/{self.total} ({100 * step / self.total:.0f}%)"]
        metrics = trainer.callback_metrics
        parts += [f"{k.removeprefix('train/')} {float(metrics[k]):.4g}" for k in SHOWN if k in metrics]
        t0, s0 = self._start or (self.clock(), step)
        elapsed, done = self.clock() - t0, step - s0
        if elapsed > 0 and done > 0:
            rate = done / elapsed
            eta = (self.total - step) / rate
            eta_text = f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.1f} min"
            parts.append(f"| {rate * self.samples_per_step:.1f} samples/s, ETA {eta_text}")
        return " ".join(parts)

    def _print(self, trainer: L.Trainer, line: str | None = None) -> None:
        self._last = self.clock()
        line = self.line(trainer) if line is None else line
        self._shown = _head(line)
        # written, not printed: Ray Train patches print() in its workers to both print and log a line, so every
        # progress line reached the driver twice
        out = self.out or sys.stdout
        out.write(line + "\n")
        out.flush()

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (self.clock(), trainer.global_step)  # a resumed run's rate counts from here

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero and self.clock() - self._last >= self.every_s:
            self._print(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and self.clock() - self._last >= self.min_gap_s:
            self._print(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        """The end line, unless the last line already said the same (step and metrics)."""
        if trainer.is_global_zero and _head(line := self.line(trainer)) != self._shown:
            self._print(trainer, line)


def _head(line: str) -> str:
    """A progress line without its rate: the step and metrics it reports."""
    return line.split(" |")[0]
