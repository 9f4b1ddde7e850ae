"""The training reader's data protocol. Per-task resampling at read time: each task's share of draws follows its
factor on every rank, repeats of a sample take their own crops, and nothing is duplicated on disk. Augmentation:
the eight dihedral symmetries, applied alike to every image of a sample and to its map priors."""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from clearair.data import (
    RestorationStream,
    TaskIndex,
    Window,
    crop_prior,
    random_windows,
    resampled_shares,
    tier_loader,
    tier_views,
    whole_images,
)
from synth.imageio import encode_png
from synth.read import ShardFormatError
from synth.tiers import write_tier_shard
from tests.test_lightning import tier_sample, write_tar

COUNTS = {"denoise": 120, "derain": 40}
FACTORS = {"denoise": 0.5, "derain": 3.0}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("resample")
    rng = np.random.default_rng(0)
    samples = [tier_sample(f"{t}{i:03d}", t, rng, size=16) for t, n in COUNTS.items() for i in range(n)]
    order = rng.permutation(len(samples))
    return [
        write_tar(out / f"t-{i:06d}.tar", sum((samples[j] for j in order[i : i + 8]), []))
        for i in range(0, len(samples), 8)
    ]


def _draws(shards: list[str], rank: int, epochs: int, steps: int) -> Counter:
    stream = RestorationStream(shards, 8, 10, TaskIndex(COUNTS), seed=3, two_crops=False, steps_per_epoch=steps,
                               resample=FACTORS)  # fmt: skip
    stream.rank, stream.world_size = rank, 2
    tasks = Counter()
    for epoch in range(epochs):
        stream.epoch = epoch
        for batch in stream:
            tasks.update(stream.tasks.name(int(t)) for t in batch["task"])
    return tasks


@pytest.mark.parametrize("rank", [0, 1])
def test_every_task_gets_its_share_of_draws_on_every_rank(shards, rank) -> None:
    target, epoch_length = resampled_shares(COUNTS, FACTORS)
    assert epoch_length == 120 * 0.5 + 40 * 3
    drawn = _draws(shards, rank, epochs=20, steps=50)  # 20 x 50 batches x 10 = 10,000 draws
    total = sum(drawn.values())
    assert total == 10_000
    for task, share in target.items():
        assert abs(drawn[task] / total - share) <= 0.02, (task, drawn, target)


def test_repeats_take_their_own_crops_and_are_deterministic(shards) -> None:
    stream = RestorationStream(shards, 8, 1, TaskIndex(COUNTS), seed=3, two_crops=False, resample=FACTORS)
    sample = {"key": "derain000", "gt": np.zeros((16, 16, 3), np.uint8)}
    first, again, other = stream.windows(sample, 0), stream.windows(sample, 0), stream.windows(sample, 1)
    assert first == again and first != other
    no_resample = RestorationStream(shards, 8, 1, TaskIndex(COUNTS), seed=3, two_crops=False)
    assert no_resample.windows(sample) == first  # repeat 0 draws the crops a stream without resampling draws
    assert [stream.repeats("derain", f"k{i}") for i in range(5)] == [3] * 5


def test_unknown_tasks_and_negative_factors_are_refused(shards) -> None:
    with pytest.raises(ValueError, match="not training tasks"):
        RestorationStream(shards, 8, 1, TaskIndex(COUNTS), resample={"dehaze": 2})
    with pytest.raises(ValueError, match=">= 0"):
        RestorationStream(shards, 8, 1, TaskIndex(COUNTS), resample={"derain": -1})


def clean_counts(cfg, images: int) -> dict[str, int]:
    """Samples per task that ``images`` clean source images give under the pipeline's recipe and variants, as
    :func:`synth.plan.expand` deals them out (each image takes ``variants`` turns of the recipe's task cycle)."""
    from synth.recipes import load_recipe

    cycle = load_recipe(cfg.synth.recipe).task_cycle()
    return {t: images * cfg.synth.variants * cycle.count(t) // len(cycle) for t in dict.fromkeys(cycle)}


def test_the_paper_pipeline_draws_the_papers_data_epoch() -> None:
    """perceive_ir_3task's factors on PromptIR's training set (BSD400 + WED once per sigma, Rain100L's 200 pairs,
    RESIDE OTS's 72,135) give Perceive-IR's stage-2 epoch: ~206K draws, ~35% rain."""
    from workflows.config import load_pipeline

    cfg = load_pipeline("perceive_ir_3task")
    counts = {**clean_counts(cfg, 5144), "derain": 200, "dehaze": 72135}
    assert counts["denoise_15"] == counts["denoise_25"] == counts["denoise_50"] == 5144  # once per sigma
    shares, epoch = resampled_shares(counts, cfg.train.resample)
    assert 200_000 <= epoch <= 212_000 and 0.33 <= shares["derain"] <= 0.37
    _, medium_epoch = resampled_shares(counts, cfg.crossval.resample)  # PromptIR's mix: ~142K
    assert 138_000 <= medium_epoch <= 146_000


def test_the_5task_pipeline_trains_sigma_25_on_the_tasks_its_data_holds() -> None:
    """The 5-task protocol's noise is sigma 25 alone, every factor names a task its sources produce, and the
    authors' factors on the standard training sets (+ GoPro's 2,103 and LOL-v1's 485 pairs) balance the draws."""
    from synth.recipes import load_recipe
    from synth.sources import LAYOUT_TASKS
    from workflows.config import load_pipeline

    cfg = load_pipeline("perceive_ir_5task")
    recipe = load_recipe(cfg.synth.recipe)
    assert [t.name for t in recipe.tasks] == ["denoise_25"]
    assert [s.fixed()["sigma"] for t in recipe.tasks for s in t.steps] == [25]
    assert [b.noise_sigma for b in cfg.evaluate.benchmarks if b.noise_sigma] == [25]
    produced = {"denoise_25", "derain", "dehaze"} | {LAYOUT_TASKS[s.layout] for s in cfg.synth.sources
                                                     if s.layout in LAYOUT_TASKS}  # fmt: skip
    assert produced == {"denoise_25", "derain", "dehaze", "deblur", "lowlight"}
    for stage in (cfg.crossval, cfg.train):
        assert set(stage.resample) <= produced
    counts = {**clean_counts(cfg, 5144), "dehaze": 72135, "derain": 200, "deblur": 2103, "lowlight": 485}
    assert counts["denoise_25"] == 5144  # each clean image once, as the authors' epoch counts it
    shares, epoch = resampled_shares(counts, cfg.train.resample)
    assert 330_000 <= epoch <= 345_000 and all(0.15 <= s <= 0.25 for s in shares.values()), shares


def test_dihedral_crops_take_all_eight_symmetries_and_maps_move_with_pixels() -> None:
    rng = np.random.default_rng(0)
    drawn = {(w.flip, w.rot) for w in random_windows(64, 64, 32, rng, n=200, augment="dihedral")}
    assert drawn == {(f, r) for f in (False, True) for r in range(4)}
    assert {w.rot for w in random_windows(64, 64, 32, rng, n=50)} == {0}  # the default: horizontal flips only
    coords = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)  # every pixel names its position
    image = np.repeat(coords[..., None], 3, axis=2)
    views = set()
    for flip, rot in sorted(drawn):
        window = Window(8, 24, 32, flip, rot)
        crop = window.apply(image)
        assert np.array_equal(crop[..., 1], crop[..., 0])  # channels stay together
        assert np.array_equal(crop_prior(coords[None], window, (64, 64), out_size=32)[0], crop[..., 0])
        views.add(crop[..., 0].tobytes())
    assert len(views) == 8  # eight different views of one window


def test_stream_refuses_an_unknown_augmentation(shards) -> None:
    with pytest.raises(ValueError, match="augment"):
        RestorationStream(shards, 8, 1, TaskIndex(COUNTS), augment="mixup")


def _noise_tier_shard(path, sigma: float) -> str:
    """Two tier samples on a mid-grey 64x64 image (no clipping): one synthetic sigma-``sigma`` noise sample with
    its recorded steps, as crossval writes them, and one paired rain sample, which cannot be redrawn."""
    grey = np.full((64, 64, 3), 128, np.uint8)
    noisy = np.clip(grey + np.random.default_rng(9).normal(0, sigma, grey.shape), 0, 255).astype(np.uint8)
    steps = [{"degradation": "gaussian_noise", "severity": "medium",
              "params": {"sigma": sigma, "mode": "promptir", "gray": 0}}]  # fmt: skip
    metas = {
        "n0": {"task": "denoise", "origin": "synthetic", "seed": 0, "variant": 0, "degradations": steps},
        "r0": {"task": "derain", "origin": "paired", "seed": 0, "variant": 0, "degradations": []},
    }
    members = []
    for key, meta in metas.items():
        meta |= {"key": key, "fold": 0, "psnr": {"low": 20.0, "medium": 25.0}, "ssim": {"low": 0.5, "medium": 0.6}}
        tiers = {"low": noisy, "medium": grey, "high": grey}
        members += [(f"{key}.{t}.png", encode_png(img)) for t, img in tiers.items()]
        members.append((f"{key}.json", json.dumps(meta).encode()))
    return write_tar(path, members)


def _low_tiers(url: str, epoch: int, fresh: bool) -> dict[str, list[np.ndarray]]:
    stream = RestorationStream([url], 64, 1, TaskIndex(COUNTS), seed=5, two_crops=False, shuffle=0, tiers=True,
                               resample={"denoise": 3, "derain": 2}, fresh_noise=fresh)  # fmt: skip
    stream.epoch = epoch
    out: dict[str, list[np.ndarray]] = {}
    for batch in stream:
        out.setdefault(batch["key"][0], []).append(batch["lq"][0].numpy() * 255.0)
    return out


def test_fresh_noise_draws_new_noise_of_the_stated_sigma_per_draw(tmp_path) -> None:
    url = _noise_tier_shard(tmp_path / "n.tar", sigma=25.0)
    first, again, later = (_low_tiers(url, e, fresh=True) for e in (0, 0, 1))
    draws = first["n0"]
    assert len(draws) == 3  # three repeats of the noise sample this epoch
    for lq in draws:  # measured: the noise has the recorded sigma (promptir floors, so its mean is ~-0.5)
        assert abs((lq - 128.0).std() - 25.0) < 1.0 and abs((lq - 128.0).mean() + 0.5) < 0.5
    def same(a, b) -> bool:  # the same pixels, whatever flip each draw took
        return np.array_equal(np.sort(a, axis=None), np.sort(b, axis=None))

    assert all(not same(a, b) for i, a in enumerate(draws) for b in draws[i + 1 :])  # new noise per repeat
    assert all(np.array_equal(a, b) for a, b in zip(draws, again["n0"], strict=True))  # same key, epoch, repeat
    assert not any(same(a, b) for a, b in zip(draws, later["n0"], strict=True))  # a new data epoch
    stored = _low_tiers(url, 0, fresh=False)
    assert all(same(a, stored["n0"][0]) for a in stored["n0"])  # off: the stored draw every time
    assert len(first["r0"]) == 2 and all(same(a, stored["r0"][0]) for a in first["r0"])  # paired: never redrawn


def _two_medium_shard(path, n: int, size: int = 48) -> str:
    """``n`` tier samples written by the tier writer with two medium tiers: the first is the low tier, the second
    the high tier, so each stays equal to that tier under any view it is given."""
    rng = np.random.default_rng(4)
    samples = []
    for i in range(n):
        low, high = (rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2))
        psnr = {"low": 10.0 + i, "medium": 11.0 + i, "medium1": 12.0 + i}
        samples.append((low, [low, high], high, {"key": f"s{i:02d}", "task": "derain", "psnr": psnr}))
    write_tier_shard(str(path), samples)
    return str(path)


def test_every_medium_tier_of_a_batch_takes_the_view_of_its_gt(tmp_path) -> None:
    url = _two_medium_shard(tmp_path / "f0-000000.tar", 6)
    stream = RestorationStream([url], 32, 3, TaskIndex(["derain"]), tiers=True, augment="dihedral", shuffle=0)
    batches = list(stream)
    assert [b["medium"].shape for b in batches] == [(3, 2, 3, 32, 32)] * 2
    for batch in batches:
        assert torch.equal(batch["medium"][:, 0], batch["lq"]) and torch.equal(batch["medium"][:, 1], batch["gt"])
        index = [int(k[1:]) for k in batch["key"]]
        assert batch["medium_psnr"].tolist() == [[11.0 + i, 12.0 + i] for i in index]  # (B, P), stored order
    windows = [stream.windows({"key": f"s{i:02d}", "gt": np.zeros((48, 48))})[0] for i in range(6)]
    assert any(w.rot for w in windows) and any(w.flip for w in windows)  # views that move pixels were taken
    one = tier_sample("one", "derain", np.random.default_rng(0), size=48)  # a single-medium sample in the batch
    mixed = write_tar(tmp_path / "mixed.tar", sorted(one) + _first_sample(url))
    with pytest.raises(ShardFormatError, match=r"different numbers of medium tiers in one batch.*'one': 1.*'s00': 2"):
        list(RestorationStream([mixed], 32, 2, TaskIndex(["derain"]), tiers=True, shuffle=0))


def _first_sample(url: str) -> list[tuple[str, bytes]]:
    """The members of the first sample of ``url``."""
    with tarfile.open(url) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.name.startswith("s00.")]


def test_the_tier_stream_learns_medium_from_every_restorer(tmp_path) -> None:
    url = _two_medium_shard(tmp_path / "f0-000000.tar", 40, size=16)
    images, labels = next(iter(tier_loader([url], 40, 16, TaskIndex(["derain"]), shuffle=0, balanced=False)))
    low, medium, high = (images[labels == tier] for tier in range(3))
    from_first = [torch.equal(m, lo) for m, lo in zip(medium, low, strict=True)]
    assert all(f or torch.equal(m, h) for f, m, h in zip(from_first, medium, high, strict=True))  # low/high's view
    assert 10 <= sum(from_first) <= 30  # both restorers' outputs are drawn as "medium"
    sample = next(whole_images([url]))
    one = tier_views({**sample, "mediums": sample["mediums"][:1]}, 8, np.random.default_rng(7), "crop")
    two = tier_views(sample, 8, np.random.default_rng(7), "crop")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[2], two[2])  # another medium moves no view
