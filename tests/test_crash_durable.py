"""Crash tests of errands-durable, with one worker script and one set of checks:

- SIGKILL: a worker subprocess is killed at random moments while it runs 100 executions of a five-step
  workflow on SQLite;
- connection drops: two worker processes run 80 executions of a four-step workflow (with a timer) on
  PostgreSQL while every connection to the database is terminated (``pg_terminate_backend``) again and again.

Afterwards every execution succeeded (0 failed by a fault, 0 stuck, 0 lost), at-most-once steps never ran
twice in one attempt, and no step ran again once its result was checkpointed.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest

# argv: store URL, record file, number of steps, lease_for, "wait" to pause on a timer after the second step.
WORKER = textwrap.dedent(
    """
    import random, sqlite3, sys, time, uuid
    from errands.durable import DurableRunner, RetryPresets, StepConfig, StepSemantics

    store_url, record_path, n_steps, lease_for, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    rec = sqlite3.connect(record_path, isolation_level=None, timeout=30)

    def make(i):
        def run(step):
            value = f"s{i}-{uuid.uuid4().hex[:8]}"
            rec.execute("INSERT INTO runs (execution, step, attempt, value) VALUES (?, ?, ?, ?)",
                        (step.execution_id, i, step.attempt, value))
            time.sleep(random.random() * 0.01)  # the side effect happened; a kill or drop now hits its checkpoint
            return value
        return run

    def steps(event, ctx):
        out = []
        for i in range(n_steps):
            sem = StepSemantics.AT_MOST_ONCE_PER_RETRY if i % 2 == 0 else StepSemantics.AT_LEAST_ONCE_PER_RETRY
            out.append(ctx.step(f"step{i}", make(i), config=StepConfig(
                step_semantics=sem, retry_strategy=RetryPresets.immediate(50))))
            if i == 1 and pause == "wait":
                ctx.wait("pause", 0.05)
        return out

    runner = DurableRunner(store_url, functions={"steps": steps}, lease_for=lease_for)
    print("ready", flush=True)
    runner.serve(poll_interval=0.01)
    """
)


def _setup(tmp_path: Path) -> tuple[Path, Path, sqlite3.Connection]:
    """The worker script and the record of every step run (its own SQLite file, outside the store)."""
    record_path = tmp_path / "runs.db"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    rec = sqlite3.connect(record_path, isolation_level=None)
    rec.execute("PRAGMA journal_mode = WAL")
    rec.execute("CREATE TABLE runs (seq INTEGER PRIMARY KEY AUTOINCREMENT, execution TEXT, step INTEGER, "
                "attempt INTEGER, value TEXT)")
    return script, record_path, rec


def _check(infos: list[Any], rec: sqlite3.Connection, history: Callable[[str], list[Any]], n_steps: int,
           ) -> tuple[int, int, int]:
    """Every execution succeeded, at-most-once steps ran once per attempt, nothing ran after its checkpoint.
    Returns (step runs, at-least-once reruns, interrupted at-most-once attempts)."""
    from errands.durable import ExecutionStatus, OperationType

    assert [i.status for i in infos] == [ExecutionStatus.SUCCEEDED] * len(infos), [
        (i.execution_id, i.status, i.error) for i in infos if i.status is not ExecutionStatus.SUCCEEDED]
    rows = rec.execute("SELECT execution, step, attempt, value FROM runs ORDER BY seq").fetchall()
    runs: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for execution, step, attempt, value in rows:
        runs.setdefault((execution, step), []).append((attempt, value))
    reruns = interrupted = 0
    for info in infos:
        steps = [o for o in history(info.execution_id) if o.type is OperationType.STEP]
        assert len(steps) == n_steps
        for i, value in enumerate(info.result):
            runs_of_step = runs[(info.execution_id, i)]
            # the checkpointed result is the last run's: nothing ran again after the checkpoint
            assert runs_of_step[-1][1] == value
            attempts = [a for a, _ in runs_of_step]
            if i % 2 == 0:  # AT_MOST_ONCE_PER_RETRY: never twice in one attempt
                assert len(attempts) == len(set(attempts)), (info.execution_id, i, runs_of_step)
                interrupted += len(attempts) - 1
            else:
                reruns += len(attempts) - 1
    return len(rows), reruns, interrupted


N_EXECUTIONS = 100
N_KILLS = 30


@pytest.mark.crash
def test_worker_killed_at_random_moments(tmp_path: Path) -> None:
    from errands.durable import DurableRunner

    store_url = f"sqlite:///{tmp_path / 'durable.db'}"
    script, record_path, rec = _setup(tmp_path)
    runner = DurableRunner(store_url, functions={"steps": lambda e, c: None})
    ids = [runner.start("steps", {"i": i}, execution_id=f"exec-{i:03d}") for i in range(N_EXECUTIONS)]
    rng = random.Random(int(os.environ.get("ERRANDS_CRASH_SEED", "7")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    log_path = tmp_path / "worker.log"

    def spawn() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen([sys.executable, str(script), store_url, str(record_path), "5", "1.0", "-"],
                                    env=env, stdout=subprocess.DEVNULL, stderr=log)

    kills = 0
    for _ in range(N_KILLS):
        proc = spawn()
        time.sleep(rng.uniform(0.25, 0.7))
        if proc.poll() is not None:
            raise AssertionError(f"worker exited on its own: {log_path.read_text()[-2000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    assert kills == N_KILLS
    final = spawn()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(runner.get(i).status.terminal for i in ids):
                break
            time.sleep(0.1)
    finally:
        final.send_signal(signal.SIGKILL)
        final.wait()

    n_rows, reruns, interrupted = _check([runner.get(i) for i in ids], rec, runner.history, 5)
    sys.stderr.write(f"crash test: {kills} kills, {n_rows} step runs, {reruns} at-least-once reruns, "
                     f"{interrupted} interrupted at-most-once attempts\n")
    runner.close()
    rec.close()


N_DROP_EXECUTIONS = 80
MAX_DROPS = 25


@pytest.mark.crash
@pytest.mark.services
def test_workers_survive_dropped_postgres_connections(postgres_url: str, tmp_path: Path) -> None:
    from errands.core.testing import faults
    from errands.durable import DurableRunner
    from errands.durable._schema import QUEUE

    script, record_path, rec = _setup(tmp_path)
    runner = DurableRunner(postgres_url, functions={"steps": lambda e, c: None}, lease_for=2.0)
    ids = [runner.start("steps", {"i": i}, execution_id=f"drop-{i:03d}") for i in range(N_DROP_EXECUTIONS)]
    rng = random.Random(int(os.environ.get("ERRANDS_CRASH_SEED", "11")))
    argv = [sys.executable, str(script), postgres_url, str(record_path), "4", "2.0", "wait"]
    workers = [faults.WorkerProcess(argv, env={"PYTHONUNBUFFERED": "1"}) for _ in range(2)]
    drops = rounds = 0

    def unfinished() -> list[str]:
        return [i for i in ids if not faults.retry_through_faults(lambda i=i: runner.get(i)).status.terminal]  # type: ignore[misc]

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

    infos: list[Any] = [faults.retry_through_faults(lambda i=i: runner.get(i)) for i in ids]  # type: ignore[misc]
    assert not [i.execution_id for i in infos if not i.status.terminal], "executions stuck"
    assert faults.retry_through_faults(lambda: runner.store.queue_size(QUEUE)) == 0
    assert drops > 0 and rounds > 3, f"the connection drops never hit the workers ({drops} in {rounds} rounds)"
    n_rows, reruns, interrupted = _check(infos, rec, lambda e: faults.retry_through_faults(lambda: runner.history(e)), 4)
    sys.stderr.write(f"drop test: {drops} connections dropped in {rounds} rounds, {n_rows} step runs, "
                     f"{reruns} at-least-once reruns, {interrupted} interrupted at-most-once attempts\n")
    runner.close()
    rec.close()
