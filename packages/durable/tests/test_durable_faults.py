"""DurableRunner under infrastructure faults and long steps: a locked or dropped database never fails an
execution, leases are renewed by a heartbeat while user code runs, one bad execution never strands the
rest of a batch, and a settled callback costs no lease."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from errands.core import DEFAULT_LEASE_FOR, ConfigError, FakeClock
from errands.core.testing import faults
from errands.durable import (
    CallbackConfig,
    DurableContext,
    DurableRunner,
    ExecutionStatus,
    OperationStatus,
    RetryPresets,
    StepConfig,
    StepSemantics,
    durable_function,
)
from errands.durable._schema import QUEUE


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'durable.db'}"
    return str(request.getfixturevalue("postgres_url"))


def _steps(event: Any, ctx: DurableContext) -> list[int]:
    return [ctx.step(f"s{i}", lambda _, i=i: i) for i in range(3)]


def _drive(runner: DurableRunner, clock: FakeClock, eid: str, *, rounds: int = 50) -> ExecutionStatus:
    """Run work and let the clock pass (never more than a second at a time) until the execution ends."""
    for _ in range(rounds):
        runner.drain()
        status = runner.get(eid).status
        if status.terminal:
            return status
        clock.advance(1.0)
    return runner.get(eid).status


@pytest.mark.parametrize("limit", [1, 6], ids=["once", "persistent"])
@pytest.mark.parametrize("kind", ["locked", "serialization", "dropped"])
@pytest.mark.parametrize("when", ["before", "commit", "after_commit"])
def test_a_fault_in_a_step_checkpoint_never_fails_the_execution(url: str, kind: str, when: str, limit: int) -> None:
    clock = FakeClock()
    runner = DurableRunner(url, clock=clock, functions={"steps": _steps})
    eid = runner.start("steps")
    plan = faults.FaultPlan(seed=1, rate=1.0, kinds=(kind,), when=(when,), match=r"INSERT INTO durable_operations",
                            limit=limit)
    with faults.inject(runner.store, plan):
        status = _drive(runner, clock, eid)
    assert plan.injected, "the plan injected nothing: the test tests nothing"
    info = runner.get(eid)
    assert status is ExecutionStatus.SUCCEEDED, info.error
    assert info.result == [0, 1, 2]
    runner.close()


def test_a_locked_database_during_a_long_step_checkpoint_never_fails_the_execution(tmp_path: Path) -> None:
    # A real second writer takes the lock while the step runs and holds it until the invocation is over;
    # the step is longer than a third of lease_for, so its checkpoint also renews the lease.
    path = tmp_path / "locked.db"
    clock = FakeClock()
    locks: list[Any] = []
    runs: list[int] = []

    def long_step(step: Any) -> str:
        runs.append(step.attempt)
        clock.advance(DEFAULT_LEASE_FOR / 2)
        if not runs[1:]:
            lock = faults.sqlite_write_lock(path)
            lock.__enter__()
            locks.append(lock)
        return "done"

    def fn(event: Any, ctx: DurableContext) -> str:
        return str(ctx.step("long", long_step))

    runner = DurableRunner(f"sqlite:///{path}?busy_timeout=50", clock=clock, functions={"fn": fn})
    eid = runner.start("fn")
    try:
        runner.work_once()
    finally:
        assert locks, "the step never took the lock"
        locks.pop().__exit__(None, None, None)
    assert runner.get(eid).status is ExecutionStatus.RUNNING
    status = _drive(runner, clock, eid)
    info = runner.get(eid)
    assert status is ExecutionStatus.SUCCEEDED, info.error
    assert info.result == "done" and runs == [1, 1]  # at least once: the unrecorded run is repeated
    runner.close()


@pytest.mark.parametrize("where", ["step", "map branch", "child context"])
def test_a_step_longer_than_the_lease_is_never_taken_over(tmp_path: Path, where: str) -> None:
    lease_for = 1.0
    lock = threading.Lock()
    active = [0]
    most = [0]
    attempts: list[int] = []

    def body(step: Any) -> str:
        with lock:
            attempts.append(step.attempt)
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(lease_for * 2.5)
        with lock:
            active[0] -= 1
        return "done"

    config = StepConfig(step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY, retry_strategy=RetryPresets.immediate(3))

    def fn(event: Any, ctx: DurableContext) -> str:
        if where == "map branch":
            return str(ctx.map("m", [1], lambda c, item, i, items: c.step("slow", body, config)).results()[0])
        if where == "child context":
            return str(ctx.run_in_child_context("c", lambda c: c.step("slow", body, config)))
        return str(ctx.step("slow", body, config))

    url = f"sqlite:///{tmp_path / 'long.db'}"
    runners = [DurableRunner(url, functions={"fn": fn}, lease_for=lease_for) for _ in range(2)]
    eid = runners[0].start("fn")
    stop = threading.Event()
    threads = [threading.Thread(target=r.serve, args=(stop,), kwargs={"poll_interval": 0.01}) for r in runners]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while not runners[0].get(eid).status.terminal and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    info = runners[0].get(eid)
    assert info.status is ExecutionStatus.SUCCEEDED and info.result == "done"
    assert attempts == [1] and most[0] == 1, "the at-most-once body ran again while it still ran"
    for r in runners:
        r.close()


def test_a_worker_that_lost_its_lease_logs_it_and_writes_nothing(tmp_path: Path) -> None:
    lease_for = 0.6
    started = threading.Event()
    lost_seen = threading.Event()

    def body(step: Any) -> str:
        started.set()
        lost_seen.wait(10)  # the heartbeat finds the execution terminated while the body runs
        return "too late"

    def fn(event: Any, ctx: DurableContext) -> Any:
        first = ctx.step("slow", body, StepConfig(step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY))
        return [first, ctx.step("after", lambda _: "never")]

    runner = DurableRunner(f"sqlite:///{tmp_path / 'lost.db'}", functions={"fn": fn}, lease_for=lease_for)
    eid = runner.start("fn")

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "lost" in record.getMessage() and eid in record.getMessage():
                lost_seen.set()

    handler = Seen()
    logging.getLogger("errands").addHandler(handler)
    worker = threading.Thread(target=runner.work_once)
    try:
        worker.start()
        assert started.wait(10)
        runner.terminate(eid, "operator")
        assert lost_seen.wait(10), "no log line says the lease was lost"
        worker.join(10)
    finally:
        logging.getLogger("errands").removeHandler(handler)
    assert runner.get(eid).status is ExecutionStatus.TERMINATED
    ops = {o.name: o for o in runner.history(eid)}
    assert ops["slow"].status is OperationStatus.STARTED and "after" not in ops  # nothing written after
    runner.close()


def test_an_error_in_one_execution_never_strands_the_rest_of_the_batch(url: str) -> None:
    clock = FakeClock()
    runner = DurableRunner(url, clock=clock, functions={"steps": _steps})
    ids = [runner.start("steps", execution_id=f"e{i}") for i in range(3)]
    # the load of the first claimed execution fails once
    plan = faults.FaultPlan(rate=1.0, match=r"RETURNING run_token, function", limit=1)
    with faults.inject(runner.store, plan):
        assert runner.work_once() == 3
    assert plan.injected
    statuses = [runner.get(i).status for i in ids]
    assert statuses.count(ExecutionStatus.SUCCEEDED) == 2 and ExecutionStatus.FAILED not in statuses
    [left] = [i for i in ids if not runner.get(i).status.terminal]
    assert _drive(runner, clock, left) is ExecutionStatus.SUCCEEDED
    runner.close()


def test_a_failed_invocation_is_abandoned_and_retried_promptly(url: str) -> None:
    clock = FakeClock()
    runner = DurableRunner(url, clock=clock, functions={"steps": _steps})
    eid = runner.start("steps")
    # the transaction that records the end fails every time this invocation tries it
    plan = faults.FaultPlan(rate=1.0, kinds=("dropped",), limit=3,
                            match=r"SET status = .{1,3}, result = .{1,3}, error = .{1,3}, ended_at")
    with faults.inject(runner.store, plan):
        runner.work_once()
    assert len(plan.injected) == 3
    assert runner.get(eid).status is ExecutionStatus.RUNNING
    clock.advance(1.0)  # a tenth of lease_for: the lease was given back, not left to lapse
    assert runner.work_once() == 1
    info = runner.get(eid)
    assert info.status is ExecutionStatus.SUCCEEDED and info.result == [0, 1, 2]
    runner.close()


def test_a_callback_settled_while_the_invocation_writes_it_costs_no_lease(url: str) -> None:
    clock = FakeClock()
    holder: list[DurableRunner] = []

    def fn(event: Any, ctx: DurableContext) -> Any:
        cb = ctx.create_callback("answer", CallbackConfig(timeout_seconds=5))

        def late(_: Any) -> None:
            clock.advance(6)  # past the callback's timeout ...
            holder[0].complete_callback(cb.callback_id, "yes")  # ... but the answer arrives first

        ctx.step("late answer", late)
        return cb.result()  # this invocation sees the timeout and writes it: the store has the answer

    runner = DurableRunner(url, clock=clock, functions={"fn": fn}, lease_for=10)
    holder.append(runner)
    eid = runner.start("fn")
    assert runner.work_once() == 1
    assert runner.work_once() == 1, "the execution waits out its lease"
    info = runner.get(eid)
    assert info.status is ExecutionStatus.SUCCEEDED and info.result == "yes"
    runner.close()


def test_wait_runs_only_the_awaited_execution_and_its_children(tmp_path: Path) -> None:
    ran: list[str] = []

    def parent(event: Any, ctx: DurableContext) -> Any:
        ran.append(f"parent {event}")
        return ctx.invoke("child", event, name="child")

    def child(event: Any, ctx: DurableContext) -> Any:
        ran.append(f"child {event}")
        return ctx.step("double", lambda _: event * 2)

    runner = DurableRunner(f"sqlite:///{tmp_path / 'w.db'}", functions={"parent": parent, "child": child})
    other = runner.start("child", 100)
    mine = runner.start("parent", 1)
    assert runner.wait(mine, timeout=10).result == 2
    assert "child 100" not in ran and runner.get(other).status is ExecutionStatus.RUNNING
    assert runner.wait(other, timeout=10).result == 200
    runner.close()


def test_a_taken_function_name_is_refused_naming_both() -> None:
    from errands.durable import DuplicateFunctionError

    def first(event: Any, ctx: DurableContext) -> int:
        return 1

    def second(event: Any, ctx: DurableContext) -> int:
        return 2

    runner = DurableRunner("memory://", functions={"f": first})
    runner.register("f", first)  # the same function again is fine
    with pytest.raises(DuplicateFunctionError) as err:
        runner.register("f", second)
    assert "first" in str(err.value) and "second" in str(err.value) and isinstance(err.value, ConfigError)
    assert runner.run("f").result == 1

    durable_function("faults-taken-name")(first)
    durable_function("faults-taken-name")(first)
    with pytest.raises(DuplicateFunctionError, match="first.*second|second.*first"):
        durable_function("faults-taken-name")(second)
    with pytest.raises(DuplicateFunctionError):
        runner.register("faults-taken-name", second)  # would shadow the module-level one
    runner.close()


def test_default_lease_is_short_so_a_killed_workers_execution_is_retried_within_seconds(tmp_path: Path) -> None:
    clock = FakeClock()
    runner = DurableRunner(f"sqlite:///{tmp_path / 'k.db'}", clock=clock, functions={"steps": _steps})
    assert runner.lease_for == DEFAULT_LEASE_FOR == 10.0
    eid = runner.start("steps")
    # a worker claims the execution and dies before it writes anything
    assert runner.store.claim(QUEUE, 1, lease_for=runner.lease_for)
    assert runner.work_once() == 0
    clock.advance(DEFAULT_LEASE_FOR + 0.5)
    assert runner.work_once() == 1
    assert runner.get(eid).result == [0, 1, 2]
    runner.close()

