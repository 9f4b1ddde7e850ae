"""MLflow tracking for the pipelines: runs nested across processes, buffered metrics, datasets, registered models.

Everything goes through an explicit :class:`mlflow.MlflowClient` bound to one tracking URI: no global MLflow state,
no active run, nothing resolved against the working directory.

- :mod:`~workflows.tracking.store`: tracking URIs, the workdir's default store, the check before any work.
- :mod:`~workflows.tracking.tracker`: :class:`Tracker`, runs (nested by the ``mlflow.parentRunId`` tag), params,
  tags, artifacts and datasets.
- :mod:`~workflows.tracking.buffer` and :mod:`~workflows.tracking.senders`: the metric queue that rides out a
  store outage, and how its batches reach the store.
- :mod:`~workflows.tracking.registry`: restorers logged with models-from-code and registered by alias.
- :mod:`~workflows.tracking.callback`: ``MetricsCallback`` for Lightning. It is not imported here, so that the
  processes that only log runs do not import Lightning (about 10 s on a small machine).
"""

from workflows.tracking.params import flatten_params
from workflows.tracking.store import (
    ARTIFACTS_DIRNAME,
    DB_NAME,
    TrackingUnavailable,
    check_tracking,
    default_tracking_uri,
)
from workflows.tracking.tracker import DIGEST_TAG, RUN_STATUSES, Tracker

__all__ = [
    "ARTIFACTS_DIRNAME",
    "DB_NAME",
    "DIGEST_TAG",
    "RUN_STATUSES",
    "Tracker",
    "TrackingUnavailable",
    "check_tracking",
    "default_tracking_uri",
    "flatten_params",
]
