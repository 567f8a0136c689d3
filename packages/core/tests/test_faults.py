"""The fault kit and the lease heartbeat: faults are the database's own errors, injected where asked, and
classified as infrastructure; a heartbeat keeps a lease while code runs and reports it lost."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from errands.core import (
    DEFAULT_LEASE_FOR,
    InfrastructureError,
    LeaseLostError,
    SQLiteStore,
    heartbeat,
    is_infrastructure_error,
    open_store,
)
from errands.core.testing import faults


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    else:
        s = open_store(request.getfixturevalue("postgres_url"))
    yield s
    s.close()


def _count(store: Any) -> int:
    with store.read() as tx:
        row = tx.one("SELECT COUNT(*) FROM em_kv WHERE namespace = 'faults'")
    assert row is not None
    return int(row[0])


def _put(store: Any, key: str) -> None:
    with store.transaction() as tx:
        tx.execute("INSERT INTO em_kv (namespace, key, value, updated_at) VALUES ('faults', ?, 'v', 0)", (key,))


@pytest.mark.parametrize("kind", faults.KINDS)
def test_a_fault_before_a_statement_changes_nothing_and_is_infrastructure(store: Any, kind: str) -> None:
    plan = faults.FaultPlan(match="INSERT INTO em_kv", rate=1.0, kinds=(kind,), limit=1)
    with faults.inject(store, plan):
        with pytest.raises(Exception) as info:
            _put(store, "a")
        assert is_infrastructure_error(info.value), repr(info.value)
        _put(store, "b")  # the limit is spent: the store works again, a dropped connection replaced
    assert [i.fault.kind for i in plan.injected] == [kind]
    assert _count(store) == 1


def test_a_fault_at_commit_rolls_back(store: Any) -> None:
    plan = faults.FaultPlan(at=[1], faults=[faults.Fault(kind="serialization", when="commit")])
    with faults.inject(store, plan), pytest.raises(Exception) as info:
        _put(store, "a")
    assert is_infrastructure_error(info.value)
    assert _count(store) == 0


def test_a_fault_after_commit_keeps_the_write_but_reports_an_error(store: Any) -> None:
    plan = faults.FaultPlan(at=[1], faults=[faults.Fault(kind="dropped", when="after_commit")])
    with faults.inject(store, plan), pytest.raises(Exception) as info:
        _put(store, "a")
    assert is_infrastructure_error(info.value)
    assert _count(store) == 1


def test_paused_plans_inject_nothing_and_the_store_is_restored(store: Any) -> None:
    plan = faults.FaultPlan(rate=1.0)
    with faults.inject(store, plan):
        with plan.paused():
            _put(store, "a")
        assert plan.injected == []
    _put(store, "b")
    assert _count(store) == 2
    assert "transaction" not in vars(store)


def test_random_plans_are_reproducible(tmp_path: Path) -> None:
    def run(seed: int) -> list[int]:
        s = open_store(f"sqlite:///{tmp_path / f'r{seed}-{time.monotonic_ns()}.db'}")
        plan = faults.FaultPlan(seed=seed, rate=0.3)
        with faults.inject(s, plan):
            for i in range(30):
                try:
                    _put(s, str(i))
                except sqlite3.OperationalError:
                    pass
        s.close()
        return [i.index for i in plan.injected]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="fault kind must be one of"):
        faults.FaultPlan(kinds=("flood",))
    with pytest.raises(ValueError, match="rate must be between 0 and 1"):
        faults.FaultPlan(rate=2)
    with pytest.raises(ValueError, match="fault when must be one of"):
        faults.Fault(when="later")


def test_a_second_writer_holding_the_lock_is_a_locked_database(tmp_path: Path) -> None:
    store = SQLiteStore(f"sqlite:///{tmp_path / 'l.db'}?busy_timeout=50")
    with faults.sqlite_write_lock(store), pytest.raises(sqlite3.OperationalError) as info:
        _put(store, "a")
    assert is_infrastructure_error(info.value)
    _put(store, "a")
    store.close()


@pytest.mark.services
def test_terminated_postgres_connections_are_infrastructure(postgres_url: str) -> None:
    import psycopg

    conn = psycopg.connect(postgres_url, autocommit=True)
    assert faults.terminate_postgres_connections(postgres_url) >= 1
    with pytest.raises(psycopg.Error) as info:
        conn.execute("SELECT 1")
    assert is_infrastructure_error(info.value)
    conn.close()


def test_user_errors_are_not_infrastructure() -> None:
    assert not is_infrastructure_error(ValueError("bad input"))
    assert not is_infrastructure_error(sqlite3.OperationalError("no such table: orders"))
    assert not is_infrastructure_error(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert is_infrastructure_error(InfrastructureError("store unavailable"))


def test_jump_clock_moves_only_forward() -> None:
    clock = faults.JumpClock()
    before = clock.now()
    assert clock.jump(3600) >= before + 3600
    with pytest.raises(ValueError):
        clock.jump(-1)


def test_heartbeat_renews_until_stopped() -> None:
    renewals: list[float] = []
    with heartbeat(lambda: renewals.append(time.monotonic()) or True, lease_for=0.15, what="w") as beat:
        time.sleep(0.4)
    n = len(renewals)
    assert n >= 4
    assert not beat.lost
    time.sleep(0.2)
    assert len(renewals) == n  # stopped


def test_heartbeat_reports_a_lost_lease_and_survives_renewal_errors() -> None:
    calls = {"n": 0}

    def renew() -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database is locked")
        return calls["n"] < 3

    with heartbeat(renew, lease_for=0.06, what="task t-1") as beat:
        assert beat.wait_lost(timeout=2.0)
        with pytest.raises(LeaseLostError, match="task t-1"):
            beat.check()
    assert calls["n"] == 3


def test_many_heartbeats_share_one_thread() -> None:
    before = threading.active_count()
    beats = [heartbeat(lambda: True, lease_for=0.3, what=str(i)) for i in range(50)]
    time.sleep(0.25)
    assert threading.active_count() - before <= 5
    for b in beats:
        b.stop()


def test_stopped_heartbeats_are_not_held_until_their_time() -> None:
    """A worker running thousands of quick tasks a second takes and stops a beat for each: the scheduler
    drops the stopped ones as it grows, so it holds about the beats of the work running, not every beat of the
    last ``lease_for / 3`` seconds (which piled up as garbage the collector kept walking)."""
    from errands.core import _leases

    running = [heartbeat(lambda: True, lease_for=30.0, what=f"long {i}") for i in range(20)]
    for i in range(20_000):
        heartbeat(lambda: True, lease_for=30.0, what=f"quick {i}").stop()
    held = len(_leases._HEARTBEATS)
    assert held <= 2 * _leases._COMPACT_ABOVE + len(running), held
    assert not any(b.lost for b in running)
    for b in running:
        b.stop()


def test_a_beat_waited_on_from_two_threads_wakes_both_once_lost() -> None:
    lost = threading.Event()
    beat = heartbeat(lambda: not lost.is_set(), lease_for=0.06, what="task t-2")
    woke: list[bool] = []
    waiters = [threading.Thread(target=lambda: woke.append(beat.wait_lost(timeout=5.0))) for _ in range(2)]
    for w in waiters:
        w.start()
    assert not beat.wait_lost(timeout=0.01)
    lost.set()
    for w in waiters:
        w.join(6.0)
    assert woke == [True, True] and beat.lost
    assert beat.wait_lost(timeout=0)
    beat.stop()


def test_default_lease_is_short() -> None:
    assert DEFAULT_LEASE_FOR == 10.0


def test_worker_process_is_killed_and_restarted(tmp_path: Path) -> None:
    script = tmp_path / "w.py"
    script.write_text("import time\nprint('ready', flush=True)\ntime.sleep(60)\n")
    worker = faults.python_worker(script)
    with worker:
        first = worker.proc.pid if worker.proc else None
        worker.restart()
        assert worker.alive and worker.proc is not None and worker.proc.pid != first
    assert not worker.alive
    assert worker.kills == 2


def test_retry_through_faults_retries_only_infrastructure_errors() -> None:
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert faults.retry_through_faults(flaky, pause=0) == "ok" and calls["n"] == 3
    with pytest.raises(ValueError):
        faults.retry_through_faults(lambda: int("x"), pause=0)

    def locked() -> None:
        calls["n"] += 1
        raise sqlite3.OperationalError("database is locked")

    calls["n"] = 0
    with pytest.raises(sqlite3.OperationalError):
        faults.retry_through_faults(locked, attempts=2, pause=0)
    assert calls["n"] == 2
