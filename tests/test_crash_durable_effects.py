"""Crash test of ``ctx.effect``: worker processes that run workflows of two non-idempotent effects each
are SIGKILLed, by the test at random moments and by themselves at the worst ones: inside the transaction
that submits an effect with its checkpoint (before it commits), and right after it commits (before the
worker hears so and gives its lease back).

Run as a script, this file is the worker: ``python test_crash_durable_effects.py <store url> <ledger>
<kill probability>``. The counterparty is a SQLite ledger of its own that records every delivery; it observes
from that record, so a lost answer is resolved by observing, never by sending again. Afterwards every
execution succeeded, every effect was submitted once and reached the ledger exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

N_WORKFLOWS = 60
MAX_SPAWNS = 40


class Ledger:
    """The counterparty: every delivery is a row; ``observe`` counts them."""

    name: ClassVar[str] = "ledger"

    def __init__(self, path: str) -> None:
        self.path = path
        self.local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self.local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            db.execute("PRAGMA busy_timeout = 60000")
            self.local.db = db
        return db

    def dispatch(self, effect: Any) -> Any:
        from errands.core import DispatchOutcome, DispatchResult

        self._db().execute("INSERT INTO deliveries (key, pid) VALUES (?, ?)", (effect.key, os.getpid()))
        time.sleep(0.002)  # delivered, not yet recorded by the outbox: a kill here must not cause a resend
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED, external_ref=f"ledger/{effect.key}")

    def observe(self, effect: Any) -> Any:
        from errands.core import Observation, ObservationOutcome

        n = self._db().execute("SELECT COUNT(*) FROM deliveries WHERE key = ?", (effect.key,)).fetchone()[0]
        outcome = {0: ObservationOutcome.ABSENT, 1: ObservationOutcome.CONFIRMED}.get(n, ObservationOutcome.DUPLICATE)
        return Observation(outcome=outcome)


def workflow(event: Any, ctx: Any) -> Any:
    from errands.core import Effect, Semantics

    once = Semantics.NON_IDEMPOTENT
    a = ctx.effect("debit", Effect(key="-", connector="ledger", payload={"n": event, "leg": "debit"}, semantics=once))
    b = ctx.effect("credit", Effect(key="-", connector="ledger", payload={"n": event, "leg": "credit"}, semantics=once))
    return [a.status.value, b.status.value]


def _worker(store_url: str, ledger: str, p_kill: float) -> None:
    from errands.core import Outbox, open_store
    from errands.durable import DurableRunner, _checkpoints, _effects

    rng = random.Random()
    submitting = threading.local()
    submit_started = _effects.submit_started
    write = _checkpoints.StoreCheckpoints.write

    def die(where: str) -> None:
        with open(f"{ledger}.kills", "a") as f:
            f.write(where + "\n")
        os.kill(os.getpid(), signal.SIGKILL)

    def submit_and_maybe_die(outbox: Any, tx: Any, updates: Any) -> None:
        submit_started(outbox, tx, updates)
        if any(u.sub_type is _effects.OperationSubType.EFFECT for u in updates):
            submitting.now = True
            if rng.random() < p_kill:
                die("before-commit")

    def write_and_maybe_die(self: Any, body: Any) -> None:
        submitting.now = False
        write(self, body)
        if submitting.now and rng.random() < p_kill:
            die("after-commit")

    _effects.submit_started = submit_and_maybe_die  # type: ignore[assignment]
    _checkpoints.StoreCheckpoints.write = write_and_maybe_die  # type: ignore[method-assign]
    store = open_store(store_url)
    outbox = Outbox(store, connectors={"ledger": Ledger(ledger)}, lease_for=1.0, backoff_base=0.01, backoff_cap=0.05)
    runner = DurableRunner(store, outbox=outbox, functions={"transfer": workflow}, lease_for=1.0)
    print("ready", flush=True)
    runner.worker(poll_interval=0.01).run()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'durable.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.mark.crash
def test_killed_workers_lose_no_effect_and_duplicate_none(store_url: str, tmp_path: Path) -> None:
    from errands.core import EffectStatus, Outbox
    from errands.durable import DurableRunner, ExecutionStatus

    ledger = str(tmp_path / "ledger.db")
    db = sqlite3.connect(ledger, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE deliveries (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, pid INTEGER)")
    runner = DurableRunner(store_url, functions={"transfer": workflow})
    ids = [runner.start("transfer", i, execution_id=f"transfer-{i:02d}") for i in range(N_WORKFLOWS)]
    rng = random.Random(int(os.environ.get("ERRANDS_CRASH_SEED", "19")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "worker.log"
    external = 0
    deadline = time.monotonic() + 150
    for spawn in range(MAX_SPAWNS):
        last = spawn == MAX_SPAWNS - 1 or time.monotonic() > deadline - 40
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, __file__, store_url, ledger, "0" if last else "0.06"],
                                    env=env, stdout=subprocess.PIPE, stderr=log)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n", log_path.read_text()[-3000:]  # started: the clock runs now
        until = time.monotonic() + (40 if last else rng.uniform(0.1, 0.6))
        done = False
        while proc.poll() is None and time.monotonic() < until and not done:
            time.sleep(0.05)
            done = all(runner.get(i).status.terminal for i in ids)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            external += 1
        else:
            assert proc.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
        proc.stdout.close()
        if done or all(runner.get(i).status.terminal for i in ids) or last:
            break
    infos = [runner.get(i) for i in ids]
    assert [i.status for i in infos] == [ExecutionStatus.SUCCEEDED] * N_WORKFLOWS, [
        (i.execution_id, i.status, i.error) for i in infos if i.status is not ExecutionStatus.SUCCEEDED]
    assert [i.result for i in infos] == [["CONFIRMED", "CONFIRMED"]] * N_WORKFLOWS
    keys = [op.callback_id for i in ids for op in runner.history(i)]
    assert len(keys) == len(set(keys)) == 2 * N_WORKFLOWS
    outbox = Outbox(runner.store, connectors=["ledger"])
    submitted = outbox.list(connector="ledger", limit=1000)
    assert sorted(r.key for r in submitted) == sorted(keys)  # nothing submitted without its checkpoint
    assert {r.status for r in submitted} == {EffectStatus.CONFIRMED}
    delivered = dict(db.execute("SELECT key, COUNT(*) FROM deliveries GROUP BY key").fetchall())
    assert delivered == {k: 1 for k in keys}  # exactly once at the counterparty
    kills_path = Path(f"{ledger}.kills")
    kills = kills_path.read_text().split() if kills_path.exists() else []
    assert "before-commit" in kills and "after-commit" in kills, (kills, log_path.read_text()[-3000:])
    sys.stderr.write(f"effect crash test: {kills.count('before-commit')} kills before the submit committed, "
                     f"{kills.count('after-commit')} right after, {external} at random\n")
    runner.close()
    db.close()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], float(sys.argv[3]))
