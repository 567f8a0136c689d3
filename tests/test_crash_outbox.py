"""Crash test: outbox workers are SIGKILLed at random moments while they deliver effects to a counterparty.

Run as a script, this file is the worker: ``python test_crash_outbox.py <store url> <ledger path> [drain]``.
The counterparty is a SQLite ledger of its own that records every delivery (effect key, lease token, pid)
and every observation, in the order they happen. On PostgreSQL the workers' connections are also dropped
(``pg_terminate_backend``) again and again while they run. The workers run with the default lease (``lease_for``
10 s, renewed by the heartbeat while calls run): what a killed worker held is retried within seconds.
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
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

import pytest

EFFECTS = 2_000
KILLS = 20
CALL_TIME = float(os.environ.get("ERRANDS_CRASH_CALL_TIME", "0.004"))  # seconds the counterparty takes
DROP_APP = "errands-drop-worker"  # the application_name of workers whose connections are dropped


class LedgerConnector:
    """The counterparty: dedups on the effect key for its business, but logs every request it receives."""

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

        self._db().execute(
            "INSERT INTO log (key, kind, token, pid) VALUES (?, 'dispatch', ?, ?)",
            (effect.key, effect.metadata["errands.lease_token"], os.getpid()),
        )
        # Delivered but not yet recorded by the outbox: the window a SIGKILL should hit.
        time.sleep(CALL_TIME)
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED, external_ref=f"ledger/{effect.key}")

    def observe(self, effect: Any) -> Any:
        from errands.core import Observation, ObservationOutcome

        db = self._db()
        db.execute("INSERT INTO log (key, kind, token, pid) VALUES (?, 'observe', 0, ?)", (effect.key, os.getpid()))
        (n,) = db.execute("SELECT COUNT(*) FROM log WHERE key = ? AND kind = 'dispatch'", (effect.key,)).fetchone()
        if n == 0:
            return Observation(outcome=ObservationOutcome.ABSENT)
        if n == 1:
            return Observation(outcome=ObservationOutcome.CONFIRMED)
        return Observation(outcome=ObservationOutcome.DUPLICATE, response={"count": n})


def run_worker(url: str, ledger: str, drain: bool) -> None:
    from errands.core import Outbox, Worker, open_store

    store = open_store(url)
    outbox = Outbox(store, connectors={"ledger": LedgerConnector(ledger)}, batch_size=40, backoff_base=0.05,
                    backoff_cap=0.2)
    worker = Worker(store, outbox=outbox, poll_interval=0.01, max_in_flight=4)
    print("ready", flush=True)
    if not drain:
        worker.run()
        return
    from errands.core import is_infrastructure_error

    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    while True:
        try:
            stats = outbox.stats()["effects"]
        except Exception as exc:  # a dropped connection: ask again
            if not is_infrastructure_error(exc):
                raise
            time.sleep(0.05)
            continue
        if stats["CONFIRMED"] + stats["FAILED"] + stats["CANCELLED"] == sum(stats.values()):
            break
        time.sleep(0.05)
    stop.set()
    worker.wake()
    thread.join()
    store.close()


def start_workers(url: str, ledger: Path, n: int, drain: bool = False,
                  env: dict[str, str] | None = None) -> list[subprocess.Popen[str]]:
    args = [sys.executable, __file__, url, str(ledger)] + (["drain"] if drain else [])
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
             for _ in range(n)]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    return procs


def kill(proc: subprocess.Popen[str]) -> float:
    """SIGKILL ``proc``; returns when it died (epoch seconds)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    died = time.time()
    assert proc.stdout is not None
    proc.stdout.close()
    return died


class Takeovers:
    """What killed workers held when they died: their leases must lapse within the default lease, so that
    another worker retries the effects within seconds; records when each was next confirmed."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[float, float]] = {}  # key -> (when its holder died, when its lease lapses)

    def note(self, store: Any, pid: int, died: float) -> None:
        from errands.core import DEFAULT_LEASE_FOR

        with store.read() as tx:
            rows = tx.query("SELECT key, next_attempt_at FROM em_effects WHERE status IN ('DISPATCHING', 'UNKNOWN') "
                            "AND lease_owner LIKE ?", (f"%:{pid}:%",))
        for key, until in rows:
            # The lease a dead worker left ends at most lease_for after its last claim or renewal.
            assert float(until) <= died + DEFAULT_LEASE_FOR, (key, until - died)
            self.held[key] = (died, float(until))

    def report(self, store: Any) -> str:
        if not self.held:
            return "no effect was held by a killed worker"
        with store.read() as tx:
            done = dict(tx.query("SELECT key, updated_at FROM em_effects WHERE status = 'CONFIRMED'"))
        delays = sorted(float(done[k]) - died for k, (died, _until) in self.held.items() if k in done)
        assert len(delays) == len(self.held), "an effect held by a killed worker was never confirmed"
        return (f"{len(self.held)} effects held by killed workers, confirmed {delays[0]:.1f}-{delays[-1]:.1f} s "
                f"after the kill (median {delays[len(delays) // 2]:.1f} s)")


def _ledger(tmp_path: Path) -> tuple[Path, sqlite3.Connection]:
    ledger = tmp_path / "ledger.db"
    db = sqlite3.connect(ledger, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE log (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, kind TEXT NOT NULL, "
               "token INTEGER NOT NULL, pid INTEGER NOT NULL)")
    return ledger, db


def _wait_for_dispatch(db: sqlite3.Connection, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.execute("SELECT 1 FROM log WHERE pid = ? AND kind = 'dispatch' LIMIT 1", (pid,)).fetchone():
            return
        time.sleep(0.002)


def _effects(start: int, stop: int, non_idempotent: set[str]) -> list[Any]:
    from errands.core import Effect, Semantics

    batch = []
    for i in range(start, stop):
        semantics = Semantics.NON_IDEMPOTENT if i % 4 == 0 else Semantics.IDEMPOTENT
        if semantics is Semantics.NON_IDEMPOTENT:
            non_idempotent.add(f"e{i}")
        batch.append(Effect(key=f"e{i}", connector="ledger", tool="post", payload={"i": i}, semantics=semantics))
    return batch


def crash_and_drain(tmp_path: Path, workers: int, url: str | None = None,
                    ) -> tuple[Any, list[tuple[int, str, str, int, int]], set[str], Takeovers]:
    from errands.core import Outbox, open_store

    url = url or f"sqlite:///{tmp_path / 'outbox.db'}"
    ledger, db = _ledger(tmp_path)
    store = open_store(url)
    outbox = Outbox(store, connectors={"ledger": LedgerConnector(str(ledger))})
    rng = random.Random(int(os.environ.get("ERRANDS_CRASH_SEED", "0")) or None)
    per_round = EFFECTS // KILLS
    non_idempotent: set[str] = set()
    takeovers = Takeovers()
    for r in range(KILLS):
        outbox.submit_many(_effects(r * per_round, (r + 1) * per_round, non_idempotent))
        for proc in start_workers(url, ledger, workers):
            # Kill it at a random moment after it started delivering, so that it dies holding leases
            # (however loaded the machine is); one that got no work dies after a second.
            _wait_for_dispatch(db, proc.pid, timeout=1.0)
            time.sleep(rng.uniform(0.0, 0.05))
            takeovers.note(store, proc.pid, kill(proc))
    drains = start_workers(url, ledger, workers, drain=True)
    for proc in drains:
        assert proc.wait(timeout=120) == 0
        assert proc.stdout is not None
        proc.stdout.close()
    log = db.execute("SELECT seq, key, kind, token, pid FROM log ORDER BY seq").fetchall()
    db.close()
    print(takeovers.report(store))
    return (outbox, log, non_idempotent, takeovers)


def check_invariants(outbox: Any, log: list[tuple[int, str, str, int, int]], non_idempotent: set[str]) -> None:
    from errands.core import EffectStatus

    stats = outbox.stats()
    assert stats["effects"]["CONFIRMED"] == EFFECTS, stats
    assert stats["effects"]["PENDING"] == stats["effects"]["DISPATCHING"] == stats["effects"]["UNKNOWN"] == 0
    assert stats["flagged"] == 0
    assert all(r.status is EffectStatus.CONFIRMED for r in outbox.list(limit=EFFECTS))
    dispatches = [(key, token) for _, key, kind, token, _ in log if kind == "dispatch"]
    assert len({key for key, _ in dispatches}) == EFFECTS  # the deduplicated count
    # Each lease (key, fencing token) was dispatched at most once, whichever process held it.
    assert len(set(dispatches)) == len(dispatches)
    history: dict[str, list[str]] = defaultdict(list)
    for _, key, kind, _, _ in log:
        if key in non_idempotent:
            history[key].append(kind)
    for key, kinds in history.items():
        delivered, observed_since = False, False
        for kind in kinds:
            if kind == "observe":
                observed_since = True
                continue
            assert not delivered or observed_since, f"{key} was delivered twice with no observation between: {kinds}"
            delivered, observed_since = True, False


@pytest.mark.crash
def test_outbox_worker_survives_sigkill_at_random_moments(tmp_path: Path) -> None:
    outbox, log, non_idempotent, takeovers = crash_and_drain(tmp_path, workers=1)
    check_invariants(outbox, log, non_idempotent)
    # The kills landed while work was under way: some effects were delivered and only later recorded, and
    # their killed workers' leases ran out within the default lease (checked at each kill).
    assert any(r.attempts > 1 for r in outbox.list(limit=EFFECTS))
    assert takeovers.held
    # ... and NON_IDEMPOTENT effects caught mid-dispatch were observed rather than sent again.
    assert any(kind == "observe" for _, _, kind, _, _ in log)
    outbox.close()
    outbox.store.close()


@pytest.mark.crash
def test_two_workers_sharing_a_store_survive_sigkill(tmp_path: Path) -> None:
    outbox, log, non_idempotent, takeovers = crash_and_drain(tmp_path, workers=2)
    check_invariants(outbox, log, non_idempotent)
    assert takeovers.held
    assert len({pid for *_, pid in log}) > KILLS  # both workers of every round delivered something
    outbox.close()
    outbox.store.close()


@pytest.mark.crash
@pytest.mark.services
def test_two_workers_on_postgresql_survive_sigkill(tmp_path: Path, postgres_url: str) -> None:
    outbox, log, non_idempotent, takeovers = crash_and_drain(tmp_path, workers=2, url=postgres_url)
    check_invariants(outbox, log, non_idempotent)
    assert takeovers.held
    outbox.close()
    outbox.store.close()


@pytest.mark.crash
@pytest.mark.services
def test_two_workers_on_postgresql_survive_dropped_connections(tmp_path: Path, postgres_url: str) -> None:
    """Two workers run while every connection they hold is dropped (``pg_terminate_backend``) again and
    again: each fault is retried or its lease lapses, and the end state is as if nothing had happened."""
    from errands.core import Outbox, open_store
    from errands.core.testing import faults

    ledger, db = _ledger(tmp_path)
    store = open_store(postgres_url)
    outbox = Outbox(store, connectors={"ledger": LedgerConnector(str(ledger))})
    non_idempotent: set[str] = set()
    outbox.submit_many(_effects(0, EFFECTS, non_idempotent))
    worker_url = postgres_url + ("&" if "?" in postgres_url else "?") + f"application_name={DROP_APP}"
    # A slower counterparty stretches the run out over a few seconds of drops.
    procs = start_workers(worker_url, ledger, 2, drain=True, env={"ERRANDS_CRASH_CALL_TIME": "0.02"})
    rng = random.Random(int(os.environ.get("ERRANDS_CRASH_SEED", "0")) or None)
    drops = mid_run = 0
    while any(p.poll() is None for p in procs):
        time.sleep(rng.uniform(0.1, 0.4))
        dropped = faults.terminate_postgres_connections(postgres_url, application_name=DROP_APP)
        drops += dropped
        if dropped and outbox.stats()["effects"]["CONFIRMED"] < EFFECTS:
            mid_run += 1
    for proc in procs:
        assert proc.wait(timeout=120) == 0
        assert proc.stdout is not None
        proc.stdout.close()
    log = db.execute("SELECT seq, key, kind, token, pid FROM log ORDER BY seq").fetchall()
    db.close()
    check_invariants(outbox, log, non_idempotent)  # 0 lost, 0 stuck, 0 delivered twice beyond semantics
    assert not [r for r in outbox.list(limit=EFFECTS) if r.error], "a dropped connection was recorded on an effect"
    assert mid_run >= 5, f"only {mid_run} rounds of drops landed while work was under way"
    sent = sum(1 for _, _, kind, _, _ in log if kind == "dispatch")
    print(f"{drops} connections dropped in {mid_run} rounds while effects were under way; "
          f"{sent - EFFECTS} idempotent redeliveries (the counterparty dedups them)")
    outbox.close()
    store.close()


if __name__ == "__main__":
    run_worker(sys.argv[1], sys.argv[2], drain=len(sys.argv) > 3 and sys.argv[3] == "drain")
