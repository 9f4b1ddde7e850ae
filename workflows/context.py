"""Runtime state of one pipeline invocation: the workdir, its lock, stage cache entries, tracking and Ray.

The workdir (a local or shared directory, or an ``s3://`` prefix) holds one directory per stage output,
``stages/<stage>-<key>/``, where the key is a digest of the stage's settings and of its inputs' keys;
``result.json`` is written last and marks the output complete. A rerun
finds complete outputs and skips them; a changed setting changes the key of that stage and of everything
downstream. A stage that was interrupted finds its own partial directory again and resumes inside it.

``result.json`` names locations inside the workdir as ``{workdir}/stages/...``, so a workdir that is moved or
copied whole keeps its cache. Results written by clearair 0.2 and earlier hold absolute paths: one that points
into another workdir's ``stages/`` is read from this workdir when the same output is here, and is a
:class:`StaleOutput` (before any stage runs) when it is not, so a rerun never writes to the old place.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from synth import storage
from workflows.records import TrackingRef

WORKDIR_TOKEN = "{workdir}"  # stands for the workdir's root in result.json
_LEGACY_STAGE_PATH = re.compile(r"(?P<root>.+?)/(?P<rest>stages/[a-z_]+-[0-9a-f]{12}(?:/.*)?)")


class WorkdirLocked(RuntimeError):
    """Another ``clearair run`` holds this workdir."""


class StaleOutput(RuntimeError):
    """A cached stage output points at a location outside this workdir that is not here (a moved or copied
    workdir without it); the message names both and the remedy."""


def _map_locations(value: Any, fn: Callable[[str], str]) -> Any:
    """``fn`` applied to a location, or to each location of a list; records (dicts) and numbers as they are."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [fn(v) if isinstance(v, str) else v for v in value]
    return value


def _native(value: Any) -> Any:
    """An output as its JSON value: results of clearair 0.2 and earlier hold lists and records as JSON strings
    (a location never starts with ``[`` or ``{``)."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


@dataclass(frozen=True)
class StageResult:
    """What a stage hands downstream: where its outputs are and a few headline metrics (small, JSON-able)."""

    stage: str
    key: str
    outputs: dict[str, Any]  # JSON values: a location, a list of locations, a small record
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    skipped: str | None = None  # why the stage did no work (e.g. nothing to precompute)
    seconds: float | None = None  # wall time of the stage when it ran
    clearair_version: str | None = None  # what made it (workflows.provenance.stamp); None in results of 0.1.0
    commit: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Workdir:
    def __init__(self, root: str | Path):
        self.root = storage.resolve(root)
        self._lock_file = None

    def lock_path(self) -> Path:
        """The lock file: ``.lock`` in a directory workdir (shared filesystems with flock support included).

        An object store has no locks, so an ``s3://`` workdir is locked on the driver's machine (in the cache
        directory, keyed by its URI): two drivers on one machine cannot collide, two on different machines must
        not share a workdir.
        """
        if storage.is_remote(self.root):
            digest = hashlib.sha256(self.root.encode()).hexdigest()[:16]
            return storage.cache_dir() / "locks" / f"{digest}.lock"
        return Path(self.root) / ".lock"

    def lock(self) -> None:
        """Take the workdir's lock or fail naming the holder; released by :meth:`unlock` or process exit."""
        path = self.lock_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise WorkdirLocked(
                f"workdir {self.root} is in use by {holder}; wait for it or use another --workdir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"clearair run pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def stage_dir(self, stage: str, key: str) -> str:
        return storage.join(self.root, "stages", f"{stage}-{key[:12]}")

    def complete(self, stage: str, key: str) -> bool:
        """Whether the output of ``stage`` under ``key`` is complete (its ``result.json`` is there)."""
        return storage.exists(storage.join(self.stage_dir(stage, key), "result.json"))

    def cached(self, stage: str, key: str) -> StageResult | None:
        """The complete output of ``stage`` under ``key`` with its locations resolved in this workdir, or None;
        :class:`StaleOutput` if it names an old workdir's output that is not here."""
        if not self.complete(stage, key):
            return None
        result = StageResult(**storage.read_json(storage.join(self.stage_dir(stage, key), "result.json")))
        here = {
            name: _map_locations(_native(value), lambda loc, name=name: self._resolve(loc, stage, name))
            for name, value in result.outputs.items()
        }
        return StageResult(**{**result.to_json(), "outputs": here})

    def publish(self, result: StageResult) -> None:
        """Write ``result.json`` (last: it marks the output complete), locations in the workdir relative to it."""
        outputs = {name: _map_locations(value, self._relative) for name, value in result.outputs.items()}
        record = {**result.to_json(), "outputs": outputs}
        storage.write_json(storage.join(self.stage_dir(result.stage, result.key), "result.json"), record)

    def _relative(self, location: str) -> str:
        inside = location.startswith(self.root + "/")
        return WORKDIR_TOKEN + location[len(self.root) :] if inside else location

    def _resolve(self, location: str, stage: str, name: str) -> str:
        if location.startswith(WORKDIR_TOKEN + "/"):
            return self.root + location[len(WORKDIR_TOKEN) :]
        old = _LEGACY_STAGE_PATH.fullmatch(location)  # an absolute path written by clearair 0.2 or earlier
        if old is None or old["root"] == self.root:
            return location
        here = storage.join(self.root, old["rest"])
        if storage.exists(here):
            return here
        raise StaleOutput(
            f"workdir {self.root}: the cached {stage} output {name!r} is {location}, in another workdir "
            f"({old['root']}), and {here} does not exist (moved or copied without it?). Drop the entry with "
            f"`clearair workdir drop {stage} --workdir {self.root}` to recompute it here, or run in {old['root']}"
        )

    def _stage_names(self, prefix: str = "") -> list[str]:
        names = storage.listdir(storage.join(self.root, "stages"))
        return [n for n in names if "-" in n and n.startswith(prefix) and not n.startswith(".")]

    def entries(self) -> list[dict[str, Any]]:
        """Every stage output in the workdir with its size and whether it is complete."""
        out = []
        for name in self._stage_names():
            d = storage.join(self.root, "stages", name)
            complete = storage.exists(storage.join(d, "result.json"))
            out.append({"dir": name, "complete": complete, "bytes": storage.tree_size(d)})
        return out

    def drop(self, name: str) -> list[str]:
        """Remove stage outputs whose directory name starts with ``name`` (e.g. ``train`` or ``train-3f2a``)."""
        removed = []
        for stage_name in self._stage_names(name):
            d = storage.join(self.root, "stages", stage_name)
            storage.remove(storage.join(d, "result.json"))  # first: a half-removed output never looks complete
            storage.remove_tree(d)
            removed.append(stage_name)
        return removed


@dataclass
class RunContext:
    """Everything a stage needs that is not configuration."""

    workdir: Workdir
    tracking_uri: str
    experiment: str
    parent_run_id: str | None = None
    ray_address: str | None = None
    tracker: Any = None  # workflows.tracking.Tracker (created by the pipeline)
    progress: bool = True
    worker_output: bool = True  # Ray workers' output reaches the driver's terminal
    # set per stage by the pipeline
    stage: str = ""
    key: str = ""
    out: str = ""  # this stage's output location (a directory or an s3:// prefix)
    run_id: str | None = None

    def artifact_root(self) -> str | None:
        """Where a new experiment keeps artifacts: the server decides for an ``http(s)://`` tracking server (its
        ``--artifacts-destination``); other stores keep them in the workdir's ``mlartifacts``."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return None
        return storage.join(self.workdir.root, "mlartifacts")

    def tracking(self, run_id: str | None = None) -> TrackingRef:
        """What a remote process needs to log into run ``run_id`` of this invocation (the stage's by default)."""
        return TrackingRef(self.tracking_uri, self.experiment, run_id or self.run_id, self.artifact_root())

    def result(
        self, outputs: dict[str, Any], metrics: dict[str, float] | None = None, skipped: str | None = None
    ) -> StageResult:
        return StageResult(self.stage, self.key, outputs, metrics or {}, self.run_id, skipped)
