"""The metric queue's rules with a scripted sender and a hand-driven clock, no MLflow store: what is sent, in which
order and batches, what a transient or a permanent failure does, and when the next attempt comes."""

from __future__ import annotations

import logging

import pytest
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

from workflows.tracking import TrackingUnavailable, buffer
from workflows.tracking.buffer import MAX_BACKOFF_S, MetricBuffer

STORE = "http://store.test:5000"
EPOCH_S = 1_700_000_000.0


class Clock:
    """Stands in for the buffer module's ``time``: time passes only through :meth:`sleep` or :meth:`advance`."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return EPOCH_S + self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Store:
    """A sender that answers from a script (``ok``, ``down`` or ``refuse``; ``ok`` once the script runs out) and
    records every batch offered and every metric accepted, as (run, key, value, step, timestamp)."""

    def __init__(self, *script: str) -> None:
        self.script = list(script)
        self.offered: list[list[tuple]] = []
        self.accepted: list[tuple] = []
        self.errors: list[Exception] = []

    def __call__(self, run_id: str, metrics: list) -> tuple[Exception | None, bool]:
        batch = [(run_id, m.key, m.value, m.step, m.timestamp) for m in metrics]
        self.offered.append(batch)
        answer = self.script.pop(0) if self.script else "ok"
        if answer == "ok":
            self.accepted += batch
            return None, False
        err = ConnectionError("connection refused") if answer == "down" else ValueError(f"run {run_id} is deleted")
        self.errors.append(err)
        return err, answer == "down"


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(buffer, "time", fake)
    return fake


def quiet(store: Store, **kwargs) -> MetricBuffer:
    """A buffer whose next automatic attempt is an interval away (an empty flush counts as an attempt)."""
    buf = MetricBuffer(store, STORE, **{"flush_interval_s": 1e9, **kwargs})
    assert buf.flush() == 0 and store.offered == []
    return buf


def ms(clock_s: float) -> int:
    return int((EPOCH_S + clock_s) * 1000)


def test_transient_failure_keeps_metrics_queued_and_the_next_flush_replays_them(clock: Clock, caplog) -> None:
    caplog.set_level(logging.INFO, logger=buffer.__name__)
    store = Store("ok", "down")
    buf = quiet(store)
    for step, run in enumerate(["a", "a", "b", "a"]):
        buf.add(run, {"loss": float(step)}, step)
        clock.advance(1.0)
    assert buf.flush() == 2  # run a's batch went, run b's failed: b and the a after it stay, in order
    assert store.accepted == [("a", "loss", 0.0, 0, ms(100)), ("a", "loss", 1.0, 1, ms(101))]
    assert "did not take metrics (connection refused); 2 kept for replay" in caplog.text
    clock.advance(600.0)  # replayed much later: still their own steps and times
    assert buf.flush() == 0
    assert store.offered[2:] == [[("b", "loss", 2.0, 2, ms(102))], [("a", "loss", 3.0, 3, ms(103))]]
    assert [m[3] for m in store.accepted] == [0, 1, 2, 3]
    assert "answers again; replayed 2 queued metrics" in caplog.text


def test_transient_failure_raises_tracking_unavailable_when_asked(clock: Clock) -> None:
    store = Store("down")
    buf = quiet(store)
    buf.add("a", {"loss": 1.0, "psnr": 20.0}, 5)
    with pytest.raises(TrackingUnavailable, match=f"{STORE} did not accept metrics: connection refused"):
        buf.flush(raise_on_error=True)
    assert buf.pending == 2
    assert buf.flush() == 0 and store.offered[0] == store.offered[1] == store.accepted


def test_permanent_error_drops_that_batch_and_sends_the_rest(clock: Clock, caplog) -> None:
    store = Store("refuse")
    buf = quiet(store)
    buf.add("gone", {"loss": 1.0, "psnr": 20.0}, 0)
    buf.add("live", {"loss": 2.0}, 0)
    assert buf.flush() == 0
    assert [[m[0] for m in batch] for batch in store.offered] == [["gone", "gone"], ["live"]]
    assert store.accepted == [("live", "loss", 2.0, 0, ms(100))]
    assert f"{STORE} refused 2 metrics of run gone, dropped: run gone is deleted" in caplog.text


def test_permanent_error_with_raise_drops_the_batch_and_keeps_the_rest_queued(clock: Clock) -> None:
    store = Store("refuse")
    buf = quiet(store)
    buf.add("gone", {"loss": 1.0}, 0)
    buf.add("live", {"loss": 2.0}, 0)
    with pytest.raises(ValueError, match="run gone is deleted") as raised:
        buf.flush(raise_on_error=True)
    assert raised.value is store.errors[0] and buf.pending == 1
    assert buf.flush() == 0 and store.accepted == [("live", "loss", 2.0, 0, ms(100))]


def test_backoff_doubles_per_transient_failure_up_to_the_cap_and_resets_on_success(clock: Clock, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=buffer.__name__)
    store = Store(*["down"] * 9)
    buf = MetricBuffer(store, STORE, flush_interval_s=1.0)
    buf.add("a", {"loss": 0.0}, 0)  # the first add sends at once, and fails
    expected = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, *[MAX_BACKOFF_S] * 3, 1.0]  # after 9 failures, then a success
    for step, delay in enumerate(expected, start=1):
        attempts = len(store.offered)
        clock.advance(delay - 0.01)
        buf.add("a", {"loss": float(step)}, step)
        assert len(store.offered) == attempts, f"attempt {step} came before its {delay} s delay"
        clock.advance(0.01)
        buf.add("a", {"loss": float(step)}, step)
        assert len(store.offered) == attempts + 1, f"no attempt {step} after its {delay} s delay"
    assert buf.pending == 0 and [m[3] for m in store.accepted][:3] == [0, 1, 1]
    waits = [r.getMessage().rsplit("next try in ", 1)[1] for r in caplog.records if "next try" in r.getMessage()]
    assert waits == ["1 s", "2 s", "4 s", "8 s", "16 s", "32 s", "60 s", "60 s", "60 s"]
    levels = [r.levelno for r in caplog.records if "next try" in r.getMessage()]
    assert levels == [logging.WARNING] + [logging.DEBUG] * 8  # one warning per outage


def test_batches_are_split_at_mlflows_maximum_and_never_mix_runs(clock: Clock) -> None:
    store = Store()
    buf = quiet(store)
    total = 2 * MAX_METRICS_PER_BATCH + 5
    buf.add("a", {f"m{i}": float(i) for i in range(total)}, 3)
    buf.add("b", {"loss": 1.0}, 3)
    buf.add("a", {"loss": 2.0}, 4)
    assert buf.flush() == 0
    sizes = [(batch[0][0], len(batch)) for batch in store.offered]
    assert sizes == [("a", MAX_METRICS_PER_BATCH), ("a", MAX_METRICS_PER_BATCH), ("a", 5), ("b", 1), ("a", 1)]
    assert [m[1] for m in store.accepted[:total]] == [f"m{i}" for i in range(total)]


def test_close_retries_with_backoff_until_the_queue_is_sent(clock: Clock) -> None:
    store = Store("down", "down")
    buf = quiet(store)
    buf.add("a", {"loss": 1.0}, 0)
    assert buf.close(timeout=30.0) == 0
    assert clock.slept == [0.5, 1.0] and len(store.offered) == 3
    assert store.accepted == [("a", "loss", 1.0, 0, ms(100))]


def test_close_gives_up_at_its_timeout_with_waits_capped_at_8_s(clock: Clock, caplog) -> None:
    store = Store(*["down"] * 100)
    buf = quiet(store)
    buf.add("a", {"loss": 1.0, "psnr": 2.0}, 0)
    assert buf.close(timeout=60.0) == 2
    assert clock.slept == [0.5, 1.0, 2.0, 4.0] + [8.0] * 6  # the next 8 s wait would end past the deadline
    assert len(store.offered) == 11 and store.accepted == []
    assert f"2 metrics could not be sent to {STORE} before closing and are lost" in caplog.text


def test_queue_bound_drops_the_oldest_metrics(clock: Clock, caplog) -> None:
    store = Store()
    buf = quiet(store, max_pending=3)
    for step in range(5):
        buf.add("a", {"loss": float(step)}, step)
    assert buf.pending == 3 and "metric queue over 3 entries: dropped the 1 oldest (2 in all)" in caplog.text
    assert buf.flush() == 0 and [m[3] for m in store.accepted] == [2, 3, 4]


def test_bad_metrics_fail_at_add_and_queue_nothing(clock: Clock) -> None:
    buf = quiet(Store())
    with pytest.raises(ValueError, match="invalid metric name 'bad/../x'"):
        buf.add("a", {"ok": 1.0, "bad/../x": 2.0}, 0)
    with pytest.raises(ValueError, match="metric 'loss' has a non-numeric value 'high'"):
        buf.add("a", {"ok": 1.0, "loss": "high"}, 0)
    assert buf.pending == 0
