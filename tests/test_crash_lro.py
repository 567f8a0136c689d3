"""Crash test of the lro engine: the process running handlers is SIGKILLed at random moments.

200 operations each take three resumes (two ``resume_via_tasks`` and a completion). A worker subprocess
fires the local scheduler's callbacks in-process; it is killed with SIGKILL at random moments (mid-handler:
the handlers sleep between their reads and writes) and restarted, alternating one transaction per handler
and batched resumes. Afterwards every operation is done exactly once: one completion event each, the
response of the third step, no failure, and no callback left behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from typing import Any

import pytest
from errands.core import Journal, open_store
from errands.lro import Config, LroClient, unmarshal_metadata

pytestmark = pytest.mark.crash

N = 200

WORKER = textwrap.dedent(
    """
    import os, random, sys, time
    from errands.lro import Config, LroClient, ResumableHandler, unmarshal_metadata

    db, batch = sys.argv[1], int(sys.argv[2])
    client = LroClient(Config(neuron="crash", store=db, lease_for=0.5, retry_delay=0.1, resume_batch=batch))
    log = open(db.replace("sqlite:///", "") + ".runs", "a")

    def step(op):
        state = op.decode_private_state(dict) or {"step": 0}
        log.write(f"{op.name} {state['step']}\\n"); log.flush()
        time.sleep(random.uniform(0, 0.008))
        state["step"] += 1
        if state["step"] < 3:
            op.set_private_state(state)
            op.save_metadata({"step": state["step"]})
            time.sleep(random.uniform(0, 0.008))
            op.resume_via_tasks("step")
        else:
            time.sleep(random.uniform(0, 0.008))
            op.complete({"steps": state["step"]})

    client.add_resumable_handlers(ResumableHandler("step", step))
    print("ready", flush=True)
    while True:
        if client.run_due(limit=25) == 0:
            time.sleep(0.01)
    """
)


def _remaining(client: LroClient) -> int:
    ops, _ = client.list_operations("done = false", page_size=1000)
    return len(ops)


def test_sigkill_mid_handler_every_operation_completes_exactly_once(tmp_path: Any) -> None:
    rng = random.Random(int(os.environ.get("ERRANDS_CRASH_SEED", "0")) or None)
    db = f"sqlite:///{tmp_path / 'crash.db'}"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    client = LroClient(Config(neuron="crash", store=db))
    for i in range(N):
        client.new_operation(f"operations/c{i:03d}", {"step": 0}).resume_via_tasks("step")

    kills = 0
    restarts = 0
    deadline = time.monotonic() + 60
    while _remaining(client) and time.monotonic() < deadline:
        batch = 1 if restarts % 2 == 0 else 10
        proc = subprocess.Popen([sys.executable, str(script), db, str(batch)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        restarts += 1
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready": the worker is firing callbacks from here on
        if kills < 12:
            time.sleep(rng.uniform(0.02, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            kills += 1
            continue
        # Enough crashes: let this one drain everything, then stop it.
        while _remaining(client) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # leases of the last crash lapse; stale callbacks are acknowledged
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

    assert kills >= 10
    ops, _ = client.list_operations(page_size=1000)
    assert len(ops) == N
    for pb in ops:
        assert pb.done and not pb.HasField("error"), pb.name
        assert unmarshal_metadata(pb, dict) == {"step": 2.0}
        assert client.get_operation(pb.name).decode_private_state(dict) == {"step": 2}

    store = open_store(db)
    events = Journal(store).read(0, limit=10 * N, subjects=["lro.operation.done"])
    per_op = Counter(e.data["name"] for e in events)
    assert len(per_op) == N and set(per_op.values()) == {1}, "each operation completes exactly once"
    runs = Counter(line.split()[0] for line in (tmp_path / "crash.db.runs").read_text().splitlines())
    assert len(runs) == N and min(runs.values()) >= 3  # every operation really went through its three steps
    assert sum(runs.values()) > 3 * N  # some handlers were killed part-way and ran again
    leftover = client.scheduler.pending()
    store.close()
    assert leftover == 0, f"{leftover} callbacks left behind"
    client.close()


DROP_WORKER = textwrap.dedent(
    """
    import sqlite3, sys, time
    from errands.lro import Config, LroClient, ResumableHandler

    url, record_path, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rec = sqlite3.connect(record_path, isolation_level=None, timeout=30)
    client = LroClient(Config(neuron="drop", store=url, lease_for=1.0, retry_delay=0.05, resume_batch=batch))

    def step(op):
        state = op.decode_private_state(dict) or {"step": 0, "log": []}
        rec.execute("INSERT INTO runs (name, step) VALUES (?, ?)", (op.name, state["step"]))
        time.sleep(0.005)  # a drop now hits the handler's own saves
        if state["step"] < 2:
            op.set_private_state({"step": state["step"] + 1, "log": state["log"] + [state["step"]]})
            op.save_metadata({"step": state["step"] + 1})
            op.resume_via_tasks("step")
        else:
            op.complete({"steps": state["step"]})

    client.add_resumable_handlers(ResumableHandler("step", step))
    print("ready", flush=True)
    while True:
        try:
            if client.run_due(limit=20) == 0:
                time.sleep(0.01)
        except Exception as exc:  # what a core Worker does with a failing job: log it and carry on
            sys.stderr.write(f"run_due raised {type(exc).__name__}: {exc}\\n")
            time.sleep(0.01)
    """
)

N_DROP = 100


@pytest.mark.services
def test_dropped_postgres_connections_lose_and_fail_no_operation(postgres_url: str, tmp_path: Any) -> None:
    import sqlite3

    from errands.core.testing import faults

    record_path = tmp_path / "runs.db"
    rec = sqlite3.connect(record_path, isolation_level=None)
    rec.execute("PRAGMA journal_mode = WAL")
    rec.execute("CREATE TABLE runs (seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, step INTEGER)")
    script = tmp_path / "worker.py"
    script.write_text(DROP_WORKER)
    client = LroClient(Config(neuron="drop", store=postgres_url))
    with client.batch():
        for i in range(N_DROP):
            client.new_operation(f"operations/d{i:03d}", {"step": 0},
                                 private_state={"step": 0, "log": []}).resume_via_tasks("step")
    rng = random.Random(int(os.environ.get("ERRANDS_CRASH_SEED", "0")) or None)
    workers = [faults.WorkerProcess([sys.executable, str(script), postgres_url, str(record_path), str(batch)],
                                    env={"PYTHONUNBUFFERED": "1"}) for batch in (1, 10)]
    drops = rounds = 0
    try:
        for w in workers:
            w.start()
        deadline = time.monotonic() + 60
        while faults.retry_through_faults(lambda: len(client.list_operations("done = false", page_size=1000)[0])) and (
                time.monotonic() < deadline):
            time.sleep(rng.uniform(0.05, 0.25))
            if rounds < 25:
                drops += faults.terminate_postgres_connections(postgres_url)
                rounds += 1
            assert all(w.alive for w in workers), "a worker died of a dropped connection"
    finally:
        for w in workers:
            w.kill()

    ops, _ = faults.retry_through_faults(lambda: client.list_operations(page_size=1000))
    assert len(ops) == N_DROP
    assert not [pb.name for pb in ops if not pb.done], "operations stuck"
    assert not [(pb.name, pb.error.message) for pb in ops if pb.HasField("error")], "failed by a fault"
    for pb in ops:
        assert unmarshal_metadata(pb, dict) == {"step": 2.0}, pb.name
        state = faults.retry_through_faults(lambda pb=pb: client.get_operation(pb.name)).decode_private_state(dict)
        assert state == {"step": 2, "log": [0, 1]}, (pb.name, state)  # every step committed exactly once
    assert client.core_store is not None
    events = faults.retry_through_faults(lambda: Journal(client.core_store).read(0, limit=10 * N_DROP, subjects=["lro.operation.done"]))
    per_op = Counter(e.data["name"] for e in events)
    assert len(per_op) == N_DROP and set(per_op.values()) == {1}, "each operation completes exactly once"
    assert faults.retry_through_faults(client.scheduler.pending) == 0, "callbacks left behind"
    assert drops > 0 and rounds > 3, f"the drops never hit the workers ({drops} in {rounds} rounds)"
    runs = Counter(name for name, in rec.execute("SELECT name FROM runs"))
    assert len(runs) == N_DROP and min(runs.values()) >= 3
    sys.stderr.write(f"lro drop test: {drops} connections dropped in {rounds} rounds, {sum(runs.values())} "
                     f"handler runs for {3 * N_DROP} steps\n")
    client.close()
    rec.close()
