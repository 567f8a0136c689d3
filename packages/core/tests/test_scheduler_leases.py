"""The store scheduler's timer leases: the default lease is the shared one, a heartbeat keeps the leases of
a claimed batch while slow handlers run, and a store fault while completing fired timers is retried instead
of firing them again."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from errands.core import DEFAULT_LEASE_FOR, StoreScheduler, open_store
from errands.core.testing import faults

LEASE = 0.9


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def test_the_default_timer_lease_is_the_shared_one() -> None:
    store = open_store("memory://")
    assert StoreScheduler(store).lease_for == DEFAULT_LEASE_FOR
    store.close()


def test_a_slow_timer_handler_keeps_its_lease(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'timers.db'}"
    store, other_store = open_store(url), open_store(url)
    first = StoreScheduler(store, lease_for=LEASE)
    second = StoreScheduler(other_store, lease_for=LEASE)
    first.schedule("t", {"n": 1}, at=0, key="t1")
    fired: list[str] = []
    entered, gate = threading.Event(), threading.Event()

    def slow(_topic: str, _payload: Any) -> None:
        fired.append("first")
        entered.set()
        assert gate.wait(30)

    thread, out = _in_thread(lambda: first.fire_due({"t": slow}))
    assert entered.wait(10)
    time.sleep(3 * LEASE)  # three leases' worth of wall time: the heartbeat must carry it
    assert second.fire_due({"t": lambda _t, _p: fired.append("second")}) == 0
    gate.set()
    thread.join(10)
    assert out == [1] and fired == ["first"]
    assert first.pending() == 0
    store.close()
    other_store.close()


def test_a_fault_while_completing_timers_does_not_fire_them_again(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'timers.db'}")
    plan = faults.FaultPlan(match="DELETE FROM em_queue", rate=1.0, kinds=("locked",), limit=1)
    fired: list[Any] = []
    with faults.inject(store, plan):
        scheduler = StoreScheduler(store)
        with plan.paused():
            scheduler.schedule("t", 1, at=0, key="a")
            scheduler.schedule("t", 2, at=0, key="b")
        assert scheduler.fire_due({"t": lambda _t, p: fired.append(p)}) == 2
    assert len(plan.injected) == 1
    assert sorted(fired) == [1, 2]
    assert scheduler.pending() == 0
    store.close()
