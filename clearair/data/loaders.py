"""The public loaders: training crops, the in-memory validation set, perceiver tier batches, whole images.

Every loader decodes both shard formats through :func:`synth.samples.decode`; where a loader takes ``recipe`` (a
:class:`synth.recipes.Recipe`), it synthesises the LQ of on-the-fly shards at the epoch being read.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader

from clearair.data.shards import ShardLoader
from clearair.data.streams import RestorationStream, TierStream
from clearair.data.tasks import TaskIndex
from synth.read import ShardFormatError, ensure_lq, iter_raw
from synth.samples import decode


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
