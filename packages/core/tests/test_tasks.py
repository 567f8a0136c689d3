from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypedDict

import pytest
from errands.core import (
    MAX_RETRY_AFTER,
    DEFAULT_LEASE_FOR,
    ConfigError,
    FakeClock,
    InvalidTaskIdError,
    MemoryStore,
    PayloadError,
    PermanentError,
    TaskContext,
    TaskEngine,
    TaskStatus,
    TransientError,
    Worker,
    open_store,
    typed_handler,
)
from errands.core.runtime import RETRY_DELAYS
from errands.core.testing import faults


@pytest.fixture
def store() -> Any:
    s = MemoryStore()
    yield s
    s.close()


def test_submit_run_get(store: Any) -> None:
    engine = TaskEngine(store, handlers={"add": lambda p: p["a"] + p["b"]})
    task_id = engine.submit("add", {"a": 2, "b": 3})
    uuid.UUID(task_id)
    rec = engine.get(task_id)
    assert rec is not None and rec.status is TaskStatus.PENDING and rec.params == {"a": 2, "b": 3}
    done = engine.wait(task_id)
    assert done.status is TaskStatus.SUCCEEDED and done.result == 5 and done.attempts == 1
    assert done.started_at is not None and done.finished_at is not None
    engine.close()


def test_caller_ids_must_be_uuids_and_same_id_is_same_task(store: Any) -> None:
    engine = TaskEngine(store, handlers={"t": lambda p: p})
    with pytest.raises(InvalidTaskIdError) as info:
        engine.submit("t", {}, id="order-42")
    assert info.value.field == "id" and "order-42" in str(info.value) and "UUID" in str(info.value)
    assert engine.recent() == []
    given = uuid.uuid4()
    a = engine.submit("t", {"n": 1}, id=str(given).upper())
    b = engine.submit("t", {"n": 2}, id=given)
    assert a == b == str(given)
    assert len(engine.recent()) == 1 and engine.get(a).params == {"n": 1}  # type: ignore[union-attr]
    engine.wait(a)
    engine.submit("t", {"n": 3}, id=a)
    assert engine.get(a).result == {"n": 1}  # type: ignore[union-attr]
    engine.close()


def test_bad_submissions_change_nothing(store: Any) -> None:
    engine = TaskEngine(store, handlers={"t": lambda p: p})
    with pytest.raises(ConfigError, match="no handler for task type 'nope'; known types: t"):
        engine.submit("nope", {})
    with pytest.raises(PayloadError):
        engine.submit("t", {"x": object()})
    assert engine.recent() == []
    with pytest.raises(ConfigError, match="max_concurrency must be an integer >= 1, got 0"):
        engine.register("u", lambda p: p, max_concurrency=0)


def test_tasks_run_concurrently(store: Any) -> None:
    barrier = threading.Barrier(4, timeout=5)

    def meet(_p: Any) -> str:
        barrier.wait()  # four tasks must be running at once, or this raises
        return "met"

    engine = TaskEngine(store, handlers={"meet": meet}, concurrency=4)
    ids = [engine.submit("meet", {}) for _ in range(4)]
    assert engine.run_once() == 4
    assert [engine.wait(i).result for i in ids] == ["met"] * 4
    engine.close()


def test_max_concurrency_limits_one_type(store: Any) -> None:
    running, peak = [0], [0]
    lock = threading.Lock()

    def slow(_p: Any) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    engine = TaskEngine(store, concurrency=8)
    engine.register("slow", slow, max_concurrency=2)
    ids = [engine.submit("slow", {}) for _ in range(8)]
    engine.drain()
    assert all(engine.get(i).status is TaskStatus.SUCCEEDED for i in ids)  # type: ignore[union-attr]
    assert peak[0] == 2
    engine.close()


def test_rate_limit_spaces_starts(store: Any) -> None:
    clock = FakeClock()
    s = MemoryStore(clock=clock)
    engine = TaskEngine(s, concurrency=8)
    engine.register("limited", lambda p: p, rate_limit_per_s=2)
    for _ in range(6):
        engine.submit("limited", {})
    assert engine.run_once() == 2
    assert engine.run_once() == 0
    clock.advance(0.5)
    assert engine.run_once() == 1
    clock.advance(1)
    assert engine.run_once() == 2
    engine.close()
    s.close()


def test_failures_retry_then_fail(store: Any) -> None:
    calls: list[int] = []

    def flaky(_p: Any, ctx: TaskContext) -> str:
        calls.append(ctx.attempt)
        if ctx.attempt < 3:
            raise TransientError("try later", retry_after=0)
        return "ok"

    engine = TaskEngine(store, handlers={"flaky": flaky, "broken": lambda p: 1 / 0}, retry_max=2, retry_base=0.01)
    ok = engine.submit("flaky", {})
    bad = engine.submit("broken", {})
    assert engine.wait(ok).result == "ok" and calls == [1, 2, 3]
    rec = engine.wait(bad)
    assert rec.status is TaskStatus.FAILED and rec.attempts == 3 and "ZeroDivisionError" in (rec.error or "")
    assert engine.redrive([bad]) == 1 and engine.get(bad).status is TaskStatus.PENDING  # type: ignore[union-attr]
    engine.close()


@pytest.mark.parametrize("retry_after", [float("inf"), 1e12, float("nan")])
def test_a_handlers_absurd_retry_after_never_parks_a_task(store: Any, retry_after: float) -> None:
    def later(_p: Any) -> None:
        raise TransientError("429", retry_after=retry_after)

    engine = TaskEngine(store, handlers={"later": later}, retry_max=3, retry_cap=5.0)
    task_id = engine.submit("later", {})
    start = time.time()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and engine.get(task_id).attempts < 1:  # type: ignore[union-attr]
        engine.run_once()
        time.sleep(0.005)
    rec = engine.get(task_id)
    assert rec is not None and rec.status is TaskStatus.PENDING and rec.attempts == 1
    assert rec.available_at.timestamp() - start <= MAX_RETRY_AFTER + 5
    engine.close()


def test_permanent_error_is_not_retried_and_dlq_parks(store: Any) -> None:
    def refuse(_p: Any) -> None:
        raise PermanentError("never")

    engine = TaskEngine(store, retry_base=0.01)
    engine.register("refuse", refuse, retry_max=5)
    engine.register("parked", lambda p: 1 / 0, retry_max=10, dlq_after=2)
    a, b = engine.submit("refuse", {}), engine.submit("parked", {})
    assert engine.wait(a).status is TaskStatus.FAILED and engine.get(a).attempts == 1  # type: ignore[union-attr]
    rec = engine.wait(b)
    assert rec.status is TaskStatus.DEAD and rec.attempts == 2
    assert [t.id for t in engine.dead()] == [b]
    assert engine.redrive(type="parked") == 1 and engine.dead() == []
    engine.close()


def test_a_task_retried_many_times_does_not_use_up_the_free_slots(store: Any) -> None:
    # Free slots are counted in tasks, not in fencing tokens: a task on its fourth attempt holds one slot.
    release = threading.Event()

    def flaky(_p: Any, ctx: TaskContext) -> str:
        if ctx.attempt < 4:
            raise TransientError("again", retry_after=0)
        release.wait(10)
        return "ok"

    engine = TaskEngine(store, handlers={"flaky": flaky, "quick": lambda p: "quick"}, concurrency=2, retry_max=5)
    slow = engine.submit("flaky", {})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and engine.get(slow).attempts < 4:  # type: ignore[union-attr]
        engine.run_once()
        time.sleep(0.005)
    assert engine.get(slow).attempts == 4 and engine.in_flight == 1  # type: ignore[union-attr]
    quick = engine.submit("quick", {})
    assert engine.run_once() == 1
    assert engine.wait(quick, timeout=5).result == "quick"
    release.set()
    assert engine.wait(slow, timeout=5).result == "ok"
    engine.close()


def test_the_default_lease_is_the_shared_one_and_renewed_while_a_long_handler_runs(tmp_path: Path) -> None:
    assert TaskEngine(MemoryStore()).lease_for == DEFAULT_LEASE_FOR == 10.0
    url = f"sqlite:///{tmp_path / 't.db'}"
    first, second = open_store(url), open_store(url)
    release, calls = threading.Event(), []

    def long(_p: Any) -> str:
        calls.append(1)
        release.wait(20)
        return "done"

    engine = TaskEngine(first, handlers={"long": long}, lease_for=0.6)
    other = TaskEngine(second, handlers={"long": long}, lease_for=0.6)
    task_id = engine.submit("long", {})
    assert engine.run_once() == 1
    deadline = time.monotonic() + 2.0  # more than three leases: only renewals keep the task
    while time.monotonic() < deadline:
        assert other.run_once() == 0
        time.sleep(0.02)
    release.set()
    rec = engine.wait(task_id, timeout=10)
    assert rec.status is TaskStatus.SUCCEEDED and rec.attempts == 1 and calls == [1]
    engine.close()
    other.close()
    first.close()
    second.close()


def test_a_handler_that_lost_its_lease_is_told_and_records_nothing(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    ahead = faults.JumpClock()
    mine, theirs = open_store(url), open_store(url, clock=ahead)
    noticed = threading.Event()
    started = threading.Event()

    def slow(_p: Any, ctx: TaskContext) -> str:
        started.set()
        for _ in range(1000):
            if ctx.lease_lost:
                noticed.set()
                ctx.check_lease()  # raises LeaseLostError: the engine records nothing
            time.sleep(0.01)
        return "first"

    engine = TaskEngine(mine, handlers={"t": slow}, lease_for=0.3)
    task_id = engine.submit("t", {})
    assert engine.run_once() == 1 and started.wait(5)
    ahead.jump(60)  # for the second worker the first one's lease has lapsed
    other = TaskEngine(theirs, handlers={"t": lambda p: "second"}, lease_for=30)
    assert other.run_once() == 1
    assert noticed.wait(10)
    assert other.wait(task_id, timeout=10).result == "second"
    deadline = time.monotonic() + 5
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    rec = engine.get(task_id)
    assert rec is not None and rec.status is TaskStatus.SUCCEEDED and rec.result == "second" and rec.error is None
    assert any("lease" in r.getMessage() and "lost" in r.getMessage() for r in caplog.records)
    engine.close()
    other.close()
    mine.close()
    theirs.close()


def _work_until_succeeded(engine: TaskEngine, view: TaskEngine, limit: int,
                          quiet: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                          ) -> dict[str, Any]:
    """Run ``engine`` in a real ``Worker`` until every task ``view`` sees (up to ``limit``) succeeded, or a minute
    passed; the tasks then, by id. ``quiet()`` holds faults off while the test reads."""
    worker = Worker(engine.store, jobs=[engine.run_once], max_in_flight=8)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with quiet():
                if all(r.status is TaskStatus.SUCCEEDED for r in view.recent(limit)):
                    break
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
    with quiet():
        return {r.id: r for r in view.recent(limit)}


@pytest.mark.services
def test_postgres_connections_killed_between_rounds_cost_retries_not_failed_tasks(postgres_url: str) -> None:
    """The worker's rounds (outcomes written and next tasks claimed in one statement) meet connections that died
    since the last round: each is replaced, and every task succeeds once, its attempt counted once."""
    store = open_store(postgres_url + "?pool_size=4&application_name=errands-rounds")
    watcher = open_store(postgres_url + "?pool_size=1&application_name=errands-watch")
    try:
        calls: list[int] = []
        lock = threading.Lock()

        def handler(n: int) -> int:
            with lock:
                calls.append(n)
                kill = len(calls) % 25 == 0
            if kill:  # between this round's claim and its outcome write: every pooled connection dies
                faults.terminate_postgres_connections(postgres_url, application_name="errands-rounds")
            return n

        engine = TaskEngine(store, handlers={"h": handler}, concurrency=8)
        ids = engine.submit_many("h", list(range(200)))
        # The test reads on connections of its own, which the kills leave alone.
        view = TaskEngine(watcher)
        records = _work_until_succeeded(engine, view, 300)
        assert sorted(records) == sorted(ids)
        assert {r.status for r in records.values()} == {TaskStatus.SUCCEEDED}
        assert {r.attempts for r in records.values()} == {1}
        assert sorted(r.result for r in records.values()) == list(range(200))
        assert len(calls) >= 200 and sorted(set(calls)) == list(range(200))
    finally:
        watcher.close()
        store.close()


@pytest.mark.services
@pytest.mark.parametrize("when", ["before", "commit", "after_commit"])
def test_a_round_statement_that_meets_a_fault_costs_retries_on_postgres(when: str, postgres_url: str) -> None:
    """The worker's round on PostgreSQL (outcomes written and next tasks claimed in one statement) meets dropped
    connections, before it, at its commit, and after it committed: every task succeeds, its attempt counted once,
    and none is left running."""
    store = open_store(postgres_url)
    try:
        plan = faults.FaultPlan(match=r"WITH done AS", rate=0.2, kinds=("dropped",), when=(when,), seed=5,
                                limit=6)
        with faults.inject(store, plan):
            engine = TaskEngine(store, handlers={"h": lambda n: n}, concurrency=8)
            ids = engine.submit_many("h", list(range(120)))
            records = _work_until_succeeded(engine, engine, 200, plan.paused)
        assert plan.injected, "no round met a fault"
        assert sorted(records) == sorted(ids)
        assert {r.status for r in records.values()} == {TaskStatus.SUCCEEDED}
        assert {r.attempts for r in records.values()} == {1}
        assert sorted(r.result for r in records.values()) == list(range(120))
    finally:
        store.close()


@pytest.mark.parametrize("when", ["before", "commit", "after_commit"])
def test_an_outcome_write_that_meets_a_fault_is_retried_not_a_failure(when: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    s = MemoryStore(clock=clock)
    plan = faults.FaultPlan(match=r"SET status = \?, result", rate=1.0, kinds=("locked", "dropped"),
                            when=(when,), seed=3, limit=3)
    with faults.inject(s, plan):
        engine = TaskEngine(s, handlers={"t": lambda p: p["n"] * 2})
        task_id = engine.submit("t", {"n": 21})
        rec = engine.wait(task_id, timeout=10)
    assert len(plan.injected) == (1 if when == "after_commit" else 3)
    assert rec.status is TaskStatus.SUCCEEDED and rec.result == 42 and rec.attempts == 1
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]  # the write that landed is known
    engine.close()
    s.close()


def test_an_outcome_that_cannot_be_written_abandons_the_run_which_runs_again_soon() -> None:
    clock = FakeClock()  # the lease never lapses by itself: only an abandon gives the task back
    s = MemoryStore(clock=clock)
    calls: list[int] = []

    def handler(_p: Any, ctx: TaskContext) -> str:
        calls.append(ctx.attempt)
        return "ok"

    # Every write of the outcome fails: the first one and each retry of the shared policy.
    plan = faults.FaultPlan(match=r"SET status = \?, result", rate=1.0, kinds=("locked",),
                            limit=len(RETRY_DELAYS) + 1)
    with faults.inject(s, plan):
        engine = TaskEngine(s, handlers={"t": handler})
        task_id = engine.submit("t", {})
        rec = engine.wait(task_id, timeout=10)
    assert rec.status is TaskStatus.SUCCEEDED and rec.error is None
    assert calls == [1, 1] and rec.attempts == 1  # the abandoned invocation is not counted as an attempt
    engine.close()
    s.close()


@pytest.mark.parametrize("when", ["before", "commit", "after_commit"])
def test_a_claim_that_meets_a_fault_starts_the_task_at_a_later_pass(when: str) -> None:
    clock = FakeClock()
    s = MemoryStore(clock=clock)
    calls: list[int] = []
    plan = faults.FaultPlan(match=r"UPDATE em_tasks SET status = \?, owner = \?", rate=1.0,
                            kinds=("dropped",), when=(when,), limit=1)
    with faults.inject(s, plan):
        engine = TaskEngine(s, handlers={"t": lambda p: calls.append(1)})
        task_id = engine.submit("t", {})
        assert engine.run_once() == 0  # logged, not raised
        rec = engine.wait(task_id, timeout=10)
    assert len(plan.injected) == 1
    assert rec.status is TaskStatus.SUCCEEDED and rec.attempts == 1 and calls == [1]
    engine.close()
    s.close()


def test_an_engine_never_takes_again_a_task_it_still_runs() -> None:
    # Renewals cannot reach the database and the lease lapses while the handler still runs here: another
    # worker may take the task (at least once), but this engine must not start it a second time itself.
    clock = FakeClock()
    s = MemoryStore(clock=clock)
    release, calls = threading.Event(), []

    def hold(_p: Any) -> str:
        calls.append(1)
        release.wait(10)
        return "done"

    plan = faults.FaultPlan(match=r"SET lease_expires = \? WHERE id", rate=1.0, kinds=("dropped",))
    with faults.inject(s, plan):
        engine = TaskEngine(s, handlers={"t": hold}, lease_for=1.0, concurrency=4)
        task_id = engine.submit("t", {})
        assert engine.run_once() == 1
        clock.advance(5)
        assert engine.run_once() == 0
        release.set()
        rec = engine.wait(task_id, timeout=10)
    assert rec.status is TaskStatus.SUCCEEDED and calls == [1]
    engine.close()
    s.close()


def test_recent_and_remove(store: Any) -> None:
    clock = FakeClock()
    s = MemoryStore(clock=clock)
    engine = TaskEngine(s, handlers={"t": lambda p: p})
    ids = []
    for i in range(5):
        ids.append(engine.submit("t", {"i": i}))
        clock.advance(1)
    assert [r.id for r in engine.recent(3)] == ids[::-1][:3]
    assert engine.remove(ids[0]) is True and engine.remove(ids[0]) is False
    assert engine.get(ids[0]) is None
    assert len(engine.recent(10, status="PENDING")) == 4
    engine.close()
    s.close()


def test_async_handler(store: Any) -> None:
    async def double(p: Any) -> int:
        return int(p["n"]) * 2

    engine = TaskEngine(store, handlers={"double": double})
    assert engine.wait(engine.submit("double", {"n": 21})).result == 42
    engine.close()


@dataclass
class Line:
    sku: str
    qty: int = 1


@dataclass
class Order:
    id: str
    lines: list[Line] = field(default_factory=list)


class Greeting(TypedDict):
    name: str
    times: int


def test_typed_handler_builds_dataclasses_and_typeddicts(store: Any) -> None:
    seen: list[Any] = []

    @typed_handler
    def place(order: Order) -> int:
        seen.append(order)
        return sum(line.qty for line in order.lines)

    @typed_handler
    def greet(g: Greeting, ctx: TaskContext) -> str:
        return f"{g['name'] * g['times']}@{ctx.attempt}"

    engine = TaskEngine(store, handlers={"place": place, "greet": greet})
    a = engine.submit("place", {"id": "o1", "lines": [{"sku": "x", "qty": 2}, {"sku": "y"}]})
    b = engine.submit("greet", {"name": "ab", "times": 2})
    c = engine.submit("place", {"id": "o2", "lines": [{"sku": "x", "qty": "many"}]})
    d = engine.submit("greet", {"name": "ab"})
    assert engine.wait(a).result == 3
    assert seen[0] == Order(id="o1", lines=[Line("x", 2), Line("y", 1)])
    assert engine.wait(b).result == "abab@1"
    bad = engine.wait(c)
    assert bad.status is TaskStatus.FAILED and bad.attempts == 1
    assert "params.lines[0].qty must be int, got 'many'" in (bad.error or "")
    assert "params.times is required by Greeting" in (engine.wait(d).error or "")
    engine.close()


def test_typed_handler_with_pydantic(store: Any) -> None:
    pydantic = pytest.importorskip("pydantic")

    class Item(pydantic.BaseModel):  # type: ignore[name-defined,misc]
        name: str
        price: float

    def price(item: Item) -> float:
        return item.price * 2

    price.__annotations__["item"] = Item
    engine = TaskEngine(store, handlers={"price": typed_handler(price)})
    assert engine.wait(engine.submit("price", {"name": "a", "price": 2})).result == 4.0
    rec = engine.wait(engine.submit("price", {"name": "a"}))
    assert rec.status is TaskStatus.FAILED and "params.price" in (rec.error or "")
    engine.close()


def test_typed_handler_needs_an_annotation() -> None:
    def bare(p):  # type: ignore[no-untyped-def]
        return p

    with pytest.raises(ConfigError, match="annotate the first argument"):
        typed_handler(bare)


def test_runs_in_the_worker(store: Any) -> None:
    engine = TaskEngine(store, handlers={"t": lambda p: p["n"]})
    ids = [engine.submit("t", {"n": i}) for i in range(10)]
    worker = Worker(store, jobs=[engine.run_once], poll_interval=0.01)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"stop": stop})
    thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        engine.get(i).status is not TaskStatus.SUCCEEDED for i in ids  # type: ignore[union-attr]
    ):
        time.sleep(0.02)
    stop.set()
    thread.join()
    assert [engine.get(i).result for i in ids] == list(range(10))  # type: ignore[union-attr]
    engine.close()


def test_lapsed_lease_of_another_host_is_taken_again(store: Any) -> None:
    clock = FakeClock()
    s = MemoryStore(clock=clock)
    engine = TaskEngine(s, handlers={"t": lambda p: "done"}, lease_for=30)
    task_id = engine.submit("t", {})
    with s.transaction() as tx:
        tx.execute("UPDATE em_tasks SET status = 'RUNNING', owner = 'elsewhere:1:x', lease_expires = ? WHERE id = ?",
                   (clock.now() + 30, task_id))
    assert engine.recover() == 0
    assert engine.run_once() == 0
    clock.advance(31)
    assert engine.run_once() == 1
    assert engine.wait(task_id).status is TaskStatus.SUCCEEDED
    engine.close()
    s.close()


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from errands.core import TaskEngine, open_store

    marks = Path(sys.argv[2])

    def work(params):
        with open(marks, "a") as fh:
            fh.write("started\\n")
        time.sleep(600)

    engine = TaskEngine(open_store(sys.argv[1]), handlers={"work": work})
    while True:
        engine.run_once()
        time.sleep(0.01)
""")


def test_task_left_running_by_a_killed_process_runs_again_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    marks = tmp_path / "marks.txt"
    store = open_store(url)
    submitter = TaskEngine(store)
    task_id = submitter.submit("work", {"n": 1})
    proc = subprocess.Popen([sys.executable, "-c", CHILD, url, str(marks)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (marks.exists() and marks.read_text()):
        time.sleep(0.02)
    rec = submitter.get(task_id)
    assert rec is not None and rec.status is TaskStatus.RUNNING
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The lease (60s) has not lapsed: only the dead owner's pid says the task is orphaned.
    completed: list[str] = []
    engine = TaskEngine(store, handlers={"work": lambda p: completed.append("x") or "finished"})
    rec = engine.wait(task_id, timeout=10)
    assert rec.status is TaskStatus.SUCCEEDED and rec.result == "finished" and rec.attempts == 2
    engine.drain(timeout=1)
    assert completed == ["x"]
    assert marks.read_text() == "started\n"
    engine.close()
    store.close()


@pytest.mark.services
def test_on_postgres(postgres_url: str) -> None:
    store = open_store(postgres_url)
    try:
        engine = TaskEngine(store, handlers={"sq": lambda p: p * p}, concurrency=4)
        engine.register("limited", lambda p: p, max_concurrency=1)
        ids = [engine.submit("sq", i) for i in range(20)] + [engine.submit("limited", i) for i in range(3)]
        engine.drain()
        assert [engine.get(i).result for i in ids] == [i * i for i in range(20)] + [0, 1, 2]  # type: ignore[union-attr]
        engine.close()
    finally:
        store.close()


class _MeetAtTheCount(faults.FaultPlan):
    """Injects nothing; holds each engine at its count of running tasks until the other has counted too
    (or a few seconds have passed), the interleaving under which count-then-claim over-admits."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=3)

    def decide(self, sql: str) -> faults.Fault | None:
        if "COUNT(*)" in sql and "em_tasks" in sql and "GROUP BY type" in sql:
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                pass
        return super().decide(sql)


@pytest.mark.services
def test_max_concurrency_holds_across_two_engines_racing_on_postgres(postgres_url: str) -> None:
    release = threading.Event()
    running: list[str] = []

    def hold(p: Any) -> None:
        running.append(p)
        release.wait(20)

    stores = [open_store(postgres_url), open_store(postgres_url)]
    plan = _MeetAtTheCount(2)
    engines: list[TaskEngine] = []
    try:
        with faults.inject(stores[0], plan), faults.inject(stores[1], plan):
            for s in stores:
                engine = TaskEngine(s, concurrency=4)
                engine.register("single", hold, max_concurrency=1)
                engines.append(engine)
            ids = [engines[0].submit("single", f"t{i}") for i in range(4)]
            for engine in engines:
                engine.recover()
            started: list[int] = []
            threads = [threading.Thread(target=lambda e=e: started.append(e.run_once())) for e in engines]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            with stores[0].read() as tx:
                row = tx.one("SELECT COUNT(*) FROM em_tasks WHERE status = 'RUNNING'")
            assert row is not None and int(row[0]) == 1 and sum(started) == 1
            release.set()
            for engine in engines:
                engine.drain(timeout=20)
            assert all(engines[0].get(i).status is TaskStatus.SUCCEEDED for i in ids)  # type: ignore[union-attr]
    finally:
        release.set()
        for engine in engines:
            engine.close()
        for s in stores:
            s.close()
