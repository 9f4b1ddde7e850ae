"""albumentations both ways: a transform as a recipe step through the real writer and replay, refused when it
would misalign or cannot run; our degradations inside a seeded ``A.Compose``."""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
from PIL import Image

from synth.config import validate_config
from synth.degradations import degrade
from synth.degradations.albu import AsAlbumentations, pixel_transforms
from synth.plan import expand, make_shards
from synth.read import iter_shard
from synth.recipes import RecipeError, load_recipe
from synth.replay import replay
from synth.run import RunOptions, synthesize
from synth.sources import discover
from synth.writer import write_shard
from tests.conftest import textured

ISO = {"intensity": [0.2, 0.6], "color_shift": [0.01, 0.05]}
RECIPE = """
name: albu_iso
description: ISONoise from albumentations, then our JPEG
tasks:
  - name: iso_jpeg
    steps:
      - {degradation: albumentations, transform: ISONoise, params: {intensity: [0.2, 0.6], color_shift: [0.01, 0.05]}}
      - {degradation: jpeg, severity: light}
"""


@pytest.fixture
def recipe_path(tmp_path: Path) -> Path:
    path = tmp_path / "albu_iso.yaml"
    path.write_text(RECIPE)
    return path


@pytest.fixture
def tiny_photos(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    root.mkdir()
    for i in range(3):
        Image.fromarray(textured(48, 64, i)).save(root / f"img{i}.png")
    return root


def config(src: Path, recipe: Path, out: Path, **kw):
    base = {
        "sources": [{"path": str(src)}],
        "recipe": str(recipe),
        "out": str(out),
        "seed": 3,
        "samples_per_shard": 6,
        "patch_size": 32,
        "variants": 2,
        "splits": {"folds": 1, "val_fraction": 0.0, "test_fraction": 0.0},
    }
    return validate_config(base | kw)


def write_one_shard(cfg, out: Path) -> tuple[bytes, list[dict]]:
    """Plan the sources like a run does, write the first shard with the real writer; its bytes and samples."""
    recipe = load_recipe(cfg.recipe)
    found = discover(cfg.sources, cfg.demo, cfg.patch_size, cfg.splits.folds)
    samples = expand(found.items, recipe.task_cycle(), cfg.variants, cfg.splits)
    spec = make_shards(samples, cfg.samples_per_shard, cfg.max_samples, {})[0]
    state = write_shard(spec, cfg, recipe, str(out))
    assert "error" not in state and state["samples"] == 6
    tar = out / "shards" / state["name"]
    return tar.read_bytes(), list(iter_shard(tar))


def write_recipe(tmp_path: Path, steps: str) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text(f"name: broken\ndescription: bad step\ntasks:\n  - name: a\n    steps:\n{steps}")
    return path


def test_recipe_step_is_validated_and_resolves_to_a_fixed_transform(recipe_path):
    recipe = load_recipe(recipe_path)
    step = recipe.tasks[0].steps[0]
    assert (step.degradation, step.transform, step.severity) == ("albumentations", "ISONoise", "medium")
    steps = recipe.resolve(recipe.tasks[0], np.random.default_rng(0))
    assert steps[0] == {
        "degradation": "albumentations",
        "severity": "medium",
        "params": {"transform": "ISONoise", "args": ISO},
    }
    assert steps[1]["degradation"] == "jpeg"


def test_same_seed_gives_identical_shards_and_samples_differ(tiny_photos, recipe_path, tmp_path):
    a, samples = write_one_shard(config(tiny_photos, recipe_path, tmp_path / "a"), tmp_path / "a")
    b, _ = write_one_shard(config(tiny_photos, recipe_path, tmp_path / "b"), tmp_path / "b")
    other, _ = write_one_shard(config(tiny_photos, recipe_path, tmp_path / "c", seed=4), tmp_path / "c")
    assert a == b and a != other
    for sample in samples:
        assert not np.array_equal(sample["lq"], sample["gt"])
    by_source: dict[str, list[dict]] = {}
    for sample in samples:
        by_source.setdefault(sample["meta"]["source"]["gt"], []).append(sample)
    first, second = next(v for v in by_source.values() if len(v) == 2)  # two variants of one photo
    noise = [s["lq"].astype(int) - s["gt"] for s in (first, second)]
    assert not np.array_equal(*noise)
    records = [s["meta"]["degradations"][0]["params"] for s in samples]
    assert len({r["transform_seed"] for r in records}) == len(records)


def test_resolved_parameters_are_in_the_sample_json(tiny_photos, recipe_path, tmp_path):
    _, samples = write_one_shard(config(tiny_photos, recipe_path, tmp_path / "a"), tmp_path / "a")
    meta = samples[0]["meta"]
    albu, jpeg = meta["degradations"]
    assert albu["degradation"] == "albumentations" and albu["severity"] == "medium" and jpeg["degradation"] == "jpeg"
    params = albu["params"]
    assert params["transform"] == "ISONoise" and params["args"] == ISO and isinstance(params["transform_seed"], int)
    assert 0.2 <= params["resolved"]["intensity"] <= 0.6 and 0.01 <= params["resolved"]["color_shift"] <= 0.05
    assert meta["severity"] == "medium"  # the highest label of the chain: the albumentations step's default
    assert json.loads(json.dumps(meta)) == meta


def test_a_recorded_step_replays_with_degrade():
    gt = textured(40, 56, 9)
    out, params = degrade(gt, "albumentations", 5, transform="ISONoise", args={"intensity": (0.3, 0.4)})
    assert params["args"] == {"intensity": [0.3, 0.4]} and 0.3 <= params["resolved"]["intensity"] <= 0.4
    again, same = degrade(gt, "albumentations", 5, **params)
    assert np.array_equal(again, out) and same == params and not np.array_equal(out, gt)
    assert not np.array_equal(degrade(gt, "albumentations", 6, **params)[0], out)


def test_regenerate_reproduces_a_sample_of_a_run(ray_session, tiny_photos, recipe_path, tmp_path):
    out = tmp_path / "ds"
    manifest = synthesize(config(tiny_photos, recipe_path, out), RunOptions(num_workers=1, progress=False))
    assert manifest["counts"]["degradation"] == {"albumentations": 6, "jpeg": 6}
    shard = out / "shards" / manifest["shards"][0]["name"]
    key = next(iter_shard(shard))["key"]
    r = replay(out, key)
    assert r.identical and np.array_equal(r.stored["lq"], r.regenerated["lq"])
    assert r.regenerated["meta"]["degradations"][0]["params"]["resolved"]


@pytest.mark.parametrize("name", ["Rotate", "HorizontalFlip", "RandomCrop"])
def test_geometric_transforms_are_refused_naming_the_step(name, tmp_path):
    params = "{height: 16, width: 16}" if name == "RandomCrop" else "{}"
    steps = (
        f"      - {{degradation: jpeg}}\n      - {{degradation: albumentations, transform: {name}, params: {params}}}\n"
    )
    path = write_recipe(tmp_path, steps)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "broken.yaml" in message and "tasks.0.steps.1.transform" in message
    assert name in message and "misalign lq and gt" in message


def test_unknown_transform_is_refused_with_close_matches(tmp_path):
    path = write_recipe(tmp_path, "      - {degradation: albumentations, transform: IsoNoize}\n")
    with pytest.raises(RecipeError, match=r"tasks\.0\.steps\.0\.transform.*IsoNoize.*did you mean ISONoise"):
        load_recipe(path)
    assert "ISONoise" in pixel_transforms() and "Rotate" not in pixel_transforms()


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ("{intensity: [0.6, 0.2]}", "intensity"),  # low above high
        ("{intensity: [0.1, 0.5], strength: 2}", "strength"),  # not an argument of ISONoise
        ("{p: 0.5}", "always applies"),
    ],
)
def test_bad_params_fail_at_load_before_any_work(params, fragment, tiny_photos, tmp_path):
    path = write_recipe(tmp_path, f"      - {{degradation: albumentations, transform: ISONoise, params: {params}}}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "tasks.0.steps.0.params" in str(err.value) and fragment in str(err.value)
    out = tmp_path / "never"
    with pytest.raises(RecipeError):
        synthesize(config(tiny_photos, path, out), RunOptions(num_workers=1, progress=False))
    assert not out.exists()  # refused before the output was touched


@pytest.mark.parametrize(
    ("step", "fragment"),
    [
        ("{degradation: albumentations, transform: FDA}", "fda_metadata"),  # needs reference images per sample
        ("{degradation: albumentations, transform: ToGray, params: {num_output_channels: 1}}", "(H, W, 3)"),
        ("{degradation: albumentations, transform: Normalize}", "value range"),
        ("{degradation: albumentations}", "names its transform"),
        ("{degradation: albumentations, transform: ISONoise, severity: random}", "draws nothing by severity"),
        ("{degradation: haze, transform: ISONoise}", "only albumentations steps"),
    ],
)
def test_steps_albumentations_cannot_run_are_refused(step, fragment, tmp_path):
    with pytest.raises(RecipeError, match="tasks.0.steps.0") as err:
        load_recipe(write_recipe(tmp_path, f"      - {step}\n"))
    assert fragment in str(err.value)


def test_albumentations_is_not_a_random_pool_member(tmp_path):
    path = tmp_path / "pool.yaml"
    path.write_text("name: p\ndescription: d\ntasks: [{name: a, random: {pool: [haze, albumentations]}}]\n")
    with pytest.raises(RecipeError, match=r"tasks\.0\.random\.pool.*explicit 'steps' chain"):
        load_recipe(path)


def compose(seed: int) -> A.Compose:
    return A.Compose([A.HorizontalFlip(p=1.0), AsAlbumentations("gaussian_noise", sigma=25, p=1.0)], seed=seed)


def test_our_degradation_in_a_seeded_compose_is_deterministic_and_degrades():
    img = textured(40, 56, 1)
    a, b, c = (compose(seed)(image=img)["image"] for seed in (7, 7, 8))
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    residual = a.astype(float) - img[:, ::-1]
    assert 15 < residual.std() < 30  # sigma 25 in 0..255 units, a little less where clipped


def test_the_adapter_equals_degrade_with_its_drawn_seed():
    img = textured(40, 56, 2)
    transform = AsAlbumentations("haze", severity="heavy", p=1.0)
    transform.set_random_seed(11)
    out = transform(image=img)["image"]
    expected, _ = degrade(img, "haze", transform.params["seed"], severity="heavy")
    assert np.array_equal(out, expected) and not np.array_equal(out, img)
    as_float = transform(image=img.astype(np.float32) / 255)["image"]
    assert as_float.dtype == np.float32 and 0.0 <= as_float.min() and as_float.max() <= 1.0
    assert AsAlbumentations("jpeg", quality=30, p=1.0)(image=img)["image"].shape == img.shape


def test_the_adapter_refuses_bad_names_params_and_images():
    with pytest.raises(ValueError, match="fog"):
        AsAlbumentations("fog")
    with pytest.raises(ValueError, match="albumentations"):
        AsAlbumentations("albumentations")
    with pytest.raises(ValueError, match="sigma"):
        AsAlbumentations("gaussian_noise", sigma=-1)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        AsAlbumentations("gaussian_noise", p=1.0)(image=np.zeros((8, 8), np.uint8))
