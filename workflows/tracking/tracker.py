"""The :class:`Tracker`: one process's handle on an experiment's runs, params, tags, artifacts and datasets.

Runs are plain MLflow runs: one parent run per pipeline invocation; children (stages, folds) carry the
``mlflow.parentRunId`` tag, so any process or node that knows the parent id can create one. Metrics go through
the tracker's :class:`~workflows.tracking.buffer.MetricBuffer`, models through :mod:`workflows.tracking.registry`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from workflows.provenance import run_tags
from workflows.tracking import registry
from workflows.tracking.buffer import MetricBuffer
from workflows.tracking.params import chunks, flatten_params, truncate
from workflows.tracking.senders import sender_for
from workflows.tracking.store import TrackingUnavailable, artifact_location

log = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
DIGEST_TAG = "clearair.digest"


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
        self.artifact_location = artifact_location(tracking_uri, artifact_root)
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.buffer = MetricBuffer(
            sender_for(tracking_uri, self.client, request_timeout),
            tracking_uri,
            flush_interval_s=flush_interval_s,
            max_pending=max_pending,
        )
        self._experiment_id: str | None = None

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
        flat = [Param(k, truncate(v, MAX_PARAM_VAL_LENGTH)) for k, v in flatten_params(params).items()]
        for chunk in chunks(flat, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk, synchronous=True)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Set run tags (values as strings, truncated to MLflow's tag length limit)."""
        items = [RunTag(k, truncate(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        for chunk in chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk, synchronous=True)

    # -- buffered metrics (MetricBuffer)

    @property
    def pending(self) -> int:
        """Metrics queued and not yet accepted by the store."""
        return self.buffer.pending

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Queue metrics at ``step``, timestamped now; ValueError for a name or value MLflow would refuse
        (:meth:`MetricBuffer.add`)."""
        self.buffer.add(run_id, metrics, step)

    def flush(self, raise_on_error: bool = False) -> int:
        """Send queued metrics in order; returns how many are still queued (:meth:`MetricBuffer.flush`)."""
        return self.buffer.flush(raise_on_error)

    def close(self, timeout: float = 30.0) -> int:
        """Flush, retrying with back-off for up to ``timeout`` seconds; returns metrics that could not be sent."""
        return self.buffer.close(timeout)

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

    # -- models (workflows.tracking.registry)

    def register_model(self, run_id: str, export_dir: Path, name: str, alias: str = "current") -> str:
        """Log an exported restorer as a models-from-code pyfunc, register it as ``name`` and point ``alias`` at it;
        returns the new version number (:func:`registry.register_model`; the alias "latest" is refused)."""
        return registry.register_model(self.client, run_id, export_dir, name, alias)

    def load_registered_model(
        self, name: str, alias: str = "current", dst_path: str | os.PathLike | None = None
    ) -> PyFuncModel:
        """The pyfunc model ``models:/NAME@ALIAS`` of this store, downloaded to ``dst_path`` (or a new temp dir),
        the alias resolved with this tracker's client (:func:`registry.load_registered_model`)."""
        return registry.load_registered_model(self.client, self.uri, name, alias, dst_path)
