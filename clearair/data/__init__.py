"""Shards -> batches: random crops for the restorer, tier images for the perceiver, whole images for evaluation.

Two shard formats are read, each decoded by its home in ``synth`` under :mod:`synth.read`'s safety rules (only
PNG, JSON and pickle-free NPY members; any other member raises :class:`synth.read.ShardFormatError`): *synth
shards* (:mod:`synth.read`) and *tier shards* (:mod:`synth.tiers`: ``lq`` = low, ``gt`` = high, plus ``mediums``),
both through :func:`synth.samples.decode`. Either may carry precomputed priors (:mod:`synth.samples`:
``KEY.prior.<name>.npy`` members), which batches carry as ``"prior.<name>"``.

- :mod:`~clearair.data.tasks`: :class:`TaskIndex`, task names <-> ids.
- :mod:`~clearair.data.windows`: seeded crop windows, flips and quarter turns; map priors cut with the image.
- :mod:`~clearair.data.examples`: a sample -> tensors, examples -> batches (restoration and tier views).
- :mod:`~clearair.data.shards`: :class:`ShardStream` (shards split by rank and worker, or resampled for DDP) and
  :class:`ShardLoader` (one epoch per pass).
- :mod:`~clearair.data.streams`: :class:`RestorationStream` (per-task resampling, fresh noise) and
  :class:`TierStream` (task-balanced tier batches).
- :mod:`~clearair.data.loaders`: the public loaders and :func:`whole_images`.
- :mod:`~clearair.data.probe`: the difficulty probe of the perceptual loss.
"""

from clearair.data.examples import (
    VIEWS,
    collate_restoration,
    collate_tiers,
    pick_medium,
    restoration_example,
    tier_views,
)
from clearair.data.loaders import restoration_loader, tier_loader, validation_loader, whole_images
from clearair.data.probe import probe_quotas, probe_set
from clearair.data.shards import EMPTY_SHARD_LIMIT, ShardLoader, ShardStream, distributed_info, worker_share
from clearair.data.streams import RestorationStream, TierStream, check_resample, resampled_shares
from clearair.data.tasks import TaskIndex
from clearair.data.windows import (
    AUGMENTS,
    PRIOR_MAP_STRIDE,
    Window,
    center_window,
    check_augment,
    crop_prior,
    key_seed,
    random_windows,
)

__all__ = [
    "AUGMENTS",
    "EMPTY_SHARD_LIMIT",
    "PRIOR_MAP_STRIDE",
    "VIEWS",
    "RestorationStream",
    "ShardLoader",
    "ShardStream",
    "TaskIndex",
    "TierStream",
    "Window",
    "center_window",
    "check_augment",
    "check_resample",
    "collate_restoration",
    "collate_tiers",
    "crop_prior",
    "distributed_info",
    "key_seed",
    "pick_medium",
    "probe_quotas",
    "probe_set",
    "random_windows",
    "resampled_shares",
    "restoration_example",
    "restoration_loader",
    "tier_loader",
    "tier_views",
    "validation_loader",
    "whole_images",
    "worker_share",
]
