"""Shards -> batches: random crops for the restorer, tier images for the perceiver, whole images for evaluation.

Two shard formats are read, each decoded by its home in ``synth`` under :mod:`synth.read`'s safety rules (only
PNG, JSON and pickle-free NPY members; any other member raises :class:`synth.read.ShardFormatError`): *synth
shards* (:mod:`synth.read`) and *tier shards* (:mod:`synth.tiers`: ``lq`` = low, ``gt`` = high, plus ``mediums``),
both through :func:`synth.samples.decode`.

Either may carry precomputed priors (:mod:`synth.samples`: ``KEY.prior.<name>.npy`` members). A prior with
three dimensions ``(M, h, w)`` is a map over the whole image (e.g. region masks): it is cropped with the image
window (nearest sampling) to ``crop // PRIOR_MAP_STRIDE`` a side and flipped with it. Any other prior is
image-level (``(D,)``, ``(4, D)``) and passed through. Batches carry them as ``"prior.<name>"``
(see :func:`clearair.priors.load_priors_from_batch`).

Distribution: a loader's dataset splits the shard list by rank (read in the main process from
``torch.distributed`` or ``RANK``/``WORLD_SIZE``), then by DataLoader worker, so every sample is read once per
epoch across all ranks and workers. Ranks may then see different numbers of batches: for DDP use
``steps_per_epoch``, which resamples shards with replacement (seeded by rank, worker, epoch) and gives every rank
exactly that many batches. Each pass over a loader is the next epoch (new crops, shard order and on-the-fly
degradations); :meth:`ShardLoader.set_epoch` sets the next pass's epoch, e.g. when resuming.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from synth.read import ShardFormatError, ensure_lq, fresh_lq, iter_raw, to_tensor, where
from synth.recipes import task_family
from synth.samples import decode
from synth.tiers import TIERS, medium_tiers

log = logging.getLogger(__name__)

PRIOR_MAP_STRIDE = 4
EMPTY_SHARD_LIMIT = 64  # consecutive resampled shards without a sample before giving up


class TaskIndex:
    """A stable task name <-> integer mapping: ids follow the sorted names, whatever order they came in."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names: tuple[str, ...] = tuple(sorted(set(names)))
        if not self.names:
            raise ValueError("TaskIndex needs at least one task name")
        self._ids = {name: i for i, name in enumerate(self.names)}
        self.families: tuple[str, ...] = tuple(sorted({task_family(n) for n in self.names}))

    def family_index(self, name: str) -> int:
        """The id of the task's degradation family (:func:`synth.recipes.task_family`), among this index's."""
        self.index(name)  # an unknown task names the known ones
        return self.families.index(task_family(name))

    def index(self, name: str) -> int:
        if name not in self._ids:
            raise ValueError(f"task {name!r} is not one of the training tasks {list(self.names)}")
        return self._ids[name]

    def name(self, index: int) -> str:
        return self.names[index]

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._ids

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskIndex) and other.names == self.names

    def __repr__(self) -> str:
        return f"TaskIndex({list(self.names)})"


# ----------------------------------------------------------------------------------------------- windows


AUGMENTS = ("hflip", "dihedral")


@dataclass(frozen=True)
class Window:
    """A square crop ``[y, y + size) x [x, x + size)`` of an image, then a horizontal flip if ``flip``, then
    ``rot`` quarter turns counter-clockwise: with ``rot`` in 0..3 the eight symmetries of the square."""

    y: int
    x: int
    size: int
    flip: bool = False
    rot: int = 0

    def apply(self, img: np.ndarray) -> np.ndarray:
        return self.orient(img[self.y : self.y + self.size, self.x : self.x + self.size])

    def orient(self, img: np.ndarray, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
        """The flip and rotation on the two image axes ``axes`` (rows, columns) of an already cropped array."""
        out = np.flip(img, axes[1]) if self.flip else img
        return np.ascontiguousarray(np.rot90(out, self.rot, axes) if self.rot else out)


def check_augment(augment: str) -> str:
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    return augment


def random_windows(
    h: int, w: int, size: int, rng: np.random.Generator, n: int = 1, augment: str = "hflip", origin: str = "image"
) -> list[Window]:
    """``n`` independent random windows of ``size``, each with a random horizontal flip (``augment="hflip"``) or
    one of the eight dihedral symmetries (``"dihedral"``, as PromptIR's training data code draws); ShardFormatError
    naming ``origin`` (e.g. :func:`synth.read.where` of the sample) if the image is smaller than ``size``."""
    check_augment(augment)
    _check_size(h, w, size, origin)
    windows = []
    for _ in range(n):
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        flip = bool(rng.random() < 0.5)
        windows.append(Window(y, x, size, flip, int(rng.integers(0, 4)) if augment == "dihedral" else 0))
    return windows


def center_window(h: int, w: int, size: int, origin: str = "image") -> Window:
    """The centred window of ``size`` (no flip)."""
    _check_size(h, w, size, origin)
    return Window((h - size) // 2, (w - size) // 2, size)


def _check_size(h: int, w: int, size: int, origin: str) -> None:
    if h < size or w < size:
        raise ShardFormatError(f"{origin}: image {w}x{h} is smaller than the crop size {size}")


def crop_prior(prior: np.ndarray, window: Window, image_hw: tuple[int, int], out_size: int) -> np.ndarray:
    """A ``(M, h, w)`` map over the whole image cut to ``window`` and sampled to ``(M, out_size, out_size)``
    (nearest, so binary masks stay binary); other priors are image-level and returned unchanged."""
    if prior.ndim != 3:
        return prior
    (big_h, big_w), (h, w) = image_hw, prior.shape[1:]
    centres = (np.arange(out_size) + 0.5) * window.size / out_size  # window pixels
    rows = np.clip(((window.y + centres) * h / big_h).astype(int), 0, h - 1)
    cols = np.clip(((window.x + centres) * w / big_w).astype(int), 0, w - 1)
    return window.orient(prior[:, rows][:, :, cols], axes=(1, 2))


def key_seed(key: str) -> int:
    """A 64-bit number from a sample key, stable across processes (Python's ``hash`` is not)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16)


# ----------------------------------------------------------------------------------------------- examples & batches


def restoration_example(
    sample: dict[str, Any], windows: list[Window] | None, tasks: TaskIndex, tiers: bool = False
) -> dict[str, Any]:
    """Tensors of one sample: ``lq``/``gt`` under the first window (the whole image when ``windows`` is None),
    ``lq2`` under the second window if any, ``prior.<name>`` and, when ``tiers``, ``medium`` ``(P, 3, c, c)``:
    every one of the sample's P medium tiers under ``gt``'s view, with ``medium_psnr`` their P stored PSNRs."""
    first, meta = (windows[0] if windows else None), sample["meta"]

    def view(img: np.ndarray) -> torch.Tensor:
        return to_tensor(first.apply(img) if first is not None else img)

    example = {
        "lq": view(sample["lq"]),
        "gt": view(sample["gt"]),
        "task": tasks.index(meta["task"]),
        "family": tasks.family_index(meta["task"]),
        "key": sample["key"],
    }
    if windows is not None and len(windows) > 1:
        example["lq2"] = to_tensor(windows[1].apply(sample["lq"]))
    if tiers:
        if "mediums" not in sample:
            raise ShardFormatError(f"{where(sample)} has no medium tier: tiers=True needs tier shards")
        names = medium_tiers(len(sample["mediums"]))
        if missing := [t for t in names if t not in meta.get("psnr", {})]:
            raise ShardFormatError(f"{where(sample)}: its json stores no PSNR of the medium tier(s) {missing}")
        example["medium"] = torch.stack([view(m) for m in sample["mediums"]])  # (P, 3, c, c)
        example["medium_psnr"] = [float(meta["psnr"][t]) for t in names]
    for name, prior in sample["priors"].items():
        if first is not None:
            prior = crop_prior(prior, first, sample["gt"].shape[:2], max(1, first.size // PRIOR_MAP_STRIDE))
        example[f"prior.{name}"] = torch.from_numpy(np.ascontiguousarray(prior))
    return example


def collate_restoration(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack examples into ``{"lq": (B, 3, c, c), ..., "task": LongTensor (B,), "family": LongTensor (B,), "key":
    list, ...}``."""
    names = set(examples[0])
    for ex in examples[1:]:
        if set(ex) != names:
            raise ShardFormatError(f"samples {examples[0]['key']} and {ex['key']} carry different members in one batch")
    mediums = {ex["key"]: len(ex["medium"]) for ex in examples if "medium" in ex}
    if len(set(mediums.values())) > 1:
        raise ShardFormatError(f"samples with different numbers of medium tiers in one batch (key: count): {mediums}")
    batch: dict[str, Any] = {}
    for name in examples[0]:
        values = [ex[name] for ex in examples]
        if name == "key":
            batch[name] = values
        elif name in ("task", "family"):
            batch[name] = torch.tensor(values, dtype=torch.long)
        elif name == "medium_psnr":
            batch[name] = torch.tensor(values, dtype=torch.float32)  # (B, P)
        else:
            batch[name] = torch.stack(values)
    return batch


VIEWS = ("crop", "resize", "train_crop")


def tier_views(
    sample: dict[str, Any], image_size: int, rng: np.random.Generator, view: str, crop: int | None = None
) -> list[np.ndarray]:
    """The low, a medium and the high image of a tier sample under one shared random view, each ``(S, S, 3)``
    uint8; of several medium tiers ``rng`` draws one (:func:`pick_medium`).

    ``view="crop"``: a random square of side ``min(H, W, image_size)`` at native resolution (resized up only when
    the image is smaller); ``"train_crop"``: a random square of side ``min(H, W, crop)`` (the restorer's training
    crop) resized to ``image_size``, which is what the CLIP-aware loss sees; ``"resize"``: the whole image
    squashed to ``image_size``. All flip horizontally at random.
    """
    h, w = sample["gt"].shape[:2]
    if view in ("crop", "train_crop"):
        if view == "train_crop" and crop is None:
            raise ValueError("view 'train_crop' needs the training crop size (crop=...)")
        window = random_windows(h, w, min(h, w, image_size if view == "crop" else crop), rng, origin=where(sample))[0]
        orient = window.apply
    elif view == "resize":
        orient = Window(0, 0, min(h, w), flip=bool(rng.random() < 0.5)).orient  # the whole image, maybe mirrored
    else:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    images = (sample["lq"], pick_medium(sample, rng), sample["gt"])  # drawn after the view: one medium, as before
    return [_resize_square(orient(img), image_size) for img in images]


def pick_medium(sample: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """One of a tier sample's medium tiers drawn with ``rng``, so over a stream every restorer's output is seen
    as "medium"; a sample with one medium draws nothing (its views are those of a single-medium tier set)."""
    mediums = sample["mediums"]
    return mediums[int(rng.integers(len(mediums)))] if len(mediums) > 1 else mediums[0]


def _resize_square(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[:2] == (size, size):
        return img
    shrink = img.shape[0] * img.shape[1] > size * size
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def collate_tiers(groups: list[list[list[np.ndarray]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (3B, 3, S, S), labels (3B,))`` from per-task lists of [low, medium, high] views: all low images
    first, then medium, then high; labels 0, 1, 2."""
    samples = [views for group in groups for views in group]
    images = [to_tensor(views[tier]) for tier in range(len(TIERS)) for views in samples]
    labels = torch.arange(len(TIERS)).repeat_interleave(len(samples))
    return torch.stack(images), labels


# ----------------------------------------------------------------------------------------------- streams


def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: torch.distributed when initialised, else RANK/WORLD_SIZE, else 0/1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_share(total: int, worker: int, num_workers: int) -> int:
    """How many of ``total`` items worker ``worker`` of ``num_workers`` produces (the first ones take the rest)."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


def _mix(*values: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(values).encode()).digest()[:8], "little")


class ShardStream(IterableDataset):
    """Base of the shard datasets: this rank's and worker's raw samples, turned into batches by :meth:`batches`.

    ``rank``, ``world_size`` and ``epoch`` are set by :class:`ShardLoader` in the main process before workers
    start. Without ``steps_per_epoch`` the (optionally shuffled) shard list is split by rank then worker and read
    once; with it, shards are drawn with replacement forever and each worker stops after its share of the steps.
    """

    def __init__(self, urls: list[str], seed: int, shuffle: int, steps_per_epoch: int | None) -> None:
        super().__init__()
        if not urls:
            raise ValueError("no shard urls given")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        self.urls = [u if isinstance(u, str) else str(u) for u in urls]  # a ShardURL keeps its sha256
        self.seed, self.shuffle, self.steps_per_epoch = seed, shuffle, steps_per_epoch
        self.epoch, self.rank, self.world_size = 0, 0, 1

    @property
    def resampled(self) -> bool:
        return self.steps_per_epoch is not None

    def __len__(self) -> int:
        if self.steps_per_epoch is None:
            raise TypeError("a shard stream without steps_per_epoch has no length")
        return self.steps_per_epoch

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _shard_urls(self) -> Iterator[str]:
        worker, num_workers = self._worker()
        if self.resampled:
            rng = random.Random(_mix(self.seed, self.epoch, self.rank, worker))
            while True:
                yield rng.choice(self.urls)
        urls = list(self.urls)
        if self.shuffle:
            random.Random(_mix(self.seed, self.epoch)).shuffle(urls)  # same order on every rank, then split
        mine = urls[self.rank :: self.world_size]
        if not mine and worker == 0:
            log.warning(
                "rank %d of %d has no shards (%d in all): use steps_per_epoch", self.rank, self.world_size, len(urls)
            )
        yield from mine[worker::num_workers]

    def raw_samples(self) -> Iterator[dict[str, Any]]:
        """Raw samples (``{"__key__", "__url__", member: bytes}``) of this rank and worker, shuffled if asked."""
        import webdataset as wds

        stream = self._read_shards()
        if self.shuffle:
            worker = self._worker()[0]
            stream = wds.filters.shuffle(self.shuffle, seed=_mix(self.seed, self.epoch, self.rank, worker))(stream)
        return stream

    def _read_shards(self) -> Iterator[dict[str, Any]]:
        empty = 0
        for url in self._shard_urls():
            count = 0
            for raw in iter_raw(url):
                count += 1
                yield raw
            empty = 0 if count else empty + 1
            if self.resampled and empty >= EMPTY_SHARD_LIMIT:
                raise ShardFormatError(f"{empty} shards drawn in a row hold no samples (e.g. {url})")

    def batches(self, raw: Iterator[dict[str, Any]]) -> Iterator[Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        batches = self.batches(self.raw_samples())
        if not self.resampled:
            yield from batches
            return
        worker, num_workers = self._worker()
        for _, batch in zip(range(worker_share(self.steps_per_epoch, worker, num_workers)), batches, strict=False):
            yield batch


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
        rng = random.Random(_mix(self.seed, self.epoch, self.rank, self._worker()[0]))
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


def _as_is(batch: Any) -> Any:
    return batch


class ShardLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream` (batches are made inside the dataset, per worker).

    Every ``iter()`` is one epoch: it hands the dataset the epoch, rank and world size (read here, in the main
    process), then increments the epoch.
    """

    def __init__(self, dataset: ShardStream, num_workers: int = 0, epoch: int = 0) -> None:
        super().__init__(dataset, batch_size=None, num_workers=num_workers, collate_fn=_as_is)
        self.next_epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (crops, shard order, on-the-fly degradations derive from it)."""
        self.next_epoch = epoch

    def __iter__(self):
        self.dataset.rank, self.dataset.world_size = distributed_info()
        self.dataset.epoch = self.next_epoch
        self.next_epoch += 1
        return super().__iter__()


# ----------------------------------------------------------------------------------------------- public loaders


def restoration_loader(
    urls: list[str],
    crop: int,
    batch_size: int,
    tasks: TaskIndex,
    num_workers: int = 0,
    recipe=None,
    epoch: int = 0,
    seed: int = 0,
    two_crops: bool = True,
    shuffle: int = 256,
    tiers: bool = False,
    steps_per_epoch: int | None = None,
    resample: dict[str, float] | None = None,
    augment: str = "hflip",
    fresh_noise: bool = False,
) -> ShardLoader:
    """Training batches ``{"lq", "gt": (B, 3, crop, crop), "lq2" (another crop of the same degraded image),
    "task": LongTensor (B,), "key": list[str]}``, plus ``"medium": (B, P, 3, crop, crop)`` (a tier set's P medium
    tiers, under ``gt``'s crop) and ``"medium_psnr": (B, P)`` with ``tiers=True`` (tier shards), plus
    ``"prior.<name>"`` for stored priors.

    Args:
        recipe: the synth recipe (a :class:`synth.recipes.Recipe`) for on-the-fly shards.
        shuffle: sample shuffle buffer per worker (0 = shard order, no shuffling).
        steps_per_epoch: resample shards and give exactly this many batches per epoch on every rank (DDP-safe);
            None = one pass over this rank's shards, partial last batch included.
        resample: per-task repeat factors applied at read time (``{"derain": 120}``; see
            :meth:`RestorationStream.repeats`); every repeat takes its own random crops.
        augment: ``"hflip"`` (a random horizontal flip per crop) or ``"dihedral"`` (one of the eight symmetries of
            the square: flips and quarter turns, the same for ``lq``, ``gt``, ``medium`` and map priors).
        fresh_noise: draw new noise into the LQ of every synthetic noise sample for every draw
            (:meth:`RestorationStream.redraw`), as PromptIR trains; other samples are read as stored.
    """
    dataset = RestorationStream(
        urls, crop, batch_size, tasks, recipe, seed, two_crops, shuffle, tiers, steps_per_epoch, random_crops=True,
        resample=resample, augment=augment, fresh_noise=fresh_noise,
    )  # fmt: skip
    return ShardLoader(dataset, num_workers, epoch)


def validation_loader(
    urls: list[str],
    tasks: TaskIndex,
    crop: int | None = None,
    limit: int | None = None,
    recipe=None,
    tiers: bool = False,
) -> DataLoader:
    """A small fixed validation set: the first ``limit`` images of ``urls`` (all without a limit) in shard order,
    centre crops of ``crop`` (the whole image where it is smaller, or ``crop=None``), one image per batch, with
    the keys of :func:`restoration_loader` batches without ``lq2``.

    The set is read once and held in memory as a map-style dataset, so under DDP Lightning's distributed sampler
    gives every rank its share, however few shards there are (a rank-split stream could leave ranks empty).
    """
    stream = RestorationStream(urls, crop, 1, tasks, recipe, 0, False, 0, tiers, None, random_crops=False)
    items = [_unbatch(batch) for batch in itertools.islice(stream, limit)]
    if not items:
        raise ShardFormatError(f"no validation images in {len(urls)} shards (e.g. {urls[0]})")
    return DataLoader(items, batch_size=1, shuffle=False)


def _unbatch(batch: dict[str, Any]) -> dict[str, Any]:
    """The single example of a one-image batch (the default collate function rebuilds the batch)."""
    return {k: v[0] for k, v in batch.items()}


def tier_loader(
    urls: list[str],
    batch_size: int,
    image_size: int,
    tasks: TaskIndex,
    num_workers: int = 0,
    epoch: int = 0,
    seed: int = 0,
    shuffle: int = 256,
    steps_per_epoch: int | None = None,
    view: str = "crop",
    balanced: bool = True,
    crop: int | None = None,
) -> ShardLoader:
    """Prompt-learning batches ``(images (3B, 3, S, S), labels (3B,))`` from tier shards, ``S = image_size``.

    ``B = batch_size`` tier samples, ``batch_size / len(tasks)`` of each task; the first B images are their low
    tier (label 0), then medium (1; one of a sample's medium tiers, drawn per sample), then high (2), all three
    under one shared random view (see :func:`tier_views`; ``crop`` is the training crop of ``view="train_crop"``).
    Every task in ``tasks`` must occur in the shards.
    """
    dataset = TierStream(
        urls, batch_size, image_size, tasks, seed, shuffle, steps_per_epoch, view, balanced=balanced, crop=crop
    )
    return ShardLoader(dataset, num_workers, epoch)


def whole_images(urls: Iterable[str], recipe=None, epoch: int = 0) -> Iterator[dict[str, Any]]:
    """Decoded samples in shard order: ``{"key", "lq", "gt", "meta", "priors", ["medium"], ["depth"]}`` with
    whole ``(H, W, 3)`` uint8 arrays (tier samples: lq = low, gt = high). On-the-fly LQs are synthesised at
    ``epoch`` with ``recipe``. Not split by rank or worker."""
    for url in urls:
        for raw in iter_raw(url):
            yield ensure_lq(decode(raw, str(url)), recipe, epoch)


# ----------------------------------------------------------------------------------------------- difficulty probe


def probe_quotas(tasks: TaskIndex, per_task: int) -> dict[str, int]:
    """Probe crops per task: ``per_task`` per degradation family (:func:`synth.recipes.task_family`), split evenly
    over the family's tasks, as the Perceive-IR authors take 24 denoising crops as 8 per noise level."""
    quotas = {}
    for family in tasks.families:
        members = [t for t in tasks.names if task_family(t) == family]
        base, extra = divmod(per_task, len(members))
        quotas |= {t: base + (i < extra) for i, t in enumerate(members)}
    return quotas


def _probe_candidates(sample: dict[str, Any], crop: int, n: int, seed: int) -> list[tuple[float, dict[str, Any]]]:
    """``n`` seeded crops of one sample as ``(input PSNR, a sample of the crop)``; map priors cut with them."""
    from clearair.metrics import psnr

    h, w = sample["gt"].shape[:2]
    rng = np.random.default_rng([seed, key_seed(sample["key"])])
    out = []
    for i, window in enumerate(random_windows(h, w, crop, rng, n=n, origin=where(sample))):
        lq, gt = window.apply(sample["lq"]), window.apply(sample["gt"])
        side = max(1, crop // PRIOR_MAP_STRIDE)
        priors = {k: crop_prior(p, window, (h, w), side) for k, p in sample["priors"].items()}
        piece = {"key": f"{sample['key']}@{i}", "lq": lq, "gt": gt, "meta": sample["meta"], "priors": priors}
        out.append((psnr(lq, gt), piece))
    return out


def _spread(n: int, k: int) -> list[int]:
    """``min(n, k)`` indices into ``n`` ranked items, evenly spaced from the first to the last."""
    if n <= k:
        return list(range(n))
    return [round(i * (n - 1) / (k - 1)) for i in range(k)] if k > 1 else [n // 2]


def probe_set(
    urls: Iterable[str], tasks: TaskIndex, crop: int, per_task: int, seed: int = 0, candidates: int = 2
) -> dict[str, Any]:
    """A fixed difficulty probe: a batch (as :func:`restoration_loader`'s, without ``lq2``) of crops of ``crop``
    from the images of ``urls``, :func:`probe_quotas` of them per task, spread over input difficulty.

    Images are read in shard order, ``candidates`` seeded random crops each, until every task has ``candidates``
    times its quota; of each task's candidates, those at evenly spaced ranks of input PSNR are kept (easy, middling
    and hard inputs alike). The same ``urls`` and ``seed`` give the same probe on every rank and every run. Images
    smaller than ``crop`` are skipped; a task with too few crops keeps what it has (a warning); none at all is a
    ShardFormatError.
    """
    urls, quotas = list(urls), probe_quotas(tasks, per_task)
    pool: dict[str, list[tuple[float, dict[str, Any]]]] = {t: [] for t in quotas}
    for sample in whole_images(urls):
        task = tasks.name(tasks.index(sample["meta"]["task"]))
        if len(pool[task]) < candidates * quotas[task] and min(sample["gt"].shape[:2]) >= crop:
            pool[task] += _probe_candidates(sample, crop, candidates, seed)
        if all(len(pool[t]) >= candidates * q for t, q in quotas.items()):
            break
    chosen = []
    for task, quota in quotas.items():
        ranked = sorted(pool[task], key=lambda c: c[0])  # stable: equal PSNRs keep their reading order
        if len(ranked) < quota:
            log.warning("difficulty probe: %d of %d crops of %s (too few images of >= %d px)", len(ranked), quota,
                        task, crop)  # fmt: skip
        chosen += [restoration_example(ranked[i][1], None, tasks) for i in _spread(len(ranked), quota)]
    if not chosen:
        raise ShardFormatError(f"difficulty probe: no image of >= {crop} px in {len(urls)} shards")
    return collate_restoration(chosen)
