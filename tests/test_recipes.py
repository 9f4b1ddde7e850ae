"""Recipes: bundled ones load and run, invalid files fail naming the field, random chains obey physics order."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from skimage import data  # noqa: E402

from synth.degradations import DEGRADATIONS, PHYSICAL_ORDER, SEVERITIES, Context, apply_steps  # noqa: E402
from synth.recipes import Recipe, RecipeError, Task, list_recipes, load_recipe  # noqa: E402

BUNDLED = ["3task", "5task", "allweather", "cdd11", "denoise", "denoise25", "mixed"]
CDD11 = ["l", "h", "r", "s", "l_h", "l_r", "l_s", "h_r", "h_s", "l_h_r", "l_h_s"]


def write(tmp_path: Path, text: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_list_recipes_lists_every_bundled_one():
    listed = list_recipes()
    assert [name for name, _ in listed] == BUNDLED
    assert all(description.strip() for _, description in listed)


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_recipe_loads_and_degrades(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    img = data.chelsea()[:40, :48].copy()
    rng = np.random.default_rng(0)
    for task in recipe.tasks:
        steps = recipe.resolve(task, rng)
        names = [s["degradation"] for s in steps]
        assert names == sorted(names, key=PHYSICAL_ORDER.index)  # bundled chains are physical too
        out, records = apply_steps(img, steps, rng, Context())
        assert out.shape == img.shape and len(records) == len(steps)
        assert all(r["severity"] in SEVERITIES for r in records)


def test_paper_protocols_are_encoded():
    three = load_recipe("3task")
    assert [t.name for t in three.tasks] == ["denoise_15", "denoise_25", "denoise_50", "dehaze", "derain"]
    for task, sigma in zip(three.tasks[:3], (15, 25, 50), strict=True):
        step = task.steps[0]
        assert step.degradation == "gaussian_noise" and step.params == {"mode": "promptir", "sigma": sigma}
    assert three.tasks[4].steps[0].degradation == "rain" and three.tasks[4].steps[0].severity == "light"
    five = load_recipe("5task")
    assert [t.steps[0].degradation for t in five.tasks] == [
        "gaussian_noise",
        "haze",
        "rain",
        "motion_blur",
        "low_light",
    ]
    cdd = load_recipe("cdd11")
    assert [t.name for t in cdd.tasks] == CDD11
    letters = {"l": "low_light", "h": "haze", "r": "rain", "s": "snow"}
    for task in cdd.tasks:
        assert sorted(s.degradation for s in task.steps) == sorted(letters[c] for c in task.name.split("_"))
    weather = load_recipe("allweather")
    rain_haze = next(t for t in weather.tasks if t.name == "outdoor_rain")
    assert [(s.degradation, s.severity) for s in rain_haze.steps] == [("haze", "random"), ("rain", "heavy")]
    mixed = load_recipe("mixed").tasks[0].random
    assert sorted(mixed.pool) == sorted(DEGRADATIONS) and (mixed.min_steps, mixed.max_steps) == (1, 3)


def test_random_chains_come_out_in_physical_order():
    recipe = load_recipe("mixed")
    rng = np.random.default_rng(1)
    lengths, seen = set(), set()
    for _ in range(300):
        steps = recipe.resolve(recipe.tasks[0], rng)
        names = [s["degradation"] for s in steps]
        assert names == sorted(names, key=PHYSICAL_ORDER.index) and len(set(names)) == len(names)
        assert all(s["severity"] in SEVERITIES and s["params"] == {} for s in steps)
        lengths.add(len(steps))
        seen.update(names)
    assert lengths == {1, 2, 3} and seen == set(DEGRADATIONS)


def test_resolve_draws_random_severities_and_keeps_fixed_ones():
    recipe = Recipe.model_validate(
        {
            "name": "t",
            "description": "d",
            "tasks": [
                {
                    "name": "a",
                    "steps": [
                        {"degradation": "haze"},
                        {"degradation": "jpeg", "severity": "heavy", "params": {"quality": 20}},
                    ],
                }
            ],
        }
    )
    rng = np.random.default_rng(0)
    drawn = [recipe.resolve(recipe.tasks[0], rng) for _ in range(60)]
    assert {d[0]["severity"] for d in drawn} == set(SEVERITIES)
    assert all(d[1] == {"degradation": "jpeg", "severity": "heavy", "params": {"quality": 20}} for d in drawn)
    again = recipe.resolve(recipe.tasks[0], np.random.default_rng(0))
    assert again == drawn[0]


def test_task_cycle_repeats_by_weight():
    recipe = Recipe.model_validate(
        {
            "name": "w",
            "description": "weights",
            "tasks": [
                {"name": "a", "weight": 2, "steps": [{"degradation": "rain"}]},
                {"name": "b", "steps": [{"degradation": "snow"}]},
            ],
        }
    )
    assert recipe.task_cycle() == ["a", "a", "b"]


def test_a_user_recipe_file_loads(tmp_path):
    path = write(
        tmp_path,
        """
name: night_rain
description: rain at night
tasks:
  - name: night_rain
    steps:
      - {degradation: rain, severity: medium, params: {angle: 10.0}}
      - {degradation: low_light, severity: heavy}
""",
    )
    recipe = load_recipe(path)
    assert recipe.tasks[0].steps[0].params == {"angle": 10.0}
    assert load_recipe(str(path)) == recipe


BAD = {
    "unknown degradation": (
        "tasks: [{name: a, steps: [{degradation: fog}]}]",
        ["tasks.0.steps.0.degradation", "fog", "gaussian_noise"],
    ),
    "unknown param": (
        "tasks: [{name: a, steps: [{degradation: haze, params: {density: 0.2}}]}]",
        ["tasks.0.steps.0.params", "density", "beta"],
    ),
    "bad param value": (
        "tasks: [{name: a, steps: [{degradation: gaussian_noise, params: {mode: salt}}]}]",
        ["tasks.0.steps.0.params", "mode", "promptir"],
    ),
    "bad severity": (
        "tasks: [{name: a, steps: [{degradation: haze, severity: extreme}]}]",
        ["tasks.0.steps.0.severity", "light"],
    ),
    "both steps and random": (
        "tasks: [{name: a, steps: [{degradation: haze}], random: {pool: [rain]}}]",
        ["tasks.0", "steps", "random"],
    ),
    "neither steps nor random": ("tasks: [{name: a}]", ["tasks.0", "exactly one"]),
    "unknown key": ("tasks: [{name: a, steps: [{degradation: haze}], weigth: 2}]", ["tasks.0.weigth"]),
    "bad task name": ("tasks: [{name: De-Haze, steps: [{degradation: haze}]}]", ["tasks.0.name"]),
    "duplicate task": (
        "tasks: [{name: a, steps: [{degradation: haze}]}, {name: a, steps: [{degradation: rain}]}]",
        ["tasks", "unique"],
    ),
    "chain too long": (
        "tasks: [{name: a, random: {pool: [haze, rain], max_steps: 3}}]",
        ["tasks.0.random", "max_steps"],
    ),
    "chain pool unknown": ("tasks: [{name: a, random: {pool: [haze, smog]}}]", ["tasks.0.random.pool", "smog"]),
    "no tasks": ("tasks: []", ["tasks"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_recipes_fail_naming_file_and_field(case, tmp_path):
    body, expected = BAD[case]
    path = write(tmp_path, f"name: bad\ndescription: broken\n{body}\n", name="broken_recipe.yaml")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "broken_recipe.yaml" in message
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_unreadable_and_unknown_recipes_fail_clearly(tmp_path):
    with pytest.raises(RecipeError, match="3task"):
        load_recipe("4task")
    with pytest.raises(RecipeError, match="missing.yaml"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(write(tmp_path, "- just\n- a list\n"))


def test_task_model_is_strict():
    with pytest.raises(ValueError, match="weight"):
        Task.model_validate({"name": "a", "weight": 0, "steps": [{"degradation": "haze"}]})
    chain = Task.model_validate({"name": "a", "random": {"pool": ["rain"]}}).random
    assert chain.max_steps == 1  # the default of 3 adapts to a one-degradation pool; an explicit 3 fails
    with pytest.raises(ValueError, match="min_steps"):
        Task.model_validate({"name": "a", "random": {"pool": ["rain", "haze"], "min_steps": 2, "max_steps": 1}})
