"""The synthesis configuration: one pydantic schema, loaded from YAML or built from the command line.

Everything that changes the bytes of a shard is in :class:`SynthConfig`; its digest (sources excluded, so a
dataset can be extended with new sources) guards an output directory against being mixed with another config.
Runtime choices that do not change the bytes (workers, Ray address, progress bars) are not part of it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

LAYOUTS = ("auto", "folder", "demo", "paired", "rain100l", "sots", "gopro", "lol", "snow100k", "promptir")


class ConfigError(ValueError):
    """A configuration that cannot be run; the message names the file or field and the allowed values."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NEUTRAL = "clearair_neutral"  # json_schema_extra key of a field added after outputs made without it exist
_DEFAULT = object()


def added_field(default: Any, *, neutral: Any = _DEFAULT, **kwargs: Any) -> Any:
    """A config field added after the first release: it enters digests (cache keys, dataset guards) only when it
    differs from ``neutral``, the JSON value that reproduces what the code did before the field existed (by default,
    ``default``). So a new field whose default keeps today's behaviour leaves every existing output cached, and a
    later change of its default still changes the keys of configs that rely on it. A model whose added field
    matters only for some of its configs names the others' in an ``inert_fields() -> set[str]`` method: such a
    field stays out of their digests whatever its value."""
    neutral = default if neutral is _DEFAULT else neutral
    if isinstance(neutral, BaseModel):  # a section added later: neutral as a whole at its defaults
        neutral = neutral.model_dump(mode="json")
    return Field(default, json_schema_extra={NEUTRAL: neutral}, **kwargs)


def digest_dump(model: BaseModel, exclude: set[str] | None = None) -> dict[str, Any]:
    """``model.model_dump(mode="json")`` without the :func:`added_field` fields that hold their neutral value,
    recursively: the body every digest of a configuration is taken over."""
    return _prune(model, model.model_dump(mode="json", exclude=exclude))


def _prune(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    inert = model.inert_fields() if hasattr(model, "inert_fields") else set()
    for name, info in type(model).model_fields.items():
        if name not in dumped:
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        value = getattr(model, name)
        if NEUTRAL in extra and (dumped[name] == extra[NEUTRAL] or name in inert):
            del dumped[name]
        elif isinstance(value, BaseModel):
            _prune(value, dumped[name])
        elif isinstance(value, list | tuple):
            for item, item_dump in zip(value, dumped[name], strict=True):
                if isinstance(item, BaseModel):
                    _prune(item, item_dump)
    return dumped


def config_digest(body: Any) -> str:
    """sha256 of a JSON-able body, key order ignored."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class SourceSpec(Strict):
    """Where images come from. ``path`` is a directory, or ``demo`` for the images that ship with scikit-image."""

    path: str
    layout: Literal[LAYOUTS] = "auto"  # type: ignore[valid-type]
    name: str | None = Field(default=None, description="Dataset name recorded per sample; default: folder name.")

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        """``DIR``, ``demo`` or ``LAYOUT:DIR`` (e.g. ``rain100l:/data/Rain100L``) as given on the command line."""
        layout, sep, path = text.partition(":")
        if sep and layout in LAYOUTS and not path.startswith("//"):
            return cls(path=path, layout=layout)
        if text == "demo":
            return cls(path="demo", layout="demo")
        return cls(path=text)


class SplitConfig(Strict):
    """Splits of sources that have no official split, by content hash; folds partition the training split."""

    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    folds: int = Field(2, ge=1, le=64, description="K of the cross-validation; 1 = no folds.")

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class DemoConfig(Strict):
    """How the embedded demo source cuts scikit-image's photographs into many small source images, and splits them.

    ``split_by: photo`` keeps every tile of a photograph in one split and fold: the demo's fixed split
    (:data:`synth.sources.DEMO_SPLITS`) holds two photographs out for test and one for validation, and the rest are
    dealt to the K folds by tile count. ``tile`` (the default, as datasets made before 0.2 were split) splits tiles
    by content like any clean folder, so tiles of one photograph land in several splits.
    """

    long_side: int = Field(512, ge=64)
    crop: int = Field(128, ge=32)
    split_by: Literal["tile", "photo"] = added_field("tile")


class SynthParams(Strict):
    """Everything of a synthesis but where it goes: the ``synth`` section of a pipeline."""

    sources: list[SourceSpec] = Field(min_length=1)
    recipe: str = Field(description="A bundled recipe name (see `clearair synth --list-recipes`) or a YAML path.")
    mode: Literal["materialized", "on_the_fly"] = "materialized"
    seed: int = Field(0, ge=0)
    samples_per_shard: int = Field(64, ge=1)
    patch_size: int = Field(128, ge=8, description="Training crop size drawn at read time; smaller images are skipped.")
    max_side: int | None = Field(512, ge=16, description="Longer images are downscaled (area) to this long side.")
    variants: int = Field(1, ge=1, description="Degraded variants drawn per clean source image.")
    heldout: Literal["variants", "every_task"] = added_field(
        "variants",
        description="Validation and test images get `variants` degraded versions like training images, or "
        "`every_task`: one per entry of the recipe's task cycle (each task once when weights are equal), so every "
        "task is measured on every held-out image, as the papers' per-task test sets are.",
    )
    max_samples: int | None = Field(None, ge=1)
    png_compression: int = Field(1, ge=0, le=9, description="zlib level of the PNGs in the shards (1 = fast).")
    splits: SplitConfig = SplitConfig()
    demo: DemoConfig = DemoConfig()

    def heldout_variants(self, task_cycle: list[str]) -> int | None:
        """Variants of a validation or test image under ``heldout`` (None: ``variants``, as for training)."""
        return len(task_cycle) if self.heldout == "every_task" else None


class SynthConfig(SynthParams):
    out: str

    def digest(self) -> str:
        """sha256 of everything that decides shard bytes except the source list and the output path."""
        return config_digest(digest_dump(self, exclude={"sources", "out"}))


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Valid keys of the (nested) model that holds the field at ``loc``; None where that is not a model."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        inner = getattr(info, "annotation", None) if info else None
        for candidate in (inner, *getattr(inner, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
        else:
            return None
    return sorted(model.model_fields)


def format_validation_error(err: ValidationError, model: type[BaseModel], origin: str) -> str:
    """One line per bad field, naming it; unknown keys also list the valid keys at that level."""
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            valid = _fields_at(model, tuple(e["loc"]))
            msg = f"unknown key; valid keys: {', '.join(valid)}" if valid else "unknown key"
        lines.append(f"  {field}: {msg}" if field else f"  {msg}")  # a whole-config check names its own fields
    return "\n".join(lines)


def validate_config(data: dict[str, Any], origin: str = "command line") -> SynthConfig:
    """Build a :class:`SynthConfig`, turning pydantic's errors into one :class:`ConfigError` naming each field."""
    try:
        return SynthConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, SynthConfig, origin)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds; ConfigError naming the file when it cannot be read, is not YAML
    (Python tags included: ``safe_load`` refuses them) or is not a mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping of fields, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SynthConfig:
    """Read a YAML synth config and apply ``overrides`` (dotted keys allowed) before validation."""
    data = read_config_file(path)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return validate_config(data, origin=str(path))


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "splits.folds", 3)`` sets ``d["splits"]["folds"]``, creating levels as needed; a number
    indexes a list (``sources.0.path``). ConfigError naming ``key`` when a level is not what it addresses."""
    *parents, last = key.split(".")
    try:
        for p in parents:
            data = data[int(p)] if isinstance(data, list) else data.setdefault(p, {})
        if isinstance(data, list):
            data[int(last)] = value
        else:
            data[last] = value
    except (IndexError, ValueError, TypeError, AttributeError):
        raise ConfigError(f"--set {key}: no such place in the config (lists take an index: sources.0.path)") from None
