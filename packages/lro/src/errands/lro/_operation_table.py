"""Where operations live: the ``OperationStore`` protocol and its SQL implementation on core's store, the
one module of errands-lro that holds SQL.

The row layout is the alis one (``key``, ``Operation``, ``State``, ``ResumePoint``, ``UpdateTime``) plus the
bookkeeping that makes saves compare-and-set (``Version``), lets listings filter cheaply (``Done``), carries
cooperative cancellation (``CancelRequested``) and fences duplicate callbacks (``ResumePath``,
``ResumeToken``). ``Neuron`` scopes one table to many services, as a Spanner table per neuron does.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from errands.core.errors import AlreadyExistsError, ConfigError, LeaseLostError, NotFoundError
from errands.core.store import Migration, NewEvent, SQLStore, Tx, in_clause

__all__ = ["OperationDoneError", "OperationRecord", "OperationStore", "SQLOperationStore", "LRO_MIGRATIONS"]


class OperationDoneError(LeaseLostError):
    """The operation is done: it is final and no save may change it."""


class BatchAborted(BaseException):
    """A batch could not be completed and its transaction was rolled back. A ``BaseException`` so that
    handler code catching ``Exception`` inside the batch cannot swallow it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class OperationRecord:
    """One stored operation, exactly as a store keeps it.

    Attributes:
        name: ``operations/{id}``; the ``key`` column.
        operation: the serialised ``google.longrunning.Operation``.
        state: the private state as JSON bytes, or None.
        resume_point: the handler's own marker of where to pick up (``ResumePoint``).
        update_time: epoch seconds of the last save.
        version: bumped by every save; saves are compare-and-set on it.
        done: whether ``operation`` is done (mirrors ``Operation.done``).
        cancel_requested: a client asked to cancel; handlers see ``op.cancel_requested``.
        resume_path: the handler path of the latest ``resume_via_tasks``.
        resume_token: the token of the latest ``resume_via_tasks``; older callbacks are stale.
    """

    name: str
    operation: bytes
    state: bytes | None = None
    resume_point: str = ""
    update_time: float = 0.0
    version: int = 0
    done: bool = False
    cancel_requested: bool = False
    resume_path: str | None = None
    resume_token: str | None = None


@runtime_checkable
class OperationStore(Protocol):
    """What an operation store does. One instance serves one neuron (one table, in Spanner terms).

    Implementations: ``SQLOperationStore`` (SQLite, PostgreSQL, memory) here; a Spanner store in
    errands-connectors-gcp. ``errands.lro.testing.OperationStoreContract`` checks an implementation.

    Rules every implementation keeps:

    * ``save`` is compare-and-set: it succeeds only if the stored ``version`` equals ``expected_version``,
      and the stored row is not done; it writes ``version + 1`` and the store's current time.
    * A done row is final: ``save`` raises ``OperationDoneError`` and changes nothing.
    * ``request_cancel`` does not bump the version, so a handler in flight keeps its lease.
    """

    def create(self, record: OperationRecord) -> OperationRecord:
        """Insert ``record`` at version 1. Raises ``AlreadyExistsError`` if the name exists."""
        ...

    def get(self, name: str) -> OperationRecord:
        """The stored record. Raises ``NotFoundError``."""
        ...

    def save(self, record: OperationRecord, *, expected_version: int) -> OperationRecord:
        """Compare-and-set ``record`` over ``expected_version``; returns it at its new version.

        Raises:
            NotFoundError: no such operation.
            OperationDoneError: the stored operation is done.
            LeaseLostError: another writer saved first.
        """
        ...

    def request_cancel(self, name: str) -> OperationRecord:
        """Flag the operation for cancellation (no version bump). Raises ``NotFoundError``."""
        ...

    def delete(self, name: str) -> bool:
        """Remove the operation; whether it existed."""
        ...

    def list(
        self, *, done: bool | None = None, prefix: str = "", after: str = "", limit: int = 100
    ) -> Sequence[OperationRecord]:
        """Records ordered by name, names after ``after``, starting with ``prefix``, at most ``limit``."""
        ...

    def purge(self, older_than: float, *, limit: int | None = None) -> int:
        """Delete operations last saved before ``older_than`` (epoch seconds), at most ``limit`` of them
        (None: all); how many."""
        ...

    def now(self) -> float:
        """The store's clock, epoch seconds."""
        ...


_TABLE = """
        CREATE TABLE IF NOT EXISTS lro_operations (
            Neuron TEXT NOT NULL,
            key TEXT NOT NULL,
            Operation {{blob}} NOT NULL,
            State {{blob}},
            ResumePoint TEXT NOT NULL DEFAULT '',
            UpdateTime {{double}} NOT NULL,
            Version {{bigint}} NOT NULL,
            Done INTEGER NOT NULL DEFAULT 0,
            CancelRequested INTEGER NOT NULL DEFAULT 0,
            ResumePath TEXT,
            ResumeToken TEXT,
            PRIMARY KEY (Neuron, key)
        ){suffix}
"""
_DONE_INDEX = "CREATE INDEX IF NOT EXISTS lro_operations_done ON lro_operations (Neuron, Done, key)"

# No index on UpdateTime: every save changes it, and only the periodic purge reads it (a scan). On SQLite
# the table is WITHOUT ROWID (one B-tree keyed by (Neuron, key)) and has no Done index either: the embedded
# store favours writes, and a listing filtered on done walks the neuron's rows in name order. PostgreSQL,
# serving a fleet, keeps the index.
LRO_MIGRATIONS = [Migration(1, _TABLE.format(suffix="") + ";" + _DONE_INDEX)]
LRO_MIGRATIONS_SQLITE = [Migration(1, _TABLE.format(suffix=" WITHOUT ROWID"))]

_COLS = "key, Operation, State, ResumePoint, UpdateTime, Version, Done, CancelRequested, ResumePath, ResumeToken"

DONE_EVENT = "lro.operation.done"


def _with(r: OperationRecord, *, version: int, update_time: float) -> OperationRecord:
    # dataclasses.replace is several times slower than building the record; saves are the hot path.
    return OperationRecord(
        name=r.name, operation=r.operation, state=r.state, resume_point=r.resume_point, update_time=update_time,
        version=version, done=r.done, cancel_requested=r.cancel_requested, resume_path=r.resume_path,
        resume_token=r.resume_token,
    )


def _record(row: Sequence[Any]) -> OperationRecord:
    key, op, state, point, t, version, done, cancel, path, token = row
    return OperationRecord(
        name=key, operation=bytes(op), state=None if state is None else bytes(state), resume_point=point or "",
        update_time=float(t), version=int(version), done=bool(done), cancel_requested=bool(cancel),
        resume_path=path, resume_token=token,
    )


class SQLOperationStore:
    """``OperationStore`` on an errands-core SQL store (SQLite, PostgreSQL, memory).

    The transition to done appends a ``lro.operation.done`` event (data ``{"name", "neuron"}``) to the
    journal stream ``lro/{neuron}`` in the same transaction, so fan-out routes can react to finished operations
    and every completion is recorded exactly once.

    Args:
        store: an open core store; the ``lro`` migrations are applied here.
        neuron: the service whose operations this instance reads and writes.
    """

    def __init__(self, store: SQLStore, neuron: str) -> None:
        self.store = store
        self.neuron = neuron
        store.migrate("lro", LRO_MIGRATIONS_SQLITE if store.dialect == "sqlite" else LRO_MIGRATIONS)
        self._local = threading.local()
        self._stream = f"lro/{neuron}"

    # -- transactions ----------------------------------------------------------------------------
    def batch(self) -> contextlib.AbstractContextManager[Tx]:
        """One transaction that every call on this thread joins until the outermost block ends; committed
        at its end, rolled back if it raises. A nested block simply joins the outer transaction.

        Each call inside is one statement; the journal events of the operations completed inside are
        appended together at the end, in the same transaction (if that fails, ``BatchAborted`` and nothing
        of the batch happens). Rows written inside are remembered until the block ends, so reading one of
        them again costs no query: the open transaction holds their write locks, so nobody else can change
        them meanwhile."""
        return _Batch(self)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Tx]:
        """The batch transaction open on this thread, or a transaction of its own."""
        current: Tx | None = getattr(self._local, "tx", None)
        if current is None:
            with self.store.transaction() as tx:
                yield tx
            return
        yield current

    def current_tx(self) -> Tx | None:
        """The batch transaction open on this thread, if any."""
        return getattr(self._local, "tx", None)

    def written(self) -> Mapping[str, OperationRecord]:
        """The rows the batch open on this thread wrote, by name, as they now stand (empty outside a batch)."""
        written: dict[str, OperationRecord] | None = getattr(self._local, "written", None)
        return written if written is not None else {}

    def now(self) -> float:
        return self.store.clock.now()

    # -- OperationStore --------------------------------------------------------------------------
    def create(self, record: OperationRecord, *, conn: Any = None) -> OperationRecord:
        """``OperationStore.create``; with ``conn`` (the caller's own connection to the same database) the row
        is written in the caller's transaction, and committed or rolled back with it.

        Raises:
            AlreadyExistsError: the name exists.
            ConfigError: ``conn`` inside a ``batch()`` open on this thread, or not a connection of this store.
        """
        out = _with(record, version=1, update_time=self.store.clock.now())
        tx: Tx | None = getattr(self._local, "tx", None)
        if conn is not None:
            if tx is not None:
                raise ConfigError(
                    "conn= cannot be used inside client.batch(): the batch has its own transaction",
                    field="conn", value=type(conn).__name__,
                )
            with self.store.transaction(conn) as own:
                self._insert(own, out)
                if out.done:
                    self._append_done(own, [out])
            return out
        if tx is not None:
            self._insert(tx, out)
            if out.done:
                self._local.done.append(out)  # journalled with the rest of the batch, before it commits
            self._local.written[out.name] = out
            return out
        with self.store.transaction() as tx:
            self._insert(tx, out)
            if out.done:
                self._append_done(tx, [out])
        return out

    def _insert(self, tx: Tx, r: OperationRecord) -> None:
        n = tx.rowcount(
            f"INSERT INTO lro_operations (Neuron, {_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (Neuron, key) DO NOTHING",
            (self.neuron, r.name, r.operation, r.state, r.resume_point, r.update_time, r.version, int(r.done),
             int(r.cancel_requested), r.resume_path, r.resume_token),
        )
        if n != 1:
            raise AlreadyExistsError(f"operation {r.name!r} already exists; choose another id")

    def get(self, name: str) -> OperationRecord:
        current: Tx | None = getattr(self._local, "tx", None)
        sql = f"SELECT {_COLS} FROM lro_operations WHERE Neuron = ? AND key = ?"
        if current is not None:
            mine: OperationRecord | None = self._local.written.get(name)
            if mine is not None:
                return mine  # written by the open batch, which holds the row's lock
            row = current.one(sql, (self.neuron, name))
        else:
            with self.store.read() as tx:
                row = tx.one(sql, (self.neuron, name))
        if row is None:
            raise NotFoundError(f"operation {name!r} not found")
        return _record(row)

    def get_many(self, names: Sequence[str]) -> dict[str, OperationRecord]:
        """The stored records of ``names`` by name (missing ones left out), one statement per 500 names.
        Inside a batch, rows the batch wrote come from memory."""
        written = self.written()
        out: dict[str, OperationRecord] = {}
        wanted: list[str] = []
        for n in dict.fromkeys(names):
            mine = written.get(n)
            if mine is not None:
                out[n] = mine
            elif isinstance(n, str):
                wanted.append(n)
        if not wanted:
            return out
        current = self.current_tx()
        with contextlib.nullcontext(current) if current is not None else self.store.read() as tx:
            for i in range(0, len(wanted), 500):
                chunk = wanted[i:i + 500]
                rows = tx.query(
                    f"SELECT {_COLS} FROM lro_operations WHERE Neuron = ? AND key IN {in_clause(len(chunk))}",
                    (self.neuron, *chunk),
                )
                for row in rows:
                    rec = _record(row)
                    out[rec.name] = rec
        return out

    def save(self, record: OperationRecord, *, expected_version: int) -> OperationRecord:
        out = _with(record, version=expected_version + 1, update_time=self.store.clock.now())
        tx: Tx | None = getattr(self._local, "tx", None)
        if tx is not None:
            out = self._update(tx, out, expected_version)
            if out.done:
                self._local.done.append(out)  # journalled with the rest of the batch, before it commits
            self._local.written[out.name] = out
            return out
        with self.store.transaction() as tx:
            out = self._update(tx, out, expected_version)
            if out.done:
                self._append_done(tx, [out])
        return out

    def _update(self, tx: Tx, out: OperationRecord, expected_version: int) -> OperationRecord:
        row = tx.one(
            "UPDATE lro_operations SET Operation = ?, State = ?, ResumePoint = ?, UpdateTime = ?, "
            "Version = ?, Done = ?, ResumePath = ?, ResumeToken = ? "
            "WHERE Neuron = ? AND key = ? AND Version = ? AND Done = 0 RETURNING CancelRequested",
            (out.operation, out.state, out.resume_point, out.update_time, out.version, int(out.done),
             out.resume_path, out.resume_token, self.neuron, out.name, expected_version),
        )
        if row is None:
            got = tx.one("SELECT Version, Done FROM lro_operations WHERE Neuron = ? AND key = ?",
                         (self.neuron, out.name))
            if got is None:
                raise NotFoundError(f"operation {out.name!r} not found")
            if got[1]:
                raise OperationDoneError(f"operation {out.name!r} is done; a done operation is final")
            raise LeaseLostError(
                f"operation {out.name!r} is no longer at version {expected_version} "
                f"(now {got[0]}): another writer saved first"
            )
        if row[0] and not out.cancel_requested:
            out = replace(out, cancel_requested=True)
        return out

    def _append_done(self, tx: Tx, records: Sequence[OperationRecord]) -> None:
        stream, neuron = self._stream, self.neuron
        self.store.append_events([NewEvent(stream, DONE_EVENT, {"name": r.name, "neuron": neuron}) for r in records],
                                 tx=tx)

    def request_cancel(self, name: str) -> OperationRecord:
        with self._tx() as tx:
            row = tx.one(
                f"UPDATE lro_operations SET CancelRequested = 1 WHERE Neuron = ? AND key = ? RETURNING {_COLS}",
                (self.neuron, name),
            )
        if row is None:
            raise NotFoundError(f"operation {name!r} not found")
        out = _record(row)
        written: dict[str, OperationRecord] | None = getattr(self._local, "written", None)
        if written is not None:
            written[name] = out
        return out

    def delete(self, name: str) -> bool:
        with self._tx() as tx:
            written: dict[str, OperationRecord] | None = getattr(self._local, "written", None)
            if written is not None:
                written.pop(name, None)
            return tx.rowcount("DELETE FROM lro_operations WHERE Neuron = ? AND key = ?", (self.neuron, name)) > 0

    def list(
        self, *, done: bool | None = None, prefix: str = "", after: str = "", limit: int = 100
    ) -> list[OperationRecord]:
        where = ["Neuron = ?", "key > ?"]
        params: list[Any] = [self.neuron, after]
        if done is not None:
            where.append("Done = ?")
            params.append(int(done))
        if prefix:
            where.append("substr(key, 1, ?) = ?")
            params += [len(prefix), prefix]
        params.append(limit)
        with self.store.read() as tx:
            rows = tx.query(
                f"SELECT {_COLS} FROM lro_operations WHERE {' AND '.join(where)} ORDER BY key LIMIT ?", params
            )
        return [_record(r) for r in rows]

    def purge(self, older_than: float, *, limit: int | None = None) -> int:
        with self._tx() as tx:
            written: dict[str, OperationRecord] | None = getattr(self._local, "written", None)
            if written is not None:
                written.clear()
            if limit is None:
                return tx.rowcount(
                    "DELETE FROM lro_operations WHERE Neuron = ? AND UpdateTime < ?", (self.neuron, older_than)
                )
            return tx.rowcount(
                "DELETE FROM lro_operations WHERE Neuron = ? AND key IN (SELECT key FROM lro_operations "
                "WHERE Neuron = ? AND UpdateTime < ? ORDER BY key LIMIT ?)",
                (self.neuron, self.neuron, older_than, int(limit)),
            )


class _Batch:
    """The context manager of ``SQLOperationStore.batch``. A class rather than a generator: it is entered
    once per operation on hot paths."""

    __slots__ = ("_cm", "_ops", "_tx")

    def __init__(self, ops: SQLOperationStore) -> None:
        self._ops = ops
        self._cm: contextlib.AbstractContextManager[Tx] | None = None
        self._tx: Tx | None = None

    def __enter__(self) -> Tx:
        local = self._ops._local
        current: Tx | None = getattr(local, "tx", None)
        if current is not None:
            return current  # nested: joins the outer block
        cm = self._ops.store.transaction()
        tx = cm.__enter__()
        self._cm, self._tx = cm, tx
        local.tx, local.done, local.written = tx, [], {}
        return tx

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        cm, tx = self._cm, self._tx
        if cm is None or tx is None:
            return False
        self._cm = self._tx = None
        local = self._ops._local
        done: list[OperationRecord] = local.done
        local.tx, local.done, local.written = None, [], None
        if exc_type is None and done:
            try:
                self._ops._append_done(tx, done)
            except Exception as error:
                aborted = BatchAborted(f"could not journal the completions of this batch: {error}")
                aborted.__cause__ = error
                cm.__exit__(BatchAborted, aborted, None)  # rolls back
                raise aborted from error
        return bool(cm.__exit__(exc_type, exc, tb))
