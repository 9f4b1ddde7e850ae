"""The trained-model form: safetensors + config.json, read by :func:`load_model`.

Training checkpoints are Lightning's (``clearair.restorer`` reads them, ``weights_only=True``); this module is
the export format only, and :func:`clearair.load_restorer` is the public way to load either.

An export directory holds nothing pickled:

- ``model.safetensors``: the restorer's state dict (frozen pretrained parts are never inside a restorer);
- ``config.json``: ``{"format": "clearair-model", "format_version": 2, "arch", "config", "clearair_version",
  "weights_sha256", "extra"}``, enough to rebuild the network with :func:`clearair.models.factory.build_model`;
  ``extra`` holds the caller's JSON fields: ``priors`` (the spec of :func:`clearair.priors.build_priors`),
  ``frozen`` (``{part: sha256}`` of the frozen parts, :func:`clearair.restorer.fingerprint`), training provenance;
- ``parts/`` (format 2, only when the priors use them): the frozen parts this project makes itself, copied in so
  the export loads on another machine: learned prompts (``prompts`` fields) and a reused CFE's export (``cfe``
  fields). The priors spec then names them ``"export:parts/<field path>"``, resolved against the export
  directory by :func:`resolve_parts`. Third-party weights (DINOv2, CLIP, an MLLM) are never copied.

Both are published all-or-nothing (:func:`synth.storage.staged`: a temporary name, then a rename), weights first
and config last (an existing config is removed before new weights land), so a directory with ``config.json`` is
complete and one without it is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from clearair.models.factory import build_model, config_to_dict
from clearair.version import __version__
from synth import storage

log = logging.getLogger(__name__)

MODEL_FORMAT = "clearair-model"
FORMAT_VERSION = 2
PARTS_DIR = "parts"
PART_PREFIX = "export:"
BUNDLED_FIELDS = ("prompts", "cfe")  # priors-spec fields that name files this project makes
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_PLAIN = (str, int, float, bool, type(None))
_MAX_LISTED = 8


class ExportFormatError(ValueError):
    """A model directory is not in our format, is incomplete, or does not match its architecture."""


# ----------------------------------------------------------------------------------------------- helpers


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is built from dicts (str keys), lists, tuples, str, numbers, bool, None."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where} is a {type(value).__name__}; only plain types (dict, list, str, number, bool, None)")


def _config_dict(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg
    return config_to_dict(cfg) if dataclasses.is_dataclass(cfg) else None


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`ExportFormatError` naming ``source`` and every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = [
        f"missing keys: {_listed(missing)}" if missing else "",
        f"unexpected keys: {_listed(unexpected)}" if unexpected else "",
        f"shape mismatches: {_listed(shapes)}" if shapes else "",
    ]
    arch = getattr(model, "arch", type(model).__name__)
    raise ExportFormatError(
        f"{source} does not match a {arch!r} network built from its config; " + "; ".join(p for p in parts if p)
    )


# ----------------------------------------------------------------------------------------------- parts


def bundle_parts(spec: Any, out: Path, path: str = "") -> Any:
    """``spec`` with every ``prompts`` / ``cfe`` location copied under ``out/parts/`` and renamed
    ``"export:parts/<field path>[suffix]"``; other values unchanged."""
    if isinstance(spec, list | tuple):
        return [bundle_parts(v, out, f"{path}{i}.") for i, v in enumerate(spec)]
    if not isinstance(spec, dict):
        return spec
    result = {}
    for key, value in spec.items():
        if key in BUNDLED_FIELDS and isinstance(value, str) and not value.startswith(PART_PREFIX):
            result[key] = _copy_part(value, out, f"{path}{key}")
        else:
            result[key] = bundle_parts(value, out, f"{path}{key}.")
    return result


def _copy_part(location: str, out: Path, name: str) -> str:
    if storage.is_file(location):
        rel = f"{PARTS_DIR}/{name}{Path(location).suffix}"
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        with storage.staged(dst) as tmp:
            shutil.copyfile(storage.local_copy(location), tmp)
    else:
        rel = f"{PARTS_DIR}/{name}"
        src = storage.local_tree(location)
        if not (src / CONFIG_NAME).is_file():
            raise ExportFormatError(f"priors field {name!r}: {location} is neither a file nor a model export")
        dst = out / rel
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    return PART_PREFIX + rel


def resolve_parts(spec: Any, root: str | os.PathLike) -> Any:
    """``spec`` with each ``"export:<rel>"`` string made a path under the export directory ``root``."""
    if isinstance(spec, dict):
        return {k: resolve_parts(v, root) for k, v in spec.items()}
    if isinstance(spec, list):
        return [resolve_parts(v, root) for v in spec]
    if isinstance(spec, str) and spec.startswith(PART_PREFIX):
        part = Path(root) / spec.removeprefix(PART_PREFIX)
        if not part.exists():
            raise ExportFormatError(f"{root} lacks {spec.removeprefix(PART_PREFIX)}, a frozen part its priors name")
        return str(part)
    return spec


# ----------------------------------------------------------------------------------------------- export / load


def export_model(model: nn.Module, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as ``out_dir/model.safetensors`` + ``out_dir/config.json``; returns ``out_dir``.

    Args:
        model: a restorer with ``arch`` and a dataclass ``config`` (as :func:`build_model` makes them).
        extra: JSON-able fields stored under config.json's ``"extra"``, e.g. the priors the model needs or
            training provenance. The project-made files that ``extra["priors"]`` names are copied under
            ``parts/`` (see the module docstring).
    """
    arch, cfg = getattr(model, "arch", None), _config_dict(model)
    if arch is None or cfg is None:
        raise ValueError(f"{type(model).__name__} has no 'arch' and dataclass 'config': build it with build_model")
    extra = dict(extra or {})
    _check_plain(extra, "extra")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, config = out / WEIGHTS_NAME, out / CONFIG_NAME
    config.unlink(missing_ok=True)  # the directory is incomplete until the new config lands
    if "priors" in extra:
        extra["priors"] = bundle_parts(extra["priors"], out)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    with storage.staged(weights) as tmp:
        save_file(state, tmp, metadata={"format": MODEL_FORMAT, "arch": arch})
    meta = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "config": cfg,
        "clearair_version": __version__,
        "weights_sha256": storage.sha256(weights),
        "extra": extra,
    }
    storage.write_text(config, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log.info("exported %s (%d tensors) to %s", arch, len(state), out)
    return out


def read_export_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config.json of an export directory (or the file itself), checked for format and completeness."""
    root = Path(path)
    if root.name == CONFIG_NAME and root.is_file():
        root = root.parent
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a model directory")
    config = root / CONFIG_NAME
    if not config.is_file() and not (root / WEIGHTS_NAME).is_file():
        raise ExportFormatError(f"{root} is not a ClearAIR export (no {CONFIG_NAME}, no {WEIGHTS_NAME})")
    if not config.is_file():
        raise ExportFormatError(
            f"{root} has no {CONFIG_NAME}: not a complete ClearAIR export (an interrupted export leaves the weights "
            f"without it); export the model again"
        )
    try:
        meta = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ExportFormatError(f"{config} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ExportFormatError(f"{config} is not a {MODEL_FORMAT!r} config (format: {found!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ExportFormatError(
            f"{config} has format_version {meta['format_version']}; this clearair reads up to {FORMAT_VERSION}"
        )
    for key in ("arch", "config"):
        if key not in meta:
            raise ExportFormatError(f"{config} lacks the {key!r} field")
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The network of an export directory, weights loaded, in eval mode on ``device``."""
    meta = read_export_config(path)
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        raise ExportFormatError(f"{root} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    expected_sha = meta.get("weights_sha256")
    if expected_sha is not None and storage.sha256(weights) != expected_sha:
        raise ExportFormatError(f"{weights} does not match the checksum in {root / CONFIG_NAME} (replaced or damaged)")
    try:
        model = build_model(meta["arch"], config=meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ExportFormatError(
            f"{root / CONFIG_NAME}: cannot build arch {meta['arch']!r} from its config: {err}"
        ) from err
    try:
        state = load_file(weights)
    except SafetensorError as err:
        raise ExportFormatError(f"{weights} is not a readable safetensors file: {err}") from err
    check_state_dict(model, state, str(weights))
    model.load_state_dict(state)
    return model.to(device).eval()
