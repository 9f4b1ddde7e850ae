"""What produced an output: the clearair version, the commit it runs from, and the versions of its stack.

Recorded on every MLflow run (tags) and in every stage's ``result.json``, and printed by ``clearair --version``.
Read from package metadata, git and the password database only, never from environment variables, so no token
can leak into a run. MLflow's standard tags come too: ``mlflow.user`` (the run's owner in its UI, otherwise
"unknown"), ``mlflow.source.name``/``mlflow.source.type`` and ``mlflow.source.git.commit``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import pwd
import socket
import subprocess
from pathlib import Path

import clearair

VERSIONED_PACKAGES = ("clearair", "torch", "ray", "mlflow", "lightning")
GIT_COMMIT_TAG = "mlflow.source.git.commit"  # MLflow's own tag name, so its UI links the run to the commit
SOURCE_NAME = "clearair"  # mlflow.source.name: the entry point that made the run
UNKNOWN = "unknown"


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.cache
def _checkout() -> tuple[str, bool]:
    """(HEAD sha, tracked files differ from it) of the checkout clearair runs from; (``unknown``, False) for an
    install that is not a checkout (a wheel in site-packages, even one inside another repository)."""
    here = Path(__file__).resolve().parent
    top = _git("rev-parse", "--show-toplevel", cwd=here)
    sha = _git("rev-parse", "HEAD", cwd=here) if top and Path(top).resolve() == here.parent else None
    if not sha:
        return UNKNOWN, False
    return sha, bool(_git("status", "--porcelain", "--untracked-files=no", cwd=here))


def commit() -> str:
    """The commit clearair runs from, ``-dirty`` appended when tracked files differ from it (or ``unknown``)."""
    sha, dirty = _checkout()
    return f"{sha}-dirty" if dirty else sha


def version_line() -> str:
    """``clearair 0.2.0 (commit 1a2b3c4d5e6f)``, as ``clearair --version`` prints it."""
    return f"clearair {clearair.__version__} (commit {commit()})"


def user() -> str:
    """The name of the user running this process (its uid when the password database has none, e.g. a
    container started with an arbitrary uid)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.cache
def _run_tags() -> tuple[tuple[str, str], ...]:
    tags = {
        "mlflow.user": user(),
        "mlflow.source.name": SOURCE_NAME,
        "mlflow.source.type": "LOCAL",  # MLflow's SourceType for a run started by a local process
        GIT_COMMIT_TAG: _checkout()[0],  # a plain sha, as MLflow expects
        "clearair.commit": commit(),
        "clearair.version": clearair.__version__,
        "clearair.python": platform.python_version(),
        "clearair.host": socket.gethostname(),
    }
    tags.update({f"clearair.version.{p}": package_version(p) for p in VERSIONED_PACKAGES})
    return tuple(tags.items())


def run_tags() -> dict[str, str]:
    """Provenance tags of every run: commit, clearair and library versions, Python, host."""
    return dict(_run_tags())


def stamp() -> dict[str, str]:
    """The two fields every ``result.json`` carries: ``clearair_version`` and ``commit``."""
    return {"clearair_version": clearair.__version__, "commit": commit()}
