"""MLflow tracking for the pipelines: runs nested across processes, buffered metrics, datasets, registered models.

Everything goes through an explicit :class:`mlflow.MlflowClient` bound to one tracking URI: no global MLflow state,
no active run, nothing resolved against the working directory.

- Runs: one parent run per pipeline invocation; children (stages, folds) are plain runs carrying the
  ``mlflow.parentRunId`` tag, so any process or node that knows the parent id can create one.
- Metrics are buffered in memory and sent with ``log_batch``. A send that fails for a transient reason
  (connection refused or reset, timeout, HTTP 5xx / 429, a locked sqlite file) keeps the metrics queued with their
  original step and timestamp; the next flush replays them in order. Against a server, metric batches are sent with
  MLflow's own request code but without its multi-minute retry loop, so a server that is down costs the training
  loop one failed connection per flush attempt (attempts back off up to a minute), never a stall.
- Models are logged with MLflow's models-from-code (``workflows/model_code.py`` plus the safetensors export as an
  artifact): nothing is pickled, and loading the model runs only our code.

``MetricsCallback`` (a Lightning callback) is created on first access, so importing this module does not import
Lightning (about 10 s on a small machine) in processes that only log runs.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import requests
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    RunTag,
)
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
    path_not_unique,
    validate_param_and_metric_name,
)

from workflows.provenance import package_version, run_tags

log = logging.getLogger(__name__)

MODEL_CODE_PATH = Path(__file__).with_name("model_code.py")
DB_NAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
DIGEST_TAG = "clearair.digest"
# MLflow error codes that no retry will fix: the batch is dropped (and reported) instead of replayed forever.
_PERMANENT_ERRORS = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "PERMISSION_DENIED", "BAD_REQUEST"}
)
_LOG_BATCH_ENDPOINT = "/api/2.0/mlflow/runs/log-batch"
_MAX_BACKOFF_S = 60.0


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or written; the message names the URI and what to do."""


# ----------------------------------------------------------------------------------------------- URIs and checks


def default_tracking_uri(workdir: str | Path) -> str:
    """The embedded store of a workdir: ``sqlite:////ABS/workdir/mlflow.db`` (four slashes: an absolute path)."""
    if str(workdir).startswith("s3://"):
        raise ValueError(
            f"workdir {workdir} is in an object store, where an SQLite tracking store cannot live: pass "
            f"--tracking-uri (an MLflow server such as http://HOST:5000, or sqlite:////local/path/mlflow.db)"
        )
    return "sqlite:///" + str(Path(workdir).expanduser().resolve() / DB_NAME)


def _is_http(uri: str) -> bool:
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
    if _is_http(uri):
        _check_server(uri, timeout)
        return
    scheme = urlparse(uri).scheme
    path = _local_store_path(uri)
    if path is not None:
        _check_local(uri, path, is_db=scheme == "sqlite")
    elif scheme not in ("sqlite",):
        log.info("tracking store %s (%s) is not checked before use", uri, scheme)


def _artifact_location(uri: str, artifact_root: str | os.PathLike | None) -> str | None:
    """Where new experiments keep artifacts: explicit, or ``<store dir>/mlartifacts`` for a sqlite store."""
    if artifact_root is not None:
        text = os.fspath(artifact_root)
        return text if "://" in text else Path(text).expanduser().resolve().as_uri()
    if _is_http(uri):
        return None  # the server decides (proxied artifacts under its --artifacts-destination)
    path = _local_store_path(uri)
    if path is None or urlparse(uri).scheme != "sqlite":
        raise ValueError(f"tracking store {uri}: give artifact_root explicitly (only sqlite stores have a default)")
    return (path.parent / ARTIFACTS_DIRNAME).as_uri()


# ----------------------------------------------------------------------------------------------- params


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


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    marker = f"...[truncated {len(text)} chars]"
    return text[: limit - len(marker)] + marker


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------------- tracker


class Tracker:
    """One per process: runs, params, buffered metrics, artifacts, datasets and models of one experiment.

    Other processes (Ray tasks, training workers) build their own Tracker from the same URI and experiment and
    receive the parent run id, not this object.

    Args:
        tracking_uri: ``sqlite:////abs/mlflow.db``, ``http://host:port``, or any MLflow store URI.
        experiment: experiment name, created on first use.
        artifact_root: artifact location of a new experiment; None means ``<store dir>/mlartifacts`` for sqlite
            and the server's choice for a server.
        request_timeout: seconds a metric batch may take against a server before it counts as unanswered.
        flush_interval_s: :meth:`log_metrics` sends the queue when the last attempt is older than this.
        max_pending: queue bound; during a very long outage the oldest metrics beyond it are dropped (logged).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_root: str | os.PathLike | None = None,
        *,
        request_timeout: float = 10.0,
        flush_interval_s: float = 5.0,
        max_pending: int = 200_000,
    ) -> None:
        self.uri = tracking_uri
        self.experiment = experiment
        self.artifact_location = _artifact_location(tracking_uri, artifact_root)
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.request_timeout = request_timeout
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self._experiment_id: str | None = None
        self._pending: collections.deque[tuple[str, Metric]] = collections.deque()
        self._queue_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._failures = 0
        self._next_flush = 0.0
        self._dropped = 0

    # -- experiment and runs

    @property
    def experiment_id(self) -> str:
        """The experiment's id, creating the experiment (with the explicit artifact location) if needed."""
        if self._experiment_id is None:
            self._experiment_id = self._get_or_create_experiment()
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                return self.client.create_experiment(self.experiment, artifact_location=self.artifact_location)
            except MlflowException as err:  # another process created it first
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(self.experiment)
        if exp.lifecycle_stage == "deleted":
            log.warning("experiment %r was deleted in %s; restoring it", self.experiment, self.uri)
            self.client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def check_artifact_location(self) -> None:
        """TrackingUnavailable when the experiment already exists with artifacts elsewhere than this tracker's
        location: for a workdir's own store, a workdir that was moved or copied (new artifacts would go to the
        old place, which MLflow cannot change for an existing experiment)."""
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None or self.artifact_location is None or exp.artifact_location == self.artifact_location:
            return
        raise TrackingUnavailable(
            f"experiment {self.experiment!r} in {self.uri} keeps its artifacts in {exp.artifact_location}, not in "
            f"{self.artifact_location} (was the workdir moved or copied?). New runs would write into the old "
            f"place: start a new experiment here with --set tracking.experiment=NAME"
        )

    def mark_killed(self, tag: str, value: str) -> list[str]:
        """Mark KILLED every run of the experiment left RUNNING with ``tag`` = ``value``, and every RUNNING run
        nested under one (e.g. a fold's run, made by its own process); returns their ids. For a caller that knows
        nobody else writes these runs (the pipeline, holding its workdir's lock)."""
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            return []
        running, token = [], None
        while True:
            page = self.client.search_runs(
                [exp.experiment_id], "attributes.status = 'RUNNING'", max_results=1000, page_token=token
            )
            running += page
            token = page.token
            if not token:
                break
        stale = {r.info.run_id for r in running if r.data.tags.get(tag) == value}
        grew = True
        while grew:  # descendants, however deep
            nested = {r.info.run_id for r in running if r.data.tags.get(MLFLOW_PARENT_RUN_ID) in stale}
            grew = not nested <= stale
            stale |= nested
        for run_id in sorted(stale):
            self.client.set_terminated(run_id, status="KILLED")
        return sorted(stale)

    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, Any] | None = None) -> str:
        """Create a run (nested under ``parent_run_id`` if given, in the parent's experiment); returns its id.

        Every run carries :func:`run_tags` (overridable by ``tags``). Works from any process that can reach the
        store: nesting is the ``mlflow.parentRunId`` tag, not process state.
        """
        all_tags = {**run_tags(), **{k: str(v) for k, v in (tags or {}).items()}}
        experiment_id = self.experiment_id if parent_run_id is None else self._parent_experiment(parent_run_id)
        if parent_run_id is not None:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(experiment_id, tags=all_tags, run_name=name)
        log.debug("started run %s (%s) parent=%s", run.info.run_id, name, parent_run_id)
        return run.info.run_id

    def _parent_experiment(self, parent_run_id: str) -> str:
        try:
            return self.client.get_run(parent_run_id).info.experiment_id
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise ValueError(f"parent run {parent_run_id} does not exist in {self.uri}") from err
            raise

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Send the queued metrics, then mark the run FINISHED, FAILED or KILLED."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        self.flush()
        self.client.set_terminated(run_id, status=status)

    # -- params and tags

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log a (nested) config as params with dotted keys; over-long values are truncated with a marker.

        MLflow params are immutable: logging a key again with another value fails. Log the full config as an
        artifact too (:meth:`log_dict`), since truncated values are not recoverable from params.
        """
        flat = [Param(k, _truncate(v, MAX_PARAM_VAL_LENGTH)) for k, v in flatten_params(params).items()]
        for chunk in _chunks(flat, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk, synchronous=True)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Set run tags (values as strings, truncated to MLflow's tag length limit)."""
        items = [RunTag(k, _truncate(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for chunk in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk, synchronous=True)

    # -- buffered metrics

    @property
    def pending(self) -> int:
        """Metrics queued and not yet accepted by the store."""
        return len(self._pending)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Queue metrics at ``step`` (timestamped now); sends the queue if the last attempt is old enough.

        Raises ValueError for a name MLflow would refuse or a value that is not a number, so bad input fails
        here, not at replay (where the store would refuse the whole batch it is in).
        """
        now = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            key = str(key)
            if len(key) > MAX_ENTITY_KEY_LENGTH or not validate_param_and_metric_name(key) or path_not_unique(key):
                raise ValueError(f"invalid metric name {key!r}: use letters, digits, _ - . / : and spaces")
            try:
                number = float(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"metric {key!r} has a non-numeric value {value!r}") from err
            entries.append((run_id, Metric(key, number, now, int(step))))
        with self._queue_lock:
            self._pending.extend(entries)
            overflow = len(self._pending) - self.max_pending
            for _ in range(max(overflow, 0)):
                self._pending.popleft()
        if overflow > 0:
            self._dropped += overflow
            log.error(
                "metric queue over %d entries: dropped the %d oldest (%d in all)",
                self.max_pending,
                overflow,
                self._dropped,
            )
        if time.monotonic() >= self._next_flush:
            self.flush()

    def _peek_batch(self) -> tuple[str, list[Metric]] | None:
        """The oldest queued metrics of one run, at most one MLflow batch, left in the queue."""
        with self._queue_lock:
            if not self._pending:
                return None
            run_id = self._pending[0][0]
            batch = []
            for rid, metric in self._pending:
                if rid != run_id or len(batch) == MAX_METRICS_PER_BATCH:
                    break
                batch.append(metric)
            return run_id, batch

    def _pop(self, n: int) -> None:
        with self._queue_lock:
            for _ in range(n):
                self._pending.popleft()

    def _send_http(self, run_id: str, metrics: list[Metric]) -> tuple[Exception | None, bool]:
        """POST one log-batch request with no retries; returns (error or None, whether the error is transient)."""
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.proto_json_utils import message_to_json
        from mlflow.utils.rest_utils import http_request

        body = json.loads(message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in metrics])))
        try:
            resp = http_request(
                get_default_host_creds(self.uri), _LOG_BATCH_ENDPOINT, "POST", max_retries=0, backoff_factor=0,
                timeout=self.request_timeout, raise_on_status=False, json=body,
            )  # fmt: skip
        except MlflowException as err:  # connection refused / reset, timeout: the server did not answer
            return err, True
        if resp.status_code == 200:
            return None, False
        err = MlflowException(f"{_LOG_BATCH_ENDPOINT} answered HTTP {resp.status_code}: {resp.text[:300]}")
        return err, resp.status_code >= 500 or resp.status_code in (408, 429)

    def _send(self, run_id: str, metrics: list[Metric]) -> tuple[Exception | None, bool]:
        if _is_http(self.uri):
            return self._send_http(run_id, metrics)
        try:
            self.client.log_batch(run_id, metrics=metrics, synchronous=True)
        except MlflowException as err:
            return err, err.error_code not in _PERMANENT_ERRORS
        except Exception as err:  # e.g. a locked sqlite file surfacing from SQLAlchemy
            return err, True
        return None, False

    def flush(self, raise_on_error: bool = False) -> int:
        """Send queued metrics in order; returns how many are still queued.

        On a transient failure the rest stay queued (replayed by the next flush) and the next automatic attempt
        backs off; metrics the store refuses outright (e.g. a deleted run) are dropped with an error logged.
        With ``raise_on_error`` either case raises (:class:`TrackingUnavailable` for a transient one).
        """
        with self._flush_lock:
            sent = 0
            while (batch := self._peek_batch()) is not None:
                run_id, metrics = batch
                err, transient = self._send(run_id, metrics)
                if err is None:
                    self._pop(len(metrics))
                    sent += len(metrics)
                    continue
                if transient:
                    self._on_transient(err, raise_on_error)
                    break
                self._pop(len(metrics))
                log.error("%s refused %d metrics of run %s, dropped: %s", self.uri, len(metrics), run_id, err)
                if raise_on_error:
                    raise err
            else:
                self._on_success(sent)
        return self.pending

    def _on_transient(self, err: Exception, raise_on_error: bool) -> None:
        self._failures += 1
        delay = min(self.flush_interval_s * 2 ** (self._failures - 1), _MAX_BACKOFF_S)
        self._next_flush = time.monotonic() + delay
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(
            level,
            "tracking store %s did not take metrics (%s); %d kept for replay, next try in %.0f s",
            self.uri,
            err,
            self.pending,
            delay,
        )
        if raise_on_error:
            raise TrackingUnavailable(f"{self.uri} did not accept metrics: {err}") from err

    def _on_success(self, sent: int) -> None:
        if self._failures:
            log.info("tracking store %s answers again; replayed %d queued metrics", self.uri, sent)
        self._failures = 0
        self._next_flush = time.monotonic() + self.flush_interval_s

    def close(self, timeout: float = 30.0) -> int:
        """Flush, retrying with back-off for up to ``timeout`` seconds; returns metrics that could not be sent."""
        deadline = time.monotonic() + timeout
        delay = 0.5
        while self.flush() and time.monotonic() + delay < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
        if self.pending:
            log.error("%d metrics could not be sent to %s before closing and are lost", self.pending, self.uri)
        return self.pending

    # -- artifacts and datasets

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or directory to the run's artifacts (under ``artifact_path`` if given)."""
        self.client.log_artifact(run_id, os.fspath(path), artifact_path)

    def log_dict(self, run_id: str, data: dict[str, Any], name: str) -> None:
        """Write ``data`` as the artifact ``name`` (JSON, or YAML for a .yaml/.yml name)."""
        self.client.log_dict(run_id, data, name)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        """Write ``text`` as the artifact ``name`` (e.g. ``results.md``)."""
        self.client.log_text(run_id, text, name)

    def log_dataset(
        self, run_id: str, name: str, digest: str, source: str, context: str, profile: dict[str, Any] | None = None
    ) -> None:
        """Record a dataset input of the run (lineage), e.g. a shard manifest with its digest.

        MLflow keeps at most 36 characters of a digest: the dataset's digest is the prefix, and the full digest
        is kept in the input tag ``clearair.digest`` and in the profile. ``context`` is e.g. "training".
        """
        scheme = urlparse(source).scheme
        dataset = Dataset(
            name=name,
            digest=digest[:MAX_DATASET_DIGEST_SIZE],
            source_type=scheme if scheme and scheme != "file" else "local",
            source=json.dumps({"uri": source}),
            profile=json.dumps({"digest": digest, **(profile or {})}, default=str),
        )
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag(DIGEST_TAG, digest)]
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])

    # -- models

    def register_model(self, run_id: str, export_dir: Path, name: str, alias: str = "current") -> str:
        """Log an exported restorer as a models-from-code pyfunc, register it as ``name`` and point ``alias`` at it.

        The logged model holds ``workflows/model_code.py`` and the export directory (safetensors + config.json);
        nothing is pickled. Returns the new version number. MLflow reserves the alias "latest" (the URI
        ``models:/NAME/latest`` already means the newest version), so it is refused here.
        """
        if alias.lower() == "latest":
            raise ValueError('MLflow reserves the alias "latest"; models:/NAME/latest already names the newest version')
        from clearair.export import read_export_config

        meta = read_export_config(export_dir)  # refuse an incomplete export before logging anything
        run = self.client.get_run(run_id)
        tags = {"clearair.arch": meta["arch"], "clearair.weights_sha256": str(meta.get("weights_sha256"))}
        model = self.client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, tags=tags)
        try:
            self._save_pyfunc(model, run_id, Path(export_dir))
        except BaseException:
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        return self._register(name, alias, run_id, model, tags)

    def _save_pyfunc(self, model, run_id: str, export_dir: Path) -> None:
        import mlflow.pyfunc
        from mlflow.models import Model

        import clearair
        import synth

        mlmodel = Model(
            artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id, model_id=model.model_id
        )
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            with warnings.catch_warnings():  # the entry declares its schema in the signature, not in type hints
                warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
                mlflow.pyfunc.save_model(
                    path=local,
                    python_model=str(MODEL_CODE_PATH),
                    artifacts={"model": str(export_dir.resolve())},
                    code_paths=[str(Path(p).parent) for p in (clearair.__file__, synth.__file__)],
                    mlflow_model=mlmodel,
                    signature=_model_signature(),
                    input_example=(_input_example(), {"output": "float"}),
                    pip_requirements=_pip_requirements(),  # explicit: no inference subprocess that loads the model
                )
            self.client.log_model_artifacts(model.model_id, str(local))

    def _register(self, name: str, alias: str, run_id: str, model, tags: dict[str, str]) -> str:
        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # The source is the logged model's storage location, not models:/<id>: with a sqlite store MLflow resolves
        # a models:/ source through the process-global tracking URI (a ./mlflow.db in the working directory).
        version = self.client.create_model_version(
            name, source=model.artifact_location, run_id=run_id, tags=tags, model_id=model.model_id
        )
        self.client.set_registered_model_alias(name, alias, version.version)
        log.info("registered %s version %s (alias %s) from run %s", name, version.version, alias, run_id)
        return str(version.version)

    def load_registered_model(self, name: str, alias: str = "current", dst_path: str | os.PathLike | None = None):
        """The pyfunc model ``models:/NAME@ALIAS`` of this store, downloaded to ``dst_path`` (or a new temp dir).

        The alias is resolved with this tracker's client: MLflow's own ``models:/`` resolution uses the
        process-global registry URI, whatever URI is passed to it.
        """
        import mlflow.artifacts
        import mlflow.pyfunc

        version = self.client.get_model_version_by_alias(name, alias).version
        source = self.client.get_model_version_download_uri(name, version)
        dst = os.fspath(dst_path) if dst_path is not None else tempfile.mkdtemp(prefix="clearair-model-")
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=self.uri)
        return mlflow.pyfunc.load_model(local)


def _model_signature():
    """uint8 RGB batches (B, H, W, 3) of any size in, float32 (B, H, W, 3) in [0, 1] out, and the tiling params."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, -1, 3))]),
        params=ParamSchema(
            [
                ParamSpec("tile", "long", 0),
                ParamSpec("overlap", "long", 32),
                ParamSpec("memory_budget_mb", "double", 0.0),
                ParamSpec("output", "string", "float"),
            ]
        ),
    )


def _input_example():
    """One 32x32 grey-gradient image: small enough to log, a valid input for every architecture."""
    import numpy as np

    ramp = np.linspace(0, 255, 32).astype(np.uint8)  # (32,)
    return np.tile(ramp[:, None, None], (1, 1, 32, 3))  # (1, 32, 32, 3)


# What the model library (clearair + synth, logged as code) imports, at the versions of this environment.
MODEL_REQUIREMENTS = (
    "torch",
    "numpy",
    "safetensors",
    "pillow",
    "opencv-python-headless",
    "transformers",
    "open_clip_torch",
    "mlflow",
)


def _pip_requirements() -> list[str]:
    return [f"{p}=={package_version(p)}" if package_version(p) != "not installed" else p for p in MODEL_REQUIREMENTS]


# ----------------------------------------------------------------------------------------------- Lightning


def _same(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)  # NaN equals NaN here


@functools.cache
def _metrics_callback_class() -> type:
    import lightning.pytorch as pl

    class MetricsCallback(pl.Callback):
        """Send ``trainer.callback_metrics`` to a :class:`Tracker` run from rank 0 only.

        Scalars whose value changed since they were last sent are logged every ``every_n_steps`` global steps,
        after each validation and at each epoch end, at the trainer's global step; the tracker's queue is flushed
        at epoch end and at train end. Lightning's MLFlowLogger is not used: it cannot ride out a server outage.
        """

        def __init__(self, tracker: Tracker, run_id: str, every_n_steps: int = 50) -> None:
            if every_n_steps < 1:
                raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
            self.tracker, self.run_id, self.every_n_steps = tracker, run_id, every_n_steps
            self._last: dict[str, float] = {}

        def _log(self, trainer: pl.Trainer) -> None:
            # callback_metrics keeps every key's latest value (validation results stay there all epoch): only
            # values that changed since they were last sent are logged, at the current global step.
            fresh = {}
            for key, value in trainer.callback_metrics.items():
                if getattr(value, "numel", lambda: 1)() != 1:
                    continue
                number = float(value)
                if key not in self._last or not _same(self._last[key], number):
                    fresh[key] = number
            if fresh:
                self._last.update(fresh)
                fresh["epoch"] = float(trainer.current_epoch)
                self.tracker.log_metrics(self.run_id, fresh, trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.is_global_zero and trainer.global_step % self.every_n_steps == 0:
                self._log(trainer)

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.is_global_zero and not trainer.sanity_checking:
                self._log(trainer)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.is_global_zero:
                self._log(trainer)
                self.tracker.flush()

        def on_train_end(self, trainer, pl_module) -> None:
            if trainer.is_global_zero:
                self.tracker.flush()

    MetricsCallback.__module__ = __name__
    MetricsCallback.__qualname__ = "MetricsCallback"
    return MetricsCallback


def __getattr__(name: str) -> Any:
    # MetricsCallback subclasses lightning.pytorch.Callback; it is built on first access so that importing this
    # module stays cheap for processes that only log runs. `from workflows.tracking import MetricsCallback` works.
    if name == "MetricsCallback":
        return _metrics_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------- local server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ServerHandle:
    """A running ``mlflow server`` subprocess on 127.0.0.1; ``stop()`` (or leaving the ``with`` block) ends it."""

    def __init__(self, process: subprocess.Popen, port: int, log_path: Path, owns_log: bool = False) -> None:
        self.process, self.port, self.log_path = process, port, log_path
        self._owns_log = owns_log  # a temp log we created is removed after a clean stop

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's combined stdout/stderr log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the server's process group (it started its own session), SIGKILL if it outlives ``timeout``."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("mlflow server on port %d ignored SIGTERM for %.0f s; killing it", self.port, timeout)
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                return
        if self._owns_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_ready(handle: ServerHandle, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise RuntimeError(
                f"mlflow server on port {handle.port} exited with code {handle.process.returncode}; "
                f"log {handle.log_path}:\n{handle.log_tail()}"
            )
        try:
            if requests.get(handle.uri + "/health", timeout=1.0).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    handle.stop()
    raise RuntimeError(f"mlflow server on port {handle.port} not ready after {timeout:.0f} s:\n{handle.log_tail()}")


def start_mlflow_server(
    backend_uri: str,
    artifacts_dir: str | Path,
    port: int | None = None,
    *,
    workers: int = 1,
    timeout: float = 120.0,
    log_path: Path | None = None,
) -> ServerHandle:
    """Start ``mlflow server`` on 127.0.0.1 (never another interface) and return once ``/health`` answers.

    Artifacts are proxied by the server into ``artifacts_dir``. Job execution is switched off
    (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``), which keeps the server to a few processes. No authentication
    is configured: keep it on loopback. Output goes to ``log_path`` (a new temp file by default).
    """
    port = port or _free_port()
    if not _port_free(port):
        raise RuntimeError(f"port {port} on 127.0.0.1 is in use; pick another port for the mlflow server")
    from synth import storage

    artifacts_dir = storage.resolve(artifacts_dir)  # a directory, or an s3:// prefix the server writes with boto3
    storage.makedirs(artifacts_dir)
    owns_log = log_path is None
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"mlflow-server-{port}-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts_dir, "--workers", str(workers),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    handle = ServerHandle(process, port, Path(log_path), owns_log)
    _wait_ready(handle, timeout)
    log.info("mlflow server ready at %s (pid %d, log %s)", handle.uri, process.pid, log_path)
    return handle
