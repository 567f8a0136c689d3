"""The event-driven worker, on SQLite and PostgreSQL: woken by a submit in this process and by another
process's ``NOTIFY``, claiming as soon as a slot frees, two workers never running a task twice, a SIGKILLed
worker's task reclaimed after its lease; and claims that walk only the due rows (the partial claim index)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from errands.core import TaskEngine, TaskStatus, Worker, _wake, open_store
from errands.core import _tasks_table as table


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def url(request: Any, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def postgres(postgres_url: str) -> str:
    return postgres_url


@pytest.fixture
def never_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle waits of an hour from the first one: only a wake can get a worker going again."""
    monkeypatch.setattr(_wake, "FIRST_POLL", 3600.0)


def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for ``predicate()`` (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


@pytest.fixture
def running() -> Iterator[Callable[[Worker], threading.Event]]:
    """Run workers on threads; stop and join them at the end."""
    started: list[tuple[threading.Thread, threading.Event]] = []

    def run(worker: Worker) -> threading.Event:
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        started.append((thread, stop))
        return stop

    yield run
    for thread, stop in started:
        stop.set()
    for thread, stop in started:
        thread.join(timeout=30)


def status(store: Any, task_id: str) -> TaskStatus | None:
    with store.read() as tx:
        rec = table.get(tx, task_id)
    return None if rec is None else rec.status


def test_a_submit_in_this_process_wakes_the_worker(url: str, never_poll: None, running: Any) -> None:
    store = open_store(url)
    try:
        engine = TaskEngine(store, handlers={"t": lambda p: p})
        worker = Worker(store, jobs=[engine.run_once], poll_interval=3600)
        running(worker)
        until(lambda: worker.passes >= 1)
        before = worker.woken
        task_id = engine.submit("t", 1)
        until(lambda: status(store, task_id) is TaskStatus.SUCCEEDED)
        assert worker.woken > before
    finally:
        store.close()


def test_a_subscribed_wake_is_set_by_a_submit_on_another_store_of_the_same_database(url: str) -> None:
    first, second = open_store(url), open_store(url)
    try:
        wake = _wake.Wake()
        _wake.subscribe(first, wake, [_wake.TASKS])
        TaskEngine(second).submit("t")
        assert wake.is_set
        assert wake.wait(0) and wake.woken == 1 and not wake.is_set
    finally:
        first.close()
        second.close()


@pytest.mark.services
def test_a_submit_in_another_process_wakes_the_worker_by_notify(postgres: str, never_poll: None,
                                                                  running: Any) -> None:
    store = open_store(postgres)
    try:
        engine = TaskEngine(store, handlers={"t": lambda p: p})
        worker = Worker(store, jobs=[engine.run_once], poll_interval=3600)
        running(worker)
        until(lambda: worker.listening and worker.passes >= 1)
        task_id = str(uuid.uuid4())
        script = textwrap.dedent(f"""
            from errands.core import TaskEngine, open_store
            store = open_store({postgres!r})
            TaskEngine(store).submit("t", 1, id={task_id!r})
            store.close()
        """)
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        until(lambda: status(store, task_id) is TaskStatus.SUCCEEDED)
        assert worker.notified >= 1
    finally:
        store.close()


def test_no_due_task_waits_while_a_slot_is_free(url: str, never_poll: None, running: Any) -> None:
    """Four slots, forty tasks queued before the worker starts, no poll: every task is claimed when a slot frees."""
    store = open_store(url)
    try:
        lock = threading.Lock()
        at_once = [0, 0]

        def handler(_: Any) -> None:
            with lock:
                at_once[0] += 1
                at_once[1] = max(at_once[1], at_once[0])
            time.sleep(0.005)
            with lock:
                at_once[0] -= 1

        engine = TaskEngine(store, handlers={"t": handler}, concurrency=4)
        ids = [engine.submit("t") for _ in range(40)]
        worker = Worker(store, jobs=[engine.run_once], poll_interval=3600)
        running(worker)
        until(lambda: all(status(store, i) is TaskStatus.SUCCEEDED for i in ids))
        assert at_once[1] <= 4
    finally:
        store.close()


def test_drain_claims_as_slots_free(url: str) -> None:
    store = open_store(url)
    try:
        engine = TaskEngine(store, handlers={"t": lambda p: p}, concurrency=2)
        ids = [engine.submit("t", n) for n in range(30)]
        assert engine.drain(timeout=60, poll=3600) == 30
        assert all(status(store, i) is TaskStatus.SUCCEEDED for i in ids)
    finally:
        store.close()


def test_two_workers_on_one_store_never_run_a_task_twice(url: str, running: Any) -> None:
    stores = [open_store(url), open_store(url)]
    try:
        ran: list[str] = []
        lock = threading.Lock()

        def handler(p: Any) -> None:
            with lock:
                ran.append(p)

        engines = [TaskEngine(s, handlers={"t": handler}, concurrency=4) for s in stores]
        ids = [engines[0].submit("t", str(n)) for n in range(200)]
        workers = [Worker(s, jobs=[e.run_once]) for s, e in zip(stores, engines)]
        for w in workers:
            running(w)
        until(lambda: all(status(stores[0], i) is TaskStatus.SUCCEEDED for i in ids), timeout=60)
        assert sorted(ran) == sorted(str(n) for n in range(200))
    finally:
        for s in stores:
            s.close()


def test_a_sigkilled_workers_task_is_taken_again_after_its_lease(url: str, tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = textwrap.dedent(f"""
        import pathlib, time
        from errands.core import TaskEngine, Worker, open_store
        store = open_store({url!r})
        def slow(p):
            pathlib.Path({str(started)!r}).write_text("yes")
            time.sleep(3600)
        engine = TaskEngine(store, handlers={{"t": slow}}, lease_for=1.0)
        Worker(store, jobs=[engine.run_once]).run()
    """)
    store = open_store(url)
    try:
        task_id = TaskEngine(store).submit("t")
        proc = subprocess.Popen([sys.executable, "-c", script])
        try:
            until(started.exists, timeout=60)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        assert status(store, task_id) is TaskStatus.RUNNING
        # Another engine on another host's terms: only the lapsed lease gives the task back.
        engine = TaskEngine(store, handlers={"t": lambda p: "again"}, lease_for=1.0)
        engine._recovered = True  # not this host's recovery at start: the claim of a lapsed lease
        until(lambda: engine.run_once() > 0 or status(store, task_id) is TaskStatus.SUCCEEDED, timeout=30)
        until(lambda: status(store, task_id) is TaskStatus.SUCCEEDED)
        rec = engine.get(task_id)
        assert rec is not None and rec.result == "again" and rec.attempts == 2
    finally:
        store.close()


# -- the claim walks due rows only -----------------------------------------------------------------

def _claim_statement(store: Any) -> tuple[str, tuple[Any, ...]]:
    """The claim's SQL and parameters, as ``table.claim`` sends them."""
    seen: list[tuple[str, tuple[Any, ...]]] = []

    class Spy:
        def __init__(self, tx: Any) -> None:
            self.dialect, self.skip_locked = tx.dialect, tx.skip_locked

        def query(self, sql: str, params: Any) -> list[Any]:
            seen.append((sql, tuple(params)))
            return []

    with store.read() as tx:
        table.claim(Spy(tx), "t", "me", [], 8, 2e9, 1e9)  # type: ignore[arg-type]
    return seen[0]


def _finished_rows(store: Any, n: int) -> None:
    """``n`` finished tasks of type ``t`` (a tenth of them keyed), and a few live keyed ones."""
    rows = [(str(uuid.uuid4()), "t", "SUCCEEDED", 0.0, 0.0, 0.0, 0.0, f"k{i % 7}" if i % 10 == 0 else None, i)
            for i in range(n)]
    rows += [(str(uuid.uuid4()), "t", "PENDING", 0.0, 0.0, 0.0, None, f"k{i % 3}", n + i) for i in range(12)]
    with store.transaction() as tx:
        tx.insert_rows("INSERT INTO em_tasks (id, type, status, available_at, created_at, updated_at, finished_at, "
                       "order_key, order_seq) VALUES ", "(?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def _select(sql: str) -> str:
    """The claim's candidate query: the ``IN (...)`` of its ``UPDATE``, the walks of the due index."""
    return sql[sql.index("SELECT id FROM ("):sql.rindex(")")]


def test_the_claim_walks_the_partial_index_of_due_rows_on_sqlite(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'plan.db'}")
    try:
        TaskEngine(store)
        _finished_rows(store, 2000)
        with store.transaction() as tx:
            tx.execute("ANALYZE")
        sql, params = _claim_statement(store)
        with store.read() as tx:
            plan = [str(r[-1]) for r in tx.query("EXPLAIN QUERY PLAN " + _select(sql), params[5:])]
        walks = [line for line in plan if " t " in f" {line} "]
        # Both walks (lapsed leases, due pending tasks) search the partial index; the head rule probes em_tasks_order.
        assert len(walks) == 2 and all("em_tasks_claim" in w and w.startswith("SEARCH") for w in walks), plan
        assert any("em_tasks_order" in line for line in plan), plan
    finally:
        store.close()


@pytest.mark.services
def test_the_claim_walks_the_partial_index_of_due_rows_on_postgres(postgres: str) -> None:
    store = open_store(postgres)
    try:
        TaskEngine(store)
        _finished_rows(store, 20_000)
        with store.transaction() as tx:
            tx.execute("ANALYZE em_tasks")
        sql, params = _claim_statement(store)
        select = _select(sql).replace(" FOR UPDATE SKIP LOCKED", "")
        with store.read() as tx:
            # A generic plan (the parameters unknown), as a prepared statement gets after a few runs.
            tx.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            plan = "\n".join(r[0] for r in tx.query("EXPLAIN " + select, params[5:]))
        assert "em_tasks_claim" in plan and "Seq Scan" not in plan, plan
    finally:
        store.close()


# -- batched enqueue and outcomes written together --------------------------------------------------

def test_quick_handlers_run_inline_under_a_driver_and_others_on_the_pool(url: str) -> None:
    """Once a type's handler is timed as quick, a driver (``drain``) runs it in its own thread, a batch per
    commit; a type with a time limit always runs on the engine's pool. Every task succeeds, failures are
    retried as on the pool."""
    store = open_store(url)
    threads: dict[str, set[str]] = {"quick": set(), "limited": set()}
    failed: set[int] = set()

    def handler(kind: str) -> Callable[[Any], Any]:
        def run(n: Any) -> Any:
            threads[kind].add(threading.current_thread().name)
            if kind == "quick" and n % 10 == 0 and n not in failed:
                failed.add(n)
                raise RuntimeError("once")
            return n
        return run

    try:
        engine = TaskEngine(store, concurrency=4)
        engine._latency.QUICK = 60.0  # every timed handler counts as quick here, however busy the machine
        engine.register("quick", handler("quick"), retry_base=0.001)
        engine.register("limited", handler("limited"), time_limit=30)
        ids = engine.submit_many("quick", range(200)) + engine.submit_many("limited", range(40))
        engine.drain(timeout=120)
        records = [engine.wait(i, timeout=60) for i in ids]
        assert all(r.status is TaskStatus.SUCCEEDED for r in records)
        quick = [r for r in records if r.type == "quick"]
        assert sorted(r.result for r in quick) == list(range(200))
        assert {r.attempts for r in quick if r.result % 10 == 0} == {2}
        here = threading.current_thread().name
        assert here in threads["quick"] and here not in threads["limited"]
    finally:
        store.close()


def test_an_interrupt_in_an_inline_handler_gives_the_batch_back(url: str) -> None:
    """A ``KeyboardInterrupt`` from a handler run inline reaches the driver; the tasks of its batch are not
    left held by the engine: the next pass gives them back and runs every task to success."""
    store = open_store(url)
    calls: list[int] = []

    def handler(n: Any) -> Any:
        calls.append(n)
        if n == 5 and calls.count(5) == 1:
            raise KeyboardInterrupt
        return n

    try:
        engine = TaskEngine(store, handlers={"t": handler}, concurrency=4)
        engine._latency.QUICK = 60.0
        engine._latency.record("t", 0.0)  # timed as quick already: every batch runs inline
        ids = engine.submit_many("t", range(12))
        with pytest.raises(KeyboardInterrupt):
            engine.drain(timeout=60)
        assert engine.in_flight == 0
        engine.drain(timeout=60)
        records = [engine.wait(i, timeout=60) for i in ids]
        assert [r.result for r in records] == list(range(12))
        assert all(r.status is TaskStatus.SUCCEEDED for r in records)
    finally:
        store.close()


def test_submit_many_queues_every_task_in_one_go_and_keeps_existing_ids(url: str) -> None:
    store = open_store(url)
    try:
        engine = TaskEngine(store, handlers={"t": lambda p: p * 2})
        first = str(uuid.uuid4())
        engine.submit("t", 100, id=first)
        ids = engine.submit_many("t", [1, 2, 3], ids=[first, uuid.uuid4(), str(uuid.uuid4())])
        assert ids[0] == first and len(set(ids)) == 3
        assert engine.drain(timeout=60) == 3
        results = [rec.result for rec in (engine.get(i) for i in ids) if rec is not None]
        assert results == [200, 4, 6]  # the existing id kept its own params
        assert engine.submit_many("t", []) == []
    finally:
        store.close()


def test_submit_many_refuses_bad_input_and_stores_nothing(url: str) -> None:
    from errands.core import ConfigError, InvalidTaskIdError, PayloadError

    store = open_store(url)
    try:
        engine = TaskEngine(store, handlers={"t": lambda p: p})
        with pytest.raises(ConfigError) as info:
            engine.submit_many("t", [1, 2], ids=[str(uuid.uuid4())])
        assert info.value.field == "ids"
        with pytest.raises(InvalidTaskIdError):
            engine.submit_many("t", [1], ids=["not-a-uuid"])
        with pytest.raises(PayloadError) as payload:
            engine.submit_many("t", [1, object()])
        assert payload.value.field == "params[1]"
        with pytest.raises(ConfigError):
            engine.submit_many("nope", [1])
        assert engine.recent() == []
    finally:
        store.close()


def test_outcomes_that_end_together_are_each_written_as_their_own(url: str) -> None:
    """Successes, failures for good and retries in the same batches: each task gets its own outcome."""
    store = open_store(url)
    try:
        from errands.core import PermanentError

        def handler(n: int) -> int:
            if n % 3 == 1:
                raise PermanentError(f"no {n}")
            return n

        engine = TaskEngine(store, handlers={"t": handler}, concurrency=8, retry_max=0)
        ids = engine.submit_many("t", list(range(60)))
        engine.drain(timeout=60)
        for n, task_id in enumerate(ids):
            rec = engine.get(task_id)
            assert rec is not None
            if n % 3 == 1:
                assert rec.status is TaskStatus.FAILED and rec.error is not None and f"no {n}" in rec.error
            else:
                assert rec.status is TaskStatus.SUCCEEDED and rec.result == n and rec.error is None
    finally:
        store.close()


def test_an_outbox_submit_wakes_the_worker(url: str, never_poll: None, running: Any) -> None:
    from errands.core import DispatchOutcome, DispatchResult, Effect, EffectStatus, Outbox

    class Noop:
        name = "noop"

        def dispatch(self, effect: Any) -> DispatchResult:
            return DispatchResult(outcome=DispatchOutcome.CONFIRMED)

    store = open_store(url)
    try:
        outbox = Outbox(store, connectors={"noop": Noop()})
        worker = Worker(store, outbox=outbox, poll_interval=3600)
        running(worker)
        until(lambda: worker.passes >= 1)
        outbox.submit(Effect(key="a", connector="noop", payload={}))
        outbox.submit_many([Effect(key="b", connector="noop", payload={})])
        until(lambda: all((rec := outbox.get(k)) is not None and rec.status is EffectStatus.CONFIRMED
                          for k in ("a", "b")))
        assert worker.woken >= 1
    finally:
        store.close()


def test_tasks_claimed_while_the_engine_closes_are_given_back(url: str) -> None:
    store = open_store(url)
    try:
        engine = TaskEngine(store, handlers={"t": lambda p: p})
        task_id = engine.submit("t")
        engine.close()  # no pool any more: nothing may start here
        now = store.clock.now()
        with store.transaction() as tx:
            claimed = table.claim(tx, "t", engine.owner, [], 8, now + 60, now)
        assert [c.id for c in claimed] == [task_id]
        assert engine._start(claimed, ahead=True) == (0, [])
        rec = engine.get(task_id)
        assert rec is not None and rec.status is TaskStatus.PENDING and rec.attempts == 0
        assert engine.in_flight == 0
    finally:
        store.close()
