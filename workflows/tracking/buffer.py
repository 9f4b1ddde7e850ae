"""The metric queue of a :class:`~workflows.tracking.Tracker`: metrics wait in memory and go out in batches.

A send that fails for a transient reason keeps the metrics queued with their original step and timestamp; the next
flush replays them in order, and automatic attempts back off (doubling, up to :data:`MAX_BACKOFF_S`), so a store
that is down costs the training loop one failed attempt per flush, never a stall. Metrics the store refuses for
good (a deleted run, say) are dropped with an error logged rather than replayed forever. How a batch is sent, and
which of its failures are transient, is the sender's business (:mod:`workflows.tracking.senders`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from mlflow.entities import Metric
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    path_not_unique,
    validate_param_and_metric_name,
)

from workflows.tracking.store import TrackingUnavailable

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
# Sends one batch (metrics of one run, at most MAX_METRICS_PER_BATCH); returns (the error or None, whether the
# error is transient, i.e. the same batch may succeed later).
Sender = Callable[[str, list[Metric]], tuple[Exception | None, bool]]


class MetricBuffer:
    """Metrics queued in order of logging, sent by ``send`` one batch (one run, at most MLflow's limit) at a time.

    Args:
        send: the :data:`Sender` that delivers a batch to the store.
        store: the store's URI, for messages.
        flush_interval_s: :meth:`add` sends the queue when the last attempt is older than this.
        max_pending: queue bound; during a very long outage the oldest metrics beyond it are dropped (logged).
    """

    def __init__(self, send: Sender, store: str, *, flush_interval_s: float = 5.0, max_pending: int = 200_000) -> None:
        self._send = send
        self.store = store
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self._pending: collections.deque[tuple[str, Metric]] = collections.deque()
        self._queue_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._failures = 0
        self._next_flush = 0.0
        self._dropped = 0

    @property
    def pending(self) -> int:
        """Metrics queued and not yet accepted by the store."""
        return len(self._pending)

    def add(self, run_id: str, metrics: dict[str, float], step: int) -> None:
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
                log.error("%s refused %d metrics of run %s, dropped: %s", self.store, len(metrics), run_id, err)
                if raise_on_error:
                    raise err
            else:
                self._on_success(sent)
        return self.pending

    def _on_transient(self, err: Exception, raise_on_error: bool) -> None:
        self._failures += 1
        delay = min(self.flush_interval_s * 2 ** (self._failures - 1), MAX_BACKOFF_S)
        self._next_flush = time.monotonic() + delay
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(
            level,
            "tracking store %s did not take metrics (%s); %d kept for replay, next try in %.0f s",
            self.store,
            err,
            self.pending,
            delay,
        )
        if raise_on_error:
            raise TrackingUnavailable(f"{self.store} did not accept metrics: {err}") from err

    def _on_success(self, sent: int) -> None:
        if self._failures:
            log.info("tracking store %s answers again; replayed %d queued metrics", self.store, sent)
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
            log.error("%d metrics could not be sent to %s before closing and are lost", self.pending, self.store)
        return self.pending
