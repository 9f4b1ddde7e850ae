"""Reading shards in parallel: the base dataset that splits the shard list by rank and worker, and its loader.

A loader's dataset splits the shard list by rank (read in the main process from ``torch.distributed`` or
``RANK``/``WORLD_SIZE``), then by DataLoader worker, so every sample is read once per epoch across all ranks and
workers. Ranks may then see different numbers of batches: for DDP use ``steps_per_epoch``, which resamples shards
with replacement (seeded by rank, worker, epoch) and gives every rank exactly that many batches. Each pass over a
loader is the next epoch (new crops, shard order and on-the-fly degradations); :meth:`ShardLoader.set_epoch` sets
the next pass's epoch, e.g. when resuming.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from synth.read import ShardFormatError, iter_raw

log = logging.getLogger(__name__)

EMPTY_SHARD_LIMIT = 64  # consecutive resampled shards without a sample before giving up


def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: torch.distributed when initialised, else RANK/WORLD_SIZE, else 0/1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_share(total: int, worker: int, num_workers: int) -> int:
    """How many of ``total`` items worker ``worker`` of ``num_workers`` produces (the first ones take the rest)."""
    return total // num_workers + (1 if worker < total % num_workers else 0)


def mixed_seed(*values: int) -> int:
    """A 64-bit seed from a tuple of numbers, stable across processes (Python's ``hash`` is not)."""
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
            rng = random.Random(mixed_seed(self.seed, self.epoch, self.rank, worker))
            while True:
                yield rng.choice(self.urls)
        urls = list(self.urls)
        if self.shuffle:
            random.Random(mixed_seed(self.seed, self.epoch)).shuffle(urls)  # same order on every rank, then split
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
            seed = mixed_seed(self.seed, self.epoch, self.rank, self._worker()[0])
            stream = wds.filters.shuffle(self.shuffle, seed=seed)(stream)
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
