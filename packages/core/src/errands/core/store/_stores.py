"""Stores: one schema and one SQL code path over SQLite (embedded default) and PostgreSQL.

``memory://`` is the SQLite engine on a private in-memory database: identical semantics, nothing on
disk, gone when the store closes.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import select
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from .. import telemetry
from .._clock import Clock, SystemClock
from .._values import Event, Lease
from ..errors import ConfigError, ErrandsError, LeaseLostError, MissingDependencyError
from . import _async
from ._connections import caller_transaction, pg_server
from ._group import Batch, GroupCommitter
from ._listen import Listener
from ._sql import POSTGRES, SQLITE, VALUES_ROWS, JSONText, Migration, Tx, dumps, in_clause, loads, subject_matcher

log = logging.getLogger("errands.store")

# Arbitrary constants for PostgreSQL advisory locks: one serialises journal appends so that global
# positions become visible in order; one serialises migrations across processes.
_JOURNAL_LOCK = 0x656D6A6F
_MIGRATE_LOCK = 0x656D6D69

# Every append writes as few B-trees as possible: (stream, seq) is unique by construction (the per-stream
# counter in em_streams is taken under the write lock), so it carries no index of its own; keyed tables are
# clustered on their key on SQLite. Streams an engine reserved (``SQLStore.reserve_positioned_prefix``) have
# no counter at all: their events are numbered by journal position.
CORE_MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE IF NOT EXISTS em_streams (
            stream TEXT PRIMARY KEY,
            last_seq {bigint} NOT NULL
        ){without_rowid};
        CREATE TABLE IF NOT EXISTS em_events (
            position {rowid_pk},
            stream TEXT NOT NULL,
            seq {bigint} NOT NULL,
            subject TEXT NOT NULL,
            type TEXT NOT NULL,
            data TEXT,
            time {double} NOT NULL
        );
        CREATE TABLE IF NOT EXISTS em_queue (
            queue TEXT NOT NULL,
            key TEXT NOT NULL,
            payload TEXT,
            available_at {double} NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_token {bigint} NOT NULL DEFAULT 0,
            lease_expires {double},
            created_at {double} NOT NULL,
            PRIMARY KEY (queue, key)
        ){without_rowid};
        CREATE INDEX IF NOT EXISTS em_queue_due ON em_queue (queue, available_at);
        CREATE TABLE IF NOT EXISTS em_kv (
            namespace TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT,
            version {bigint} NOT NULL DEFAULT 1,
            updated_at {double} NOT NULL,
            PRIMARY KEY (namespace, key)
        ){without_rowid}
        """,
    ),
    # The W3C trace context current at ``append_events`` (JSON, ``telemetry.carrier_text``), NULL when none: the
    # tasks of a reaction to the event continue that trace.
    Migration(2, "ALTER TABLE em_events ADD COLUMN trace TEXT"),
]


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append; the journal assigns ``seq``, ``position``, ``id`` and ``time``."""

    stream: str
    type: str
    data: Any = None
    subject: str | None = None


def _validate_new_event(ev: NewEvent, reserved: Mapping[str, str]) -> None:
    for name in ("stream", "type"):
        value = getattr(ev, name)
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"event {name} must be a non-empty string, got {value!r}", field=name, value=value
            )
    for prefix, engine in reserved.items():
        if ev.stream.startswith(prefix):
            raise ConfigError(
                f"stream {ev.stream!r} belongs to {engine} (streams under {prefix} are written by the engine "
                "only); append to a stream of your own",
                field="stream", value=ev.stream,
            )
    if ev.subject is not None and (not isinstance(ev.subject, str) or not ev.subject):
        raise ConfigError(
            f"event subject must be a non-empty string, got {ev.subject!r}",
            field="subject",
            value=ev.subject,
        )


def _event_from_row(row: Sequence[Any]) -> Event:
    position, stream, seq, subject, type_, data, t = row
    return Event(
        id=f"{stream}/{seq}",
        stream=stream,
        seq=int(seq),
        subject=subject,
        type=type_,
        data=loads(data),
        time=datetime.fromtimestamp(float(t), tz=timezone.utc),
        position=int(position),
    )


_EVENT_COLS = "position, stream, seq, subject, type, data, time"


_T = TypeVar("_T")


def _keep_trace(tx: Tx, positions: Sequence[int], trace: str | None) -> None:
    """Keep ``trace`` (a traced append's context) with the events at ``positions``; an untraced append writes
    nothing more."""
    if trace is not None:
        tx.executemany("UPDATE em_events SET trace = ? WHERE position = ?", [(trace, p) for p in positions])


class SQLStore:
    """Everything a store does, written once over ``Tx``. Subclasses supply connections.

    Args:
        url: the store URL.
        clock: the time source (``FakeClock`` in tests).
    """

    name: ClassVar[str] = ""
    schemes: ClassVar[tuple[str, ...]] = ()
    dialect: ClassVar[str] = SQLITE

    def __init__(self, url: str, *, clock: Clock | None = None) -> None:
        self.url = url
        self.clock: Clock = clock or SystemClock()
        self._migrated: set[str] = set()
        self._migrate_lock = threading.Lock()
        self._committer = GroupCommitter(self)

    # -- connections -------------------------------------------------------------------------
    def transaction(self, conn: Any = None) -> contextlib.AbstractContextManager[Tx]:
        """A write transaction: committed on success, rolled back on error.

        Args:
            conn: the caller's own connection to the same database, of any kind ``conn=`` accepts (a
                ``sqlite3``/psycopg connection, a SQLAlchemy ``Connection`` or ``Session``, Django's connection
                inside ``atomic()``; async ones from ``run_async``). The work joins the caller's transaction and
                is committed or rolled back by the caller.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def read(self) -> contextlib.AbstractContextManager[Tx]:
        """A read-only transaction."""
        return self.transaction()

    def statement(self) -> contextlib.AbstractContextManager[Tx]:
        """A write transaction of one statement, for a hot path whose whole transaction one statement says.

        On PostgreSQL that statement runs on its own (autocommit: atomic, committed when it returns), without
        the round trips of ``BEGIN`` and ``COMMIT``; a second statement raises ``ErrandsError``. A connection
        that breaks under it raises an infrastructure error, never run again here: the statement may have
        committed unacknowledged, as a transaction's ``COMMIT`` may. Elsewhere it is ``transaction()``.
        """
        return self.transaction()

    def group_commit(self, work: Callable[[Tx], _T], *, together: Batch | None = None) -> _T:
        """Run ``work(tx)`` in a transaction of the store's own, shared with the concurrent calls of other threads
        (group commit): one commit serves every call that arrived while the previous group was committing.

        Returns only once the transaction holding ``work`` has committed, with what ``work`` returned. Each call's
        work runs inside a savepoint: if it raises, its statements are undone and the error is raised to its own
        caller, not to the others. ``work`` runs in the thread of the group's leader and must use only ``tx``.
        A lone caller's work runs in a plain transaction, with no wait. Under ``run_async`` on PostgreSQL the
        groups are those of the coroutines of one event loop, on its async pool: a follower awaits its group.

        ``together``: this call's part of a write the group's leader makes for every member bringing the same
        ``Batch.write`` at once (one multi-row statement per table), falling back to ``work`` for the members that
        write leaves to their own work, or for all of them if it raises (``store._group``).

        Raises:
            Exception: the error ``work`` raised, or the transaction's own (a failed commit, a dropped
                connection), in which case nothing of the group was committed.
        """
        if _async._live and _async.bridged_store() is self:
            # A coroutine's work on this event loop (``run_async`` on PostgreSQL): grouped with the loop's others.
            grouped: _T = self._committer.run_bridged(work, together)
            return grouped
        if self._in_transaction_here():
            # Inside a transaction of this thread's own the group's leader would wait for it: the work goes alone,
            # as a transaction of its own would.
            with self.transaction() as tx:
                return work(tx)
        return self._committer.run(work, together)

    def _in_transaction_here(self) -> bool:
        """Whether this thread is inside a transaction of the store's own that would hold a group's leader up."""
        return False

    async def run_async(self, fn: Callable[..., _T], /, *args: Any, conn: Any = None, **kwargs: Any) -> _T:
        """Run store work written once, for sync callers, on behalf of a coroutine: ``fn(*args, **kwargs)``
        (with ``conn=conn`` when a connection is given), without blocking the caller's event loop.

        Every ``*_async`` twin of the engines is this call around its sync method: one configuration serves
        sync and async callers, and the SQL exists once.

        - An async ``conn`` (psycopg ``AsyncConnection``, SQLAlchemy ``AsyncConnection`` / ``AsyncSession`` over
          psycopg or aiosqlite): ``fn`` runs in a greenlet on this event loop, each of its DBAPI calls awaited on
          the caller's connection, inside the caller's transaction.
        - A sync ``conn`` (thread-bound: sqlite3, Django's, SQLAlchemy's sync ones): ``fn`` runs here, on it.
        - No ``conn``: SQLite work runs in a thread; PostgreSQL work takes its connections from an
          ``AsyncConnectionPool`` of this event loop, through the same greenlet bridge.

        Errors raised by ``fn`` propagate unchanged. Cancelling the awaiting task leaves no transaction
        half-open: the store's own transaction rolls back (or, in a thread, finishes) and its connection goes
        back to the pool; the caller's own transaction is the caller's to end.
        """
        return await _async.run_async(self, fn, args, kwargs, conn)

    async def close_async(self) -> None:
        """Close what ``run_async`` opened for this event loop (a PostgreSQL store's async pool); the store
        stays open for sync callers and other loops."""
        await _async.close_pools(self)

    def listen(self, channels: Sequence[str], on_notify: Callable[[str | None], None]) -> Listener | None:
        """Call ``on_notify(channel)`` on a thread of its own whenever a committed transaction notified one of
        ``channels`` (``Tx.notify``), until the returned listener's ``close()``; None where the database cannot
        notify (SQLite: its workers poll)."""
        return None

    def close(self) -> None:
        """Release connections. The store is unusable afterwards."""

    def __enter__(self) -> SQLStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.redacted_url!r})"

    @property
    def redacted_url(self) -> str:
        parts = urlsplit(self.url)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            return parts._replace(netloc=netloc).geturl()
        return self.url

    # -- migrations --------------------------------------------------------------------------
    def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Apply the ``component``'s migrations not yet applied, each in one transaction.

        Returns:
            The component's schema version afterwards.
        """
        with self._migrate_lock:
            if component in self._migrated:
                return max((m.version for m in migrations), default=0)
            with self.transaction() as tx:
                if self.dialect == POSTGRES:
                    tx.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATE_LOCK,))
                tx.execute(
                    "CREATE TABLE IF NOT EXISTS em_schema (component TEXT PRIMARY KEY, "
                    "version INTEGER NOT NULL)"
                )
                row = tx.one("SELECT version FROM em_schema WHERE component = ?", (component,))
                current = int(row[0]) if row else 0
                for m in sorted(migrations, key=lambda m: m.version):
                    if m.version <= current:
                        continue
                    for stmt in m.statements(self.dialect):
                        tx.execute(stmt)
                    current = m.version
                tx.execute(
                    "INSERT INTO em_schema (component, version) VALUES (?, ?) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    (component, current),
                )
            self._migrated.add(component)
            return current

    def schema_version(self, component: str = "core") -> int:
        with self.read() as tx:
            row = tx.one("SELECT version FROM em_schema WHERE component = ?", (component,))
        return int(row[0]) if row else 0

    # -- journal -----------------------------------------------------------------------------
    # Stream prefixes engines reserved, with the engine each belongs to (``reserve_positioned_prefix``); shared
    # by every store of the process, as the engines that fill it are.
    _reserved: ClassVar[dict[str, str]] = {}
    _positioned: ClassVar[tuple[str, ...]] = ()

    #: ``last_position()`` as an SQL scalar subquery, for an engine to store with a row of its own in the statement
    #: that writes the row (no round trip of its own): inside a transaction it is below every event appended later
    #: in it, so that the engine can read the row's events from there.
    LAST_POSITION_SQL: ClassVar[str] = "(SELECT COALESCE(MAX(position), 0) FROM em_events)"

    @staticmethod
    def reserve_positioned_prefix(prefix: str, engine: str) -> None:
        """Reserve the streams under ``prefix`` (``"effects/"``) for ``engine`` (its name in errors: ``"the
        outbox"``), in every store of this process. An engine calls it when its module is imported.

        Their events are numbered by journal position (``seq`` is the event's ``position``): still unique, stable
        and increasing along the stream, with no counter row to write on every append. Only the engine writes
        them (``append_engine_events``); ``append_events`` refuses them with a ``ConfigError``.

        Raises:
            ConfigError: ``prefix`` is not a non-empty string ending in ``/``, or another engine holds it.
        """
        if not isinstance(prefix, str) or not prefix.endswith("/") or prefix == "/":
            raise ConfigError(f"a reserved stream prefix must end in '/', got {prefix!r}", field="prefix",
                              value=prefix)
        holder = SQLStore._reserved.get(prefix)
        if holder is not None and holder != engine:
            raise ConfigError(f"streams under {prefix} are reserved for {holder} already", field="prefix",
                              value=prefix)
        SQLStore._reserved[prefix] = engine
        SQLStore._positioned = tuple(SQLStore._reserved)

    def append_events(self, events: Sequence[NewEvent], *, tx: Tx | None = None, conn: Any = None) -> list[Event]:
        """Append events in one transaction (or inside ``tx`` / the caller's ``conn``); without either, concurrent
        appends share commits (``group_commit``), each returning once its events are committed."""
        for ev in events:
            _validate_new_event(ev, self._reserved)
        # Read in the caller's thread: under group commit the rows are written by the leader's.
        trace = telemetry.carrier_text() if telemetry.tracing() else None
        if tx is not None:
            return self._append(tx, events, trace)
        if conn is None:
            return self.group_commit(lambda t: self._append(t, events, trace))
        with self.transaction(conn) as t:
            return self._append(t, events, trace)

    def _append(self, tx: Tx, events: Sequence[NewEvent], trace: str | None = None) -> list[Event]:
        if not events:
            return []
        rows, positions = self._write_events(tx, events)
        _keep_trace(tx, positions, trace)
        when = datetime.fromtimestamp(rows[0][5], tz=timezone.utc)
        out = []
        for r, ev, pos in zip(rows, events, positions):
            seq = pos if r[1] is None else r[1]
            out.append(Event(id=f"{r[0]}/{seq}", stream=r[0], seq=seq, subject=r[2], type=r[3], data=ev.data,
                             time=when, position=pos))
        return out

    def append_engine_events(self, tx: Tx, events: Sequence[NewEvent], trace: str | None = None) -> list[int]:
        """Append events an engine built, inside the engine's transaction ``tx``; returns their positions.
        ``trace``: the trace context they carry (``telemetry.carrier_text``), as ``append_events`` keeps it.

        For engines only: the events are taken as well-formed (an engine builds them; they are not validated
        again), and they may go to the streams the engine reserved (``reserve_positioned_prefix``)."""
        if not events:
            return []
        positions = self._write_events(tx, events)[1]
        _keep_trace(tx, positions, trace)
        return positions

    def _write_events(self, tx: Tx, events: Sequence[NewEvent]) -> tuple[list[tuple[Any, ...]], list[int]]:
        """Write well-formed events (validated by the caller, or built by an engine): their rows and positions.

        Events on a reserved stream take their position as ``seq`` (their rows' ``seq`` is None); the others take
        the next value of their stream's counter."""
        now = self.clock.now()
        if tx.dialect == POSTGRES:
            tx.execute("SELECT pg_advisory_xact_lock(?)", (_JOURNAL_LOCK,))
        positioned = self._positioned
        rows: list[tuple[Any, ...]] = []
        counted: dict[str, int] = {}
        for ev in events:
            data = ev.data if type(ev.data) is JSONText else dumps(ev.data, field="data")
            stream = ev.stream
            if not stream.startswith(positioned):
                counted[stream] = counted.get(stream, 0) + 1
            rows.append((stream, None, ev.subject or ev.type, ev.type, data, now))
        if counted:
            # Streams with a counter: one upsert per stream reserves its numbers, handed out in order.
            next_seq: dict[str, int] = {}
            for stream, n in counted.items():
                row = tx.one(
                    "INSERT INTO em_streams (stream, last_seq) VALUES (?, ?) ON CONFLICT (stream) "
                    "DO UPDATE SET last_seq = em_streams.last_seq + excluded.last_seq RETURNING last_seq",
                    (stream, n),
                )
                assert row is not None
                next_seq[stream] = int(row[0]) - n + 1
            for i, r in enumerate(rows):
                seq = next_seq.get(r[0])
                if seq is not None:
                    next_seq[r[0]] = seq + 1
                    rows[i] = (r[0], seq, *r[2:])
        return rows, self._insert_events(tx, rows)

    def _insert_events(self, tx: Tx, rows: list[tuple[Any, ...]]) -> list[int]:
        """Insert event rows (``seq`` None: the row's own position) and return their positions."""
        if tx.dialect == SQLITE:
            # A rowid table hands out max(position) + 1 (the journal is append-only and given no position but
            # max(position) + 1), which the statement reads first when it needs it for ``seq``. Under the write lock the
            # rows of one statement are consecutive.
            insert = ("INSERT INTO em_events (stream, seq, subject, type, data, time) VALUES "
                      "(?, COALESCE(?, (SELECT IFNULL(MAX(position), 0) + 1 FROM em_events)), ?, ?, ?, ?)")
            if len(rows) == 1:
                return [int(tx.raw.execute(insert, rows[0]).lastrowid)]
            # Several rows, ``VALUES_ROWS`` a statement: each statement reads the last position once and numbers
            # its rows after it (on a positioned stream, ``seq`` too), in order; its last row's position is the
            # statement's ``lastrowid``. One statement, not a read and then the insert: each is a step of the
            # driver, which lets the process's other threads take the interpreter while the store's lock is held.
            positions: list[int] = []
            execute = tx.raw.execute
            for i in range(0, len(rows), VALUES_ROWS):
                chunk = rows[i:i + VALUES_ROWS]
                cur = execute(_numbered_events(len(chunk)),
                              tuple(itertools.chain.from_iterable((n, *r) for n, r in enumerate(chunk, 1))))
                last = int(cur.lastrowid)
                positions += range(last - len(chunk) + 1, last + 1)
            return positions
        cur = tx.raw.cursor()
        cur.executemany(
            tx._sql(
                "INSERT INTO em_events (position, stream, seq, subject, type, data, time) SELECT p.v, "
                "CAST(? AS TEXT), COALESCE(CAST(? AS BIGINT), p.v), CAST(? AS TEXT), CAST(? AS TEXT), CAST(? AS TEXT), "
                "CAST(? AS DOUBLE PRECISION) FROM (SELECT "
                "nextval(pg_get_serial_sequence('em_events', 'position')) AS v) p RETURNING position"
            ),
            rows, returning=True,
        )
        out = []
        while True:
            out.append(int(cur.fetchone()[0]))
            if not cur.nextset():
                break
        return out

    def read_events(
        self, after: int = 0, limit: int = 1000, subjects: Sequence[str] | None = None,
        stream: str | None = None,
    ) -> list[Event]:
        """Events with a global position after ``after``, oldest first, at most ``limit``,
        filtered by subject patterns and/or one stream."""
        events, _ = self.scan_events(after, limit, subjects, stream=stream)
        return events

    def event_traces(self, tx: Tx, positions: Sequence[int]) -> dict[int, str]:
        """The trace context ``append_events`` stored with the events at ``positions``, of those that have one."""
        out: dict[int, str] = {}
        for i in range(0, len(positions), 500):
            chunk = list(positions[i:i + 500])
            out.update((int(p), str(t)) for p, t in tx.query(
                f"SELECT position, trace FROM em_events WHERE position IN {in_clause(len(chunk))} "
                "AND trace IS NOT NULL", chunk))
        return out

    def scan_events(
        self, after: int, limit: int, subjects: Sequence[str] | None = None, *,
        stream: str | None = None, scan: int | None = None,
    ) -> tuple[list[Event], int]:
        """Like ``read_events``, also returning the last position scanned, so that a reader whose
        filter skipped every row still moves its cursor forward."""
        match = subject_matcher(subjects)
        scan = scan or max(limit, 500)
        out: list[Event] = []
        last = after
        while len(out) < limit:
            with self.read() as tx:
                if stream is None:
                    rows = tx.query(
                        f"SELECT {_EVENT_COLS} FROM em_events WHERE position > ? ORDER BY position LIMIT ?",
                        (last, scan),
                    )
                else:
                    rows = tx.query(
                        f"SELECT {_EVENT_COLS} FROM em_events WHERE stream = ? AND position > ? "
                        "ORDER BY position LIMIT ?",
                        (stream, last, scan),
                    )
            if not rows:
                break
            for row in rows:
                last = int(row[0])
                if match(row[3]):
                    out.append(_event_from_row(row))
                    if len(out) >= limit:
                        break
            if len(rows) < scan:
                break
        return out, last

    def events_at(self, positions: Sequence[int]) -> list[Event]:
        """The events at these global positions, oldest first, for a reader that keeps positions of its own
        (fan-out's parked events); a position with no event is left out."""
        wanted = sorted(set(positions))
        out: list[Event] = []
        with self.read() as tx:
            for i in range(0, len(wanted), 500):
                chunk = wanted[i:i + 500]
                out.extend(map(_event_from_row, tx.query(
                    f"SELECT {_EVENT_COLS} FROM em_events WHERE position IN {in_clause(len(chunk))} "
                    "ORDER BY position", chunk)))
        return out

    def last_position(self) -> int:
        with self.read() as tx:
            row = tx.one(f"SELECT {self.LAST_POSITION_SQL}")
        return int(row[0]) if row else 0

    # -- key/value with versions (cursors, engine state) --------------------------------------
    def kv_get(self, namespace: str, key: str, *, tx: Tx | None = None) -> tuple[Any, int] | None:
        """``(value, version)`` or None."""
        sql = "SELECT value, version FROM em_kv WHERE namespace = ? AND key = ?"
        if tx is not None:
            row = tx.one(sql, (namespace, key))
        else:
            with self.read() as t:
                row = t.one(sql, (namespace, key))
        return (loads(row[0]), int(row[1])) if row else None

    def kv_put(
        self, namespace: str, key: str, value: Any, *, expected_version: int | None = None,
        tx: Tx | None = None,
    ) -> int:
        """Store ``value``; with ``expected_version`` it is compare-and-set (0 = must not exist):
        a mismatch raises ``LeaseLostError`` and changes nothing. Returns the new version."""
        if tx is None:
            with self.transaction() as t:
                return self.kv_put(namespace, key, value, expected_version=expected_version, tx=t)
        now = self.clock.now()
        text = dumps(value, field="value")
        if expected_version is None:
            row = tx.one(
                "INSERT INTO em_kv (namespace, key, value, version, updated_at) VALUES (?, ?, ?, 1, ?) "
                "ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value, "
                "version = em_kv.version + 1, updated_at = excluded.updated_at RETURNING version",
                (namespace, key, text, now),
            )
            assert row is not None
            return int(row[0])
        if expected_version == 0:
            row = tx.one(
                "INSERT INTO em_kv (namespace, key, value, version, updated_at) VALUES (?, ?, ?, 1, ?) "
                "ON CONFLICT (namespace, key) DO NOTHING RETURNING version",
                (namespace, key, text, now),
            )
        else:
            row = tx.one(
                "UPDATE em_kv SET value = ?, version = version + 1, updated_at = ? "
                "WHERE namespace = ? AND key = ? AND version = ? RETURNING version",
                (text, now, namespace, key, expected_version),
            )
        if row is None:
            raise LeaseLostError(
                f"{namespace}/{key} is no longer at version {expected_version}: another writer won"
            )
        return int(row[0])

    def kv_delete(self, namespace: str, key: str) -> bool:
        with self.transaction() as tx:
            return tx.rowcount("DELETE FROM em_kv WHERE namespace = ? AND key = ?", (namespace, key)) > 0

    def get_cursor(self, name: str) -> int:
        got = self.kv_get("cursor", name)
        return int(got[0]) if got else 0

    def set_cursor(self, name: str, position: int, *, tx: Tx | None = None) -> None:
        self.kv_put("cursor", name, int(position), tx=tx)

    # -- leased work queue -------------------------------------------------------------------
    def enqueue(
        self, queue: str, items: Sequence[tuple[str, Any] | tuple[str, Any, float]], *,
        tx: Tx | None = None, conn: Any = None,
    ) -> int:
        """Add ``(key, payload[, available_at])`` items; a key already queued is left as it is.

        Returns:
            How many items were new.
        """
        if tx is None:
            with self.transaction(conn) as t:
                return self.enqueue(queue, items, tx=t)
        now = self.clock.now()
        added = 0
        for item in items:
            key, payload = item[0], item[1]
            at = float(item[2]) if len(item) > 2 else now
            if not isinstance(key, str) or not key:
                raise ConfigError(f"queue item key must be a non-empty string, got {key!r}", field="key", value=key)
            added += tx.rowcount(
                "INSERT INTO em_queue (queue, key, payload, available_at, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (queue, key) DO NOTHING",
                (queue, key, dumps(payload), at, now),
            )
        return added

    def claim(self, queue: str, limit: int = 100, *, lease_for: float = 30.0, owner: str | None = None) -> list[Lease]:
        """Lease up to ``limit`` due items, oldest first, in one transaction. Each claim bumps the
        item's fencing token; items whose lease lapsed are claimable again."""
        owner = owner or default_owner()
        now = self.clock.now()
        expires = now + lease_for
        with self.transaction() as tx:
            rows = tx.query(
                "UPDATE em_queue SET lease_owner = ?, lease_token = lease_token + 1, lease_expires = ?, "
                "attempts = attempts + 1 WHERE (queue, key) IN (SELECT queue, key FROM em_queue "
                "WHERE queue = ? AND available_at <= ? AND (lease_expires IS NULL OR lease_expires <= ?) "
                f"ORDER BY available_at LIMIT ?{tx.skip_locked}) RETURNING key, payload, lease_token, attempts",
                (owner, expires, queue, now, now, limit),
            )
        return [
            Lease(queue=queue, key=k, token=int(t), owner=owner, expires_at=expires, payload=loads(p), attempts=int(a))
            for k, p, t, a in rows
        ]

    def claim_keys(self, queue: str, keys: Sequence[str], *, lease_for: float = 30.0, owner: str | None = None,
                   tx: Tx | None = None) -> list[Lease]:
        """Lease those of ``keys`` that are due and held by no one, in one statement (inside ``tx`` when
        given): for a worker that must run particular items now (one it has just enqueued, one a caller
        waits for) rather than the oldest due. Keys absent, not yet due or leased to another are skipped;
        each claim bumps the item's fencing token, as ``claim`` does."""
        if not keys:
            return []
        if tx is None:
            with self.transaction() as t:
                return self.claim_keys(queue, keys, lease_for=lease_for, owner=owner, tx=t)
        owner = owner or default_owner()
        now = self.clock.now()
        expires = now + lease_for
        rows = tx.query(
            "UPDATE em_queue SET lease_owner = ?, lease_token = lease_token + 1, lease_expires = ?, "
            f"attempts = attempts + 1 WHERE queue = ? AND key IN {in_clause(len(keys))} AND available_at <= ? "
            "AND (lease_expires IS NULL OR lease_expires <= ?) RETURNING key, payload, lease_token, attempts",
            (owner, expires, queue, *keys, now, now),
        )
        return [
            Lease(queue=queue, key=k, token=int(t), owner=owner, expires_at=expires, payload=loads(p), attempts=int(a))
            for k, p, t, a in rows
        ]

    def enqueue_claimed(self, queue: str, key: str, payload: Any, *, tx: Tx, lease_for: float = 30.0,
                        owner: str | None = None) -> Lease | None:
        """Add item ``key``, due now, already leased to ``owner``, in one statement inside ``tx``: the lease
        ``enqueue`` then ``claim_keys`` would give (token 1, one attempt, expiring ``lease_for`` from now), for a
        worker that runs what it has just created. None, changing nothing, if ``key`` is queued already."""
        if not isinstance(key, str) or not key:
            raise ConfigError(f"queue item key must be a non-empty string, got {key!r}", field="key", value=key)
        owner = owner or default_owner()
        now = self.clock.now()
        expires = now + lease_for
        text = dumps(payload)
        if not tx.rowcount(
            "INSERT INTO em_queue (queue, key, payload, available_at, created_at, attempts, lease_owner, lease_token, "
            "lease_expires) VALUES (?, ?, ?, ?, ?, 1, ?, 1, ?) ON CONFLICT (queue, key) DO NOTHING",
            (queue, key, text, now, now, owner, expires),
        ):
            return None
        return Lease(queue=queue, key=key, token=1, owner=owner, expires_at=expires, payload=loads(text), attempts=1)

    def _fenced(self, tx: Tx, leases: Sequence[Lease], sql: str, extra: Callable[[Lease], tuple[Any, ...]]) -> None:
        where = "WHERE queue = ? AND key = ? AND lease_token = ?"
        extras = {extra(lease) for lease in leases}
        if tx.dialect == POSTGRES and len(leases) > 1 and len(extras) == 1 and sql.endswith(where):
            # One statement per chunk rather than one network round trip per lease.
            head, params = sql[: -len(where)], extras.pop()
            for i in range(0, len(leases), 1000):
                chunk = leases[i : i + 1000]
                rows = tx.query(
                    f"{head}WHERE (queue, key, lease_token) IN (VALUES {', '.join(['(?, ?, ?)'] * len(chunk))}) "
                    "RETURNING queue, key, lease_token",
                    (*params, *(v for lease in chunk for v in (lease.queue, lease.key, lease.token))),
                )
                held = {(q, k, int(t)) for q, k, t in rows}
                seen: set[tuple[str, str, int]] = set()
                for lease in chunk:
                    ident = (lease.queue, lease.key, lease.token)
                    if ident not in held or ident in seen:
                        raise LeaseLostError(
                            f"lease on {lease.queue}/{lease.key} (token {lease.token}) is no longer held"
                        )
                    seen.add(ident)
            return
        for lease in leases:
            n = tx.rowcount(sql, (*extra(lease), lease.queue, lease.key, lease.token))
            if n != 1:
                raise LeaseLostError(
                    f"lease on {lease.queue}/{lease.key} (token {lease.token}) is no longer held"
                )

    def complete(self, leases: Sequence[Lease], *, tx: Tx | None = None) -> None:
        """Finish leased items in one transaction. If any token is stale, ``LeaseLostError`` and
        nothing changes."""
        if tx is None:
            with self.transaction() as t:
                return self.complete(leases, tx=t)
        self._fenced(tx, leases, "DELETE FROM em_queue WHERE queue = ? AND key = ? AND lease_token = ?", lambda _l: ())

    def release(self, leases: Sequence[Lease], *, delay: float = 0.0, tx: Tx | None = None) -> None:
        """Give leased items back, due again after ``delay`` seconds. Stale tokens: ``LeaseLostError``."""
        if tx is None:
            with self.transaction() as t:
                return self.release(leases, delay=delay, tx=t)
        at = self.clock.now() + delay
        self._fenced(
            tx, leases,
            "UPDATE em_queue SET lease_owner = NULL, lease_expires = NULL, available_at = ? "
            "WHERE queue = ? AND key = ? AND lease_token = ?",
            lambda _l: (at,),
        )

    def extend(self, leases: Sequence[Lease], *, lease_for: float = 30.0, tx: Tx | None = None) -> list[Lease]:
        """Push the expiry of held leases out by ``lease_for`` seconds from now, in one transaction (or inside
        ``tx``, so that the renewal commits with the holder's own writes). Stale tokens: ``LeaseLostError``."""
        if tx is None:
            with self.transaction() as t:
                return self.extend(leases, lease_for=lease_for, tx=t)
        expires = self.clock.now() + lease_for
        self._fenced(
            tx, leases,
            "UPDATE em_queue SET lease_expires = ? WHERE queue = ? AND key = ? AND lease_token = ?",
            lambda _l: (expires,),
        )
        return [
            Lease(queue=lease.queue, key=lease.key, token=lease.token, owner=lease.owner, expires_at=expires,
                  payload=lease.payload, attempts=lease.attempts)
            for lease in leases
        ]

    def bring_forward(self, queue: str, key: str, at: float, *, tx: Tx | None = None) -> bool:
        """Make a waiting item due by ``at`` if it was due later (something it waits for has arrived). A
        leased item is left as it is: its holder decides when it comes back. Returns whether it moved."""
        if tx is None:
            with self.transaction() as t:
                return self.bring_forward(queue, key, at, tx=t)
        return tx.rowcount(
            "UPDATE em_queue SET available_at = ? WHERE queue = ? AND key = ? AND lease_expires IS NULL "
            "AND available_at > ?",
            (at, queue, key, at),
        ) == 1

    def dequeue(self, queue: str, key: str, *, tx: Tx | None = None) -> bool:
        """Remove an item whatever its lease. Returns whether it existed."""
        if tx is None:
            with self.transaction() as t:
                return self.dequeue(queue, key, tx=t)
        return tx.rowcount("DELETE FROM em_queue WHERE queue = ? AND key = ?", (queue, key)) > 0

    def queue_size(self, queue: str) -> int:
        with self.read() as tx:
            row = tx.one("SELECT COUNT(*) FROM em_queue WHERE queue = ?", (queue,))
        return int(row[0]) if row else 0

    def due_items(self, queue: str, limit: int = 100) -> list[tuple[str, Any, float, int]]:
        """The items of ``queue`` a ``claim`` would take now (due, and leased to no one or their lease lapsed),
        earliest first, without claiming them: ``(key, payload, available_at, attempts)``."""
        now = self.clock.now()
        with self.read() as tx:
            rows = tx.query(
                "SELECT key, payload, available_at, attempts FROM em_queue WHERE queue = ? AND available_at <= ? "
                "AND (lease_expires IS NULL OR lease_expires <= ?) ORDER BY available_at, key LIMIT ?",
                (queue, now, now, int(limit)),
            )
        return [(k, loads(p), float(at), int(a)) for k, p, at, a in rows]

    def next_due(self, queue: str) -> float | None:
        """When the earliest item of ``queue`` becomes claimable, or None if empty."""
        with self.read() as tx:
            row = tx.one(
                "SELECT MIN(CASE WHEN lease_expires IS NOT NULL AND lease_expires > available_at "
                "THEN lease_expires ELSE available_at END) FROM em_queue WHERE queue = ?",
                (queue,),
            )
        return float(row[0]) if row and row[0] is not None else None


def default_owner() -> str:
    return f"{os.uname().nodename if hasattr(os, 'uname') else 'host'}:{os.getpid()}:{threading.get_ident()}"


@functools.lru_cache(maxsize=VALUES_ROWS)
def _numbered_events(n: int) -> str:
    """SQLite: insert ``n`` events, each given as (its number in the statement, stream, seq or NULL, subject, type,
    data, time), at the positions after the journal's last (a positioned stream's ``seq`` is its position). The one
    row of the last position is the outer loop (``CROSS JOIN`` keeps it so), and the rows go in their order."""
    return (
        "INSERT INTO em_events (position, stream, seq, subject, type, data, time) "
        "SELECT p.last + v.column1, v.column2, COALESCE(v.column3, p.last + v.column1), v.column4, v.column5, "
        "v.column6, v.column7 FROM (SELECT IFNULL(MAX(position), 0) AS last FROM em_events) AS p CROSS JOIN "
        "(VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * n) + ") AS v"
    )


# -- SQLite ---------------------------------------------------------------------------------------

_SYNC_LEVELS = ("OFF", "NORMAL", "FULL", "EXTRA")


class SQLiteStore(SQLStore):
    """The embedded store: one SQLite file in WAL mode, on a local disk (never NFS).

    URL: ``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``sqlite:///:memory:``; query options
    ``synchronous`` and ``busy_timeout`` (ms, 30000).

    ``synchronous=FULL`` (the default) fsyncs the WAL at every commit: a commit that returned survives a power
    loss or an operating-system crash. ``synchronous=NORMAL`` (``sqlite:///app.db?synchronous=normal`` or
    ``SQLiteStore(url, synchronous="normal")``) fsyncs only at checkpoints: it still survives a crash of the
    process, but a power loss can lose the last commits (effects whose ``submit`` returned). ``OFF`` and
    ``EXTRA`` are SQLite's own.
    """

    name: ClassVar[str] = "sqlite"
    schemes: ClassVar[tuple[str, ...]] = ("sqlite",)
    dialect: ClassVar[str] = SQLITE

    def __init__(self, url: str, *, clock: Clock | None = None, synchronous: str | None = None) -> None:
        super().__init__(url, clock=clock)
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query))
        path = unquote(parts.path)
        if parts.netloc:
            raise ConfigError(
                f"store URL {url!r} has a host; write sqlite:///relative.db or sqlite:////absolute.db",
                field="store", value=url,
            )
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise ConfigError(f"store URL {url!r} names no file", field="store", value=url)
        self.path = path
        url_sync = options.pop("synchronous", None)
        sync = (synchronous or url_sync or "FULL").upper()
        if sync not in _SYNC_LEVELS:
            raise ConfigError(
                f"store option synchronous must be one of {', '.join(_SYNC_LEVELS)}, got {sync!r}",
                field="store.synchronous", value=sync,
            )
        self.synchronous = sync
        busy_text = options.pop("busy_timeout", "30000")
        try:
            busy = int(busy_text)
        except ValueError as exc:
            raise ConfigError(
                f"store option busy_timeout must be whole milliseconds, got {busy_text!r}",
                field="store.busy_timeout", value=busy_text,
            ) from exc
        if options:
            # A misspelt option (``synchronus=FULL``) must not silently drop a durability setting.
            unknown = sorted(options)
            raise ConfigError(
                f"unknown store option(s) {', '.join(unknown)} in {url!r}; SQLite takes synchronous and busy_timeout",
                field=f"store.{unknown[0]}", value=options[unknown[0]],
            )
        self._lock = threading.RLock()
        self._conn = self._connect(path, busy)
        self.migrate("core", CORE_MIGRATIONS)

    def _connect(self, path: str, busy_ms: int) -> sqlite3.Connection:
        memory = path == ":memory:"
        if not memory:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ConfigError(f"store directory {parent!r} does not exist", field="store", value=self.url)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_ms / 1000)
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        if not memory:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        # A statement that writes many rows in a transaction keeps a statement journal (to undo that statement
        # alone), which SQLite spills to a temporary file past 64 KiB: a batched submit then wrote each page twice,
        # once to that file. Kept in memory, the batch writes only its WAL frames.
        conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    def transaction(self, conn: Any = None) -> contextlib.AbstractContextManager[Tx]:
        if conn is not None:
            return caller_transaction(self, conn)
        return _SQLiteTransaction(self._lock, self._conn)

    def _in_transaction_here(self) -> bool:
        # The store's one connection is held under this lock for a whole transaction (or read).
        owned: bool = self._lock._is_owned()  # type: ignore[attr-defined]  # RLock's C method, not in typeshed
        return owned

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        with self._lock:
            c = self._conn
            c.execute("BEGIN")
            try:
                yield Tx(c, SQLITE)
            finally:
                c.execute("COMMIT")

    def connect(self) -> sqlite3.Connection:
        """A new connection of the caller's own to this database, for ``conn=`` transactions."""
        if self.path == ":memory:":
            raise ConfigError("an in-memory store cannot be shared with another connection", field="store")
        conn = sqlite3.connect(self.path, timeout=30)
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _SQLiteTransaction:
    """One write transaction on the store's connection (a class, not a generator: it is on every hot path)."""

    __slots__ = ("_conn", "_lock")

    def __init__(self, lock: Any, conn: sqlite3.Connection) -> None:
        self._lock = lock
        self._conn = conn

    def __enter__(self) -> Tx:
        self._lock.acquire()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return Tx(self._conn, SQLITE)

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        try:
            if kind is None:
                try:
                    self._conn.execute("COMMIT")
                except BaseException:
                    # Not committed (the disk is full, say): leave the connection out of the transaction.
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            else:
                self._conn.execute("ROLLBACK")
        finally:
            self._lock.release()


class MemoryStore(SQLiteStore):
    """``memory://``: the SQLite engine on a private in-memory database."""

    name: ClassVar[str] = "memory"
    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(self, url: str = "memory://", *, clock: Clock | None = None) -> None:
        SQLStore.__init__(self, url, clock=clock)
        # A named shared-cache database, so that callers can join with ``connect()``; it lives as
        # long as this store's connection.
        self.path = f"file:errands-{uuid.uuid4().hex}?mode=memory&cache=shared"
        self.synchronous = "OFF"
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, uri=True, isolation_level=None, check_same_thread=False)
        self.migrate("core", CORE_MIGRATIONS)

    def connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, uri=True, check_same_thread=False)


# -- PostgreSQL -----------------------------------------------------------------------------------


# Pool options read from the URL: (name, default, whole number, lowest allowed value, whether it must be above it).
_POOL_OPTIONS: tuple[tuple[str, float, bool, float, bool], ...] = (
    ("pool_size", 8, True, 1, False),
    ("pool_min_size", 1, True, 0, False),
    ("pool_timeout", 30.0, False, 0, True),
    ("pool_max_lifetime", 3600.0, False, 0, True),
    ("pool_max_idle", 600.0, False, 0, True),
    ("pool_reconnect_timeout", 300.0, False, 0, True),
)


def _pool_settings(options: dict[str, str], pool_size: int | None) -> dict[str, float]:
    """The pool options popped from ``options``, checked; every bad one is reported at once."""
    settings: dict[str, float] = {}
    problems: list[ConfigError] = []
    for name, default, whole, lowest, above in _POOL_OPTIONS:
        text = options.pop(name, None)
        if name == "pool_size" and pool_size is not None:
            text = str(pool_size)
        if text is None:
            settings[name] = default
            continue
        try:
            value = float(int(text)) if whole else float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < lowest or (above and value == lowest):
            kind = "a whole number of connections" if whole else "a finite number of seconds"
            bound = f"{'>' if above else '>='} {lowest:g}"
            problems.append(ConfigError(f"store option {name} must be {kind} {bound}, got {text!r}",
                                        field=f"store.{name}", value=text))
            continue
        settings[name] = value
    if not problems and settings["pool_min_size"] > settings["pool_size"]:
        text = str(int(settings["pool_min_size"]))
        problems.append(ConfigError(
            f"store option pool_min_size ({text}) must not exceed pool_size ({int(settings['pool_size'])})",
            field="store.pool_min_size", value=text))
    if problems:
        raise ConfigError.collect(problems, "store options")
    return settings


def _readable(conn: Any) -> bool:
    """Whether an idle connection's socket has something to read: the server's farewell (an error, then the
    end of the stream) when it dropped the session; a live idle one has nothing unasked to say."""
    try:
        return bool(select.select([conn.fileno()], [], [], 0)[0])
    except Exception:  # closed already, or no socket: let the check decide
        return True


class _PooledTx(Tx):
    """A transaction on a connection of a ``PostgresStore``'s pool, taken without a round trip to check it.

    If its first statement finds the connection dead (it died idle since it was taken: a failover, a restart,
    ``pg_terminate_backend``), the dead one is discarded and the statement runs again on a checked connection:
    nothing had run in the transaction and nothing commits before ``COMMIT``, so nothing is lost or done twice.
    A statement that meets a dead connection later, a connection wrapped by fault injection (``raw`` is not the
    pool's), or the one statement of ``PostgresStore.statement`` (in autocommit it may have committed before
    its connection broke: running it again could do its work twice) raises, an infrastructure error for the
    caller to handle; the dead connection is discarded all the same.
    """

    __slots__ = ("_single", "_store", "conn")

    def __init__(self, conn: Any, store: PostgresStore, *, single: bool = False) -> None:
        super().__init__(conn, POSTGRES)
        self.conn: Any = conn  # the pool's connection (None while it is being replaced)
        self._store: PostgresStore | None = store  # None once the first statement ran
        self._single = single  # ``PostgresStore.statement``: one statement, in autocommit

    def _first(self, run: Callable[[], _T]) -> _T:
        store, self._store = self._store, None
        if store is None and self._single:
            raise ErrandsError("store.statement() runs one statement, and this is a second one: use "
                               "store.transaction() for several")
        if store is None or self.raw is not self.conn:
            return run()
        # Nothing may have run on the connection yet (code can reach ``raw`` directly): libpq's own record of the
        # session, read without a round trip. Only then can the statement go again on another connection.
        untouched = self.conn.info.transaction_status == store._idle
        try:
            return run()
        except Exception as exc:
            dead = self.conn
            if not dead.closed:
                raise
            self.conn = None
            store._discard(dead, exc)
            if self._single or not untouched:
                raise
            self.raw = self.conn = store._checkout(verify=True)
            return run()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if self._store is None and not self._single:
            return Tx.execute(self, sql, params)
        return self._first(lambda: Tx.execute(self, sql, params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:  # no statement otherwise: the first is still to come
            self._first(lambda: Tx.executemany(self, sql, rows))

    def insert_rows(self, head: str, row: str, rows: Sequence[Sequence[Any]], tail: str = "") -> int:
        if not rows:
            return 0
        return self._first(lambda: Tx.insert_rows(self, head, row, rows, tail))

    def notify(self, channel: str) -> None:
        self._first(lambda: Tx.notify(self, channel))


class PostgresStore(SQLStore):
    """PostgreSQL through psycopg 3 and a ``psycopg_pool`` connection pool, claims with ``FOR UPDATE SKIP LOCKED``.

    URL: ``postgresql://user:pass@host:port/db``. These options are the pool's; the rest go to libpq
    (``sslmode``, ``connect_timeout``, ``application_name``...):

    ========================== ======= ==================================================================
    option                     default meaning
    ========================== ======= ==================================================================
    ``pool_size``              8       the most connections open at once (also the ``pool_size=`` keyword)
    ``pool_min_size``          1       connections kept open while idle
    ``pool_timeout``           30      seconds a transaction waits for a connection (then ``PoolTimeout``)
    ``pool_max_lifetime``      3600    seconds after which a connection is retired when it comes back
    ``pool_max_idle``          600     seconds an idle connection above ``pool_min_size`` is kept
    ``pool_reconnect_timeout`` 300     seconds the pool keeps reconnecting (exponential backoff) before
                                       it gives up on a connection and logs an error
    ========================== ======= ==================================================================

    A connection that died idle (a failover, a server restart, ``pg_terminate_backend``) never fails a
    transaction: taking one from the pool looks at its socket without a round trip (the server's farewell
    makes it readable; such a one is checked with a round trip), and one found dead by the first statement of
    a transaction (it died since) is replaced there and the statement run again on a checked connection
    (nothing had run in the transaction). Either way the dead one is discarded together with every other dead
    idle one. A connection that breaks later inside a transaction raises its error (an infrastructure error:
    ``is_infrastructure_error``) and is discarded when it goes back. Opening the store connects once, so that
    a wrong host or password fails at once with the server's own error.
    """

    name: ClassVar[str] = "postgresql"
    schemes: ClassVar[tuple[str, ...]] = ("postgresql", "postgres")
    dialect: ClassVar[str] = POSTGRES

    def __init__(self, url: str, *, clock: Clock | None = None, pool_size: int | None = None) -> None:
        super().__init__(url, clock=clock)
        try:
            import psycopg
        except ImportError as exc:
            raise MissingDependencyError("psycopg", "postgres") from exc
        try:
            import psycopg_pool
        except ImportError as exc:
            raise MissingDependencyError("psycopg-pool", "postgres") from exc
        self._psycopg = psycopg
        self._idle = psycopg.pq.TransactionStatus.IDLE  # a session with nothing run in its transaction
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query))
        settings = _pool_settings(options, pool_size)
        self.pool_size = int(settings["pool_size"])
        rest = "&".join(f"{k}={v}" for k, v in options.items())
        self._conninfo = parts._replace(scheme="postgresql", query=rest).geturl()
        self._timeout = settings["pool_timeout"]
        # Fail now, with the server's own words, on a wrong host, database or password: a pool would only
        # retry in the background and, after pool_timeout, say that no connection came.
        with psycopg.connect(self._conninfo) as probe:
            #: ``(dbname, host, port)`` of the server: a caller's ``conn=`` must be connected to the same.
            self.server = pg_server(probe.info)
        self._pool: Any = psycopg_pool.ConnectionPool(
            self._conninfo,
            kwargs={"autocommit": False},
            min_size=int(settings["pool_min_size"]),
            max_size=self.pool_size,
            open=False,
            name=f"errands:{parts.path.lstrip('/') or 'postgres'}",
            timeout=self._timeout,
            max_lifetime=settings["pool_max_lifetime"],
            max_idle=settings["pool_max_idle"],
            reconnect_timeout=settings["pool_reconnect_timeout"],
            reconnect_failed=self._reconnect_failed,
        )
        self._pool_closed: type[Exception] = psycopg_pool.PoolClosed
        self._check = psycopg_pool.ConnectionPool.check_connection
        self._pool.open(wait=False)
        try:
            self.migrate("core", CORE_MIGRATIONS)
        except BaseException:
            self._pool.close()
            raise

    def _reconnect_failed(self, pool: Any) -> None:
        log.error("store %s: could not reconnect to PostgreSQL for %.0f s; still trying when asked for a "
                  "connection", self.redacted_url, pool.reconnect_timeout)

    def _checkout(self, *, verify: bool = False) -> Any:
        """A connection from the pool not known to be dead. Its socket is looked at without a round trip: a
        connection whose server said goodbye (or sent anything unasked) is readable, and only such a one (every
        one, with ``verify``) is checked with a round trip before it is handed out."""
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                conn = self._pool.getconn(timeout=max(deadline - time.monotonic(), 0.001))
            except self._pool_closed:
                raise ErrandsError(f"store {self.redacted_url} is closed") from None
            if verify or _readable(conn):
                try:
                    self._check(conn)
                except Exception as exc:
                    self._discard(conn, exc)
                    continue
            return conn

    def _discard(self, conn: Any, exc: BaseException) -> None:
        """Give a dead connection back (the pool discards it and opens a new one) and test the idle ones."""
        self._pool.putconn(conn)
        # A connection that died idle seldom dies alone (a failover, a restart, an administrator): test every
        # idle one now rather than meet them one at a time.
        log.warning("store %s: a pooled connection was dead (%s); checking the idle ones", self.redacted_url,
                    type(exc).__name__)
        self._pool.check()

    @contextlib.contextmanager
    def _single(self) -> Iterator[Tx]:
        tx = _PooledTx(self._checkout(), self, single=True)
        try:
            tx.conn.autocommit = True  # no round trip: the connection is idle
            yield tx
        finally:
            c = tx.conn
            if c is not None:
                if not c.closed:
                    c.autocommit = False
                self._pool.putconn(c)

    @contextlib.contextmanager
    def _pooled(self) -> Iterator[Tx]:
        tx = _PooledTx(self._checkout(), self)
        try:
            try:
                yield tx
            except BaseException:
                c = tx.conn
                if c is not None and not c.closed:
                    try:
                        c.rollback()
                    except self._psycopg.Error:
                        pass  # the connection is gone (the pool discards it); the error to report is the first
                raise
            tx.conn.commit()
        finally:
            if tx.conn is not None:
                self._pool.putconn(tx.conn)

    def transaction(self, conn: Any = None) -> contextlib.AbstractContextManager[Tx]:
        if conn is not None:
            return caller_transaction(self, conn)
        if _async._live and _async.bridged_store() is self:
            return _async.pooled_async(self)  # run_async: this event loop's async pool
        return self._pooled()

    def statement(self) -> contextlib.AbstractContextManager[Tx]:
        if _async._live and _async.bridged_store() is self:
            return _async.pooled_async(self)
        return self._single()

    def read(self) -> contextlib.AbstractContextManager[Tx]:
        # Not through self.transaction: fault injection wraps both, and a read must pass it once.
        if _async._live and _async.bridged_store() is self:
            return _async.pooled_async(self)
        return self._pooled()

    def connect(self) -> Any:
        """A new psycopg connection of the caller's own to this database (not from the pool)."""
        return self._psycopg.connect(self._conninfo)

    def listen(self, channels: Sequence[str], on_notify: Callable[[str | None], None]) -> Listener | None:
        """``LISTEN`` on a connection of its own (not from the pool), opened again whenever it drops."""
        return Listener(lambda: self._psycopg.connect(self._conninfo, autocommit=True), channels, on_notify)

    def close(self) -> None:
        """Close the pool: idle connections now, those in use when their transaction ends (and the async pools
        of ``run_async`` whose event loops still run)."""
        _async.close_all_pools(self)
        self._pool.close()


BUILTIN_STORES: tuple[type[SQLStore], ...] = (SQLiteStore, MemoryStore, PostgresStore)

#: What ``open_store`` returns: the built-in stores share ``SQLStore``'s interface; a plugin's store class
#: (``errands_register_stores``) offers what the engine it serves asks of it (lro's ``operation_store``).
Store = SQLStore


def open_store(url: str, *, clock: Clock | None = None, **options: Any) -> Store:
    """Open the store named by ``url`` and apply pending migrations.

    Args:
        url: ``sqlite:///path.db`` (embedded default), ``sqlite:///:memory:``, ``memory://``,
            ``postgresql://...``, or a scheme a plugin registered (``spanner://...``).
        clock: the time source; ``FakeClock`` in tests.
        **options: passed to the store class.

    Raises:
        ConfigError: the URL is malformed or its scheme unknown.
        MissingDependencyError: the scheme's driver is not installed.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"store URL must look like 'sqlite:///app.db', 'memory://' or 'postgresql://...', got {url!r}",
            field="store", value=url,
        )
    scheme = url.split("://", 1)[0].lower()
    for cls in BUILTIN_STORES:
        if scheme in cls.schemes:
            return cls(url, clock=clock, **options)
    from .._plugins import get_registry

    registry = get_registry()
    cls2 = registry.stores.get(scheme)
    if cls2 is None:
        known = sorted({s for c in BUILTIN_STORES for s in c.schemes} | set(registry.stores))
        raise ConfigError(
            f"unknown store scheme {scheme!r} in {url!r}; known: {', '.join(known)}",
            field="store", value=url,
        )
    opened: Store = cls2(url, clock=clock, **options)
    return opened


def new_id() -> str:
    return uuid.uuid4().hex


def as_epoch(value: datetime | float | int | None, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ConfigError(f"datetime {value!r} must be timezone-aware", field="dispatch_at", value=value)
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"expected a datetime or epoch seconds, got {value!r}", field="at", value=value)

