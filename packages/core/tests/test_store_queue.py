"""The store's queue methods for engines that run particular items: claiming named keys, renewing a lease
inside the holder's own transaction, bringing a waiting item forward; and ``retry_infrastructure`` with an
engine's own budget of retries."""

from __future__ import annotations

import sqlite3
from typing import Any, Iterator

import pytest
from errands.core import FakeClock, LeaseLostError, is_infrastructure_error, open_store
from errands.core.runtime import retry_infrastructure
from errands.core.testing import faults


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Any]:
    url = (f"sqlite:///{tmp_path / 'queue.db'}" if request.param == "sqlite"
           else str(request.getfixturevalue("postgres_url")))
    s = open_store(url, clock=FakeClock())
    yield s
    s.close()


def test_a_claim_of_named_keys_commits_with_the_callers_writes(store: Any) -> None:
    with store.transaction() as tx:
        store.enqueue("q", [("new", None)], tx=tx)
        (lease,) = store.claim_keys("q", ["new"], lease_for=10, tx=tx)
    assert store.claim("q", 10) == []  # held from the moment it was enqueued
    store.complete([lease])
    with pytest.raises(RuntimeError), store.transaction() as tx:
        store.enqueue("q", [("gone", None)], tx=tx)
        assert store.claim_keys("q", ["gone"], tx=tx)
        raise RuntimeError("the caller's transaction fails")
    assert store.queue_size("q") == 0


def test_a_stale_extend_inside_a_transaction_rolls_back_with_it(store: Any) -> None:
    clock: FakeClock = store.clock
    store.enqueue("q", [("a", 1), ("b", 2)])
    old = {x.key: x for x in store.claim("q", 10, lease_for=5)}
    clock.advance(6)
    new = store.claim_keys("q", ["b"], lease_for=5)
    with pytest.raises(LeaseLostError), store.transaction() as tx:
        store.extend([old["a"], old["b"]], lease_for=60, tx=tx)
    clock.advance(1)
    # a's extension rolled back with b's refusal: a lapsed as before and is claimable
    assert [x.key for x in store.claim("q", 10)] == ["a"]
    store.complete(new)


def test_bring_forward_lets_the_caller_wake_an_item_in_its_transaction(store: Any) -> None:
    clock: FakeClock = store.clock
    store.enqueue("q", [("timer", None, clock.now() + 3600)])
    with store.transaction() as tx:
        assert store.bring_forward("q", "timer", clock.now(), tx=tx)
    assert [x.key for x in store.claim("q", 10)] == ["timer"]


def test_retry_infrastructure_takes_an_engines_own_delays() -> None:
    clock = FakeClock()
    calls: list[int] = []

    def locked(attempt: int) -> None:
        calls.append(attempt)
        raise sqlite3.OperationalError("database is locked")

    start = clock.now()
    with pytest.raises(sqlite3.OperationalError):
        retry_infrastructure(locked, clock=clock, what="a write", delays=(0.02, 0.08))
    assert calls == [0, 1, 2] and clock.now() == pytest.approx(start + 0.1)
    calls.clear()
    with pytest.raises(sqlite3.OperationalError):
        retry_infrastructure(locked, clock=clock, what="a write", delays=(0.02, 0.08), keep_going=lambda: False)
    assert calls == [0]
    assert retry_infrastructure(lambda attempt: attempt, clock=clock, what="a write", delays=()) == 0


def test_claim_keys_under_a_fault_claims_nothing(store: Any) -> None:
    store.enqueue("q", [("a", None)])
    plan = faults.FaultPlan(rate=1.0, match=r"^UPDATE em_queue SET lease_owner", limit=1, when=("before",))
    with faults.inject(store, plan), pytest.raises(Exception) as err:
        store.claim_keys("q", ["a"])
    assert plan.injected and is_infrastructure_error(err.value)
    assert [x.key for x in store.claim_keys("q", ["a"])] == ["a"]
