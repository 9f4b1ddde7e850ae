"""Shard loaders, prior providers and the Lightning modules, on tiny random-init parts and real tiny shards (CPU)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import io
import json
import tarfile
import warnings
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from clearair.data import (
    TaskIndex,
    Window,
    crop_prior,
    restoration_loader,
    tier_loader,
    validation_loader,
    whole_images,
)
from clearair.lightning import (
    PerceiverModule,
    RestorerModule,
    build_restorer_module,
    restorer_module_from_checkpoint,
)
from clearair.metrics import psnr
from clearair.objectives import AlignedRestore, PixelObjective
from clearair.priors import build_frozen_perceiver, build_priors, load_priors_from_batch
from clearair.restorer import load_restorer, read_checkpoint
from clearair.specs import LossSpec, NetworkSpec, OptimSpec, RestorerSpec
from synth.imageio import encode_png
from synth.read import ShardFormatError
from tests.tiny import GUIDANCE_DINO, REGION_DINO

TINY_DINO = {**GUIDANCE_DINO, "image_size": 28}
TINY_CLIP = {"clip_model": "clearair-tiny-clip", "pretrained": None, "n_ctx": 4, "image_size": 32}
TINY_PERCEIVER = {"config": TINY_CLIP, "prompts": None}
TASKS = {"denoise": 9, "derain": 5}  # uneven on purpose


@pytest.fixture(autouse=True)
def quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=".*(does not have many workers|IterableDataset|LeafSpec|log_every|in eval mode|no `val_data).*",
        )
        yield


def tiny_spec(
    arch: str = "restormer", optim: OptimSpec | None = None, config: dict | None = None, **fields
) -> RestorerSpec:
    """A restorer spec of the tiny ``arch`` preset (one step unless ``optim`` says); ``fields`` of RestorerSpec."""
    return RestorerSpec(NetworkSpec(arch, config or {}, "tiny"), optim or OptimSpec(1), **fields)


def trainer(root: Path, **kw) -> L.Trainer:
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    return L.Trainer(**{**base, **kw})


# --- shards ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory) -> list[str]:
    """16 samples of the 3-task recipe on the embedded demo source, 4 per shard, written by the real synth writer."""
    from synth.config import validate_config
    from synth.plan import expand, make_shards
    from synth.recipes import load_recipe
    from synth.sources import discover
    from synth.writer import write_shard

    out = tmp_path_factory.mktemp("synth")
    (out / "shards").mkdir()
    (out / "state").mkdir()
    cfg = validate_config(
        {
            "sources": [{"path": "demo", "layout": "demo"}],
            "recipe": "3task",
            "out": str(out),
            "seed": 1,
            "samples_per_shard": 4,
            "patch_size": 32,
            "max_samples": 16,
            "demo": {"long_side": 128, "crop": 48},
            "splits": {"folds": 2, "val_fraction": 0.0, "test_fraction": 0.0},
        }
    )
    recipe = load_recipe(cfg.recipe)
    found = discover(cfg.sources, cfg.demo, cfg.patch_size)
    specs = make_shards(expand(found.items, recipe.task_cycle(), cfg.variants, cfg.splits), 4, cfg.max_samples)
    states = [write_shard(spec, cfg, recipe, str(out)) for spec in specs]
    return [str(out / "shards" / s["name"]) for s in states]


def _blocky(rng: np.random.Generator, size: int, low: float, high: float) -> np.ndarray:
    cells = rng.uniform(low, high, (size // 4, size // 4, 3))
    return cells.repeat(4, 0).repeat(4, 1)  # (size, size, 3) in [low, high]


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def tier_sample(key: str, task: str, rng: np.random.Generator, size: int = 32) -> list[tuple[str, bytes]]:
    """low = heavy noise, medium = blur + mild noise, high = clean, on 4-pixel cells (the tiny CLIP's patch size;
    image and crop sizes of 32 keep them on its patch grid). Clean denoise images are darker ([0, 0.7]) than
    derain ones ([0.3, 1]), so the mean of a high-tier image tells its task."""
    clean = _blocky(rng, size, *((0.0, 0.7) if task == "denoise" else (0.3, 1.0)))
    low = _u8(clean + 0.3 * rng.standard_normal(clean.shape))
    blurred = F.avg_pool2d(torch.from_numpy(clean).permute(2, 0, 1)[None], 5, 1, 2, count_include_pad=False)
    medium = _u8(blurred[0].permute(1, 2, 0).numpy() + 0.03 * rng.standard_normal(clean.shape))
    high = _u8(clean)
    meta = {
        "key": key,
        "task": task,
        "fold": 0,
        "psnr": {"low": psnr(low, high), "medium": psnr(medium, high)},
        "ssim": {"low": 0.0, "medium": 0.0},
    }
    images = {"low": low, "medium": medium, "high": high}
    return [(f"{key}.{t}.png", encode_png(images[t])) for t in images] + [(f"{key}.json", json.dumps(meta).encode())]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def tier_shards(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("tiers")
    rng = np.random.default_rng(0)
    samples = [tier_sample(f"{task}{i:03d}", task, rng) for task, n in TASKS.items() for i in range(n)]
    order = rng.permutation(len(samples))
    shards = [sum((samples[j] for j in order[i : i + 4]), []) for i in range(0, len(samples), 4)]
    return [write_tar(out / f"tiers-{i:06d}.tar", members) for i, members in enumerate(shards)]


def synth_tasks(urls: list[str]) -> TaskIndex:
    return TaskIndex(s["meta"]["task"] for s in whole_images(urls))


# --- data --------------------------------------------------------------------------------------------------------


def test_task_index_is_sorted_and_names_unknown_tasks():
    tasks = TaskIndex(["derain", "dehaze", "denoise", "dehaze"])
    assert tasks.names == ("dehaze", "denoise", "derain") and tasks.index("denoise") == 1 and len(tasks) == 3
    assert tasks == TaskIndex(["denoise", "derain", "dehaze"])
    with pytest.raises(ValueError, match="deblur.*dehaze"):
        tasks.index("deblur")


def test_restoration_batches_two_workers_read_each_sample_once(synth_shards):
    tasks = synth_tasks(synth_shards)
    all_keys = [s["key"] for s in whole_images(synth_shards)]
    loader = restoration_loader(synth_shards, crop=32, batch_size=3, tasks=tasks, num_workers=2, seed=3)
    epochs = [list(loader) for _ in range(2)]
    for batches in epochs:
        keys = [k for b in batches for k in b["key"]]
        assert sorted(keys) == sorted(all_keys)  # every sample once: no duplicates across workers, none missing
    batch = epochs[0][0]
    assert batch["lq"].shape == batch["gt"].shape == batch["lq2"].shape == (3, 3, 32, 32)
    assert batch["task"].dtype == torch.long and not torch.equal(batch["lq"], batch["lq2"])
    first = {k: b["gt"][i] for b in epochs[0] for i, k in enumerate(b["key"])}
    second = {k: b["gt"][i] for b in epochs[1] for i, k in enumerate(b["key"])}
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the next pass is the next epoch: new crops


def test_ranks_split_the_shards_and_steps_per_epoch_evens_them(synth_shards, monkeypatch):
    tasks = synth_tasks(synth_shards)
    keys, counts = [], []
    for rank in (0, 1):  # two DDP ranks, as torch.distributed / Ray Train announce them through RANK, WORLD_SIZE
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        keys.append([k for b in restoration_loader(synth_shards, 32, 3, tasks, num_workers=2) for k in b["key"]])
        loader = restoration_loader(synth_shards, 32, 4, tasks, num_workers=2, steps_per_epoch=5)
        counts.append([len(b["key"]) for b in loader] + [len(loader)])
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(s["key"] for s in whole_images(synth_shards))
    assert counts == [[4] * 5 + [5]] * 2  # same number of full batches on every rank: no DDP hang


def test_tier_batches_carry_aligned_negatives_and_their_psnr(tier_shards, tmp_path):
    tasks = TaskIndex(TASKS)
    batch = next(iter(restoration_loader(tier_shards, 32, 4, tasks, tiers=True)))
    assert batch["medium"].shape == (4, 1, 3, 32, 32) and batch["medium_psnr"].shape == (4, 1)
    stored = {s["key"]: s["meta"]["psnr"]["medium"] for s in whole_images(tier_shards)}
    assert batch["medium_psnr"][:, 0].tolist() == pytest.approx([stored[k] for k in batch["key"]], rel=1e-5)
    # a sample whose medium tier equals its high tier: the negative crop is the GT crop, pixel for pixel
    rng = np.random.default_rng(5)
    members = tier_sample("same", "derain", rng)
    high = next(data for name, data in members if name == "same.high.png")
    members = [(n, high if n == "same.medium.png" else d) for n, d in members]
    same = next(iter(restoration_loader([write_tar(tmp_path / "same.tar", members)], 32, 1, tasks, tiers=True)))
    assert torch.equal(same["medium"][:, 0], same["gt"]) and not torch.equal(same["lq"], same["gt"])


def test_tier_loader_batches_are_task_balanced(tier_shards):
    loader = tier_loader(tier_shards, batch_size=4, image_size=32, tasks=TaskIndex(TASKS))
    batches = list(loader)
    assert len(batches) == TASKS["derain"] // 2  # the minority task decides; majority samples are left over
    for images, labels in batches:
        assert images.shape == (12, 3, 32, 32)
        assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        bright = images[labels == 2].mean(dim=(1, 2, 3)) > 0.5  # derain high-tier images are bright
        assert int(bright.sum()) == 2  # two samples of each task
    with pytest.raises(ValueError, match="multiple of the number of tasks"):
        tier_loader(tier_shards, batch_size=3, image_size=32, tasks=TaskIndex(TASKS))


def test_whole_images_in_shard_order_and_unsafe_members_refused(tier_shards, tmp_path):
    samples = list(whole_images(tier_shards[:1]))
    with tarfile.open(tier_shards[0]) as tar:
        keys = list(dict.fromkeys(m.name.split(".")[0] for m in tar))
    assert [s["key"] for s in samples] == keys
    assert all(s["lq"].shape == s["gt"].shape == s["medium"].shape == (32, 32, 3) for s in samples)
    members = tier_sample("evil", "denoise", np.random.default_rng(1)) + [("evil.pyd", b"cos\nsystem\n")]
    with pytest.raises(ShardFormatError, match="evil.pyd|'pyd'"):
        list(whole_images([write_tar(tmp_path / "evil.tar", members)]))


def test_stored_priors_are_cropped_with_the_image_window(tmp_path):
    masks = np.zeros((2, 8, 8), np.float32)
    masks[0, :, :4] = 1.0  # left half of the image
    masks[1, :, 4:] = 1.0
    left = crop_prior(masks, Window(0, 0, 32), (64, 64), out_size=8)
    assert left.shape == (2, 8, 8) and left[0].all() and not left[1].any()
    flipped = crop_prior(masks, Window(16, 16, 32, flip=True), (64, 64), out_size=8)
    assert flipped[0, :, 4:].all() and flipped[1, :, :4].all()  # centre crop, mirrored
    members = tier_sample("p", "denoise", np.random.default_rng(2))
    buf = io.BytesIO()
    np.save(buf, masks, allow_pickle=False)
    url = write_tar(tmp_path / "p.tar", members + [("p.prior.region_masks.npy", buf.getvalue())])
    batch = next(iter(restoration_loader([url], 32, 1, TaskIndex(TASKS))))
    assert batch["prior.region_masks"].shape == (1, 2, 8, 8)
    assert set(load_priors_from_batch(batch)) == {"region_masks"}


# --- priors ------------------------------------------------------------------------------------------------------


def test_prior_specs_refuse_random_parts_and_unknown_keys():
    spec = {"kind": "dino", "source": TINY_DINO, "image_size": 28}
    with pytest.raises(ValueError, match="allow_random"):
        build_priors(spec)
    with pytest.raises(ValueError, match="valid keys"):
        build_priors({**spec, "size": 3}, allow_random=True)
    with pytest.raises(ValueError, match="none, dino, clearair"):
        build_priors({"kind": "sam"})
    assert build_priors({"kind": "none"}) is None
    a, b = build_priors(spec, allow_random=True), build_priors(spec, allow_random=True)
    lq = torch.rand(2, 3, 32, 32)
    assert torch.equal(a(lq)["dino_cls"], b(lq)["dino_cls"])  # random parts are seeded: every stage builds the same
    assert a(lq)["dino_cls"].shape == (2, 4, 32) and not a(lq)["dino_cls"].requires_grad


def test_aligned_restore_moves_region_masks_with_the_view():
    seen = []

    def model(x, priors):
        seen.append(priors["region_masks"])
        return x

    reference = torch.rand(1, 3, 8, 8)
    masks = torch.rand(1, 2, 8, 8)
    restore = AlignedRestore(model, {"region_masks": masks, "quality_emb": torch.ones(1, 4)}, reference)
    view = torch.rot90(reference.flip(-1), 3, dims=(-2, -1))
    restore(view)
    restore(view * 0.5)  # later views reuse the transform found on the first
    expected = torch.rot90(masks.flip(-1), 3, dims=(-2, -1))
    assert torch.equal(seen[0], expected) and torch.equal(seen[1], expected)


# --- restorer ----------------------------------------------------------------------------------------------------


def test_l1_restorer_learns_and_its_checkpoint_loads_weights_only(synth_shards, tmp_path):
    tasks = synth_tasks(synth_shards)
    fixed = next(iter(restoration_loader(synth_shards, 32, 4, tasks, shuffle=0)))
    torch.manual_seed(0)
    spec = tiny_spec(optim=OptimSpec(30, lr=2e-3))
    module = build_restorer_module(spec)

    def fixed_loss() -> float:
        with torch.no_grad():
            return F.l1_loss(module.model(fixed["lq"]), fixed["gt"]).item()

    before = fixed_loss()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/psnr", mode="max")
    fit = trainer(tmp_path, max_steps=30, callbacks=[checkpoints], check_val_every_n_epoch=3)
    fit.fit(
        module, DataLoader([fixed] * 10, batch_size=None), validation_loader(synth_shards[:1], tasks)
    )  # whole images, padded
    assert fixed_loss() < 0.8 * before
    ckpt = torch.load(checkpoints.best_model_path, weights_only=True)
    assert RestorerSpec.from_dict(ckpt["hyper_parameters"]) == spec and np.isfinite(ckpt["state_dict"]["probe_psnr"])
    restored = load_restorer(checkpoints.best_model_path, device="cpu").network
    torch.testing.assert_close(restored(fixed["lq"]), module.model.eval()(fixed["lq"]))
    # a checkpoint of the former RestorerModule (flat keyword arguments as hyperparameters) still loads
    ckpt["hyper_parameters"] = FLAT_HPARAMS
    torch.save(ckpt, tmp_path / "flat.ckpt")
    assert RestorerSpec.from_dict(FLAT_HPARAMS) == spec
    torch.testing.assert_close(read_checkpoint(tmp_path / "flat.ckpt")[0](fixed["lq"]), restored(fixed["lq"]))
    reloaded = restorer_module_from_checkpoint(tmp_path / "flat.ckpt")
    torch.testing.assert_close(reloaded.model.eval()(fixed["lq"]), restored(fixed["lq"]))


FLAT_HPARAMS = {  # what RestorerModule("restormer", {}, "tiny", "l1", max_steps=30, lr=2e-3) saved before the specs
    "arch": "restormer", "model_config": {}, "preset": "tiny", "loss": "l1", "loss_weights": None, "priors": None,
    "perceiver": None, "vgg": None, "max_steps": 30, "allow_random_frozen": False, "lr": 2e-3, "min_lr": 1e-6,
    "weight_decay": 1e-4, "betas": (0.9, 0.999), "probe_every_epoch": True, "pixel_loss": "l1",
    "clip_temperature": 1.0, "select_by": "task_mean", "con_labels": "family", "con_gather": True, "vgg_taps": None,
    "vgg_layer_weights": None, "negative_psnr": "patch", "ema_decay": None,
}  # fmt: skip


def test_any_network_trains_with_the_parts_it_is_given(synth_shards, tmp_path):
    """A plain ``nn.Conv2d`` (no priors, no ``arch``) with the pixel loss: trained and validated by Lightning."""
    tasks = synth_tasks(synth_shards)
    torch.manual_seed(0)
    network = nn.Conv2d(3, 3, 3, padding=1)
    start = network.weight.detach().clone()
    module = RestorerModule(network, PixelObjective(), OptimSpec(max_steps=2, lr=1e-2))
    fit = trainer(tmp_path, fast_dev_run=2)
    fit.fit(module, restoration_loader(synth_shards, 32, 2, tasks), validation_loader(synth_shards[:1], tasks))
    assert torch.isfinite(fit.callback_metrics["train/loss"]) and torch.isfinite(fit.callback_metrics["val/psnr"])
    assert not torch.equal(network.weight, start)
    assert set(module.state_dict()) == {"model.weight", "model.bias", "probe_psnr"}  # the loss holds no weights


def test_around_fit_only_the_warning_about_eval_mode_parts_is_silenced(synth_shards, tmp_path):
    """Frozen parts are in eval mode by design; Lightning's warning about them is silenced around fit, no other."""
    import contextlib

    from clearair.lightning import frozen_parts_in_eval

    tasks = synth_tasks(synth_shards)

    def messages(silenced: bool) -> list[str]:
        module = RestorerModule(nn.Conv2d(3, 3, 3, padding=1), PixelObjective(), OptimSpec(max_steps=1, lr=1e-2))
        module.frozen_stand_in = nn.Conv2d(3, 3, 1).eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with frozen_parts_in_eval() if silenced else contextlib.nullcontext():
                trainer(tmp_path, fast_dev_run=1).fit(module, restoration_loader(synth_shards, 32, 2, tasks))
                warnings.warn("another warning", UserWarning, stacklevel=1)
        return [str(w.message) for w in caught]

    assert any("in eval mode" in m for m in messages(silenced=False))
    silenced = messages(silenced=True)
    assert not any("in eval mode" in m for m in silenced) and "another warning" in silenced


def test_perceive_ir_training_keeps_frozen_parts_out_of_checkpoints(tier_shards, tmp_path):
    tasks = TaskIndex(TASKS)
    spec = tiny_spec(
        "perceive_ir",
        OptimSpec(4),
        loss=LossSpec("perceive_ir", perceiver=TINY_PERCEIVER, vgg=None),
        priors={"kind": "dino", "source": TINY_DINO, "image_size": 28},
        allow_random_frozen=True,
    )
    module = build_restorer_module(spec)
    train = restoration_loader(tier_shards, 32, 4, tasks, tiers=True, steps_per_epoch=2)
    val = validation_loader(tier_shards[:1], tasks, crop=32, limit=4, tiers=True)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit = trainer(tmp_path, max_steps=4, callbacks=[checkpoints], num_sanity_val_steps=1, limit_val_batches=1)
    fit.fit(module, train, val)
    metrics = fit.callback_metrics
    assert {"train/l1", "train/con", "train/clip", "train/dpl", "val/psnr"} <= set(metrics)
    assert all(torch.isfinite(metrics[k]) for k in ("train/loss", "val/psnr"))
    assert np.isfinite(module.probe_psnr.item())  # measured on the first validation batch
    ckpt = torch.load(checkpoints.last_model_path, weights_only=True)
    assert set(ckpt["state_dict"]) == {f"model.{k}" for k in module.model.state_dict()} | {"probe_psnr"}
    assert not any(k.startswith(("model.vgg", "model.dinov2", "model.clip")) for k in ckpt["state_dict"])
    assert not module.priors.part.training and not module.loss.part.training  # Frozen: out of train mode
    reloaded = restorer_module_from_checkpoint(checkpoints.last_model_path)  # frozen parts rebuilt from sources
    negatives = reloaded.loss.part.negatives(next(iter(train)), reloaded._probe_value)
    assert negatives[1] is not None and reloaded._probe_value == module.probe_psnr.item()
    batch = next(iter(val))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.restore(batch["lq"], reloaded.priors_for(batch)),
            module.eval().restore(batch["lq"], module.priors_for(batch)),
        )
    # the one loading API rebuilds the same DINOv2 priors from the checkpoint and checks their recorded sum
    restorer = load_restorer(checkpoints.last_model_path, device="cpu", precision="fp32")
    assert set(ckpt["clearair"]["frozen"]) == {"guidance"} and restorer.info["frozen"] == ckpt["clearair"]["frozen"]
    with torch.no_grad():
        expected = module.restore(batch["lq"], module.priors_for(batch)).clamp(0, 1)
    torch.testing.assert_close(restorer.restore(batch["lq"]), expected)


def test_clearair_restorer_trains_with_clue_reuse(tier_shards, tmp_path):
    perceiver = {"kind": "perceiver", **TINY_PERCEIVER}
    priors = {
        "kind": "clearair",
        "assessor": perceiver,
        "regions": {"kind": "dino_cluster", "source": REGION_DINO, "n_regions": 4, "image_size": 32},
        "degradation": {"kind": "cfe_perceiver", "cfe": {"channels": [8, 8, 16, 16], "out_dim": 16}},
    }
    config = {"quality_dim": 64, "degradation_dim": 19, "n_regions": 4}
    spec = tiny_spec(
        "clearair", OptimSpec(2), config, loss=LossSpec("clearair"), priors=priors, allow_random_frozen=True
    )
    module = build_restorer_module(spec)
    fit = trainer(tmp_path, fast_dev_run=2)
    fit.fit(module, restoration_loader(tier_shards, 32, 2, TaskIndex(TASKS)))
    assert fit.callback_metrics["train/inter"] > 0 and torch.isfinite(fit.callback_metrics["train/loss"])
    with pytest.raises(ValueError, match="quality_dim"):
        build_restorer_module(replace(spec, network=replace(spec.network, config={**config, "quality_dim": 8})))


# --- perceiver ---------------------------------------------------------------------------------------------------


def test_perceiver_module_learns_tiers_above_chance(tier_shards, tmp_path):
    tasks = TaskIndex(TASKS)
    module = PerceiverModule(TINY_CLIP, max_steps=80, lr=1e-2, allow_random_frozen=True)
    train = tier_loader(tier_shards, 4, 32, tasks, steps_per_epoch=20)
    val = tier_loader(tier_shards, 4, 32, tasks, shuffle=0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit = trainer(tmp_path, max_steps=80, callbacks=[checkpoints], check_val_every_n_epoch=4, num_sanity_val_steps=0)
    fit.fit(module, train, val)
    n_val = sum(len(labels) for _, labels in val)
    assert module.confusion.sum() == n_val
    assert fit.callback_metrics["val/accuracy"] > 0.5  # chance is 1/3
    ckpt = torch.load(checkpoints.last_model_path, weights_only=True)
    assert list(ckpt["state_dict"]) == ["perceiver.prompt_learner.ctx"]  # the frozen CLIP is not saved
    path = module.export_prompts(tmp_path / "prompts.safetensors")
    frozen = build_frozen_perceiver({"config": TINY_CLIP, "prompts": str(path)}, allow_random=True)
    images, _ = next(iter(val))
    with torch.no_grad():
        torch.testing.assert_close(frozen(images), module.perceiver.eval()(images))


@pytest.mark.parametrize("select_by", ["task_mean", "image_mean"])
def test_val_psnr_is_the_task_mean_or_the_image_mean_as_asked(select_by):
    """Three images of one task and one of another: the two averages differ, and ``val/psnr`` is the one asked
    for (the score checkpoints are kept by)."""
    from clearair.metrics import psnr_torch

    torch.manual_seed(0)
    module = build_restorer_module(tiny_spec(select_by=select_by))
    gen = torch.Generator().manual_seed(0)
    gt = torch.rand(4, 3, 16, 16, generator=gen)
    lq = gt + 0.2 * torch.rand(4, 3, 16, 16, generator=gen) * torch.tensor([0.1, 0.1, 0.1, 3.0])[:, None, None, None]
    batches = [{"lq": lq[i : i + 2].clamp(0, 1), "gt": gt[i : i + 2], "task": torch.tensor(t)} for i, t in
               ((0, [0, 0]), (2, [0, 1]))]  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)
    with torch.no_grad():
        per_image = psnr_torch(module.restore(lq.clamp(0, 1), None).clamp(0, 1), gt).double()
    tasks = (per_image[:3].mean() + per_image[3]) / 2
    assert metrics["val/psnr_tasks"] == pytest.approx(float(tasks), abs=1e-4)
    assert metrics["val/psnr_images"] == pytest.approx(float(per_image.mean()), abs=1e-4)
    assert abs(metrics["val/psnr_tasks"] - metrics["val/psnr_images"]) > 0.1
    key = {"task_mean": "val/psnr_tasks", "image_mean": "val/psnr_images"}[select_by]
    assert metrics["val/psnr"] == metrics[key]
    with pytest.raises(ValueError, match="select_by"):
        build_restorer_module(tiny_spec(select_by="median"))


def test_weight_average_follows_its_warmed_up_decay():
    torch.manual_seed(0)
    module = build_restorer_module(tiny_spec(optim=OptimSpec(1, ema_decay=0.5)))
    start = [p.detach().clone() for p in module.ema.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(start, module.model.parameters(), strict=True))
    expected = start
    for n in range(3):
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(1.0)
        decay = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.18, 0.25: the early updates move it most
        expected = [decay * e + (1 - decay) * p for e, p in zip(expected, module.model.parameters(), strict=True)]
        module.update_ema()
    for got, want in zip(module.ema.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert int(module.ema_updates) == 3 and not any(p.requires_grad for p in module.ema.parameters())
    with pytest.raises(ValueError, match="ema_decay"):
        build_restorer_module(tiny_spec(optim=OptimSpec(1, ema_decay=1.0)))


def test_the_weight_average_is_updated_per_optimizer_step_validated_and_exported(synth_shards, tmp_path):
    tasks = synth_tasks(synth_shards)
    fixed = next(iter(restoration_loader(synth_shards, 32, 4, tasks, shuffle=0)))
    torch.manual_seed(0)
    spec = tiny_spec(optim=OptimSpec(6, lr=2e-3, ema_decay=0.9))
    module = build_restorer_module(spec)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit = trainer(tmp_path, max_steps=6, callbacks=[checkpoints], accumulate_grad_batches=2, limit_val_batches=1)
    fit.fit(module, DataLoader([fixed] * 12, batch_size=None), validation_loader(synth_shards[:1], tasks))
    assert int(module.ema_updates) == 6  # once per optimizer step, not per accumulated batch
    average, raw = module.ema.eval()(fixed["lq"]), module.model.eval()(fixed["lq"])
    assert not torch.allclose(average, raw)  # a real average, not a copy of the last weights
    ckpt = torch.load(checkpoints.last_model_path, weights_only=True)
    assert {k for k in ckpt["state_dict"] if k.startswith("ema.")} == {f"ema.{k}" for k in module.ema.state_dict()}
    restorer = load_restorer(checkpoints.last_model_path, device="cpu", precision="fp32")
    torch.testing.assert_close(restorer.network(fixed["lq"]), average)  # the average is what is exported
    with torch.no_grad():
        torch.testing.assert_close(module.restore(fixed["lq"], None), average)  # and what validation measures
    resumed = restorer_module_from_checkpoint(checkpoints.last_model_path)
    assert int(resumed.ema_updates) == 6 and torch.equal(resumed.ema.eval()(fixed["lq"]), average)
    # Lightning resumes a fresh module from the checkpoint as Ray Train's workers do (weights only)
    again = build_restorer_module(replace(spec, optim=replace(spec.optim, max_steps=8)))
    more = trainer(tmp_path, max_steps=8, accumulate_grad_batches=2, limit_val_batches=1)
    batches = DataLoader([fixed] * 16, batch_size=None)
    more.fit(again, batches, validation_loader(synth_shards[:1], tasks), ckpt_path=checkpoints.last_model_path,
             weights_only=True)  # fmt: skip
    assert more.global_step == 8 and int(again.ema_updates) == 8


@pytest.mark.slow
def test_a_ray_train_worker_computes_on_every_cpu_it_holds(ray_session, synth_shards, tmp_path):
    """Ray's workers inherit OMP_NUM_THREADS=1; a worker that asked for 2 CPUs must still train on 2 threads (the
    thread count is tagged on the run, as a user comparing runs would look for it)."""
    from mlflow import MlflowClient

    from clearair.specs import NetworkSpec, OptimSpec, RestorerSpec
    from workflows.config import Fit
    from workflows.records import TrackingRef, TrainingData
    from workflows.training import fit_restorer

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = TrackingRef(uri, "threads", None, str(tmp_path / "artifacts"))
    tracker = tracking.open()
    run_id = tracker.start_run("train")
    tracker.close()
    data = TrainingData(synth_shards[:3], synth_shards[3:], list(synth_tasks(synth_shards).names))
    fit = Fit(steps=2, global_batch=2, crop=32, val_every=2, val_images=1, val_crop=32, workers=1, cpus_per_worker=2)
    spec = RestorerSpec(NetworkSpec("restormer", preset="tiny"), OptimSpec(2, lr=1e-3))
    fit_restorer("threads", str(tmp_path / "ray"), spec, data, fit.model_dump(), 1, tracking.child(run_id), False)
    assert MlflowClient(uri).get_run(run_id).data.tags["clearair.torch_threads"] == "2"
