"""The difficulty probe: a fixed set of crops per task spread over input PSNR, for the difficulty-adaptive
perceptual loss (:meth:`clearair.lightning.RestorerModule.set_probe`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np

from clearair.data.examples import collate_restoration, restoration_example
from clearair.data.loaders import whole_images
from clearair.data.tasks import TaskIndex
from clearair.data.windows import PRIOR_MAP_STRIDE, crop_prior, key_seed, random_windows
from clearair.metrics import psnr
from synth.read import ShardFormatError, where
from synth.recipes import task_family

log = logging.getLogger(__name__)


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
