"""Storage faults as one line: a full disk, a quota or a read-only mount, wherever in a run it surfaces.

A full disk can surface as an ``OSError`` in the driver, inside a Ray task (wrapped in ``RayTaskError``), or
as SQLite's "database or disk is full" through SQLAlchemy and MLflow, often while an exception handler is
already running. :func:`storage_fault` walks an error's whole chain (``__cause__``, ``__context__`` and Ray's
``cause``) and says what happened and where, so the command line can print one message in place of a long
traceback. Nothing a stage half wrote looks finished: ``result.json`` is written last, files are renamed into
place, and the next run resumes.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

OS_FAULTS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
SQLITE_FAULTS = {  # SQLite's own words, as SQLAlchemy and MLflow pass them on
    "database or disk is full": "no space left on device",
    "attempt to write a readonly database": "read-only file system",
}


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]  # RayTaskError keeps the worker's in .cause


def storage_fault(err: BaseException, workdir: str, tracking_uri: str | None = None) -> str | None:
    """``"no space left on device: PATH"`` (or the quota or read-only variant) when ``err`` or anything in its
    chain is such a fault, else None. PATH is the file the OS named, else the tracking store for SQLite's
    errors, else ``workdir``."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in OS_FAULTS:
            return f"{OS_FAULTS[e.errno]}: {e.filename or workdir}"
    for e in _chain(err):
        text = str(e)
        for needle, what in SQLITE_FAULTS.items():
            if needle in text:
                return f"{what}: the tracking store {tracking_uri or workdir}"
    for e in _chain(err):  # an OSError turned into text by a worker or a library (errno lost on the way)
        text = str(e)
        for what in OS_FAULTS.values():
            if what in text.lower():
                return f"{what}: {workdir} ({text.splitlines()[0][:300]})"
    return None
