"""Discovery of sources: dataset layouts, bad inputs, duplicates, test leakage, content-based splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synth.config import DemoConfig, SourceSpec, SplitConfig, SynthParams, digest_dump
from synth.imageio import BadImage, load_rgb
from synth.plan import assign_split, expand
from synth.recipes import load_recipe
from synth.sources import discover, discover_demo
from tests.conftest import textured


def save(path: Path, seed: int, size=(64, 80), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(textured(*size, seed)).save(path, format=fmt)
    return path


def found(root: Path, layout: str = "auto", min_side: int = 32):
    return discover([SourceSpec(path=str(root), layout=layout)], DemoConfig(), min_side)


def test_rain100l_flat_pairs(tmp_path):
    for i in (1, 2, 3):
        save(tmp_path / "Rain100L" / "train" / f"rain-{i}.png", i)
        save(tmp_path / "Rain100L" / "train" / f"norain-{i}.png", 10 + i)
    save(tmp_path / "Rain100L" / "test" / "rain-1.png", 21)
    save(tmp_path / "Rain100L" / "test" / "norain-1.png", 22)
    d = found(tmp_path / "Rain100L", "rain100l")
    assert len(d.items) == 4 and all(i.lq and i.task == "derain" for i in d.items)
    assert sorted(i.split for i in d.items) == ["test", "train", "train", "train"]
    assert all(Path(i.gt).name == "no" + Path(i.lq).name for i in d.items)


def test_sots_many_hazy_per_clean_share_group(tmp_path):
    root = tmp_path / "SOTS" / "outdoor"
    save(root / "clear" / "0001.png", 1)
    save(root / "hazy" / "0001_0.8_0.2.jpg", 2)
    save(root / "hazy" / "0001_0.9_0.1.jpg", 3)
    save(root / "hazy" / "0002_0.8_0.2.jpg", 4)  # no clean image: listed, not dropped silently
    d = found(tmp_path / "SOTS")
    assert len(d.items) == 2 and {i.task for i in d.items} == {"dehaze"}
    assert len({i.group for i in d.items}) == 1 and len({i.identity for i in d.items}) == 2
    assert any("no ground truth" in s["reason"] and "0002_0.8_0.2" in s["path"] for s in d.skipped)


@pytest.mark.parametrize(
    "lq,gt,task,split",
    [
        ("GoPro/test/GOPR0384_11_00/blur/000001.png", "GoPro/test/GOPR0384_11_00/sharp/000001.png", "deblur", "test"),
        ("LOL/our485/low/2.png", "LOL/our485/high/2.png", "lowlight", "train"),
        (
            "Snow100K/test/Snow100K-S/synthetic/beautiful_1.jpg",
            "Snow100K/test/Snow100K-S/gt/beautiful_1.jpg",
            "desnow",
            "test",
        ),
        ("data/Train/Derain/rainy/rain-7.png", "data/Train/Derain/gt/norain-7.png", "derain", "train"),
        (
            "data/Train/Dehaze/synthetic/part1/0005_0.8_0.1.jpg",
            "data/Train/Dehaze/original/0005.jpg",
            "dehaze",
            "train",
        ),
        ("custom/input/a.png", "custom/target/a.png", "custom", None),
    ],
)
def test_paired_layouts(tmp_path, lq, gt, task, split):
    save(tmp_path / lq, 1)
    save(tmp_path / gt, 2)
    top = tmp_path / Path(lq).parts[0]
    (item,) = found(top).items
    assert (Path(item.lq), Path(item.gt), item.task, item.split) == (tmp_path / lq, tmp_path / gt, task, split)


def test_promptir_tree_mixes_clean_and_pairs(tmp_path):
    save(tmp_path / "data/Train/Denoise/100080.jpg", 1)
    save(tmp_path / "data/Train/Derain/rainy/rain-1.png", 2)
    save(tmp_path / "data/Train/Derain/gt/norain-1.png", 3)
    items = found(tmp_path / "data", "promptir").items
    clean = [i for i in items if i.lq is None]
    assert len(items) == 2 and len(clean) == 1 and clean[0].gt.endswith("100080.jpg")


def test_explicit_layout_without_pairs_fails(tmp_path):
    save(tmp_path / "x" / "a.png", 1)
    with pytest.raises(FileNotFoundError, match="no gopro pairs"):
        found(tmp_path / "x", "gopro")


def write_bad_inputs(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    good = root / "full.jpg"
    save(good, 5, size=(96, 96))
    (root / "truncated.jpg").write_bytes(good.read_bytes()[:400])
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(textured(64, 64, 7)[..., 0]).save(root / "grey.png")
    rgba = np.dstack([textured(64, 64, 8), np.full((64, 64), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "alpha.png")
    Image.fromarray(textured(64, 64, 9)[..., 0].astype(np.uint16) * 257).save(root / "sixteen.png")
    Image.fromarray(textured(64, 64, 10)).convert("CMYK").save(root / "cmyk.jpg")
    im = Image.fromarray(textured(64, 48, 11))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(root / "rotated.jpg", exif=exif)
    save(root / "tiny.png", 12, size=(16, 16))
    shutil.copy(root / "grey.png", root / "grey_copy.png")


def test_bad_inputs_are_converted_or_listed(tmp_path):
    write_bad_inputs(tmp_path / "bad")
    d = found(tmp_path / "bad")
    reasons = {Path(s["path"]).name: s["reason"] for s in d.skipped}
    assert "not an image" in reasons["notes.txt"]
    assert "smaller than the patch size" in reasons["tiny.png"]
    assert "duplicate of" in reasons["grey_copy.png"]
    assert "cannot read image header" in reasons["corrupt.png"]
    kept = {Path(i.gt).name for i in d.items}
    assert {"grey.png", "alpha.png", "sixteen.png", "cmyk.jpg", "rotated.jpg", "full.jpg"} <= kept
    with pytest.raises(BadImage, match="cannot decode"):
        load_rgb(tmp_path / "bad" / "truncated.jpg")


def test_conversions_are_exact_and_reported(tmp_path):
    write_bad_inputs(tmp_path / "bad")
    grey, notes = load_rgb(tmp_path / "bad" / "sixteen.png")
    assert grey.dtype == np.uint8 and grey.shape == (64, 64, 3) and "16" in notes[0]
    np.testing.assert_array_equal(grey[..., 0], textured(64, 64, 9)[..., 0])
    rot, notes = load_rgb(tmp_path / "bad" / "rotated.jpg")
    assert rot.shape == (48, 64, 3) and any("EXIF" in n for n in notes)
    alpha, notes = load_rgb(tmp_path / "bad" / "alpha.png")
    expected = (textured(64, 64, 8).astype(np.uint16) * 128 + 127) // 255
    np.testing.assert_array_equal(alpha, expected.astype(np.uint8))
    assert "alpha" in notes[0]
    cmyk, notes = load_rgb(tmp_path / "bad" / "cmyk.jpg")
    assert cmyk.shape == (64, 64, 3) and "CMYK" in notes[0]


def test_official_test_images_never_enter_training(tmp_path):
    save(tmp_path / "bench/test/input/a.png", 1)
    save(tmp_path / "bench/test/target/a.png", 2)
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(tmp_path / "bench/test/target/a.png", photos / "leaked.png")
    save(photos / "fine.png", 3)
    d = discover([SourceSpec(path=str(tmp_path / "bench")), SourceSpec(path=str(photos))], DemoConfig(), 32)
    assert {Path(i.gt).name for i in d.items if i.split != "test"} == {"fine.png"}
    assert any("identical to official test image" in s["reason"] for s in d.skipped)


def test_split_follows_content_not_path(tmp_path, photo_dir):
    before = {i.gt_hash: assign_split(i, SplitConfig(folds=3)) for i in found(photo_dir).items}
    moved = tmp_path / "moved"
    for i, p in enumerate(sorted(photo_dir.rglob("*.*"))):
        (moved / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, moved / f"d{i % 2}" / f"renamed{i}{p.suffix}")
    after = {i.gt_hash: assign_split(i, SplitConfig(folds=3)) for i in found(moved).items}
    assert before == after and len(before) == 12


def test_demo_source_is_embedded_and_large_enough():
    items = discover_demo(DemoConfig())
    assert len(items) >= 60 and len({i.gt_hash for i in items}) == len(items)
    splits = [assign_split(i, SplitConfig(folds=2)) for i in items]
    assert {s for s, _ in splits} == {"train", "val", "test"}
    assert {f for s, f in splits if s == "train"} == {0, 1}


def test_demo_split_by_photo_keeps_every_photograph_in_one_split_and_fold():
    cfg = DemoConfig(split_by="photo")
    placement: dict[str, set] = {}
    for item in discover_demo(cfg, folds=2):
        photo = item.gt.removeprefix("skimage:").partition("#")[0]
        placement.setdefault(photo, set()).add(assign_split(item, SplitConfig(folds=2)))
    assert all(len(where) == 1 for where in placement.values()), placement
    where = {photo: next(iter(w)) for photo, w in placement.items()}
    assert {p for p, (s, _) in where.items() if s == "test"} == {"coffee.png", "motorcycle_left.png"}
    assert {p for p, (s, _) in where.items() if s == "val"} == {"chelsea.png"}
    tiles = {f: sum(1 for i in discover_demo(cfg) if assign_split(i, SplitConfig())[1] == f) for f in (0, 1)}
    assert min(tiles.values()) > 0 and abs(tiles[0] - tiles[1]) <= 16, tiles  # dealt by tile count


def test_demo_split_by_tile_is_unchanged_by_the_photo_option():
    by_tile = [(i.gt, assign_split(i, SplitConfig(folds=2))) for i in discover_demo(DemoConfig())]
    photos_of_test = {gt.partition("#")[0] for gt, (s, _) in by_tile if s == "test"}
    assert len(photos_of_test) > 2  # tiles of many photographs in test: why the photo split exists
    assert DemoConfig().split_by == "tile"


def test_heldout_every_task_measures_every_task_on_every_heldout_photo_and_keeps_existing_samples():
    cycle = load_recipe("3task").task_cycle()
    items = discover_demo(DemoConfig(split_by="photo"), folds=2)
    default = SynthParams(sources=[{"path": "demo", "layout": "demo"}], recipe="3task", variants=2)
    every = default.model_copy(update={"heldout": "every_task"})
    base = expand(items, cycle, 2, default.splits, default.heldout_variants(cycle))
    full = expand(items, cycle, 2, every.splits, every.heldout_variants(cycle))
    tasks: dict[str, set[str]] = {}
    for s in full:
        if s.split != "train":
            tasks.setdefault(s.item.identity, set()).add(s.task)
    assert tasks and all(found == set(cycle) for found in tasks.values())  # every held-out image under every task
    assert all(sum(1 for s in full if s.item.identity == i) == len(cycle) for i in tasks)
    # training samples are those of `variants`, and every sample made before keeps its key and task
    assert {(s.key, s.task) for s in base} <= {(s.key, s.task) for s in full}
    assert [s for s in full if s.split == "train"] == [s for s in base if s.split == "train"]
    assert "heldout" not in digest_dump(default) and digest_dump(every)["heldout"] == "every_task"
