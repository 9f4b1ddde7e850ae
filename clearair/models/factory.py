"""Restorers by name: build from a preset plus overrides, and convert architecture configs to and from JSON dicts.

Configs named here are frozen dataclasses with ``paper()`` and ``tiny()`` presets. A config dict holds plain
JSON types (nested configs as dicts, tuples as lists); checkpoints and exports store ``{"arch", "config"}`` in
this form so they load without pickle.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import typing
from typing import Any

from torch import nn

from clearair.models.nafnet import GuidedNAFNet, GuidedNAFNetConfig, NAFNet, NAFNetConfig
from clearair.models.perceive_ir import PerceiveIR, PerceiveIRConfig
from clearair.models.restormer import Restormer, RestormerConfig

log = logging.getLogger(__name__)

ARCHITECTURES: dict[str, tuple[type, type]] = {
    "restormer": (Restormer, RestormerConfig),
    "perceive_ir": (PerceiveIR, PerceiveIRConfig),
    "nafnet": (NAFNet, NAFNetConfig),
    "nafnet_guided": (GuidedNAFNet, GuidedNAFNetConfig),
}
# Imported on first use: (module, model class, config class).
LAZY_ARCHITECTURES: dict[str, tuple[str, str, str]] = {
    "clearair": ("clearair.models.clearair_net", "ClearAIRNet", "ClearAIRConfig"),
}
PRESETS = ("paper", "tiny")


def architecture_names() -> list[str]:
    """Every name :func:`build_model` accepts."""
    return [*ARCHITECTURES, *LAZY_ARCHITECTURES]


def architecture(arch: str) -> tuple[type, type]:
    """``(model class, config class)`` for ``arch``, or a ValueError listing the valid names."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if arch in LAZY_ARCHITECTURES:
        module_name, model_name, config_name = LAZY_ARCHITECTURES[arch]
        module = importlib.import_module(module_name)
        return getattr(module, model_name), getattr(module, config_name)
    raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(architecture_names())}")


def required_priors(arch: str) -> tuple[str, ...]:
    """The priors ``arch``'s ``forward(lq, priors)`` needs (e.g. ``("dino_cls",)``); empty for a plain restorer
    that runs on the image alone."""
    return architecture(arch)[0].required_priors


def plain_architectures() -> list[str]:
    """The architectures that need no priors (:func:`required_priors` empty)."""
    return [arch for arch in architecture_names() if not required_priors(arch)]


def build_model(arch: str, config: dict[str, Any] | None = None, preset: str = "paper") -> nn.Module:
    """A randomly initialised restorer: the ``preset`` config of ``arch`` with the fields in ``config`` replaced.

    Nested configs may be overridden partially (``{"backbone": {"dim": 16}}`` keeps the preset's other backbone
    fields); lists become tuples. An unknown architecture, preset or field raises a ValueError naming the valid ones.
    """
    cfg = model_config(arch, config, preset)
    log.debug("building %s with %s", arch, cfg)
    return architecture(arch)[0](cfg)


def model_config(arch: str, config: dict[str, Any] | None = None, preset: str = "paper") -> Any:
    """The config dataclass :func:`build_model` would build from, without building anything (a cheap check of a
    pipeline's model section); raises the same ValueErrors."""
    _, cfg_cls = architecture(arch)
    if preset not in PRESETS or not hasattr(cfg_cls, preset):
        valid = [p for p in PRESETS if hasattr(cfg_cls, p)]
        raise ValueError(f"unknown preset {preset!r} for {arch!r}; valid: {', '.join(valid)}")
    return _merge(getattr(cfg_cls, preset)(), config or {})


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-able dict of an architecture config (nested configs as dicts, tuples as lists)."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    return _listify(dataclasses.asdict(cfg))


def config_from_dict(arch: str, d: dict[str, Any]) -> Any:
    """The config of ``arch`` from a dict as written by :func:`config_to_dict`; missing fields take defaults."""
    return _from_dict(architecture(arch)[1], d)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameters, by default only those with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _listify(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _listify(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_listify(v) for v in value]
    return value


def _tuplify(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_tuplify(v) for v in value)
    return value


def _check_fields(cls: type, d: dict[str, Any]) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} expects a dict of fields, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for {cls.__name__}; valid: {', '.join(names)}")


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass named by a type hint (directly or inside ``X | None``), if any."""
    candidates = typing.get_args(hint) or (hint,)
    return next((c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)), None)


def _convert(cls: type, name: str, value: Any, current: Any = None) -> Any:
    if isinstance(value, dict):
        if dataclasses.is_dataclass(current):
            return _merge(current, value)
        nested = _dataclass_in(typing.get_type_hints(cls)[name])
        if nested is not None:
            return _from_dict(nested, value)
    return _tuplify(value)


def _merge(base: Any, d: dict[str, Any]) -> Any:
    cls = type(base)
    _check_fields(cls, d)
    return dataclasses.replace(base, **{k: _convert(cls, k, v, getattr(base, k)) for k, v in d.items()})


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    _check_fields(cls, d)
    try:
        return cls(**{k: _convert(cls, k, v) for k, v in d.items()})
    except TypeError as err:
        raise ValueError(f"cannot build {cls.__name__} from {sorted(d)}: {err}") from err
