"""How a :class:`~workflows.tracking.buffer.MetricBuffer` delivers a batch, and which failures are worth a replay.

Against a server, a batch is one ``log-batch`` request made with MLflow's own request code but without its
multi-minute retry loop: a server that is down costs one failed connection per attempt. Transient there: no
answer (connection refused or reset, timeout), HTTP 5xx, 408 and 429. Any other store is written through the
tracker's :class:`mlflow.MlflowClient`; transient there: every error but the MLflow error codes in
:data:`PERMANENT_ERRORS`, e.g. a locked sqlite file surfacing from SQLAlchemy.
"""

from __future__ import annotations

import json

import mlflow
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.service_pb2 import LogBatch
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.proto_json_utils import message_to_json
from mlflow.utils.rest_utils import http_request

from workflows.tracking.buffer import Sender
from workflows.tracking.store import is_http

# MLflow error codes that no retry will fix: the batch is dropped (and reported) instead of replayed forever.
PERMANENT_ERRORS = frozenset(
    {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "PERMISSION_DENIED", "BAD_REQUEST"}
)
LOG_BATCH_ENDPOINT = "/api/2.0/mlflow/runs/log-batch"


def http_sender(uri: str, timeout: float) -> Sender:
    """POST each batch to the server at ``uri`` once, waiting at most ``timeout`` seconds for the answer."""

    def send(run_id: str, metrics: list[Metric]) -> tuple[Exception | None, bool]:
        body = json.loads(message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in metrics])))
        try:
            resp = http_request(
                get_default_host_creds(uri), LOG_BATCH_ENDPOINT, "POST", max_retries=0, backoff_factor=0,
                timeout=timeout, raise_on_status=False, json=body,
            )  # fmt: skip
        except MlflowException as err:  # connection refused / reset, timeout: the server did not answer
            return err, True
        if resp.status_code == 200:
            return None, False
        err = MlflowException(f"{LOG_BATCH_ENDPOINT} answered HTTP {resp.status_code}: {resp.text[:300]}")
        return err, resp.status_code >= 500 or resp.status_code in (408, 429)

    return send


def client_sender(client: mlflow.MlflowClient) -> Sender:
    """Write each batch with ``client.log_batch`` (synchronous: an error surfaces here, not in a thread)."""

    def send(run_id: str, metrics: list[Metric]) -> tuple[Exception | None, bool]:
        try:
            client.log_batch(run_id, metrics=metrics, synchronous=True)
        except MlflowException as err:
            return err, err.error_code not in PERMANENT_ERRORS
        except Exception as err:  # e.g. a locked sqlite file surfacing from SQLAlchemy
            return err, True
        return None, False

    return send


def sender_for(uri: str, client: mlflow.MlflowClient, timeout: float) -> Sender:
    """The sender for the store at ``uri``: one request without retries for a server, else ``client``."""
    return http_sender(uri, timeout) if is_http(uri) else client_sender(client)
