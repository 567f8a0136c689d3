"""Store throughput: journal append and lease claim/complete, beside the raw driver.

For each backend (SQLite file in WAL mode at the store's default ``synchronous=FULL``, the raw driver likewise;
PostgreSQL when installed) and each
workload, three rows are measured in the same run on fresh databases:

- ``errands batched``: the store API, ``--batch`` rows per call (one transaction per batch);
- ``raw per-row``: the bare driver (sqlite3 / psycopg) doing the same rows with one commit per row;
- ``raw batch``: the bare driver doing the same rows with one commit per batch (``executemany``).

Journal append writes events with a per-stream sequence (one counter upsert per stream per batch, as the
store does) and JSON data into tables with the store's own columns, keys and indexes. Lease claim/complete
leases queued items with a fencing token and deletes them, checking the token, in two transactions per
batch; the raw rows run the same statements.

Run: ``hatch run bench:store`` (options: ``--rows``, ``--batch``, ``--repeat``, ``--no-postgres``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from errands.core import NewEvent, open_store

# The raw tables have the same columns, keys and indexes as the store's own (CORE_MIGRATIONS), so that
# the comparison measures the code path, not the schema.
RAW_EVENTS_DDL = {
    "sqlite": (
        "CREATE TABLE raw_streams (stream TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID;"
        "CREATE TABLE raw_events (position INTEGER PRIMARY KEY, stream TEXT NOT NULL, "
        "seq INTEGER NOT NULL, subject TEXT NOT NULL, type TEXT NOT NULL, data TEXT, time REAL NOT NULL)"
    ),
    "postgresql": (
        "CREATE TABLE raw_streams (stream TEXT PRIMARY KEY, last_seq BIGINT NOT NULL);"
        "CREATE TABLE raw_events (position BIGSERIAL PRIMARY KEY, stream TEXT NOT NULL, "
        "seq BIGINT NOT NULL, subject TEXT NOT NULL, type TEXT NOT NULL, data TEXT, "
        "time DOUBLE PRECISION NOT NULL)"
    ),
}
RAW_QUEUE_DDL = {
    "sqlite": (
        "CREATE TABLE raw_queue (queue TEXT NOT NULL, key TEXT NOT NULL, payload TEXT, "
        "available_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, "
        "lease_token INTEGER NOT NULL DEFAULT 0, lease_expires REAL, PRIMARY KEY (queue, key)) WITHOUT ROWID;"
        "CREATE INDEX raw_queue_due ON raw_queue (queue, available_at)"
    ),
    "postgresql": (
        "CREATE TABLE raw_queue (queue TEXT NOT NULL, key TEXT NOT NULL, payload TEXT, "
        "available_at DOUBLE PRECISION NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, "
        "lease_token BIGINT NOT NULL DEFAULT 0, lease_expires DOUBLE PRECISION, PRIMARY KEY (queue, key));"
        "CREATE INDEX raw_queue_due ON raw_queue (queue, available_at)"
    ),
}
STREAMS = 20


def event_rows(n: int) -> list[tuple[str, str, dict[str, Any]]]:
    return [(f"orders/{i % STREAMS}", "order.placed", {"order": i, "total": i * 3}) for i in range(n)]


def chunks(seq: list[Any], size: int) -> list[list[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


# -- drivers ----------------------------------------------------------------------------------------


class Backend:
    """Opens fresh databases and raw connections for one dialect."""

    dialect = "sqlite"
    ph = "?"

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.counter = 0

    def fresh_url(self) -> str:
        self.counter += 1
        return f"sqlite:///{os.path.join(self.workdir, f'bench-{self.counter}.db')}"

    def raw_connect(self, url: str) -> Any:
        conn = sqlite3.connect(url.split(":///", 1)[1], isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")  # the store's default: both sides fsync every commit
        return conn

    def begin(self, conn: Any) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def commit(self, conn: Any) -> None:
        conn.execute("COMMIT")

    def ddl(self, conn: Any, script: str) -> None:
        conn.executescript(script)

    def sql(self, text: str) -> str:
        return text

    def cleanup(self, url: str) -> None:
        for suffix in ("", "-wal", "-shm"):
            path = url.split(":///", 1)[1] + suffix
            if os.path.exists(path):
                os.remove(path)


class PostgresBackend(Backend):
    dialect = "postgresql"

    def __init__(self, workdir: str, server: Any) -> None:
        super().__init__(workdir)
        self.server = server

    def fresh_url(self) -> str:
        return str(self.server.create_database())

    def raw_connect(self, url: str) -> Any:
        import psycopg

        return psycopg.connect(url, autocommit=False)

    def begin(self, conn: Any) -> None:
        pass  # psycopg opens a transaction on the first statement

    def commit(self, conn: Any) -> None:
        conn.commit()

    def ddl(self, conn: Any, script: str) -> None:
        for stmt in script.split(";"):
            conn.execute(stmt)
        conn.commit()

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def cleanup(self, url: str) -> None:
        self.server.drop_database(url)


# -- workloads --------------------------------------------------------------------------------------


def journal_errands(backend: Backend, rows: int, batch: int) -> float:
    url = backend.fresh_url()
    store = open_store(url)
    try:
        batches = [[NewEvent(s, t, d) for s, t, d in b] for b in chunks(event_rows(rows), batch)]
        started = time.perf_counter()
        for b in batches:
            store.append_events(b)
        elapsed = time.perf_counter() - started
        assert store.last_position() == rows
    finally:
        store.close()
        backend.cleanup(url)
    return elapsed


def journal_raw(backend: Backend, rows: int, batch: int) -> float:
    """The same rows with the bare driver; ``batch`` 1 is one commit per row."""
    url = backend.fresh_url()
    conn = backend.raw_connect(url)
    try:
        backend.ddl(conn, RAW_EVENTS_DDL[backend.dialect])
        bump = backend.sql(
            "INSERT INTO raw_streams (stream, last_seq) VALUES (?, ?) ON CONFLICT (stream) "
            "DO UPDATE SET last_seq = raw_streams.last_seq + excluded.last_seq RETURNING last_seq"
        )
        insert = backend.sql(
            "INSERT INTO raw_events (stream, seq, subject, type, data, time) VALUES (?, ?, ?, ?, ?, ?)"
        )
        data = chunks(event_rows(rows), batch)
        started = time.perf_counter()
        for b in data:
            backend.begin(conn)
            counts: dict[str, int] = {}
            for stream, _, _ in b:
                counts[stream] = counts.get(stream, 0) + 1
            nxt = {}
            for stream, n in counts.items():
                last = conn.execute(bump, (stream, n)).fetchone()[0]
                nxt[stream] = last - n + 1
            params = []
            now = time.time()
            for stream, type_, payload in b:
                params.append((stream, nxt[stream], type_, type_, json.dumps(payload), now))
                nxt[stream] += 1
            if len(params) == 1:
                conn.execute(insert, params[0])
            else:
                conn.cursor().executemany(insert, params)
            backend.commit(conn)
        elapsed = time.perf_counter() - started
        assert conn.execute("SELECT COUNT(*) FROM raw_events").fetchone()[0] == rows
    finally:
        conn.close()
        backend.cleanup(url)
    return elapsed


def lease_errands(backend: Backend, rows: int, batch: int) -> float:
    url = backend.fresh_url()
    store = open_store(url)
    try:
        for b in chunks([(f"job-{i}", {"i": i}) for i in range(rows)], 1000):
            store.enqueue("bench", b)
        started = time.perf_counter()
        done = 0
        while True:
            leases = store.claim("bench", batch, lease_for=60)
            if not leases:
                break
            store.complete(leases)
            done += len(leases)
        elapsed = time.perf_counter() - started
        assert done == rows and store.queue_size("bench") == 0
    finally:
        store.close()
        backend.cleanup(url)
    return elapsed


def lease_raw(backend: Backend, rows: int, batch: int) -> float:
    """Claim (bump the fencing token) then complete (delete where the token still matches); with
    ``batch`` 1 every claim and every completion commits on its own."""
    url = backend.fresh_url()
    conn = backend.raw_connect(url)
    try:
        backend.ddl(conn, RAW_QUEUE_DDL[backend.dialect])
        backend.begin(conn)
        conn.cursor().executemany(
            backend.sql("INSERT INTO raw_queue (queue, key, payload, available_at) VALUES (?, ?, ?, ?)"),
            [("bench", f"job-{i}", json.dumps({"i": i}), 0.0) for i in range(rows)],
        )
        backend.commit(conn)
        skip = " FOR UPDATE SKIP LOCKED" if backend.dialect == "postgresql" else ""
        claim = backend.sql(
            "UPDATE raw_queue SET lease_owner = ?, lease_token = lease_token + 1, lease_expires = ?, "
            "attempts = attempts + 1 WHERE (queue, key) IN (SELECT queue, key FROM raw_queue WHERE queue = ? "
            f"AND available_at <= ? AND (lease_expires IS NULL OR lease_expires <= ?) ORDER BY available_at LIMIT ?{skip}) "
            "RETURNING key, payload, lease_token"
        )
        complete = backend.sql("DELETE FROM raw_queue WHERE queue = ? AND key = ? AND lease_token = ?")
        started = time.perf_counter()
        done = 0
        while True:
            now = time.time()
            backend.begin(conn)
            got = conn.execute(claim, ("owner", now + 60, "bench", now, now, batch)).fetchall()
            backend.commit(conn)
            if not got:
                break
            leases = [(k, json.loads(p), t) for k, p, t in got]
            backend.begin(conn)
            if len(leases) == 1:
                assert conn.execute(complete, ("bench", leases[0][0], leases[0][2])).rowcount == 1
            else:
                cur = conn.cursor()
                cur.executemany(complete, [("bench", k, t) for k, _, t in leases])
            backend.commit(conn)
            done += len(leases)
        elapsed = time.perf_counter() - started
        assert done == rows
    finally:
        conn.close()
        backend.cleanup(url)
    return elapsed


# -- report -----------------------------------------------------------------------------------------


@dataclass
class Result:
    backend: str
    workload: str
    errands: float
    per_row: float
    raw_batch: float


def best_rate(fn: Callable[[Backend, int, int], float], backend: Backend, rows: int, batch: int, repeat: int) -> float:
    return rows / min(fn(backend, rows, batch) for _ in range(repeat))


def measure(backend: Backend, name: str, rows: int, per_row_rows: int, batch: int, repeat: int) -> list[Result]:
    out = []
    for workload, ours, raw in (
        ("journal append", journal_errands, journal_raw),
        ("lease claim+complete", lease_errands, lease_raw),
    ):
        sys.stderr.write(f"  {name}: {workload}...\n")
        out.append(
            Result(
                backend=name,
                workload=workload,
                errands=best_rate(ours, backend, rows, batch, repeat),
                per_row=best_rate(raw, backend, per_row_rows, 1, repeat),
                raw_batch=best_rate(raw, backend, rows, batch, repeat),
            )
        )
    return out


def print_table(results: list[Result], batch: int) -> None:
    headers = [
        "backend", "workload", f"errands batched ({batch}/tx) rows/s", "raw per-row commit rows/s",
        f"raw batch ({batch}/tx) rows/s", "vs per-row", "vs raw batch",
    ]
    rows = [
        [r.backend, r.workload, f"{r.errands:,.0f}", f"{r.per_row:,.0f}", f"{r.raw_batch:,.0f}",
         f"{r.errands / r.per_row:.2f}x", f"{r.errands / r.raw_batch:.2f}"]
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000, help="rows per batched measurement")
    parser.add_argument("--per-row-rows", type=int, default=1000, help="rows per one-commit-per-row measurement")
    parser.add_argument("--batch", type=int, default=100, help="rows per transaction when batched")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="errands-bench-store-")
    results: list[Result] = []
    note = ""
    try:
        sys.stderr.write("SQLite (WAL, synchronous=FULL, the store's default)\n")
        results += measure(Backend(workdir), "sqlite", args.rows, args.per_row_rows, args.batch, args.repeat)
        server = None
        if args.no_postgres:
            note = "PostgreSQL rows skipped: --no-postgres"
        else:
            try:
                import psycopg  # noqa: F401
                from errands.core.testing import start_postgres

                server = start_postgres()
            except (ImportError, FileNotFoundError) as exc:
                note = f"PostgreSQL rows skipped: {exc}"
        if server is not None:
            try:
                sys.stderr.write("PostgreSQL (local, fsync off)\n")
                pg_rows = max(args.rows // 2, args.batch)
                results += measure(
                    PostgresBackend(workdir, server), "postgresql", pg_rows, args.per_row_rows // 2, args.batch,
                    args.repeat,
                )
            finally:
                server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_table(results, args.batch)
    if note:
        print(note)
    sqlite = [r for r in results if r.backend == "sqlite"]
    vs_per_row = min(r.errands / r.per_row for r in sqlite)
    vs_batch = min(r.errands / r.raw_batch for r in sqlite)
    print(f"store batched vs per-row commits: {vs_per_row:.2f}x (goal >= 2)")
    print(f"store batched vs raw batch: {vs_batch:.2f} (goal >= 0.25)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
