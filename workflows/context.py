"""Runtime state of one pipeline invocation: the workdir, its lock, stage cache entries, tracking and Ray.

The workdir holds one directory per stage output, ``stages/<stage>-<key>/``, where the key is a digest of the
stage's settings and of its inputs' keys; ``result.json`` is written last and marks the output complete. A rerun
finds complete outputs and skips them; a changed setting changes the key of that stage and of everything
downstream. A stage that was interrupted finds its own partial directory again and resumes inside it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class WorkdirLocked(RuntimeError):
    """Another ``clearair run`` holds this workdir."""


@dataclass(frozen=True)
class StageResult:
    """What a stage hands downstream: where its outputs are and a few headline metrics (small, JSON-able)."""

    stage: str
    key: str
    outputs: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    skipped: str | None = None  # why the stage did no work (e.g. nothing to precompute)
    seconds: float | None = None  # wall time of the stage when it ran

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Workdir:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self._lock_file = None

    def lock(self) -> None:
        """Take the workdir's lock or fail naming the holder; released by :meth:`unlock` or process exit."""
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / ".lock", "a+")
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

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / "stages" / f"{stage}-{key[:12]}"

    def cached(self, stage: str, key: str) -> StageResult | None:
        path = self.stage_dir(stage, key) / "result.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return StageResult(**data)

    def publish(self, result: StageResult) -> None:
        path = self.stage_dir(result.stage, result.key) / "result.json"
        tmp = path.with_name(".result.json.partial")
        tmp.write_text(json.dumps(result.to_json(), indent=1, sort_keys=True))
        os.replace(tmp, path)

    def entries(self) -> list[dict[str, Any]]:
        """Every stage output in the workdir with its size and whether it is complete."""
        out = []
        for d in sorted((self.root / "stages").glob("*-*")):
            size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
            out.append({"dir": d.name, "complete": (d / "result.json").exists(), "bytes": size})
        return out

    def drop(self, name: str) -> list[str]:
        """Remove stage outputs whose directory name starts with ``name`` (e.g. ``train`` or ``train-3f2a``)."""
        removed = []
        for d in sorted((self.root / "stages").glob(f"{name}*")):
            shutil.rmtree(d)
            removed.append(d.name)
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
    # set per stage by the pipeline
    stage: str = ""
    key: str = ""
    out: Path = Path()
    run_id: str | None = None

    def tracking(self, run_id: str | None = None) -> dict[str, Any]:
        """What a remote process needs to log into a run of this invocation (plain, picklable)."""
        return {
            "uri": self.tracking_uri,
            "experiment": self.experiment,
            "run_id": run_id or self.run_id,
            "artifact_root": str(self.workdir.root / "mlartifacts"),
        }

    def result(
        self, outputs: dict[str, str], metrics: dict[str, float] | None = None, skipped: str | None = None
    ) -> StageResult:
        return StageResult(self.stage, self.key, outputs, metrics or {}, self.run_id, skipped)
