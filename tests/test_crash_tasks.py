"""Crash tests of the task engine on PostgreSQL: worker processes run tasks while the database drops their
connections (``pg_terminate_backend``), and while they are SIGKILLed and restarted.

Run as a script, this file is the worker: ``python test_crash_tasks.py <store url> <ledger path>``. Every
handler invocation writes a row to a SQLite ledger of its own (the task, its attempt, the process, when it
started and ended), so the test can see from outside what ran, where, and when.

What must hold: 0 lost (every task finishes), 0 stuck (within the test's deadline), 0 failed by a fault
(only the tasks planned to fail are FAILED, with their handler's own error), and 0 performed twice beyond
semantics: tasks are at least once, so a task may run again after its run was lost, but it never runs
twice at once, never after it finished, and the ``single`` type (``max_concurrency=1``) never runs two at
once across the workers.
"""

from __future__ import annotations

import itertools
import os
import random
import sqlite3
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

TASKS = 600
SINGLE = 60
LEASE_FOR = 2.0
WORKERS = 2


def plan_of(n: int) -> str:
    """What task ``n`` does: most succeed, some fail once first, a few fail for good."""
    if n % 17 == 0:
        return "fail"
    if n % 5 == 0:
        return "flaky"
    return "ok"


def run_worker(url: str, ledger: str) -> None:
    from errands.core import PermanentError, TaskEngine, TransientError, Worker, open_store

    local = threading.local()

    def db() -> sqlite3.Connection:
        conn = getattr(local, "db", None)
        if conn is None:
            conn = sqlite3.connect(ledger, timeout=60, isolation_level=None)
            conn.execute("PRAGMA busy_timeout = 60000")
            local.db = conn
        return conn

    def handle(params: Any, ctx: Any) -> str:
        row = db().execute("INSERT INTO runs (task, attempt, pid, started) VALUES (?, ?, ?, ?) RETURNING id",
                           (ctx.id, ctx.attempt, os.getpid(), time.time())).fetchone()
        time.sleep(params["ms"] / 1000)
        plan = params["plan"]
        ok = plan == "ok" or (plan == "flaky" and ctx.attempt > 1)
        db().execute("UPDATE runs SET ended = ?, ok = ? WHERE id = ?", (time.time(), int(ok), row[0]))
        if plan == "fail":
            raise PermanentError(f"planned failure of task {params['n']}")
        if not ok:
            raise TransientError(f"planned retry of task {params['n']}", retry_after=0)
        return f"done {params['n']}"

    store = open_store(url)
    engine = TaskEngine(store, concurrency=4, lease_for=LEASE_FOR, retry_base=0.01, retry_cap=0.05)
    engine.register("work", handle)
    engine.register("single", handle, max_concurrency=1)
    worker = Worker(store, jobs=[engine.run_once], poll_interval=0.005)
    print("ready", flush=True)
    worker.run()
    engine.close()
    store.close()


def submit_all(store: Any) -> dict[str, int]:
    from errands.core import TaskEngine

    engine = TaskEngine(store)
    ids = {}
    for n in range(TASKS):
        task_id = str(uuid.UUID(int=n + 1))
        engine.submit("single" if n < SINGLE else "work", {"n": n, "plan": plan_of(n), "ms": 10 if n < SINGLE else 4},
                      id=task_id)
        ids[task_id] = n
    return ids


def retrying(fn: Any, *args: Any) -> Any:
    """Call ``fn`` from the test's side, whose own connections are dropped too."""
    from errands.core import is_infrastructure_error

    for _ in range(50):
        try:
            return fn(*args)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            time.sleep(0.05)
    return fn(*args)


def final_rows(store: Any) -> dict[str, tuple[Any, ...]]:
    with store.read() as tx:
        return {r[0]: tuple(r[1:]) for r in tx.query(
            "SELECT id, status, error, finished_at, owner, lease_expires FROM em_tasks")}


Outcome = tuple[dict[str, int], dict[str, tuple[Any, ...]], list[tuple[Any, ...]], int, set[int]]


def run_under_faults(tmp_path: Path, url: str, *, kills: int) -> Outcome:
    from errands.core import open_store
    from errands.core.testing import faults

    ledger = tmp_path / "ledger.db"
    db = sqlite3.connect(ledger, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, task TEXT NOT NULL, attempt INTEGER NOT NULL, "
               "pid INTEGER NOT NULL, started REAL NOT NULL, ended REAL, ok INTEGER)")
    store = open_store(url)
    ids = submit_all(store)
    workers = [faults.python_worker(__file__, url, str(ledger)) for _ in range(WORKERS)]
    rng = random.Random(int(os.environ.get("ERRANDS_CRASH_SEED", "0")) or None)
    drops = 0
    killed: set[int] = set()
    try:
        for w in workers:
            w.start()
        deadline = time.monotonic() + 45
        kill_every = max(1, 30 // max(kills, 1))
        rounds = 0
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.03, 0.12))
            drops += faults.terminate_postgres_connections(url)
            rounds += 1
            if kills and rounds % kill_every == 0 and len(killed) < kills:
                victim = rng.choice(workers)
                assert victim.proc is not None
                killed.add(victim.proc.pid)
                victim.restart()
            rows = retrying(final_rows, store)
            if all(r[0] in ("SUCCEEDED", "FAILED", "DEAD") for r in rows.values()) and len(rows) == TASKS:
                break
    finally:
        for w in workers:
            w.stop()
    rows = retrying(final_rows, store)
    runs = db.execute("SELECT task, attempt, pid, started, ended, ok FROM runs ORDER BY started").fetchall()
    db.close()
    store.close()
    return ids, rows, runs, drops, killed


def check(ids: dict[str, int], rows: dict[str, tuple[Any, ...]], runs: list[tuple[Any, ...]],
          killed: set[int]) -> None:
    # 0 lost, 0 stuck: every task is there, finished, and holds no lease.
    assert set(rows) == set(ids)
    stuck = {t: r for t, r in rows.items() if r[0] not in ("SUCCEEDED", "FAILED", "DEAD")}
    assert not stuck, f"{len(stuck)} task(s) stuck: {list(stuck.items())[:3]}"
    assert all(r[3] is None and r[4] is None for r in rows.values()), "a finished task still holds a lease"
    # 0 failed by a fault: only the planned failures failed, with their handler's error.
    for task_id, (status, error, *_rest) in rows.items():
        n = ids[task_id]
        if plan_of(n) == "fail":
            assert (status, error) == ("FAILED", f"PermanentError: planned failure of task {n}"), (n, status, error)
        else:
            assert status == "SUCCEEDED", (n, status, error)
    # 0 performed twice beyond semantics.
    by_task: dict[str, list[tuple[Any, ...]]] = {}
    for run in runs:
        by_task.setdefault(run[0], []).append(run)
    assert set(by_task) == set(ids), "a task finished without its handler having run"
    for task_id, task_runs in by_task.items():
        finished_at = rows[task_id][2]
        for _t, _a, _pid, started, _e, _ok in task_runs:
            assert started <= finished_at, f"task {ids[task_id]} ran again after it finished"
        assert_no_overlap(task_runs, killed, f"task {ids[task_id]}")
    single = [run for run in runs if ids[run[0]] < SINGLE]
    assert_no_overlap(single, killed, "the max_concurrency=1 type")


def assert_no_overlap(runs: list[tuple[Any, ...]], killed: set[int], what: str) -> None:
    """No two runs overlap in time, except the unfinished run of a killed process, whose lease had to lapse."""
    spans = sorted((started, ended, pid) for _t, _a, pid, started, ended, _ok in runs
                   if not (ended is None and pid in killed))
    for _s, ended, pid in spans:
        assert ended is not None, f"{what}: a run of live process {pid} never ended"
    for (_s1, e1, p1), (s2, _e2, p2) in itertools.pairwise(spans):
        assert s2 >= e1, f"{what}: two runs at once (pids {p1} and {p2})"


@pytest.mark.crash
@pytest.mark.services
def test_tasks_survive_dropped_postgres_connections(tmp_path: Path, postgres_url: str) -> None:
    ids, rows, runs, drops, killed = run_under_faults(tmp_path, postgres_url, kills=0)
    assert drops > 0 and not killed
    check(ids, rows, runs, killed)


@pytest.mark.crash
@pytest.mark.services
def test_tasks_survive_dropped_connections_and_sigkill(tmp_path: Path, postgres_url: str) -> None:
    ids, rows, runs, drops, killed = run_under_faults(tmp_path, postgres_url, kills=4)
    assert drops > 0 and killed
    check(ids, rows, runs, killed)


if __name__ == "__main__":
    run_worker(sys.argv[1], sys.argv[2])
