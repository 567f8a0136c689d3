"""Crash test of errands-durable: a worker subprocess is SIGKILLed at random moments while it runs 100
executions of a five-step workflow; after restarts every execution succeeds, at-most-once steps never
ran twice in one attempt, and no step ran again once its result was checkpointed."""

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

import pytest

WORKER = textwrap.dedent(
    """
    import random, sqlite3, sys, time, uuid
    from errands.durable import DurableRunner, RetryPresets, StepConfig, StepSemantics

    store_url, record_path = sys.argv[1], sys.argv[2]
    rec = sqlite3.connect(record_path, isolation_level=None, timeout=30)

    def make(i):
        def run(step):
            value = f"s{i}-{uuid.uuid4().hex[:8]}"
            rec.execute("INSERT INTO runs (execution, step, attempt, value) VALUES (?, ?, ?, ?)",
                        (step.execution_id, i, step.attempt, value))
            time.sleep(random.random() * 0.01)  # the side effect happened; a kill now loses the result
            return value
        return run

    def five(event, ctx):
        out = []
        for i in range(5):
            sem = StepSemantics.AT_MOST_ONCE_PER_RETRY if i % 2 == 0 else StepSemantics.AT_LEAST_ONCE_PER_RETRY
            out.append(ctx.step(f"step{i}", make(i), config=StepConfig(
                step_semantics=sem, retry_strategy=RetryPresets.immediate(50))))
        return out

    runner = DurableRunner(store_url, functions={"five": five}, lease_for=1.0)
    runner.serve(poll_interval=0.01)
    """
)

N_EXECUTIONS = 100
N_KILLS = 30


@pytest.mark.crash
def test_worker_killed_at_random_moments(tmp_path: Path) -> None:
    from errands.durable import DurableRunner, ExecutionStatus, OperationType

    store_url = f"sqlite:///{tmp_path / 'durable.db'}"
    record_path = tmp_path / "runs.db"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    rec = sqlite3.connect(record_path, isolation_level=None)
    rec.execute("PRAGMA journal_mode = WAL")
    rec.execute("CREATE TABLE runs (seq INTEGER PRIMARY KEY AUTOINCREMENT, execution TEXT, step INTEGER, "
                "attempt INTEGER, value TEXT)")
    runner = DurableRunner(store_url, functions={"five": lambda e, c: None})
    ids = [runner.start("five", {"i": i}, execution_id=f"exec-{i:03d}") for i in range(N_EXECUTIONS)]
    rng = random.Random(int(os.environ.get("ERRANDS_CRASH_SEED", "7")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    log_path = tmp_path / "worker.log"

    def spawn() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen([sys.executable, str(script), store_url, str(record_path)], env=env,
                                    stdout=subprocess.DEVNULL, stderr=log)

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

    infos = [runner.get(i) for i in ids]
    assert [i.status for i in infos] == [ExecutionStatus.SUCCEEDED] * N_EXECUTIONS, [
        (i.execution_id, i.status, i.error) for i in infos if i.status is not ExecutionStatus.SUCCEEDED]
    rows = rec.execute("SELECT execution, step, attempt, value FROM runs ORDER BY seq").fetchall()
    runs: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for execution, step, attempt, value in rows:
        runs.setdefault((execution, step), []).append((attempt, value))
    reruns = interrupted = 0
    for info in infos:
        steps = [o for o in runner.history(info.execution_id) if o.type is OperationType.STEP]
        assert len(steps) == 5
        for i, value in enumerate(info.result):
            history = runs[(info.execution_id, i)]
            # the checkpointed result is the last run's: nothing ran again after the checkpoint
            assert history[-1][1] == value
            attempts = [a for a, _ in history]
            if i % 2 == 0:  # AT_MOST_ONCE_PER_RETRY: never twice in one attempt
                assert len(attempts) == len(set(attempts)), (info.execution_id, i, history)
                interrupted += len(attempts) - 1
            else:
                reruns += len(attempts) - 1
    sys.stderr.write(f"crash test: {kills} kills, {len(rows)} step runs, {reruns} at-least-once reruns, "
                     f"{interrupted} interrupted at-most-once attempts\n")
    runner.close()
    rec.close()
