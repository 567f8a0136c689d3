"""Operator control of tasks, on SQLite and PostgreSQL: cancel, time limits, shutdown, priority, retention and
periodic tasks."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from errands.core import ConfigError, FakeClock, NotFoundError, TaskContext, TaskEngine, TaskStatus, open_store
from errands.core._tasks import PURGE_BATCH, tick_id

START = datetime(2030, 1, 1, 0, 0, 30, tzinfo=timezone.utc).timestamp()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def url(request: Any, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def stores(url: str, clock: FakeClock) -> Iterator[Callable[[], Any]]:
    """Open stores on one database and one clock (each worker its own store, as separate processes would)."""
    opened: list[Any] = []

    def make() -> Any:
        s = open_store(url, clock=clock)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def until(predicate: Callable[[], bool], *engines: TaskEngine, timeout: float = 15.0) -> None:
    """Run passes of ``engines`` until ``predicate()`` holds (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the condition never held"
        for e in engines:
            e.run_once()
        time.sleep(0.01)


def status(engine: TaskEngine, task_id: str) -> TaskStatus:
    rec = engine.get(task_id)
    assert rec is not None
    return rec.status


# -- cancel -------------------------------------------------------------------------------------

def test_a_pending_task_is_cancelled_at_once(stores: Callable[[], Any]) -> None:
    engine = TaskEngine(stores(), handlers={"t": lambda p: p})
    task_id = engine.submit("t", {}, delay=60)
    assert engine.cancel(task_id) is True
    rec = engine.get(task_id)
    assert rec is not None and rec.status is TaskStatus.CANCELLED and rec.finished_at is not None
    assert engine.cancel(task_id) is False  # ended already: nothing changes
    engine.run_once()
    assert engine.get(task_id).attempts == 0  # type: ignore[union-attr]
    with pytest.raises(NotFoundError):
        engine.cancel(str(uuid.uuid4()))
    engine.close()


def test_cancel_ends_a_running_sync_task_cooperatively(stores: Callable[[], Any]) -> None:
    started = threading.Event()
    seen: list[Any] = []

    def slow(params: Any, ctx: TaskContext) -> str:
        started.set()
        seen.append(ctx.wait_cancelled(30))
        seen.append(ctx.cancel_reason)
        return "partial"

    worker = TaskEngine(stores(), handlers={"slow": slow})
    operator = TaskEngine(stores())  # another process: the CLI
    task_id = operator.submit("slow", {})
    worker.run_once()
    assert started.wait(10)
    assert status(operator, task_id) is TaskStatus.RUNNING
    assert operator.cancel(task_id) is True
    assert operator.get(task_id).cancel_requested  # type: ignore[union-attr]
    until(lambda: status(operator, task_id) is TaskStatus.CANCELLED, worker)
    assert seen == [True, "cancelled"]
    rec = operator.get(task_id)
    assert rec is not None and rec.result == "partial" and not rec.cancel_requested
    worker.close()
    operator.close()


def test_cancel_ends_a_running_async_task_with_cancelled_error(stores: Callable[[], Any]) -> None:
    started = threading.Event()
    seen: list[str] = []

    async def slow(params: Any) -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return "never"

    engine = TaskEngine(stores(), handlers={"slow": slow})
    task_id = engine.submit("slow", {})
    engine.run_once()
    assert started.wait(10)
    assert engine.cancel(task_id) is True  # running here: told at once
    until(lambda: status(engine, task_id) is TaskStatus.CANCELLED, engine)
    assert seen == ["cancelled"]
    assert engine.get(task_id).attempts == 1  # type: ignore[union-attr]
    engine.close()


def test_a_cancel_that_meets_a_failed_attempt_stops_the_retries(stores: Callable[[], Any]) -> None:
    release = threading.Event()

    def failing(params: Any) -> None:
        release.wait(10)
        raise RuntimeError("boom")

    worker = TaskEngine(stores(), handlers={"f": failing}, retry_max=5)
    operator = TaskEngine(stores())
    task_id = operator.submit("f", {})
    worker.run_once()
    until(lambda: status(operator, task_id) is TaskStatus.RUNNING)
    operator.cancel(task_id)
    release.set()  # the handler fails before its worker heard of the cancel, or after: it ends cancelled
    until(lambda: status(operator, task_id) is TaskStatus.CANCELLED, worker)
    worker.close()
    operator.close()


# -- time limits --------------------------------------------------------------------------------

def test_time_limit_fails_a_sync_attempt_which_is_retried(stores: Callable[[], Any], clock: FakeClock) -> None:
    calls: list[Any] = []
    returned = threading.Event()

    def slow(params: Any, ctx: TaskContext) -> str:
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            ctx.wait_cancelled(30)
            calls.append(ctx.cancel_reason)
            returned.set()
            return "late"
        return "on time"

    engine = TaskEngine(stores(), retry_max=2, retry_base=1.0, retry_cap=1.0)
    engine.register("slow", slow, time_limit=timedelta(seconds=5))
    task_id = engine.submit("slow", {})
    engine.run_once()
    until(lambda: calls == [1])
    clock.advance(6)
    engine.run_once()  # the pass past the limit fails the attempt and asks the handler to stop
    rec = engine.get(task_id)
    assert rec is not None and rec.status is TaskStatus.PENDING and "time limit of 5s" in (rec.error or "")
    assert returned.wait(10) and calls == [1, "time_limit"]
    until(lambda: engine.in_flight == 0)
    assert engine.get(task_id).result is None  # type: ignore[union-attr]  # the late return is dropped
    clock.advance(2)
    until(lambda: status(engine, task_id) is TaskStatus.SUCCEEDED, engine)
    rec = engine.get(task_id)
    assert rec is not None and rec.result == "on time" and rec.attempts == 2
    engine.close()


def test_a_sync_handler_past_its_limit_keeps_its_slot_until_it_returns(stores: Callable[[], Any],
                                                                       clock: FakeClock) -> None:
    release = threading.Event()
    ran: list[str] = []

    def stubborn(params: Any) -> None:  # ignores ctx.cancelled
        ran.append(params["n"])
        release.wait(30)

    engine = TaskEngine(stores(), concurrency=1, retry_max=0)
    engine.register("s", stubborn, time_limit=1)
    first = engine.submit("s", {"n": "first"})
    second = engine.submit("s", {"n": "second"})
    engine.run_once()
    until(lambda: ran == ["first"])
    clock.advance(2)
    engine.run_once()
    assert status(engine, first) is TaskStatus.FAILED
    assert engine.in_flight == 1 and engine.run_once() == 0  # the one slot is still taken
    assert status(engine, second) is TaskStatus.PENDING
    release.set()
    until(lambda: status(engine, second) is not TaskStatus.PENDING, engine)
    until(lambda: engine.in_flight == 0)
    assert ran == ["first", "second"]
    engine.close()


def test_time_limit_cancels_an_async_handler(stores: Callable[[], Any], clock: FakeClock) -> None:
    started = threading.Event()
    seen: list[str] = []

    async def slow(params: Any) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    engine = TaskEngine(stores(), retry_max=0)
    engine.register("slow", slow, time_limit=3)
    task_id = engine.submit("slow", {})
    engine.run_once()
    assert started.wait(10)
    clock.advance(4)
    until(lambda: status(engine, task_id) is TaskStatus.FAILED, engine)
    until(lambda: engine.in_flight == 0)
    assert seen == ["cancelled"]
    assert "time limit" in (engine.get(task_id).error or "")  # type: ignore[union-attr]
    engine.close()


def test_bad_time_limits_name_the_field() -> None:
    engine = TaskEngine(open_store("memory://"))
    for bad in (0, -1, "5", True, float("inf")):
        with pytest.raises(ConfigError) as info:
            engine.register("t", lambda p: p, time_limit=bad)  # type: ignore[arg-type]
        assert "time_limit" in str(info.value)
    engine.close()


# -- shutdown -----------------------------------------------------------------------------------

def test_closing_the_engine_releases_running_tasks_for_another_worker(stores: Callable[[], Any]) -> None:
    started = threading.Event()
    reasons: list[Any] = []

    def handler(params: Any, ctx: TaskContext) -> str:
        started.set()
        ctx.wait_cancelled(30)
        reasons.append(ctx.cancel_reason)
        raise RuntimeError("interrupted by shutdown")

    first = TaskEngine(stores(), handlers={"h": handler}, retry_max=0)
    task_id = first.submit("h", {"who": "first"})
    first.run_once()
    assert started.wait(10)
    first.close()  # what a worker does on SIGTERM: the handler sees the cancellation
    assert reasons == ["shutdown"]
    rec = first.get(task_id)
    assert rec is not None and rec.status is TaskStatus.PENDING and rec.attempts == 0 and rec.error is None
    second = TaskEngine(stores(), handlers={"h": lambda p: "done"}, retry_max=0)
    until(lambda: status(second, task_id) is TaskStatus.SUCCEEDED, second)
    second.close()


SIGTERM_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from errands.core import TaskEngine, Worker, open_store

    marks = Path(sys.argv[2])

    def work(params, ctx):
        marks.write_text("started\\n")
        ctx.wait_cancelled(60)
        with open(marks, "a") as fh:
            fh.write(f"{ctx.cancel_reason}\\n")
        raise RuntimeError("interrupted")

    store = open_store(sys.argv[1])
    engine = TaskEngine(store, handlers={"work": work}, retry_max=0)
    Worker(store, jobs=[engine.run_once], poll_interval=0.01).run()  # SIGTERM stops it
    store.close()
""")


def test_sigterm_to_a_worker_reaches_the_running_handler_and_releases_its_task(url: str, tmp_path: Path) -> None:
    marks = tmp_path / "marks.txt"
    store = open_store(url)
    submitter = TaskEngine(store)
    task_id = submitter.submit("work", {})
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, url, str(marks)])
    try:
        deadline = time.monotonic() + 30
        while not (marks.exists() and marks.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marks.read_text() == "started\nshutdown\n"
    rec = submitter.get(task_id)
    assert rec is not None and rec.status is TaskStatus.PENDING and rec.attempts == 0 and rec.error is None
    submitter.close()
    store.close()


# -- priority -----------------------------------------------------------------------------------

def test_higher_priority_tasks_start_first_across_types(stores: Callable[[], Any], clock: FakeClock) -> None:
    order: list[str] = []
    engine = TaskEngine(stores(), handlers={"a": lambda p: order.append(p), "b": lambda p: order.append(p)},
                        concurrency=1)
    for type_, name, priority in (("a", "a0", 0), ("a", "a-5", -5), ("b", "b3", 3), ("a", "a7", 7), ("b", "b0", 0)):
        engine.submit(type_, name, priority=priority)
        clock.advance(1)  # among equal priorities, the one due first starts first
    for _ in range(5):
        n = len(order)
        assert engine.run_once() == 1
        until(lambda n=n: len(order) == n + 1 and engine.in_flight == 0)  # type: ignore[misc]
    assert order == ["a7", "b3", "a0", "b0", "a-5"]
    assert {r.params: r.priority for r in engine.recent(10)} == {"a0": 0, "a-5": -5, "b3": 3, "a7": 7, "b0": 0}
    with pytest.raises(ConfigError) as info:
        engine.submit("a", None, priority="high")  # type: ignore[arg-type]
    assert info.value.field == "priority"
    engine.close()


def test_a_type_at_its_concurrency_limit_does_not_starve_the_others(stores: Callable[[], Any]) -> None:
    gate = threading.Event()
    engine = TaskEngine(stores(), concurrency=2)
    engine.register("busy", lambda p: gate.wait(10), max_concurrency=1)
    engine.register("other", lambda p: p)
    for _ in range(3):
        engine.submit("busy", None, priority=9)
    low = engine.submit("other", None)
    assert engine.run_once() == 2  # one busy (its limit), then the slot left goes to the lower priority
    gate.set()
    until(lambda: status(engine, low) is TaskStatus.SUCCEEDED, engine)
    engine.drain()
    engine.close()


# -- retention ----------------------------------------------------------------------------------

def test_retention_purges_old_finished_tasks_in_batches(stores: Callable[[], Any], clock: FakeClock) -> None:
    def handler(params: Any) -> Any:
        if params == "dead":
            from errands.core import PermanentError
            raise PermanentError("no")
        return params

    store = stores()
    engine = TaskEngine(store, retention=3600)
    engine.register("t", handler, dlq_after=1)
    old = [engine.submit("t", i) for i in range(3)]
    parked = engine.submit("t", "dead")
    pending = engine.submit("t", "later", delay=10 * 3600)
    engine.drain()
    cancelled = engine.submit("t", "c", delay=10)
    engine.cancel(cancelled)
    clock.advance(2 * 3600)
    recent = engine.submit("t", "recent")
    engine.run_once()  # purges, then runs ``recent``
    engine.drain()
    assert [engine.get(i) for i in (*old, cancelled)] == [None] * 4
    assert status(engine, parked) is TaskStatus.DEAD  # the dead-letter list is kept for an operator
    assert status(engine, pending) is TaskStatus.PENDING
    assert status(engine, recent) is TaskStatus.SUCCEEDED
    assert PURGE_BATCH >= 100
    # bounded batches, oldest first
    more = [engine.submit("t", i) for i in range(5)]
    engine.drain()
    clock.advance(2 * 3600)
    assert engine.purge(3600, limit=2) == 2
    assert engine.purge(timedelta(hours=1), limit=100) == 4  # the three left of ``more`` and ``recent``
    assert all(engine.get(i) is None for i in more)
    engine.close()


# -- periodic tasks -----------------------------------------------------------------------------

def test_a_cron_tick_runs_once_with_two_workers(stores: Callable[[], Any], clock: FakeClock) -> None:
    runs: list[str] = []
    lock = threading.Lock()

    def tick(params: Any, ctx: TaskContext) -> None:
        with lock:
            runs.append(ctx.id)

    engines = [TaskEngine(stores(), handlers={"report": tick}) for _ in range(2)]
    first = engines[0].schedule("reports", "report", cron="*/5 * * * *", params={"kind": "daily"})
    engines[1].schedule("reports", "report", cron="*/5 * * * *", params={"kind": "daily"})  # same: unchanged
    assert first.next_at == datetime(2030, 1, 1, 0, 5, tzinfo=timezone.utc)
    assert [s.name for s in engines[1].schedules()] == ["reports"]
    stop = threading.Event()

    def work(engine: TaskEngine) -> None:
        while not stop.is_set():
            engine.run_once()
            time.sleep(0.002)

    threads = [threading.Thread(target=work, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    try:
        time.sleep(0.05)
        assert runs == []  # not due yet
        for n, minute in enumerate((5, 10), start=1):
            tick_at = datetime(2030, 1, 1, 0, minute, tzinfo=timezone.utc).timestamp()
            clock.set(tick_at + 1)
            deadline = time.monotonic() + 15
            while len(runs) < n or status(engines[0], runs[n - 1]) is not TaskStatus.SUCCEEDED:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.1)  # both workers keep passing over the tick
            assert runs[n - 1] == tick_id("reports", tick_at)
        # ticks missed while no worker ran are run once, as the latest of them
        clock.set(datetime(2030, 1, 1, 1, 2, tzinfo=timezone.utc).timestamp())
        deadline = time.monotonic() + 15
        while len(runs) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert runs[2] == tick_id("reports", datetime(2030, 1, 1, 1, 0, tzinfo=timezone.utc).timestamp())
    assert len(runs) == len(set(runs)) == 3
    rec = engines[0].get(runs[0])
    assert rec is not None and rec.params == {"kind": "daily"} and rec.status is TaskStatus.SUCCEEDED
    (s,) = engines[0].schedules()
    assert s.last_at == datetime(2030, 1, 1, 1, 0, tzinfo=timezone.utc)
    assert s.next_at == datetime(2030, 1, 1, 1, 5, tzinfo=timezone.utc)
    for e in engines:
        e.close()


def test_schedules_change_and_go(stores: Callable[[], Any], clock: FakeClock) -> None:
    engine = TaskEngine(stores(), handlers={"r": lambda p: p})
    engine.schedule("nightly", "r", cron="0 3 * * *", priority=2)
    (s,) = engine.schedules()
    assert (s.cron, s.priority, s.next_at.hour) == ("0 3 * * *", 2, 3)
    clock.advance(3600)
    engine.schedule("nightly", "r", cron="*/15 * * * *")
    (s,) = engine.schedules()
    assert s.cron == "*/15 * * * *" and s.next_at == datetime(2030, 1, 1, 1, 15, tzinfo=timezone.utc)
    assert s.to_dict()["next_at"].startswith("2030-01-01T01:15")
    assert engine.unschedule("nightly") is True and engine.unschedule("nightly") is False
    assert engine.schedules() == []
    with pytest.raises(ConfigError) as info:
        engine.schedule("bad", "r", cron="every five minutes")
    assert info.value.field == "cron" and "*/5 * * * *" in str(info.value)
    with pytest.raises(ConfigError, match="no handler for task type 'nope'"):
        engine.schedule("bad", "nope", cron="* * * * *")
    engine.close()


# -- the pure transitions of stopping -----------------------------------------------------------

def test_stopped_attempts_settle_by_their_reason() -> None:
    from errands.core._tasks_transitions import (
        CANCEL,
        SHUTDOWN,
        TIME_LIMIT,
        RetryPolicy,
        cancelled,
        released,
        settle,
        timed_out,
    )

    policy = RetryPolicy(retry_max=1, dlq_after=None, base=1.0, cap=1.0)
    now = 1_000.0
    assert cancelled(now).columns == {"status": "CANCELLED", "result": None, "error": "cancelled", "finished_at": now}
    # a cancel wins over what the handler did, keeping what it returned
    assert settle('"partial"', 1, policy, now, lease_lost=False, stopped=CANCEL) == cancelled(now, '"partial"')
    assert settle(RuntimeError("x"), 1, policy, now, lease_lost=False, stopped=CANCEL) == cancelled(now)
    # a handler stopped by its time limit writes nothing: the failed attempt was written at the limit
    assert settle('"late"', 1, policy, now, lease_lost=False, stopped=TIME_LIMIT) is None
    retry = timed_out(5, 1, policy, now)
    assert retry.status is TaskStatus.PENDING and retry.error == "TimeoutError: the task ran past its time limit of 5s"
    assert timed_out(5, 2, policy, now).status is TaskStatus.FAILED  # out of retries
    # at shutdown a handler that raised releases its task, the attempt not counted; one that returned succeeded
    assert settle(RuntimeError("x"), 3, policy, now, lease_lost=False, stopped=SHUTDOWN) == released(3, now)
    assert released(3, now).columns == {"status": "PENDING", "attempts": 2, "available_at": now}
    assert settle('"done"', 1, policy, now, lease_lost=False, stopped=SHUTDOWN).status is TaskStatus.SUCCEEDED  # type: ignore[union-attr]
    # a lost lease writes nothing, whatever the reason
    assert settle('"done"', 1, policy, now, lease_lost=True, stopped=CANCEL) is None


def test_app_task_declares_a_time_limit(url: str) -> None:
    from errands import App

    app = App(url)
    seen: list[Any] = []

    @app.task("report", time_limit=timedelta(minutes=5), retry_max=0)
    def report(params: Any, ctx: TaskContext) -> str:
        seen.append(ctx.cancelled)
        return "ok"

    spec = app.tasks._types["report"]
    assert spec.time_limit == 300.0 and spec.policy.retry_max == 0
    assert app.tasks.wait(app.tasks.submit("report", {})).result == "ok" and seen == [False]
    app.close()
