"""The difficulty-adaptive perceptual loss's inputs: a fixed probe set per task, its PSNR measured in rank shares,
and each negative's PSNR on its own training crop."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from clearair.data import TaskIndex, probe_quotas, probe_set, whole_images
from clearair.data.probe import _probe_candidates
from clearair.lightning import MAX_PSNR, build_restorer_module
from clearair.metrics import psnr_torch
from clearair.objectives import build_loss, negative_psnr
from clearair.specs import LossSpec
from tests.test_lightning import synth_shards, synth_tasks, tiny_spec  # noqa: F401  (a module fixture)

CROP = 16


def test_quotas_give_each_family_its_count_and_split_noise_over_its_levels():
    tasks = TaskIndex(["denoise_15", "denoise_25", "denoise_50", "dehaze", "derain"])
    assert probe_quotas(tasks, 24) == {"dehaze": 24, "denoise_15": 8, "denoise_25": 8, "denoise_50": 8, "derain": 24}
    assert sorted(probe_quotas(tasks, 25).values()) == [8, 8, 9, 25, 25]
    assert set(probe_quotas(tasks, 0).values()) == {0}


def test_probe_takes_each_tasks_quota_spread_over_input_difficulty(synth_shards):  # noqa: F811
    tasks = synth_tasks(synth_shards)
    quotas = probe_quotas(tasks, 6)
    probe = probe_set(synth_shards, tasks, CROP, per_task=6, seed=0, candidates=3)
    pool: dict[str, list[float]] = {t: [] for t in tasks}
    for sample in whole_images(synth_shards):
        pool[sample["meta"]["task"]] += [p for p, _ in _probe_candidates(sample, CROP, 3, seed=0)]
    kept = psnr_torch(probe["lq"], probe["gt"])
    spread = 0
    for name in tasks:
        mine = sorted(kept[probe["task"] == tasks.index(name)].tolist())
        assert len(mine) == min(quotas[name], len(pool[name])), name
        if quotas[name] < len(pool[name]) < 3 * quotas[name]:  # every image read, more candidates than the quota
            assert mine[0] == pytest.approx(min(pool[name]), abs=1e-3), name  # the easiest and the hardest kept
            assert mine[-1] == pytest.approx(max(pool[name]), abs=1e-3), name
            spread += 1
    assert spread >= 1 and probe["lq"].shape[1:] == (3, CROP, CROP) and "lq2" not in probe
    again = probe_set(synth_shards, tasks, CROP, per_task=6, seed=0, candidates=3)
    assert torch.equal(again["lq"], probe["lq"]) and again["key"] == probe["key"]  # the same set on every rank and run
    other = probe_set(synth_shards, tasks, CROP, per_task=6, seed=1, candidates=3)
    assert not torch.equal(other["lq"], probe["lq"])


def test_a_probe_larger_than_every_image_is_refused(synth_shards):  # noqa: F811
    with pytest.raises(ValueError, match="no image of >= 4096 px"):
        probe_set(synth_shards, synth_tasks(synth_shards), 4096, per_task=2)


def test_ranks_measure_shares_that_add_up_to_the_whole_probe(synth_shards):  # noqa: F811
    tasks = synth_tasks(synth_shards)
    torch.manual_seed(0)
    module = build_restorer_module(tiny_spec()).eval()
    probe = probe_set(synth_shards, tasks, CROP, per_task=6, seed=0)
    module.set_probe(probe)
    whole, first, second = module.probe_sums(0, 1), module.probe_sums(0, 2), module.probe_sums(1, 2)
    assert first[1] + second[1] == whole[1] == len(probe["lq"]) and first[1] > 0 and second[1] > 0
    torch.testing.assert_close(first + second, whole)
    with torch.no_grad():
        expected = psnr_torch(module.restore(probe["lq"], None).clamp(0, 1), probe["gt"]).clamp(max=MAX_PSNR).mean()
    assert module.measure_probe() == pytest.approx(float(expected), abs=1e-6)
    assert module.probe_psnr.item() == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.parametrize("source", ["patch", "image"])
def test_a_negatives_psnr_is_its_crops_or_its_whole_images(source):
    gen = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, 8, 8, generator=gen)
    medium = torch.stack([gt + 0.05 * torch.randn(gt.shape, generator=gen), gt], dim=1).clamp(0, 1)  # (2, 2, 3, 8, 8)
    batch = {"gt": gt, "medium": medium, "medium_psnr": torch.tensor([[20.0, 21.0], [22.0, 23.0]])}
    got = negative_psnr(batch, source)
    if source == "image":
        assert torch.equal(got, batch["medium_psnr"])
    else:
        expected = torch.stack([psnr_torch(medium[:, p], gt) for p in range(2)], dim=1).clamp(max=MAX_PSNR)
        torch.testing.assert_close(got, expected.float())
        assert got[:, 1].tolist() == [MAX_PSNR, MAX_PSNR]  # a negative equal to its target: as easy as it gets
    with pytest.raises(ValueError, match="negative_psnr"):
        build_loss(LossSpec(negative_psnr="tile"))
