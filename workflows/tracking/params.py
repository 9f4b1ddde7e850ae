"""Configs as MLflow params and tags: nested dicts flattened to dotted keys, values cut to MLflow's limits."""

from __future__ import annotations

import json
from typing import Any, TypeVar

T = TypeVar("T")


def _param_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return json.dumps(list(value), default=str)
    return str(value)


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys (``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": "0.001"}``); lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = _param_text(value)
    return flat


def truncate(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else its start with a marker that gives the full length."""
    if len(text) <= limit:
        return text
    marker = f"...[truncated {len(text)} chars]"
    return text[: limit - len(marker)] + marker


def chunks(items: list[T], size: int) -> list[list[T]]:
    """``items`` in consecutive lists of at most ``size`` (MLflow's per-request limits)."""
    return [items[i : i + size] for i in range(0, len(items), size)]
