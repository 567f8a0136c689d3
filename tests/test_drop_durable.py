"""Connection-drop test of errands-durable on PostgreSQL: two worker processes run 80 executions of a
four-step workflow (with a timer) while every connection to the database is terminated
(``pg_terminate_backend``) again and again. Every execution succeeds (0 failed by a fault, 0 stuck, 0 lost),
no at-most-once attempt runs twice, and no step runs again once its result was checkpointed."""

from __future__ import annotations

import os
import random
import sqlite3
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest

T = TypeVar("T")

WORKER = textwrap.dedent(
    """
    import sqlite3, sys, time, uuid
    from errands.durable import DurableRunner, RetryPresets, StepConfig, StepSemantics

    store_url, record_path = sys.argv[1], sys.argv[2]
    rec = sqlite3.connect(record_path, isolation_level=None, timeout=30)

    def make(i):
        def run(step):
            value = f"s{i}-{uuid.uuid4().hex[:8]}"
            rec.execute("INSERT INTO runs (execution, step, attempt, value) VALUES (?, ?, ?, ?)",
                        (step.execution_id, i, step.attempt, value))
            time.sleep(0.01)  # the side effect happened; a drop now hits its checkpoint
            return value
        return run

    def four(event, ctx):
        out = []
        for i in range(4):
            sem = StepSemantics.AT_MOST_ONCE_PER_RETRY if i % 2 == 0 else StepSemantics.AT_LEAST_ONCE_PER_RETRY
            out.append(ctx.step(f"step{i}", make(i), config=StepConfig(
                step_semantics=sem, retry_strategy=RetryPresets.immediate(50))))
            if i == 1:
                ctx.wait("pause", 0.05)
        return out

    runner = DurableRunner(store_url, functions={"four": four}, lease_for=2.0)
    print("ready", flush=True)
    runner.serve(poll_interval=0.01)
    """
)

N_EXECUTIONS = 80
MAX_DROPS = 25


def _retry(call: Callable[[], T]) -> T:
    """The checking side's own connections are dropped too: try again on a fresh one."""
    from errands.core import is_infrastructure_error

    for attempt in range(20):
        try:
            return call()
        except Exception as exc:
            if not is_infrastructure_error(exc) or attempt == 19:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


@pytest.mark.crash
@pytest.mark.services
def test_workers_survive_dropped_postgres_connections(postgres_url: str, tmp_path: Path) -> None:
    from errands.core.testing import faults
    from errands.durable import DurableRunner, ExecutionStatus, OperationType
    from errands.durable._runner import QUEUE

    record_path = tmp_path / "runs.db"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    rec = sqlite3.connect(record_path, isolation_level=None)
    rec.execute("PRAGMA journal_mode = WAL")
    rec.execute("CREATE TABLE runs (seq INTEGER PRIMARY KEY AUTOINCREMENT, execution TEXT, step INTEGER, "
                "attempt INTEGER, value TEXT)")
    runner = DurableRunner(postgres_url, functions={"four": lambda e, c: None}, lease_for=2.0)
    ids = [runner.start("four", {"i": i}, execution_id=f"drop-{i:03d}") for i in range(N_EXECUTIONS)]
    rng = random.Random(int(os.environ.get("ERRANDS_CRASH_SEED", "11")))
    env = {"PYTHONUNBUFFERED": "1"}
    workers = [faults.WorkerProcess([sys.executable, str(script), postgres_url, str(record_path)], env=env)
               for _ in range(2)]
    drops = rounds = 0

    def unfinished() -> list[str]:
        return [i for i in ids if not _retry(lambda i=i: runner.get(i)).status.terminal]  # type: ignore[misc]

    try:
        for w in workers:
            w.start()
        deadline = time.monotonic() + 90
        left = ids
        while left and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.05, 0.3))
            if rounds < MAX_DROPS:
                drops += faults.terminate_postgres_connections(postgres_url)
                rounds += 1
            assert all(w.alive for w in workers), "a worker died of a dropped connection"
            left = unfinished()
    finally:
        for w in workers:
            w.kill()

    infos: list[Any] = [_retry(lambda i=i: runner.get(i)) for i in ids]  # type: ignore[misc]
    assert not [i.execution_id for i in infos if not i.status.terminal], "executions stuck"
    assert [i.status for i in infos] == [ExecutionStatus.SUCCEEDED] * N_EXECUTIONS, [
        (i.execution_id, i.status, i.error) for i in infos if i.status is not ExecutionStatus.SUCCEEDED]
    assert _retry(lambda: runner.store.queue_size(QUEUE)) == 0
    assert drops > 0 and rounds > 3, f"the connection drops never hit the workers ({drops} in {rounds} rounds)"
    rows = rec.execute("SELECT execution, step, attempt, value FROM runs ORDER BY seq").fetchall()
    runs: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for execution, step, attempt, value in rows:
        runs.setdefault((execution, step), []).append((attempt, value))
    reruns = interrupted = 0
    for info in infos:
        steps = [o for o in _retry(lambda info=info: runner.history(info.execution_id))  # type: ignore[misc]
                 if o.type is OperationType.STEP]
        assert len(steps) == 4
        for i, value in enumerate(info.result):
            history = runs[(info.execution_id, i)]
            assert history[-1][1] == value  # nothing ran again after the checkpoint
            attempts = [a for a, _ in history]
            if i % 2 == 0:
                assert len(attempts) == len(set(attempts)), (info.execution_id, i, history)
                interrupted += len(attempts) - 1
            else:
                reruns += len(attempts) - 1
    sys.stderr.write(f"drop test: {drops} connections dropped in {rounds} rounds, {len(rows)} step runs, "
                     f"{reruns} at-least-once reruns, {interrupted} interrupted at-most-once attempts\n")
    runner.close()
    rec.close()
