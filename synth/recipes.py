"""Recipes: which degradations make which task, as validated YAML.

A recipe lists tasks; a task is either an explicit chain of steps (each a degradation, a severity and
optionally fixed parameters) or a random chain drawn from a pool. `resolve` turns a task into concrete steps
for `synth.degradations.apply_steps`, drawing severities ("random") and random chains from the generator given,
random chains sorted into PHYSICAL_ORDER. Bundled recipes live in synth/recipes/*.yaml:

    tasks:
      - name: dehaze
        steps: [{degradation: haze, severity: random}]
      - name: mixed
        weight: 2
        random: {pool: [haze, rain, jpeg], min_steps: 1, max_steps: 2}
      - name: iso_jpeg
        steps:
          - {degradation: albumentations, transform: ISONoise, params: {intensity: [0.1, 0.5]}}
          - {degradation: jpeg, severity: medium}

A step of kind `albumentations` runs the albumentations 2.0 pixel-level transform (ImageOnlyTransform) named by
`transform`, with `params` as its arguments (see synth.degradations.albu); it is built and tried on a small
image when the recipe loads, so a bad name or argument fails here. Its `severity` is only the label the sample
is counted under (light, medium or heavy; medium if left out), and it goes in explicit chains only, never a pool.
"""

from __future__ import annotations

import logging
import re
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from synth.degradations import ALBUMENTATIONS_STEP, DEGRADATIONS, PHYSICAL_ORDER, SEVERITIES

logger = logging.getLogger(__name__)


class RecipeError(ValueError):
    """A recipe that cannot be found, read or validated; the message names the file and the field."""


def _check_degradation(name: str) -> str:
    if name == ALBUMENTATIONS_STEP:
        raise ValueError("an albumentations step names its transform, so it goes in an explicit 'steps' chain")
    if name not in DEGRADATIONS:
        raise ValueError(
            f"unknown degradation {name!r}; valid: {', '.join(sorted(DEGRADATIONS))} "
            f"(or {ALBUMENTATIONS_STEP} with a transform, in a 'steps' chain)"
        )
    return name


class Step(BaseModel):
    """One of our degradations, or (degradation: albumentations) the albumentations transform `transform` with
    `params` as its arguments."""

    model_config = ConfigDict(extra="forbid")

    degradation: str
    severity: Literal["light", "medium", "heavy", "random"] = "random"
    transform: str | None = Field(None, validate_default=True)
    params: dict[str, JsonValue] = Field({}, validate_default=True)  # a transform's defaults are checked too

    @field_validator("degradation")
    @classmethod
    def _degradation_known(cls, name: str) -> str:
        return name if name == ALBUMENTATIONS_STEP else _check_degradation(name)

    @field_validator("transform")
    @classmethod
    def _transform_for_albumentations(cls, transform: str | None, info: ValidationInfo) -> str | None:
        name = info.data.get("degradation")
        if name == ALBUMENTATIONS_STEP:
            if transform is None:
                raise ValueError("an albumentations step names its transform, e.g. transform: ISONoise")
            from synth.degradations.albu import transform_class  # albumentations is slow to import: on use only

            transform_class(transform)
        elif transform is not None and name is not None:
            raise ValueError(f"only albumentations steps take a transform; {name} is one of our degradations")
        return transform

    @field_validator("params")
    @classmethod
    def _params_known(cls, params: dict, info: ValidationInfo) -> dict:
        name = info.data.get("degradation")
        if name is None:  # the degradation itself failed validation and is reported
            return params
        if name == ALBUMENTATIONS_STEP:
            if info.data.get("transform") is not None:  # else the transform failed and is reported
                from synth.degradations.albu import check_step

                check_step(info.data["transform"], params)
            return params
        degradation = DEGRADATIONS[name]
        unknown = sorted(set(params) - set(degradation.param_names))
        if unknown:
            raise ValueError(
                f"{name}: unknown parameter(s) {unknown}; valid parameters: {sorted(degradation.param_names)}"
            )
        # the sampler is the single authority on the types, choices and limits of fixed values
        degradation.sample(np.random.default_rng(0), "medium", params)
        return params

    @model_validator(mode="after")
    def _albumentations_severity(self) -> Step:
        if self.degradation == ALBUMENTATIONS_STEP and self.severity == "random":
            if "severity" in self.model_fields_set:
                raise ValueError(
                    "severity: an albumentations step draws nothing by severity (its params decide); give light, "
                    "medium or heavy as its label, or leave it out (medium)"
                )
            self.severity = "medium"
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        data = handler(self)
        if self.transform is None:  # our own steps dump as before: manifests of existing recipes keep their bytes
            data.pop("transform", None)
        return data

    def fixed(self) -> dict:
        """The fixed parameters `apply_steps` takes for this step."""
        if self.degradation == ALBUMENTATIONS_STEP:
            return {"transform": self.transform, "args": dict(self.params)}
        return dict(self.params)


class RandomChain(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pool: list[str] = Field(min_length=1)
    min_steps: int = Field(1, ge=1)
    max_steps: int = Field(3, ge=1)

    @field_validator("pool")
    @classmethod
    def _pool_known(cls, pool: list[str]) -> list[str]:
        for name in pool:
            _check_degradation(name)
        if len(set(pool)) != len(pool):
            raise ValueError(f"pool lists a degradation twice: {pool}")
        return pool

    @model_validator(mode="after")
    def _steps_fit(self) -> RandomChain:
        if "max_steps" not in self.model_fields_set:  # the default adapts to a small pool
            self.max_steps = min(self.max_steps, len(self.pool))
        if self.max_steps < self.min_steps:
            raise ValueError(f"max_steps ({self.max_steps}) is below min_steps ({self.min_steps})")
        if self.max_steps > len(self.pool):
            raise ValueError(f"max_steps ({self.max_steps}) exceeds the pool size ({len(self.pool)})")
        return self


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    weight: int = Field(1, ge=1)
    steps: list[Step] | None = Field(None, min_length=1)
    random: RandomChain | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Task:
        if (self.steps is None) == (self.random is None):
            raise ValueError("a task needs exactly one of 'steps' (an explicit chain) or 'random' (a random chain)")
        return self


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str
    tasks: list[Task] = Field(min_length=1)

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[Task]) -> list[Task]:
        names = [task.name for task in tasks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique; repeated: {duplicates}")
        return tasks

    def resolve(self, task: Task, rng: np.random.Generator) -> list[dict]:
        """Concrete steps {"degradation", "severity", "params"} for one sample of `task`, drawn from `rng`."""
        if task.steps is not None:
            chosen = [(step.degradation, step.severity, step.fixed()) for step in task.steps]
        else:
            chain = task.random
            k = int(rng.integers(chain.min_steps, chain.max_steps + 1))
            picked = [chain.pool[i] for i in rng.choice(len(chain.pool), size=k, replace=False)]
            chosen = [(name, "random", {}) for name in sorted(picked, key=PHYSICAL_ORDER.index)]
        return [
            {"degradation": name, "severity": _draw_severity(severity, rng), "params": params}
            for name, severity, params in chosen
        ]

    def task_cycle(self) -> list[str]:
        """Task names repeated by weight, in declaration order: the round-robin of task labels."""
        return [task.name for task in self.tasks for _ in range(task.weight)]


def task_family(task: str) -> str:
    """The degradation type a task belongs to: its name without a trailing ``_<number>`` level, so
    ``denoise_15``, ``denoise_25`` and ``denoise_50`` are one ``denoise`` (as the Perceive-IR authors label
    their noise levels for the contrastive loss); every other task is its own family."""
    return re.sub(r"_\d+$", "", task)


def _draw_severity(severity: str, rng: np.random.Generator) -> str:
    return SEVERITIES[int(rng.integers(len(SEVERITIES)))] if severity == "random" else severity


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A bundled recipe by name (see `list_recipes`) or a recipe YAML file by path (a Path, or a str ending in
    .yaml/.yml or containing a path separator). Raises RecipeError naming the file and the offending field."""
    if _is_path(name_or_path):
        path = Path(name_or_path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise RecipeError(f"cannot read recipe file {path}: {err}") from err
        return _parse(text, str(path))
    resource = _bundled_dir() / f"{name_or_path}.yaml"
    if not resource.is_file():
        names = ", ".join(name for name, _ in list_recipes())
        raise RecipeError(f"no bundled recipe {name_or_path!r}; bundled: {names} (or pass a path to a .yaml file)")
    return _parse(resource.read_text(encoding="utf-8"), f"bundled recipe {name_or_path}.yaml")


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of every bundled recipe, sorted by name."""
    entries = []
    for resource in _bundled_dir().iterdir():
        if resource.name.endswith(".yaml"):
            recipe = _parse(resource.read_text(encoding="utf-8"), f"bundled recipe {resource.name}")
            entries.append((recipe.name, recipe.description))
    return sorted(entries)


def _bundled_dir():
    return resources.files("synth") / "recipes"


def _is_path(name_or_path: str | Path) -> bool:
    if isinstance(name_or_path, Path):
        return True
    return name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path or "\\" in name_or_path


def _parse(text: str, source: str) -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping with name, description and tasks")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_describe(err, source)) from err


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for error in err.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {field}: {error['msg']}")
    return "\n".join(lines)
