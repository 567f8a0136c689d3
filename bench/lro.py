"""lro throughput: operations created, resumed once and completed, beside the alis sequence on raw sqlite3.

Every row runs the same user-level work for ``--ops`` operations on a fresh SQLite file in WAL mode, once with
``synchronous=NORMAL`` (an opt-in; commits not fsynced) and once with ``synchronous=FULL`` (the store's
default; every commit fsynced), the same level on both sides; the goal line is the ``FULL`` one:

1. create the operation (metadata ``{"step": 0}``, private state ``{"step": 0}``);
2. save the private state and schedule one resume (``resume_via_tasks``);
3. resume: read the operation, decode the state, save new metadata, complete with a response.

- ``alis sequence (raw sqlite3)``: what go.alis.build/lro/v2 does, on the bare driver: an insert, then a
  read-modify-write (read the row, change it, write it) per save, one commit each. Its resume is a direct
  call (no timer table at all), which flatters the baseline. The goal line compares against this row.
- ``alis sequence + its task queue``: the same, plus the durable task that alis gets from Cloud Tasks: a
  row inserted when the resume is scheduled and deleted when it is delivered, one commit each.
- ``lro, one call at a time``: ``LroClient`` on the same kind of file: ``new_operation`` (one commit),
  ``resume_via_tasks`` (the save and the local timer commit together: one commit), then ``run_due`` fires the
  timers in-process, each handler in a transaction of its own.
- ``lro, one batch per operation``: ``new_operation`` and ``resume_via_tasks`` inside ``client.batch()``, so
  each operation costs one commit where the alis sequence costs three; ``resume_batch=100`` runs the handlers
  of one batch and the timer acknowledgements in one transaction. With fsynced commits this row is bound by
  its 2,000 fsyncs.
- ``lro, 100 operations per batch``: the same calls, 100 operations to a ``client.batch()`` (a bulk import, or
  a service that groups the operations of concurrent requests): 40 commits in all. The goal line compares
  this row against the alis sequence.

Every lro save is compare-and-set on the version column (no read first), and each completion also appends its
``lro.operation.done`` journal event in the same transaction.

Spanner rows (on the Spanner emulator, when its binary is installed): ``--spanner-ops`` operations through the
same three steps, each run of each side on an emulator process of its own (the emulator slows down as it runs,
its strong reads most, so no run inherits another's), on a table created with the alis DDL verbatim, after a
warm-up of 20 operations; the sides take turns going first:

- ``alis sequence (raw Spanner client)``: what go.alis.build/lro/v2 does with the raw client: a blind insert
  (one commit), then per save a read of the row and a blind update (one commit); its resume reads the row
  and decodes the state. ``UpdateTime`` is the commit timestamp.
- ``lro/v2 as written``: the same steps as lro/v2's code does them: its saves are blind updates of the row
  it holds (no read, no compare-and-set: a stale writer overwrites), and its callback reads the row once.
- ``lro on spanner``: ``LroClient`` on ``SpannerOperationStore(create_table=False)`` of the same table, the
  local scheduler's timers on an in-memory store, one call at a time: a blind insert, then compare-and-set
  saves (a read-write transaction reading the row it writes).

Run: ``hatch run bench:lro`` (options ``--ops``, ``--repeat``, ``--spanner-ops``; ``--spanner-ops 0`` skips
the Spanner rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

# ``python bench/lro.py`` puts bench/ first on sys.path, where bench/http.py would shadow the standard
# library's ``http`` package (urllib.request imports http.client).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from errands.lro import Config, LroClient, Operation, ResumableHandler, unmarshal_metadata  # noqa: E402
from google.longrunning import operations_pb2  # noqa: E402
from google.protobuf import any_pb2, struct_pb2  # noqa: E402

RAW_DDL = (
    "CREATE TABLE ops (key TEXT PRIMARY KEY, Operation BLOB NOT NULL, State BLOB, ResumePoint TEXT, "
    "UpdateTime REAL NOT NULL)"
)


def _struct_any(data: dict[str, Any]) -> any_pb2.Any:
    s = struct_pb2.Struct()
    s.update(data)
    out = any_pb2.Any()
    out.Pack(s)
    return out


def run_raw(path: str, n: int, sync: str, tasks: bool = False) -> float:
    """The alis sequence on sqlite3: insert; read-modify-write per save; one commit each. With ``tasks``, the
    resume is also a durable task row: inserted when scheduled, deleted when delivered, one commit each."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync}")
    conn.execute(RAW_DDL)
    conn.execute("CREATE TABLE tasks (name TEXT PRIMARY KEY, url TEXT NOT NULL, at REAL NOT NULL)")

    def rmw(name: str, change: Callable[[operations_pb2.Operation, bytes | None], bytes | None]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT Operation, State FROM ops WHERE key = ?", (name,)).fetchone()
        op = operations_pb2.Operation.FromString(row[0])
        state = change(op, row[1])
        conn.execute(
            "UPDATE ops SET Operation = ?, State = ?, UpdateTime = ? WHERE key = ?",
            (op.SerializeToString(), state, time.time(), name),
        )
        conn.execute("COMMIT")

    def done(op: operations_pb2.Operation, st: bytes | None) -> bytes | None:
        op.done = True
        op.response.CopyFrom(_struct_any({"agent": "agents/1"}))
        return st

    started = time.perf_counter()
    names = [f"operations/raw-{i}" for i in range(n)]
    for name in names:
        op = operations_pb2.Operation(name=name)
        op.metadata.CopyFrom(_struct_any({"step": 0}))
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO ops (key, Operation, State, ResumePoint, UpdateTime) VALUES (?, ?, ?, '', ?)",
            (name, op.SerializeToString(), json.dumps({"step": 0}).encode(), time.time()),
        )
        conn.execute("COMMIT")
        rmw(name, lambda _op, st: json.dumps({"step": 1}).encode())  # the save of resume_via_tasks
        if tasks:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO tasks VALUES (?, ?, ?)", (f"t-{name}", f"/resume/{name}", time.time()))
            conn.execute("COMMIT")
    for name in names:  # the resume: load, decode the state, complete
        row = conn.execute("SELECT Operation, State FROM ops WHERE key = ?", (name,)).fetchone()
        operations_pb2.Operation.FromString(row[0])
        assert json.loads(row[1]) == {"step": 1}
        rmw(name, done)
        if tasks:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM tasks WHERE name = ?", (f"t-{name}",))
            conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    assert conn.execute("SELECT COUNT(*) FROM ops").fetchone()[0] == n
    conn.close()
    return elapsed


def _run_until_idle(client: Any) -> int:
    """Fire due resumes in batches of 500 until none is due; how many fired."""
    fired = 0
    while got := client.run_due(limit=500):
        fired += got
    return fired


def run_lro(path: str, n: int, sync: str, per_batch: int) -> float:
    """``per_batch`` operations created and scheduled per ``client.batch()``; 0: no batches at all."""
    batched = per_batch > 0
    client = LroClient(Config(neuron="bench", store=f"sqlite:///{path}?synchronous={sync}",
                              resume_batch=100 if batched else 1))

    def handler(op: Operation) -> None:
        assert op.decode_private_state(dict) == {"step": 1}
        op.complete({"agent": "agents/1"})

    client.add_resumable_handlers(ResumableHandler("create-agent", handler))
    started = time.perf_counter()
    if batched:
        for start in range(0, n, per_batch):
            with client.batch():
                for i in range(start, min(start + per_batch, n)):
                    op = client.new_operation(f"operations/lro-{i}", {"step": 0}, private_state={"step": 0})
                    op.set_private_state({"step": 1}).resume_via_tasks("create-agent")
    else:
        for i in range(n):
            op = client.new_operation(f"operations/lro-{i}", {"step": 0}, private_state={"step": 0})
            op.set_private_state({"step": 1}).resume_via_tasks("create-agent")
    fired = _run_until_idle(client)
    elapsed = time.perf_counter() - started
    assert fired == n, fired
    done, token = client.list_operations("done = true", page_size=1000)
    while token:
        more, token = client.list_operations("done = true", page_size=1000, page_token=token)
        done += more
    assert len(done) == n and unmarshal_metadata(done[0], dict) == {"step": 0}
    client.close()
    return elapsed


def run_spanner_raw(database: Any, table: str, n: int, tag: str, blind: bool = False) -> float:
    """The alis sequence with the raw Spanner client: blind insert; read + blind update per save. With
    ``blind``, lro/v2's code as written: its saves are blind updates of the row it holds in memory, and only
    the callback reads the row once."""
    import base64

    from google.cloud import spanner

    def read(name: str) -> tuple[operations_pb2.Operation, bytes | None]:
        with database.snapshot() as snap:
            (row,) = list(snap.read(table, ["Operation", "State"], spanner.KeySet(keys=[[name]]), limit=1))
        return operations_pb2.Operation.FromString(row[0]), None if row[1] is None else base64.b64decode(row[1])

    def write(name: str, op: operations_pb2.Operation, state: bytes | None, insert: bool = False) -> None:
        with database.batch() as batch:
            values = [base64.b64encode(op.SerializeToString()), None if state is None else base64.b64encode(state),
                      "", spanner.COMMIT_TIMESTAMP]
            if insert:
                batch.insert(table, ["Operation", "State", "ResumePoint", "UpdateTime"], [values])
            else:
                batch.update(table, ["key", "Operation", "State", "ResumePoint", "UpdateTime"], [[name, *values]])

    started = time.perf_counter()
    names = [f"operations/raw-{tag}-{i}" for i in range(n)]
    for name in names:
        op = operations_pb2.Operation(name=name)
        op.metadata.CopyFrom(_struct_any({"step": 0}))
        write(name, op, json.dumps({"step": 0}).encode(), insert=True)
        if not blind:
            op, _state = read(name)  # the save of resume_via_tasks: read, change, write
        write(name, op, json.dumps({"step": 1}).encode())
    for name in names:  # the resume: load, decode the state, complete (read, change, write)
        op, state = read(name)
        assert state is not None and json.loads(state) == {"step": 1}
        if not blind:
            op, state = read(name)
        op.done = True
        op.response.CopyFrom(_struct_any({"agent": "agents/1"}))
        write(name, op, state)
    return time.perf_counter() - started


def run_spanner_lro(store: Any, n: int, tag: str) -> float:
    """``LroClient`` on the alis table, one call at a time, the local scheduler's timers in memory."""
    from errands.core import StoreScheduler, open_store

    timers = open_store("memory://")
    client = LroClient(Config(neuron="bench", store=store, scheduler=StoreScheduler(timers, queue="lro.timers.bench")))

    def handler(op: Operation) -> None:
        assert op.decode_private_state(dict) == {"step": 1}
        op.complete({"agent": "agents/1"})

    client.add_resumable_handler("create-agent", handler)
    started = time.perf_counter()
    for i in range(n):
        op = client.new_operation(f"operations/lro-{tag}-{i}", {"step": 0}, private_state={"step": 0})
        op.set_private_state({"step": 1}).resume_via_tasks("create-agent")
    fired = _run_until_idle(client)
    elapsed = time.perf_counter() - started
    assert fired == n, fired
    assert client.get_operation_pb(f"operations/lro-{tag}-{n - 1}").done
    timers.close()
    return elapsed


def spanner_run(side: str, n: int) -> float:
    """One timed run of ``side`` (``raw``, ``blind`` or ``lro``) on a Spanner emulator of its own: a fresh
    process, a database with one table made with the alis DDL verbatim, a warm-up of 20 operations on it first.
    The emulator slows down as it runs (its reads most), so no run inherits another's emulator."""
    from errands.connectors.gcp import SpannerOperationStore, operations_descriptor_set
    from errands.connectors.gcp._emulators import SPANNER_INSTANCE, TEST_PROJECT, start_spanner_emulator
    from errands.connectors.gcp._spanner_table import ALIS_OPERATIONS_DDL, PROTO_BUNDLE_DDL
    from google.cloud import spanner

    emulator = start_spanner_emulator()
    os.environ["SPANNER_EMULATOR_HOST"] = emulator.address
    try:
        client = spanner.Client(project=TEST_PROJECT)
        instance = client.instance(SPANNER_INSTANCE, configuration_name=f"projects/{TEST_PROJECT}/instanceConfigs/"
                                   "emulator-config", node_count=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                instance.create().result(timeout=30)
                break
            except Exception:  # the emulator accepts connections a moment before it serves the admin API
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        database = instance.database("bench")
        database.create().result(timeout=60)
        table = "bench_proj_bench_Operations"
        database.update_ddl([PROTO_BUNDLE_DDL, ALIS_OPERATIONS_DDL.format(project="bench_proj", neuron="bench")],
                            proto_descriptors=operations_descriptor_set()).result(timeout=120)
        if side == "lro":
            store = SpannerOperationStore(TEST_PROJECT, SPANNER_INSTANCE, "bench", "bench", table=table,
                                          create_table=False, client=client)
            run_spanner_lro(store, 20, "warm")
            return run_spanner_lro(store, n, "timed")
        # The raw side gets the same kind of session pool as the store (the client's default pool asks the
        # server whether a session exists at every checkout; Go's client does not).
        raw_db = instance.database("bench", pool=spanner.PingingPool(size=10))
        run_spanner_raw(raw_db, table, 20, "warm", blind=side == "blind")
        return run_spanner_raw(raw_db, table, n, "timed", blind=side == "blind")
    finally:
        emulator.stop()
        os.environ.pop("SPANNER_EMULATOR_HOST", None)


def bench_spanner(n: int, repeat: int) -> tuple[float, float, float] | None:
    """Median seconds of the raw alis sequence, of lro/v2's blind saves and of lro, each run on an emulator of
    its own, the sides taking turns going first; None without the emulator binary."""
    os.environ["GOOGLE_CLOUD_SPANNER_MULTIPLEXED_SESSIONS_FOR_RW"] = "false"
    times: dict[str, list[float]] = {"raw": [], "blind": [], "lro": []}
    for r in range(repeat):
        for side in (["raw", "lro", "blind"] if r % 2 == 0 else ["blind", "lro", "raw"]):
            try:
                times[side].append(spanner_run(side, n))
            except FileNotFoundError as exc:
                print(f"\nSpanner rows skipped: {exc}")
                return None
    return statistics.median(times["raw"]), statistics.median(times["blind"]), statistics.median(times["lro"])


ROWS = {
    "alis sequence (raw sqlite3)": lambda path, n, sync: run_raw(path, n, sync),
    "alis sequence + its task queue (raw sqlite3)": lambda path, n, sync: run_raw(path, n, sync, tasks=True),
    "lro, one call at a time": lambda path, n, sync: run_lro(path, n, sync, per_batch=0),
    "lro, one batch per operation, resume_batch=100": lambda path, n, sync: run_lro(path, n, sync, per_batch=1),
    "lro, 100 operations per batch, resume_batch=100": lambda path, n, sync: run_lro(path, n, sync, per_batch=100),
}
PER_OPERATION = "lro, one batch per operation, resume_batch=100"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median is reported")
    parser.add_argument("--spanner-ops", type=int, default=300, help="operations of the Spanner rows (0: skip)")
    args = parser.parse_args(argv)
    n = args.ops
    batched: dict[str, float] = {}
    per_op: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="errands-bench-lro-") as tmp:
        counter = iter(range(10_000))
        for sync in ("NORMAL", "FULL"):
            runs: dict[str, list[float]] = {name: [] for name in ROWS}
            for _ in range(args.repeat):
                for name, fn in ROWS.items():
                    runs[name].append(fn(os.path.join(tmp, f"b{next(counter)}.db"), n, sync))
            rows = [(name, statistics.median(times)) for name, times in runs.items()]
            base = rows[0][1]
            print(f"\n{n} operations created, resumed once, completed; SQLite WAL, synchronous={sync}; "
                  f"median of {args.repeat}\n")
            print("| what | seconds | ops/s | vs alis sequence |")
            print("|---|---:|---:|---:|")
            for name, secs in rows:
                print(f"| {name} | {secs:.3f} | {n / secs:,.0f} | {base / secs:.2f}x |")
            batched[sync] = base / rows[-1][1]
            per_op[sync] = base / dict(rows)[PER_OPERATION]
    # The goal is read on the row a service sees (each operation created by its own request, one commit per
    # operation), fsynced on both sides like an alis save on Spanner.
    print(f"\n100 operations per batch: {batched['FULL']:.2f}x fsynced, {batched['NORMAL']:.2f}x not fsynced")
    print(f"one batch per operation with synchronous=NORMAL (commits not fsynced): {per_op['NORMAL']:.2f}x")
    print(f"lro vs alis sequence: {per_op['FULL']:.2f}x (goal >= 1.5)")
    if args.spanner_ops > 0:
        got = bench_spanner(args.spanner_ops, args.repeat)
        if got is not None:
            raw, blind, lro = got
            m = args.spanner_ops
            print(f"\n{m} operations created, resumed once, completed; Spanner emulator (one per run), the alis "
                  f"table; median of {args.repeat}\n")
            print("| what | seconds | ops/s | vs alis sequence |")
            print("|---|---:|---:|---:|")
            print(f"| alis sequence (raw Spanner client) | {raw:.3f} | {m / raw:,.0f} | 1.00x |")
            print(f"| lro/v2 as written: blind saves, one read per callback (raw Spanner client) | {blind:.3f} | "
                  f"{m / blind:,.0f} | {raw / blind:.2f}x |")
            print(f"| lro on spanner, one call at a time | {lro:.3f} | {m / lro:,.0f} | {raw / lro:.2f}x |")
            print(f"\nlro on spanner vs lro/v2's blind saves: {blind / lro:.2f}x (compare-and-set costs a read per save)")
            print(f"lro on spanner vs alis sequence: {raw / lro:.2f}x (goal >= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
