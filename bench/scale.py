"""Scale-out on one PostgreSQL: 1, 2 and 4 worker processes dispatching one outbox, with a connector that takes
5 ms per call and with a no-op one.

N processes each run the real ``Worker`` with the outbox (``Worker(store, outbox=outbox).run()``); once all
are up, the effects are submitted (``submit_many``, 1,000 at a time) and the run lasts until every effect is
``CONFIRMED``. Reported: effects/s from the first submit to the last confirmation, the CPU the database used (the postmaster and its backends,
from /proc) per second of the run, and its share of all the CPU spent (database and workers).

Run: ``hatch run bench:scale`` (options: ``--effects``, ``--workers``, ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Any, ClassVar

from errands.core import DispatchOutcome, DispatchResult, Effect, EffectStatus, Outbox, Worker, open_store
from errands.core.testing._services import PostgresServer, start_postgres

CONNECTORS = {"5 ms": 0.005, "no-op": 0.0}


class SleepConnector:
    """Confirms every effect after ``seconds`` (a blocking client's call)."""

    name: ClassVar[str] = "c"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def dispatch(self, effect: Effect) -> DispatchResult:
        if self.seconds:
            time.sleep(self.seconds)
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED)


def child(url: str, seconds: float) -> None:
    """One worker process: the outbox's worker loop until SIGTERM."""
    store = open_store(url)
    outbox = Outbox(store, connectors={"c": SleepConnector(seconds)})
    worker = Worker(store, outbox=outbox)
    print("ready", flush=True)
    worker.run()
    store.close()


def _ticks(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by ``pids``."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def _postgres_pids(server: PostgresServer) -> list[int]:
    with open(os.path.join(server.datadir, "postmaster.pid")) as f:
        master = int(f.readline())
    pids = [master]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == master:
                pids.append(int(entry))
    return pids


def confirmed(outbox: Any) -> int:
    return int(outbox.stats()["effects"].get(EffectStatus.CONFIRMED.value, 0))


def run(server: PostgresServer, n: int, workers: int, seconds: float) -> tuple[float, float, float]:
    """(effects/s, database CPU seconds per second, database share of all CPU)."""
    url = server.create_database()
    store = open_store(url)
    try:
        outbox = Outbox(store, connectors={"c": SleepConnector(seconds)})
        effects = [Effect(key=f"e-{k}", connector="c", payload={"n": k}) for k in range(n)]
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", url, str(seconds)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(workers)]
        try:
            for p in procs:  # started and migrated: the run counts dispatching, not starting Python
                assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            mine_before = _ticks([p.pid for p in procs])
            db_before = _ticks(_postgres_pids(server))
            started = time.perf_counter()
            for i in range(0, n, 1000):
                outbox.submit_many(effects[i:i + 1000])
            while confirmed(outbox) < n:
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
            db = _ticks(_postgres_pids(server)) - db_before
            mine = _ticks([p.pid for p in procs]) - mine_before
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
        return n / elapsed, db / elapsed, db / max(db + mine, 1e-9)
    finally:
        store.close()
        server.drop_database(url)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], float(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--effects", type=int, default=10_000)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2,000 effects")
    args = ap.parse_args()
    n = 2000 if args.quick else args.effects
    counts = [int(w) for w in args.workers.split(",")]
    server = start_postgres()
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    try:
        for _ in range(args.rounds):
            for name, seconds in CONNECTORS.items():
                for w in counts:
                    results.setdefault((name, w), []).append(run(server, n, w, seconds))
    finally:
        server.stop()
    print(f"\n{n:,} effects per run, one PostgreSQL, {args.rounds} round(s) (medians)\n")
    print(f"| {'connector':<9} | {'workers':>7} | {'effects/s':>10} | {'vs 1 worker':>11} | {'db CPU s/s':>10} | "
          f"{'db CPU share':>12} |")
    print(f"|{'-' * 11}|{'-' * 9}|{'-' * 12}|{'-' * 13}|{'-' * 12}|{'-' * 14}|")
    med: dict[tuple[str, int], tuple[float, float, float]] = {}
    for key, seen in results.items():
        seen.sort()
        med[key] = seen[len(seen) // 2]
    for (name, w), (rate, cpu, share) in med.items():
        base = med[(name, counts[0])][0]
        print(f"| {name:<9} | {w:>7} | {rate:>10,.0f} | {rate / base:>11.2f} | {cpu:>10.2f} | {share:>11.0%} |")
    print()
    if ("5 ms", 1) in med and ("5 ms", 2) in med:
        print(f"scale 2 workers vs 1: {med[('5 ms', 2)][0] / med[('5 ms', 1)][0]:.2f} (goal >= 1.7)")


if __name__ == "__main__":
    main()
