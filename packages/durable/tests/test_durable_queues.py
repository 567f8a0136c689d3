"""Queues (concurrency across processes, worker concurrency, rate limits, priority, dedup), cron schedules
and ``max_parallelism``, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from errands.core import ConfigError, FakeClock
from errands.durable import DurableContext, DurableRunner, ExecutionStatus, QueueDeduplicatedError


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'durable.db'}"
    return str(request.getfixturevalue("postgres_url"))


def _echo(event: Any, ctx: DurableContext) -> Any:
    return ctx.step("echo", lambda _: event)


class Overlap:
    """Counts the steps running at once; ``hold`` keeps each step running until ``want`` are (or a timeout)."""

    def __init__(self, want: int = 1) -> None:
        self.want = want
        self.active = 0
        self.most = 0
        self.order: list[Any] = []
        self._cond = threading.Condition()

    def step(self, value: Any) -> Any:
        with self._cond:
            self.active += 1
            self.most = max(self.most, self.active)
            self.order.append(value)
            self._cond.notify_all()
            self._cond.wait_for(lambda: self.active >= self.want, timeout=1)
        time.sleep(0.05)  # room for one more to start, were the limit not held
        with self._cond:
            self.active -= 1
        return value

    def function(self) -> Any:
        def run(event: Any, ctx: DurableContext) -> Any:
            return ctx.step("work", lambda _: self.step(event))

        return run


def _statuses(runner: DurableRunner, ids: list[str]) -> list[ExecutionStatus]:
    return [runner.get(i).status for i in ids]


# -- queues ---------------------------------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import contextlib, os, sqlite3, sys, time
    from errands.durable import DurableRunner

    store_url, record_path = sys.argv[1], sys.argv[2]

    def work(step):
        started = time.time()
        time.sleep(0.03)
        with contextlib.closing(sqlite3.connect(record_path, isolation_level=None, timeout=30)) as rec:
            rec.execute("INSERT INTO runs (execution, pid, started, ended) VALUES (?, ?, ?, ?)",
                        (step.execution_id, os.getpid(), started, time.time()))
        return step.execution_id

    def job(event, ctx):
        return ctx.step("work", work)

    runner = DurableRunner(store_url, functions={"job": job}, max_parallelism=4)
    runner.add_queue("one", concurrency=1)
    print("ready", flush=True)
    runner.serve(poll_interval=0.01)
    """
)


def test_a_queue_with_concurrency_1_never_runs_two_at_once_across_two_worker_processes(
        url: str, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    record = tmp_path / "runs.db"
    rec = sqlite3.connect(record, isolation_level=None)
    rec.execute("PRAGMA journal_mode = WAL")
    rec.execute("CREATE TABLE runs (execution TEXT, pid INTEGER, started REAL, ended REAL)")
    runner = DurableRunner(url, functions={"job": _echo})
    runner.add_queue("one", concurrency=1)
    ids = [runner.start("job", i, queue="one") for i in range(12)]
    workers = [subprocess.Popen([sys.executable, str(script), url, str(record)], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(s.terminal for s in _statuses(runner, ids)):
            time.sleep(0.05)
    finally:
        for w in workers:
            w.terminate()
            w.wait(10)
            if w.stdout is not None:
                w.stdout.close()
    assert _statuses(runner, ids) == [ExecutionStatus.SUCCEEDED] * len(ids)
    runs = rec.execute("SELECT execution, started, ended FROM runs ORDER BY started").fetchall()
    rec.close()
    assert sorted(r[0] for r in runs) == sorted(ids)  # each ran once
    for (_, _, ended), (_, started, _) in zip(runs, runs[1:]):
        assert started >= ended, runs  # the next began after the last ended: never two at once
    runner.close()


def test_worker_concurrency_bounds_what_one_worker_runs_of_the_queue(url: str) -> None:
    overlap = Overlap(want=3)  # a step waits for a third that must never come
    runner = DurableRunner(url, functions={"job": overlap.function()}, max_parallelism=4)
    runner.add_queue("q", worker_concurrency=2)
    ids = [runner.start("job", i, queue="q") for i in range(6)]
    runner.drain()
    assert _statuses(runner, ids) == [ExecutionStatus.SUCCEEDED] * 6
    assert overlap.most == 2
    runner.close()


def test_global_concurrency_holds_across_two_runners_in_one_process(url: str) -> None:
    overlap = Overlap(want=3)
    runners = [DurableRunner(url, functions={"job": overlap.function()}, max_parallelism=4) for _ in range(2)]
    for r in runners:
        r.add_queue("q", concurrency=2)
    ids = [runners[0].start("job", i, queue="q") for i in range(6)]
    threads = [threading.Thread(target=r.drain) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    runners[0].drain()
    assert _statuses(runners[0], ids) == [ExecutionStatus.SUCCEEDED] * 6
    assert overlap.most == 2
    for r in runners:
        r.close()


def test_a_rate_limit_admits_at_most_limit_per_period(url: str) -> None:
    clock = FakeClock()
    runner = DurableRunner(url, functions={"job": _echo}, clock=clock)
    runner.add_queue("slow", rate_limit=(2, 60.0))
    ids = [runner.start("job", i, queue="slow") for i in range(5)]
    done = []
    for _ in range(3):
        runner.drain()
        done.append(sum(s is ExecutionStatus.SUCCEEDED for s in _statuses(runner, ids)))
        clock.advance(61)
    assert done == [2, 4, 5]
    runner.close()


def test_a_queue_admits_lower_priority_first_then_oldest(url: str) -> None:
    clock = FakeClock()
    order: list[str] = []

    def job(event: Any, ctx: DurableContext) -> Any:
        return ctx.step("record", lambda _: order.append(event))

    runner = DurableRunner(url, functions={"job": job}, clock=clock)
    runner.add_queue("q", concurrency=1)
    for name, priority in (("c5", 5), ("a1", 1), ("d0", 0), ("b3", 3), ("e1", 1)):
        runner.start("job", name, queue="q", priority=priority)
        clock.advance(1)
    runner.drain()
    assert order == ["d0", "a1", "e1", "b3", "c5"]
    runner.close()


def test_a_second_start_with_a_held_dedup_id_raises_and_starts_nothing(url: str) -> None:
    runner = DurableRunner(url, functions={"job": _echo})
    runner.add_queue("q")
    first = runner.start("job", 1, queue="q", dedup_id="order-7", execution_id="first")
    assert runner.get(first).status is ExecutionStatus.ENQUEUED
    with pytest.raises(QueueDeduplicatedError) as caught:
        runner.start("job", 2, queue="q", dedup_id="order-7", execution_id="second")
    assert (caught.value.queue, caught.value.dedup_id, caught.value.execution_id) == ("q", "order-7", "first")
    assert "order-7" in str(caught.value) and "first" in str(caught.value)
    assert [i.execution_id for i in runner.list()] == ["first"]
    assert runner.start("job", 1, queue="q", dedup_id="order-7", execution_id="first") == "first"  # idempotent
    runner.add_queue("other")
    runner.start("job", 3, queue="other", dedup_id="order-7", execution_id="elsewhere")  # per queue
    runner.drain()
    assert runner.get(first).result == 1
    again = runner.start("job", 4, queue="q", dedup_id="order-7", execution_id="again")  # free once it ended
    runner.drain()
    assert runner.get(again).result == 4
    runner.close()


def test_terminating_an_enqueued_execution_frees_its_place_and_dedup_id(url: str) -> None:
    runner = DurableRunner(url, functions={"job": _echo})
    runner.add_queue("q", concurrency=1)
    runner.start("job", 1, queue="q", dedup_id="d", execution_id="x")
    assert runner.terminate("x").status is ExecutionStatus.TERMINATED
    runner.start("job", 2, queue="q", dedup_id="d", execution_id="y")
    runner.drain()
    assert runner.get("y").result == 2 and runner.get("x").status is ExecutionStatus.TERMINATED
    runner.close()


def test_a_signal_to_an_enqueued_execution_is_kept_until_the_queue_admits_it(url: str) -> None:
    def waits(event: Any, ctx: DurableContext) -> Any:
        return ctx.wait_for_signal("go")

    runner = DurableRunner(url, functions={"waits": waits, "job": Overlap().function()})
    runner.add_queue("q", concurrency=1)
    runner.start("job", 0, queue="q", execution_id="ahead")
    runner.start("waits", None, queue="q", execution_id="behind")
    assert runner.send_signal("behind", "go", 42) is False
    assert runner.get("behind").status is ExecutionStatus.ENQUEUED  # the signal did not jump the queue
    runner.drain()
    assert runner.get("behind").result == 42
    runner.close()


def test_bad_queue_arguments_are_config_errors_naming_the_culprit() -> None:
    runner = DurableRunner("memory://", functions={"job": _echo})
    runner.add_queue("known")
    with pytest.raises(ConfigError) as caught:
        runner.start("job", 1, queue="nope")
    assert "'nope'" in str(caught.value) and "'known'" in str(caught.value) and caught.value.field == "queue"
    with pytest.raises(ConfigError) as caught:
        runner.add_queue("", concurrency=0, worker_concurrency=-1, rate_limit=(1, 0))
    assert [p.field for p in caught.value.problems] == ["name", "concurrency", "worker_concurrency", "rate_limit"]
    for kwargs, field in (({"queue": "known", "priority": "high"}, "priority"),
                          ({"queue": "known", "dedup_id": ""}, "dedup_id"), ({"dedup_id": "d"}, "queue")):
        with pytest.raises(ConfigError) as caught:
            runner.start("job", 1, **kwargs)
        assert caught.value.field == field
    assert runner.list() == []
    runner.close()


# -- schedules ------------------------------------------------------------------------------------
def test_a_cron_schedule_runs_once_per_tick_with_two_workers(url: str) -> None:
    clock = FakeClock(1_700_000_000.0)
    ran: list[str] = []

    def tick(event: Any, ctx: DurableContext) -> Any:
        return ctx.step("run", lambda step: ran.append(step.execution_id))

    runners = [DurableRunner(url, functions={"tick": tick}, clock=clock) for _ in range(2)]
    for r in runners:
        r.schedule("minutely", "tick", "* * * * *", input={"k": 1})
    ticks = []
    for _ in range(4):
        clock.set((clock.now() // 60 + 1) * 60)  # the next tick
        ticks.append(clock.now())
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=lambda r=r: (barrier.wait(10), r.drain())) for r in runners]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    clock.advance(3600)  # an hour with no worker: its missed ticks start once, as the latest
    ticks.append(clock.now() // 60 * 60)
    for r in runners:
        r.drain()
    infos = runners[0].list(function="tick")
    expected = sorted(f"minutely@{time.strftime('%Y-%m-%dT%H:%M:%S+00:00', time.gmtime(t))}" for t in ticks)
    assert sorted(i.execution_id for i in infos) == expected
    assert sorted(ran) == expected  # each tick ran once
    assert all(i.status is ExecutionStatus.SUCCEEDED and i.input == {"k": 1} for i in infos)
    assert runners[0].unschedule("minutely") and not runners[1].unschedule("minutely")
    for r in runners:
        r.close()


def test_a_schedule_checks_its_function_and_cron() -> None:
    runner = DurableRunner("memory://", functions={"job": _echo})
    with pytest.raises(ConfigError) as caught:
        runner.schedule("a/b", "nope", "every minute")
    assert [p.field for p in caught.value.problems] == ["name", "function", "cron"]
    runner.close()


# -- max_parallelism ------------------------------------------------------------------------------
def test_max_parallelism_4_runs_four_slow_steps_at_once(url: str) -> None:
    barrier = threading.Barrier(4, timeout=20)  # breaks (the steps fail) unless four run at once

    def slow(event: Any, ctx: DurableContext) -> Any:
        return ctx.step("slow", lambda _: barrier.wait() >= 0)

    runner = DurableRunner(url, functions={"slow": slow}, max_parallelism=4)
    ids = [runner.start("slow", i) for i in range(4)]
    runner.drain()
    assert [runner.get(i).result for i in ids] == [True] * 4
    runner.close()


def test_max_parallelism_in_a_core_worker_never_exceeds_its_budget(url: str) -> None:
    overlap = Overlap(want=3)
    runner = DurableRunner(url, functions={"job": overlap.function()}, max_parallelism=2)
    ids = [runner.start("job", i) for i in range(6)]
    worker = runner.worker(poll_interval=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(s.terminal for s in _statuses(runner, ids)):
        time.sleep(0.02)
    stop.set()
    thread.join(30)
    assert _statuses(runner, ids) == [ExecutionStatus.SUCCEEDED] * 6
    assert overlap.most == 2
    runner.close()


def test_max_parallelism_must_be_a_positive_integer() -> None:
    with pytest.raises(ConfigError) as caught:
        DurableRunner("memory://", max_parallelism=0)
    assert caught.value.field == "max_parallelism"


def _grouped_checkpoints(url: str, fence: int | None) -> tuple[DurableRunner, list[str]]:
    """Four executions of a one-step workflow on four threads whose step checkpoints are held back until all four
    wait behind one group commit, then written as one group. ``fence``: the execution another invocation takes
    over (its run token moved) in the transaction before that group, so that its own fence fails inside it."""
    arrived = threading.Barrier(5, timeout=20)  # the four steps and this test
    go = threading.Event()

    def one(event: Any, ctx: DurableContext) -> Any:
        def step(_: Any) -> Any:
            arrived.wait()
            go.wait(20)
            return event * 10
        return ctx.step("one", step)

    runner = DurableRunner(url, functions={"one": one}, max_parallelism=4)
    ids = [runner.start("one", i, execution_id=f"grouped-{i}") for i in range(4)]
    committer = runner.store._committer
    seen: list[int] = []

    entered = threading.Event()

    def hold(tx: Any) -> None:
        entered.set()  # the holder's transaction is open: the checkpoints from now on queue behind it
        deadline = time.monotonic() + 20
        while len(committer._threads.queue) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        seen.append(len(committer._threads.queue))
        if fence is not None:
            tx.execute("UPDATE durable_executions SET run_token = run_token + 1 WHERE id = ?", (ids[fence],))

    drained = threading.Thread(target=runner.drain)
    drained.start()
    arrived.wait()  # every invocation runs its step: their takes are committed
    holder = threading.Thread(target=runner.store.group_commit, args=(hold,))
    holder.start()
    assert entered.wait(20)
    go.set()
    holder.join(30)
    drained.join(60)
    assert seen == [4]  # the four checkpoints waited behind the holder: they were written as one group
    return runner, ids


def test_checkpoints_of_concurrent_invocations_share_one_commit(url: str) -> None:
    runner, ids = _grouped_checkpoints(url, fence=None)
    assert [runner.get(i).status for i in ids] == [ExecutionStatus.SUCCEEDED] * 4
    assert [runner.get(i).result for i in ids] == [0, 10, 20, 30]
    runner.close()


def test_a_fenced_out_checkpoint_in_a_group_fails_alone(url: str) -> None:
    """One invocation of the group was taken over: its checkpoint is undone (its savepoint) and it stops; the
    other three are written and their executions end."""
    runner, ids = _grouped_checkpoints(url, fence=2)
    statuses = [runner.get(i).status for i in ids]
    assert statuses[:2] + statuses[3:] == [ExecutionStatus.SUCCEEDED] * 3
    assert statuses[2] is ExecutionStatus.RUNNING  # another invocation's now; this one wrote nothing
    assert [op.name for op in runner.history(ids[2]) if op.name == "one"] == []
    runner.close()
