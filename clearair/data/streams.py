"""The two datasets: restoration batches (random crops, per-task resampling, fresh noise) and task-balanced tier
batches for the perceiver, both :class:`~clearair.data.shards.ShardStream` subclasses."""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Iterator
from typing import Any

import numpy as np
import torch

from clearair.data.examples import VIEWS, collate_restoration, collate_tiers, restoration_example, tier_views
from clearair.data.shards import ShardStream, mixed_seed
from clearair.data.tasks import TaskIndex
from clearair.data.windows import Window, center_window, check_augment, key_seed, random_windows
from synth.read import ShardFormatError, ensure_lq, fresh_lq, where
from synth.samples import decode

log = logging.getLogger(__name__)


def check_resample(resample: dict[str, float], tasks: Collection[str]) -> dict[str, float]:
    """Per-task repeat factors (a task left out counts once); unknown tasks and negative factors are errors
    (the pipeline checks them against the synth manifest before a training job starts)."""
    unknown = sorted(set(resample) - set(tasks))
    if unknown:
        raise ValueError(f"resample names tasks {unknown} that are not training tasks {list(tasks)}")
    bad = {t: f for t, f in resample.items() if not f >= 0}
    if bad:
        raise ValueError(f"resample factors must be >= 0, got {bad}")
    return dict(resample)


def resampled_shares(counts: dict[str, int], resample: dict[str, float]) -> tuple[dict[str, float], float]:
    """Each task's share of draws and the length (samples) of one data epoch under ``resample``."""
    drawn = {t: n * resample.get(t, 1.0) for t, n in counts.items()}
    total = sum(drawn.values())
    return {t: d / total if total else 0.0 for t, d in sorted(drawn.items())}, total


class RestorationStream(ShardStream):
    """Restoration batches (see :func:`restoration_loader`); ``crop=None`` gives whole images, one per batch."""

    def __init__(
        self,
        urls: list[str],
        crop: int | None,
        batch_size: int,
        tasks: TaskIndex,
        recipe=None,
        seed: int = 0,
        two_crops: bool = True,
        shuffle: int = 256,
        tiers: bool = False,
        steps_per_epoch: int | None = None,
        random_crops: bool = True,
        resample: dict[str, float] | None = None,
        augment: str = "hflip",
        fresh_noise: bool = False,
    ) -> None:
        super().__init__(urls, seed, shuffle, steps_per_epoch)
        if crop is None and batch_size != 1:
            raise ValueError("whole images (crop=None) come one per batch: set batch_size=1")
        self.crop, self.batch_size, self.tasks, self.recipe = crop, batch_size, tasks, recipe
        self.two_crops, self.tiers, self.random_crops = two_crops, tiers, random_crops
        self.resample = check_resample(resample or {}, tasks)
        self.augment = check_augment(augment)
        self.fresh_noise = fresh_noise

    def windows(self, sample: dict[str, Any], repeat: int = 0) -> list[Window] | None:
        """Random windows (two with ``two_crops``), the centre window, or None for the whole image; each repeat
        of a resampled sample gets its own."""
        h, w = sample["gt"].shape[:2]
        if self.crop is None:
            return None
        if not self.random_crops:  # evaluation: images smaller than the crop are taken whole
            return [center_window(h, w, min(self.crop, h, w), where(sample))]
        stream = [self.seed, self.epoch, key_seed(sample["key"])] + ([repeat] if repeat else [])
        rng = np.random.default_rng(stream)
        n = 2 if self.two_crops else 1
        return random_windows(h, w, self.crop, rng, n=n, augment=self.augment, origin=where(sample))

    def repeats(self, task: str, key: str) -> int:
        """How often a sample of ``task`` is drawn this epoch: its factor's integer part, plus one with the
        probability of its fraction (seeded by seed, rank, epoch and key), so a data epoch holds each task
        ``factor`` times over on average and nothing is duplicated on disk."""
        factor = self.resample.get(task, 1.0)
        whole, fraction = int(factor), factor - int(factor)
        if not fraction:
            return whole
        u = np.random.default_rng([self.seed, self.epoch, self.rank, key_seed(key), 7]).random()
        return whole + int(u < fraction)

    def redraw(self, sample: dict[str, Any], repeat: int) -> dict[str, Any]:
        """The sample with new noise in its LQ (the low tier of a tier sample) for this draw, keyed by (seed, key,
        epoch, repeat); samples that cannot be redrawn (paired, haze, rain) come back as stored. A tier sample's
        medium stays the restoration made at crossval time of the stored draw."""
        lq = fresh_lq(sample, [self.seed, key_seed(sample["key"]), self.epoch, repeat, 13])
        return sample if lq is None else {**sample, "lq": lq}

    def batches(self, raw: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        pending = []
        for item in raw:
            sample = ensure_lq(decode(item, item.get("__url__", "?")), self.recipe, self.epoch)
            for repeat in range(self.repeats(sample["meta"]["task"], sample["key"]) if self.resample else 1):
                draw = self.redraw(sample, repeat) if self.fresh_noise else sample
                pending.append(restoration_example(draw, self.windows(sample, repeat), self.tasks, self.tiers))
                if len(pending) == self.batch_size:
                    yield collate_restoration(pending)
                    pending = []
        if pending and not self.resampled:
            yield collate_restoration(pending)


class TierStream(ShardStream):
    """Task-balanced prompt-learning batches from tier shards (see :func:`tier_loader`)."""

    def __init__(
        self,
        urls: list[str],
        batch_size: int,
        image_size: int,
        tasks: TaskIndex,
        seed: int = 0,
        shuffle: int = 256,
        steps_per_epoch: int | None = None,
        view: str = "crop",
        buffer_cap: int = 8,
        balanced: bool = True,
        crop: int | None = None,
    ) -> None:
        super().__init__(urls, seed, shuffle, steps_per_epoch)
        self.balanced, self.batch_size = balanced, batch_size
        if balanced and batch_size % len(tasks):
            raise ValueError(f"batch_size {batch_size} must be a multiple of the number of tasks {len(tasks)}")
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        self.per_task, self.image_size, self.tasks, self.view = batch_size // len(tasks), image_size, tasks, view
        self.crop = crop
        self.cap = max(1, buffer_cap) * self.per_task

    def batches(self, raw: Iterator[dict[str, Any]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Round-robin buffers per task; a batch leaves as soon as every task has ``per_task`` samples.

        A buffer at its cap replaces a random element, so majority tasks are subsampled instead of piling up.
        """
        if not self.balanced:
            yield from self._unbalanced(raw)
            return
        buffers: dict[str, list] = {t: [] for t in self.tasks}
        rng = random.Random(mixed_seed(self.seed, self.epoch, self.rank, self._worker()[0]))
        since_batch = 0
        for item in raw:
            task, views = self._views(decode(item, item.get("__url__", "?")))
            buf = buffers[task]
            if len(buf) < self.cap:
                buf.append(views)
            else:
                buf[rng.randrange(len(buf))] = views
            since_batch += 1
            if all(len(b) >= self.per_task for b in buffers.values()):
                yield collate_tiers([[b.pop(0) for _ in range(self.per_task)] for b in buffers.values()])
                since_batch = 0
            elif self.resampled and since_batch > 100 * self.cap * len(buffers):
                missing = [t for t, b in buffers.items() if len(b) < self.per_task]
                raise ValueError(f"no tier samples of task(s) {missing} in {since_batch} samples: drop them from tasks")
        log.debug("tier stream: %d samples left after the last balanced batch", sum(map(len, buffers.values())))

    def _unbalanced(self, raw: Iterator[dict[str, Any]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every sample once, in stream order, ``batch_size`` per batch and the remainder last (evaluation)."""
        batch: list = []
        for item in raw:
            batch.append(self._views(decode(item, item.get("__url__", "?")))[1])
            if len(batch) == self.batch_size:
                yield collate_tiers([batch])
                batch = []
        if batch:
            yield collate_tiers([batch])

    def _views(self, sample: dict[str, Any]) -> tuple[str, list[np.ndarray]]:
        if "medium" not in sample:
            raise ShardFormatError(f"{where(sample)} is not a tier sample (low/medium/high members)")
        task = sample["meta"]["task"]
        self.tasks.index(task)  # unknown task -> ValueError naming the known ones
        rng = np.random.default_rng([self.seed, self.epoch, key_seed(sample["key"])])
        return task, tier_views(sample, self.image_size, rng, self.view, self.crop)
