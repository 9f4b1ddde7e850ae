"""The subcommands of the ``clearair`` command line (:mod:`workflows.cli`), one module each or per pair.

Each module holds a subcommand's ``add_*_parser(sub)`` and ``cmd_*(args) -> int`` (the exit status: 0 done, 1
some inputs failed, 2 nothing ran). Module tops import only the standard library and YAML, so that ``clearair
--help`` loads neither NumPy, OpenCV nor Torch; the work is imported inside each ``cmd_*``.

- :mod:`~workflows.commands.synth`: ``clearair synth`` (and ``--regenerate``).
- :mod:`~workflows.commands.run`: ``clearair run`` and ``clearair doctor``, the two that take a pipeline.
- :mod:`~workflows.commands.images`: ``clearair restore`` and ``clearair score``, a trained model on image files.
- :mod:`~workflows.commands.workdir`: ``clearair workdir``, the cached stage outputs.
- :mod:`~workflows.commands.pretrain_clip`: ``clearair pretrain-clip``, the shipped quality-aware CLIP.
"""

from __future__ import annotations

from typing import Any

import yaml


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` flags as ``{key: value}``, each value read as YAML (``3e-4``, ``null``, ``[a, b]``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out
