"""``StoreScheduler.fire_due`` with ``transaction``: timers fired in groups, each group's handler writes and
timer acknowledgements in one transaction; a failed group records nothing and fires again; a slow group on
SQLite's one writer neither deadlocks with the heartbeat nor fires a timer twice. Also: timers of a topic
without a handler here are released at once, and expected failures are logged without a traceback."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
from errands.core import FakeClock, StoreScheduler, TransientError, open_store
from errands.core.store import SQLStore, Tx
from errands.core.testing import faults


class Groups:
    """A ``transaction`` for ``fire_due`` that records each group's payloads and hands its ``Tx`` to the
    handler, which writes one key-value row per timer in it."""

    def __init__(self, store: SQLStore) -> None:
        self.store = store
        self.groups: list[list[Any]] = []
        self.tx: Tx | None = None

    @contextlib.contextmanager
    def transaction(self, payloads: Sequence[Any]) -> Iterator[Tx]:
        self.groups.append(list(payloads))
        with self.store.transaction() as tx:
            self.tx = tx
            try:
                yield tx
            finally:
                self.tx = None

    def write(self, _topic: str, payload: Any) -> None:
        assert self.tx is not None, "the handler runs inside its group's transaction"
        self.store.kv_put("fired", str(payload), payload, tx=self.tx)

    def written(self) -> list[Any]:
        return sorted(v for v in (self.store.kv_get("fired", str(n)) for n in range(100)) if v is not None)


@pytest.fixture
def store(clock: FakeClock) -> Iterator[SQLStore]:
    s = open_store("memory://", clock=clock)
    yield s
    s.close()


def _schedule(scheduler: StoreScheduler, n: int, topic: str = "t") -> None:
    for i in range(n):
        scheduler.schedule(topic, i, at=0, key=f"k{i}")


def test_groups_commit_handler_writes_and_acknowledgements_together(store: SQLStore) -> None:
    scheduler = StoreScheduler(store)
    groups = Groups(store)
    _schedule(scheduler, 7)
    assert scheduler.fire_due({"t": groups.write}, group=3, transaction=groups.transaction) == 7
    assert [len(g) for g in groups.groups] == [3, 3, 1]
    assert sorted(p for g in groups.groups for p in g) == list(range(7))
    assert [v for v, _ in groups.written()] == list(range(7))
    assert scheduler.pending() == 0


def test_a_failing_handler_in_a_group_fires_again_and_the_rest_commit(store: SQLStore, clock: FakeClock) -> None:
    scheduler = StoreScheduler(store, retry_delay=5)
    groups = Groups(store)
    calls: list[Any] = []

    def handler(topic: str, payload: Any) -> None:
        calls.append(payload)
        if payload == 1 and calls.count(1) == 1:
            raise ValueError("one breaks once")
        if payload == 2 and calls.count(2) == 1:
            raise TransientError("two waits")
        groups.write(topic, payload)

    _schedule(scheduler, 4)
    assert scheduler.fire_due({"t": handler}, group=10, transaction=groups.transaction) == 2
    assert scheduler.pending() == 2
    assert scheduler.fire_due({"t": handler}, group=10, transaction=groups.transaction) == 0  # not due yet
    clock.advance(5)
    assert scheduler.fire_due({"t": handler}, group=10, transaction=groups.transaction) == 2
    assert [v for v, _ in groups.written()] == [0, 1, 2, 3] and scheduler.pending() == 0


def test_a_store_fault_in_a_handler_abandons_its_group_and_nothing_of_it_is_recorded(
    store: SQLStore, clock: FakeClock
) -> None:
    scheduler = StoreScheduler(store, retry_delay=5)
    groups = Groups(store)
    faulted: list[int] = []

    def handler(topic: str, payload: Any) -> None:
        groups.write(topic, payload)
        if payload == 1 and not faulted:
            faulted.append(payload)
            raise faults.fault_error(faults.Fault(kind="locked"), "sqlite")

    _schedule(scheduler, 4)
    assert scheduler.fire_due({"t": handler}, group=2, transaction=groups.transaction) == 2
    assert [v for v, _ in groups.written()] == [2, 3]  # the first group's writes were rolled back
    assert scheduler.pending() == 2
    clock.advance(5)
    assert scheduler.fire_due({"t": handler}, group=2, transaction=groups.transaction) == 2
    assert [v for v, _ in groups.written()] == [0, 1, 2, 3] and scheduler.pending() == 0


def test_a_group_whose_commit_fails_fires_again(tmp_path: Path) -> None:
    clock = faults.JumpClock()
    store = open_store(f"sqlite:///{tmp_path / 'timers.db'}", clock=clock)
    plan = faults.FaultPlan(match="DELETE FROM em_queue", rate=1.0, kinds=("locked",), when=("commit",), limit=1)
    with faults.inject(store, plan):
        scheduler = StoreScheduler(store, retry_delay=1.0)
        groups = Groups(store)
        with plan.paused():
            _schedule(scheduler, 3)
        assert scheduler.fire_due({"t": groups.write}, group=10, transaction=groups.transaction) == 0
        assert plan.injected
        assert groups.written() == [] and scheduler.pending() == 3
        clock.jump(1.0)
        assert scheduler.fire_due({"t": groups.write}, group=10, transaction=groups.transaction) == 3
    assert [v for v, _ in groups.written()] == [0, 1, 2] and scheduler.pending() == 0
    store.close()


def test_a_slow_group_on_sqlite_neither_deadlocks_nor_fires_a_timer_twice(tmp_path: Path) -> None:
    # The group's transaction holds SQLite's one writer while its handlers run, so the heartbeat's renewal
    # waits for it (holding the batch's lock) and cannot keep the leases meanwhile: fire_due must not
    # deadlock, must not fire a timer whose lease may have lapsed, and leaves those to the next claim.
    lease = 0.6
    url = f"sqlite:///{tmp_path / 'timers.db'}"
    store, other_store = open_store(url), open_store(url)
    first = StoreScheduler(store, lease_for=lease)
    second = StoreScheduler(other_store, lease_for=lease)
    groups = Groups(store)
    _schedule(first, 4)
    fired: list[Any] = []

    def slow(topic: str, payload: Any) -> None:
        fired.append(payload)
        if payload == 0:
            time.sleep(2 * lease)  # the heartbeat beats meanwhile, and waits for the group's commit
        groups.write(topic, payload)

    out: list[int] = []
    thread = threading.Thread(target=lambda: out.append(first.fire_due({"t": slow}, group=2,
                                                                       transaction=groups.transaction)))
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "fire_due deadlocked"
    assert out and out[0] >= 1
    # What the first worker left behind lapses: a renewal the heartbeat had waiting for the group's commit may
    # land just after fire_due returned, so the leases can last up to lease_for past that.
    time.sleep(3 * lease)
    second_groups = Groups(other_store)

    def quick(topic: str, payload: Any) -> None:
        fired.append(payload)
        second_groups.write(topic, payload)

    second.fire_due({"t": quick}, group=2, transaction=second_groups.transaction)
    assert sorted(fired) == [0, 1, 2, 3], "a timer fired twice, or not at all"
    assert first.pending() == 0
    store.close()
    other_store.close()


def test_timers_of_a_topic_without_a_handler_here_are_released_at_once(store: SQLStore) -> None:
    scheduler = StoreScheduler(store, retry_delay=60)
    scheduler.schedule("theirs", {"x": 1}, at=0, key="theirs")
    assert scheduler.fire_due({"mine": lambda _t, _p: None}) == 0
    fired: list[Any] = []
    assert scheduler.fire_due({"theirs": lambda _t, p: fired.append(p)}) == 1  # no retry_delay to wait out
    assert fired == [{"x": 1}]


def test_a_transient_error_or_a_store_fault_is_logged_without_a_traceback(
    store: SQLStore, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = StoreScheduler(store)
    scheduler.schedule("t", 1, at=0, key="a")
    scheduler.schedule("t", 2, at=0, key="b")

    def handler(_topic: str, payload: Any) -> None:
        if payload == 1:
            raise TransientError("later")
        raise faults.fault_error(faults.Fault(kind="dropped"), "sqlite")

    with caplog.at_level(logging.INFO, logger="errands.scheduler"):
        assert scheduler.fire_due({"t": handler}) == 0
    records = [r for r in caplog.records if r.name == "errands.scheduler"]
    assert len(records) == 2 and not any(r.exc_info for r in records)
    assert scheduler.pending() == 2
