"""Riding out catalog and object store outages: retries with backoff, queued job events."""

from __future__ import annotations

import pytest

from storage.errors import CatalogUnavailable, ObjectStoreUnavailable
from storage.retry import backoff_delays, with_retries
from workers.training.events import EventSink


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


class Catalog:
    """Writes events unless down; records them in order."""

    def __init__(self) -> None:
        self.down = False
        self.rows: list[tuple[str, dict]] = []
        self.attempts = 0

    def write(self, kind: str, data: dict) -> None:
        self.attempts += 1
        if self.down:
            raise CatalogUnavailable("connection refused")
        self.rows.append((kind, data))


def test_with_retries_rides_out_an_outage_and_gives_up_at_the_deadline():
    t = FakeTime()
    calls = []

    def flaky() -> str:
        calls.append(t.now)
        if t.now < 10:
            raise ObjectStoreUnavailable("down")
        return "ok"

    got = with_retries(flaky, retry_on=(ObjectStoreUnavailable,), deadline_s=60, what="x",
                       clock=t.clock, sleep=t.sleep)  # fmt: skip
    assert got == "ok" and t.now >= 10 and len(calls) >= 3
    assert t.slept == sorted(t.slept) and max(t.slept) <= 5.0  # growing, capped backoff
    t2 = FakeTime()
    with pytest.raises(ObjectStoreUnavailable):
        with_retries(lambda: (_ for _ in ()).throw(ObjectStoreUnavailable("down")),
                     retry_on=(ObjectStoreUnavailable,), deadline_s=20, what="x",
                     clock=t2.clock, sleep=t2.sleep)  # fmt: skip
    assert t2.now <= 20
    with pytest.raises(ValueError):  # not an outage: no retry
        with_retries(lambda: int("x"), retry_on=(ObjectStoreUnavailable,), deadline_s=20,
                     what="x", clock=t2.clock, sleep=t2.sleep)  # fmt: skip
    assert backoff_delays(1, 2, 5)(0) == 1 and backoff_delays(1, 2, 5)(10) == 5


def test_events_queue_through_a_catalog_outage_in_order():
    t, db = FakeTime(), Catalog()
    sink = EventSink(db.write, clock=t.clock, sleep=t.sleep)
    sink.emit("metrics", {"step": 1})
    db.down = True
    for step in range(2, 8):
        sink.emit("metrics", {"step": step})
        t.now += 0.1  # a training step
    assert [d["step"] for _, d in db.rows] == [1]
    assert db.attempts < 1 + 6  # backoff: not one failed attempt per step
    db.down = False
    t.now += 30
    sink.emit("checkpoint", {"step": 8})
    assert [d["step"] for _, d in db.rows] == list(range(1, 9))  # all, once, in order
    assert not sink.pending


def test_close_writes_what_is_left_or_says_the_catalog_stayed_down():
    t, db = FakeTime(), Catalog()
    sink = EventSink(db.write, close_deadline_s=60, clock=t.clock, sleep=t.sleep)
    db.down = True
    sink.emit("metrics", {"step": 1})
    real_sleep = t.sleep

    def recover_later(s: float) -> None:
        real_sleep(s)
        db.down = t.now < 12

    sink.sleep = recover_later
    sink.close()
    assert db.rows == [("metrics", {"step": 1})] and t.now >= 12
    t2, db2 = FakeTime(), Catalog()
    sink2 = EventSink(db2.write, close_deadline_s=30, clock=t2.clock, sleep=t2.sleep)
    db2.down = True
    sink2.emit("metrics", {"step": 1})
    with pytest.raises(CatalogUnavailable):
        sink2.close()


def test_a_very_long_outage_keeps_the_newest_events():
    t, db = FakeTime(), Catalog()
    sink = EventSink(db.write, max_pending=3, clock=t.clock, sleep=t.sleep)
    db.down = True
    for step in range(6):
        sink.emit("metrics", {"step": step})
    db.down = False
    t.now += 60
    sink.close()
    assert [d["step"] for _, d in db.rows] == [3, 4, 5] and sink.dropped == 3
