"""Task queue throughput: no-op tasks enqueued, then run through each queue's own worker, side by side.

- errands: ``TaskEngine.submit`` one by one (and ``submit_many`` in batches), then the real ``Worker`` loop
  (``Worker(store, jobs=[engine.run_once]).run()``) on a thread until every task succeeded.
- huey: ``SqliteHuey`` (its default durability, ``synchronous=FULL``), tasks enqueued by calling them, run by
  its consumer with thread workers (the worker type its docs recommend for I/O-bound tasks).
- pgqueuer (asyncpg): ``Queries.enqueue`` one by one and with lists (its batched enqueue), run by
  ``QueueManager.run`` in drain mode with an async entrypoint.
- procrastinate (psycopg): ``defer_async`` one by one and ``batch_defer_async``, run by ``run_worker_async``
  (``wait=False``: it returns once the queue is empty) with an async task and ``concurrency``.

SQLite rows run on a fresh file each; PostgreSQL rows on a fresh database each (dropped when its run ends) of one
throwaway PostgreSQL cluster (the tests' helper: ``initdb``/``pg_ctl`` on a free port, ``fsync=off`` for every peer alike). The
processing rate counts from the worker's start to the last task's end; every task is counted by its handler.
Each comparison alternates the peers over ``--rounds`` rounds and takes the medians.

A last table shows that a claim costs what its batch costs, not what the table's history does: the claim
rate with 10,000 and with 1,000,000 finished tasks beside the due ones (inserted in bulk with one statement).

Run: ``hatch run bench:tasks`` (options: ``--tasks``, ``--rounds``, ``--concurrency``, ``--quick``,
``--no-postgres``, ``--no-claims``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from errands.core import TaskEngine, Worker, open_store
from errands.core.testing._services import PostgresServer, start_postgres

BATCH = 1000


class Counter:
    """Counts handler calls; ``done`` is set at ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.ended = 0.0

    def hit(self) -> None:
        with self.lock:
            self.count += 1
            if self.count == self.n:
                self.ended = time.perf_counter()
                self.done.set()


def _wait(counter: Counter, started: float, what: str, timeout: float = 600.0) -> float:
    if not counter.done.wait(timeout):
        raise RuntimeError(f"{what}: {counter.count} of {counter.n} tasks ran in {timeout:.0f}s")
    return counter.ended - started


# -- errands -----------------------------------------------------------------------------------------

def errands_run(url: str, n: int, concurrency: int, *, batched: bool) -> tuple[float, float]:
    """(enqueue seconds, processing seconds) of ``n`` no-op tasks through the real ``Worker``."""
    store = open_store(url, **({"pool_size": concurrency + 4} if url.startswith("postgresql") else {}))
    try:
        counter = Counter(n)

        def noop(_: Any) -> None:
            counter.hit()

        engine = TaskEngine(store, handlers={"noop": noop}, concurrency=concurrency)
        started = time.perf_counter()
        if batched:
            for i in range(0, n, BATCH):
                engine.submit_many("noop", [None] * min(BATCH, n - i))
        else:
            for _ in range(n):
                engine.submit("noop")
        enqueue = time.perf_counter() - started
        worker = Worker(store, jobs=[engine.run_once], max_in_flight=concurrency)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        started = time.perf_counter()
        thread.start()
        try:
            processing = _wait(counter, started, "errands")
        finally:
            stop.set()
            thread.join(60)
        return enqueue, processing
    finally:
        store.close()


# -- huey --------------------------------------------------------------------------------------------

def huey_run(path: str, n: int, workers: int) -> tuple[float, float]:
    from huey import SqliteHuey

    huey = SqliteHuey(filename=path, results=False)
    counter = Counter(n)

    @huey.task()
    def noop() -> None:
        counter.hit()

    started = time.perf_counter()
    for _ in range(n):
        noop()
    enqueue = time.perf_counter() - started
    consumer = huey.create_consumer(workers=workers, worker_type="thread", periodic=False,
                                    check_worker_health=False)
    started = time.perf_counter()
    consumer.start()
    try:
        processing = _wait(counter, started, "huey")
    finally:
        consumer.stop(graceful=True)
    return enqueue, processing


# -- pgqueuer ----------------------------------------------------------------------------------------

async def _pgqueuer(dsn: str, n: int, batched: bool, batch_size: int) -> tuple[float, float]:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        await queries.install()
        started = time.perf_counter()
        if batched:
            for i in range(0, n, BATCH):
                k = min(BATCH, n - i)
                await queries.enqueue(["noop"] * k, [None] * k, [0] * k)
        else:
            for _ in range(n):
                await queries.enqueue("noop", None)
        enqueue = time.perf_counter() - started
        counter = Counter(n)
        qm = QueueManager(queries)

        @qm.entrypoint("noop")
        async def noop(job: Any) -> None:
            counter.hit()

        started = time.perf_counter()
        await qm.run(batch_size=batch_size, mode=QueueExecutionMode.drain)
        if counter.count != n:
            raise RuntimeError(f"pgqueuer: {counter.count} of {n} tasks ran")
        return enqueue, counter.ended - started
    finally:
        await conn.close()


def pgqueuer_run(dsn: str, n: int, batched: bool, batch_size: int) -> tuple[float, float]:
    return asyncio.run(_pgqueuer(dsn, n, batched, batch_size))


# -- procrastinate -----------------------------------------------------------------------------------

async def _procrastinate(dsn: str, n: int, batched: bool, concurrency: int) -> tuple[float, float]:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    counter = Counter(n)

    @app.task(name="noop")
    async def noop() -> None:
        counter.hit()

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        started = time.perf_counter()
        if batched:
            for i in range(0, n, BATCH):
                await noop.batch_defer_async(*([{}] * min(BATCH, n - i)))
        else:
            for _ in range(n):
                await noop.defer_async()
        enqueue = time.perf_counter() - started
        started = time.perf_counter()
        await app.run_worker_async(concurrency=concurrency, wait=False, install_signal_handlers=False)
        if counter.count != n:
            raise RuntimeError(f"procrastinate: {counter.count} of {n} tasks ran")
        return enqueue, counter.ended - started


def procrastinate_run(dsn: str, n: int, batched: bool, concurrency: int) -> tuple[float, float]:
    return asyncio.run(_procrastinate(dsn, n, batched, concurrency))


# -- claims beside a long history --------------------------------------------------------------------

_HISTORY = {
    "sqlite": ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
               "INSERT INTO em_tasks (id, type, status, attempts, available_at, created_at, updated_at, finished_at) "
               "SELECT 'done-' || i, 'noop', 'SUCCEEDED', 1, i, i, i, i FROM n"),
    "postgresql": ("INSERT INTO em_tasks (id, type, status, attempts, available_at, created_at, updated_at, "
                   "finished_at) SELECT 'done-' || i, 'noop', 'SUCCEEDED', 1, i, i, i, i FROM generate_series(1, ?) i"),
}


def claim_rate(url: str, finished: int, due: int = 2000, batch: int = 8) -> float:
    """Tasks claimed per second, ``batch`` per claim (one transaction each), beside ``finished`` finished rows
    inserted in bulk first."""
    from errands.core import _tasks_table as table

    store = open_store(url)
    try:
        engine = TaskEngine(store, handlers={"noop": lambda p: None})
        with store.transaction() as tx:
            tx.execute(_HISTORY[store.dialect], (finished,))
        with store.transaction() as tx:
            tx.execute("ANALYZE")
        for i in range(0, due, BATCH):
            engine.submit_many("noop", [None] * min(BATCH, due - i))
        taken = 0
        started = time.perf_counter()
        while taken < due:
            now = store.clock.now()
            with store.transaction() as tx:
                got = table.claim(tx, "noop", "bench", [], batch, now + 60, now)
            if not got:
                raise RuntimeError(f"claims stopped at {taken} of {due}")
            taken += len(got)
        return taken / (time.perf_counter() - started)
    finally:
        store.close()


# -- the table ---------------------------------------------------------------------------------------

def rounds(runs: dict[str, Callable[[], tuple[float, float]]], r: int) -> dict[str, list[tuple[float, float]]]:
    """Each of ``runs`` ``r`` times, alternating (one of each per round)."""
    seen: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(r):
        for name, fn in runs.items():
            seen[name].append(fn())
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8, help="slots of errands, huey's threads, procrastinate's")
    ap.add_argument("--pgqueuer-batch", type=int, default=10, help="pgqueuer's batch_size (its default: 10)")
    ap.add_argument("--quick", action="store_true", help="2,000 tasks, one round")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--no-claims", action="store_true", help="skip the claim rate beside a long history")
    args = ap.parse_args()
    n, r = (2000, 1) if args.quick else (args.tasks, args.rounds)
    c = args.concurrency
    tmp = tempfile.mkdtemp(prefix="bench-tasks-")
    counter = iter(range(1_000_000))

    def sqlite_file(sync: str | None = None) -> str:
        path = os.path.join(tmp, f"t{next(counter)}.db")
        return f"sqlite:///{path}" + (f"?synchronous={sync}" if sync else "")

    runs: dict[str, Callable[[], tuple[float, float]]] = {
        "errands sqlite (FULL)": lambda: errands_run(sqlite_file("FULL"), n, c, batched=False),
        "errands sqlite (store default)": lambda: errands_run(sqlite_file(), n, c, batched=False),
        "huey SqliteHuey (FULL)": lambda: huey_run(os.path.join(tmp, f"h{next(counter)}.db"), n, c),
    }
    server: PostgresServer | None = None
    if not args.no_postgres:
        server = start_postgres()
        pg = server

        def fresh(run: Callable[[str], tuple[float, float]]) -> Callable[[], tuple[float, float]]:
            """``run`` on a database of its own, dropped once it ends: no run's table is left for the cluster's
            autovacuum to work through while the next peer is measured."""
            def once() -> tuple[float, float]:
                url = pg.create_database()
                try:
                    return run(url)
                finally:
                    pg.drop_database(url)
            return once

        runs.update({
            "errands postgres": fresh(lambda url: errands_run(url, n, c, batched=False)),
            "errands postgres submit_many": fresh(lambda url: errands_run(url, n, c, batched=True)),
            "pgqueuer": fresh(lambda url: pgqueuer_run(url, n, False, args.pgqueuer_batch)),
            "pgqueuer list enqueue": fresh(lambda url: pgqueuer_run(url, n, True, args.pgqueuer_batch)),
            "procrastinate": fresh(lambda url: procrastinate_run(url, n, False, c)),
            "procrastinate batch_defer": fresh(lambda url: procrastinate_run(url, n, True, c)),
        })
    histories = (10_000, 100_000) if args.quick else (10_000, 1_000_000)
    claims: dict[tuple[str, int], float] = {}
    try:
        seen = rounds(runs, r)
        if not args.no_claims:
            for finished in histories:
                claims[("sqlite", finished)] = claim_rate(sqlite_file("FULL"), finished)
                if server is not None:
                    claims[("postgres", finished)] = claim_rate(server.create_database(), finished)
    finally:
        if server is not None:
            server.stop()
    enq = {k: n / statistics.median(e for e, _ in v) for k, v in seen.items()}
    proc = {k: n / statistics.median(p for _, p in v) for k, v in seen.items()}
    spread = {k: (n / max(p for _, p in v), n / min(p for _, p in v)) for k, v in seen.items()}
    print(f"\n{n:,} no-op tasks, concurrency {c}, {r} round(s), medians (processing spread min-max)\n")
    print(f"| {'queue':<32} | {'enqueue/s':>10} | {'processed/s':>11} | {'spread':>15} |")
    print(f"|{'-' * 34}|{'-' * 12}|{'-' * 13}|{'-' * 17}|")
    for k in seen:
        lo, hi = spread[k]
        print(f"| {k:<32} | {enq[k]:>10,.0f} | {proc[k]:>11,.0f} | {lo:>6,.0f}-{hi:>6,.0f}  |")
    if claims:
        print(f"\nClaims of 8 due tasks (one transaction each) beside finished tasks inserted in bulk\n")
        print(f"| {'store':<8} | {'finished rows':>13} | {'claimed/s':>10} | {'vs fewest rows':>14} |")
        print(f"|{'-' * 10}|{'-' * 15}|{'-' * 12}|{'-' * 16}|")
        for (dialect, finished), rate in claims.items():
            base = claims[(dialect, histories[0])]
            print(f"| {dialect:<8} | {finished:>13,} | {rate:>10,.0f} | {rate / base:>14.2f} |")
    print()
    print(f"tasks vs huey: {proc['errands sqlite (FULL)'] / proc['huey SqliteHuey (FULL)']:.2f} (goal >= 1.5)")
    if server is not None:
        print(f"tasks on postgres vs pgqueuer: {proc['errands postgres'] / proc['pgqueuer']:.2f} (goal >= 1.0)")
        print(f"tasks on postgres vs procrastinate: {proc['errands postgres'] / proc['procrastinate']:.2f} "
              "(goal >= 3)")
        print(f"batched enqueue on postgres vs pgqueuer: "
              f"{enq['errands postgres submit_many'] / enq['pgqueuer list enqueue']:.2f} (goal >= 1.0)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
