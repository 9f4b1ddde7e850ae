"""Tracking store URIs: the workdir's default store, the check made before any work, and where artifacts go.

A workdir's own store is SQLite, ``<workdir>/mlflow.db`` (an absolute path, four slashes), with artifacts beside
it in ``<workdir>/mlartifacts``. A server (``http(s)://``) answers ``GET /health`` and decides where artifacts go.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import requests

log = logging.getLogger(__name__)

DB_NAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written; the message names the URI and what to do."""


def default_tracking_uri(workdir: str | Path) -> str:
    """The embedded store of a workdir: ``sqlite:////ABS/workdir/mlflow.db`` (four slashes: an absolute path)."""
    if str(workdir).startswith("s3://"):
        raise ValueError(
            f"workdir {workdir} is in an object store, where an SQLite tracking store cannot live: pass "
            f"--tracking-uri (an MLflow server such as http://HOST:5000, or sqlite:////local/path/mlflow.db)"
        )
    return "sqlite:///" + str(Path(workdir).expanduser().resolve() / DB_NAME)


def is_http(uri: str) -> bool:
    """Whether ``uri`` names an MLflow server (``http://`` or ``https://``) rather than a store MLflow opens itself."""
    return urlparse(uri).scheme in ("http", "https")


def _local_store_path(uri: str) -> Path | None:
    """The file (sqlite) or directory (file store) behind a local URI; None for other stores and in-memory sqlite."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        rest = uri[len("sqlite:///") :].split("?", 1)[0] if uri.startswith("sqlite:///") else ""
        if rest in ("", ":memory:"):
            return None
        if not rest.startswith("/"):
            log.warning(
                "%s is relative to the working directory %s; use four slashes for an absolute path", uri, Path.cwd()
            )
        return Path(rest).resolve()
    if parsed.scheme in ("file", ""):
        return Path(parsed.path if parsed.scheme == "file" else uri).resolve()
    return None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_local(uri: str, path: Path, is_db: bool) -> None:
    if path.exists() and is_db and not (path.is_file() and os.access(path, os.R_OK | os.W_OK)):
        raise TrackingUnavailable(f"tracking store {uri}: {path} is not a readable and writable file")
    folder = path.parent if is_db else path
    base = _nearest_existing(folder)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise TrackingUnavailable(
            f"tracking store {uri}: {base} is not a writable directory; choose another --workdir or --tracking-uri"
        )


def _check_server(uri: str, timeout: float) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        resp = requests.get(url, timeout=timeout)
    except requests.RequestException as err:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} does not answer ({type(err).__name__}: {err}). Start it (e.g. "
            f"`mlflow server --host 127.0.0.1 --port PORT --backend-store-uri sqlite:////ABS/PATH/mlflow.db`), "
            f"correct --tracking-uri, or leave --tracking-uri out to use the sqlite store inside the workdir"
        ) from err
    if resp.status_code != 200:
        raise TrackingUnavailable(
            f"{url} answered HTTP {resp.status_code}, not 200: is {uri} an MLflow tracking server, and is it healthy?"
        )


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingUnavailable` unless the tracking store at ``uri`` can be used, before any work starts.

    A server gets one request (``GET /health``, at most ``timeout`` seconds); a sqlite or file store needs a
    writable directory (created on first use if missing). Other stores (e.g. PostgreSQL) are not probed.
    """
    if is_http(uri):
        _check_server(uri, timeout)
        return
    scheme = urlparse(uri).scheme
    path = _local_store_path(uri)
    if path is not None:
        _check_local(uri, path, is_db=scheme == "sqlite")
    elif scheme not in ("sqlite",):
        log.info("tracking store %s (%s) is not checked before use", uri, scheme)


def artifact_location(uri: str, artifact_root: str | os.PathLike | None) -> str | None:
    """Where new experiments keep artifacts: explicit, or ``<store dir>/mlartifacts`` for a sqlite store."""
    if artifact_root is not None:
        text = os.fspath(artifact_root)
        return text if "://" in text else Path(text).expanduser().resolve().as_uri()
    if is_http(uri):
        return None  # the server decides (proxied artifacts under its --artifacts-destination)
    path = _local_store_path(uri)
    if path is None or urlparse(uri).scheme != "sqlite":
        raise ValueError(f"tracking store {uri}: give artifact_root explicitly (only sqlite stores have a default)")
    return (path.parent / ARTIFACTS_DIRNAME).as_uri()
