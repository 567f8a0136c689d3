"""Where operations live: the ``OperationStore`` protocol and its SQL implementation on core's store.

The row layout is the alis one (``key``, ``Operation``, ``State``, ``ResumePoint``, ``UpdateTime``) plus the
bookkeeping that makes saves compare-and-set (``Version``), lets listings filter cheaply (``Done``), carries
cooperative cancellation (``CancelRequested``) and fences duplicate callbacks (``ResumePath``,
``ResumeToken``). ``Neuron`` scopes one table to many services, as a Spanner table per neuron does.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, replace
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

from emissary.core import LeaseLostError, Migration, NewEvent, NotFoundError, SQLStore, Tx
from emissary.core.errors import AlreadyExistsError

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
    emissary-connectors-gcp. ``emissary.lro.testing.OperationStoreContract`` checks an implementation.

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

    def purge(self, older_than: float) -> int:
        """Delete operations last saved before ``older_than`` (epoch seconds); how many."""
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
    """``OperationStore`` on an emissary-core SQL store (SQLite, PostgreSQL, memory).

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

    # -- transactions ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def batch(self) -> Iterator[Tx]:
        """One transaction that every call on this thread joins until the outermost block ends; committed
        at its end, rolled back if it raises. A nested block simply joins the outer transaction.

        Each call inside is one statement; the journal events of the operations completed inside are
        appended together at the end, in the same transaction (if that fails, ``BatchAborted`` and nothing
        of the batch happens)."""
        current: Tx | None = getattr(self._local, "tx", None)
        if current is not None:
            yield current
            return
        with self.store.transaction() as tx:
            self._local.tx = tx
            self._local.done = []
            try:
                yield tx
                if self._local.done:
                    try:
                        self._append_done(tx, self._local.done)
                    except Exception as exc:
                        raise BatchAborted(f"could not journal the completions of this batch: {exc}") from exc
            finally:
                self._local.tx = None
                self._local.done = []

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Tx]:
        """The batch transaction open on this thread, or a transaction of its own."""
        current: Tx | None = getattr(self._local, "tx", None)
        if current is None:
            with self.store.transaction() as tx:
                yield tx
            return
        yield current

    def _append_done_or_abort(self, tx: Tx, record: OperationRecord) -> None:
        if self.current_tx() is tx:
            self._local.done.append(record)  # appended with the rest of the batch, before it commits
        else:
            self._append_done(tx, [record])

    def current_tx(self) -> Tx | None:
        """The batch transaction open on this thread, if any."""
        return getattr(self._local, "tx", None)

    def now(self) -> float:
        return self.store.clock.now()

    # -- OperationStore --------------------------------------------------------------------------
    def create(self, record: OperationRecord) -> OperationRecord:
        out = _with(record, version=1, update_time=self.now())
        with self._tx() as tx:
            row = tx.one(
                f"INSERT INTO lro_operations (Neuron, {_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (Neuron, key) DO NOTHING RETURNING Version",
                (self.neuron, *self._values(out)),
            )
            if row is None:
                raise AlreadyExistsError(f"operation {record.name!r} already exists; choose another id")
            if out.done:
                self._append_done_or_abort(tx, out)
        return out

    def _values(self, r: OperationRecord) -> tuple[Any, ...]:
        return (
            r.name, r.operation, r.state, r.resume_point, r.update_time, r.version, int(r.done),
            int(r.cancel_requested), r.resume_path, r.resume_token,
        )

    def get(self, name: str) -> OperationRecord:
        current = self.current_tx()
        sql = f"SELECT {_COLS} FROM lro_operations WHERE Neuron = ? AND key = ?"
        if current is not None:
            row = current.one(sql, (self.neuron, name))
        else:
            with self.store.read() as tx:
                row = tx.one(sql, (self.neuron, name))
        if row is None:
            raise NotFoundError(f"operation {name!r} not found")
        return _record(row)

    def save(self, record: OperationRecord, *, expected_version: int) -> OperationRecord:
        now = self.now()
        out = _with(record, version=expected_version + 1, update_time=now)
        with self._tx() as tx:
            row = tx.one(
                "UPDATE lro_operations SET Operation = ?, State = ?, ResumePoint = ?, UpdateTime = ?, "
                "Version = ?, Done = ?, ResumePath = ?, ResumeToken = ? "
                "WHERE Neuron = ? AND key = ? AND Version = ? AND Done = 0 RETURNING CancelRequested",
                (out.operation, out.state, out.resume_point, now, out.version, int(out.done), out.resume_path,
                 out.resume_token, self.neuron, record.name, expected_version),
            )
            if row is None:
                got = tx.one("SELECT Version, Done FROM lro_operations WHERE Neuron = ? AND key = ?",
                             (self.neuron, record.name))
                if got is None:
                    raise NotFoundError(f"operation {record.name!r} not found")
                if got[1]:
                    raise OperationDoneError(f"operation {record.name!r} is done; a done operation is final")
                raise LeaseLostError(
                    f"operation {record.name!r} is no longer at version {expected_version} "
                    f"(now {got[0]}): another writer saved first"
                )
            if row[0]:
                out = replace(out, cancel_requested=True)
            if out.done:
                self._append_done_or_abort(tx, out)
        return out

    def _append_done(self, tx: Tx, records: Sequence[OperationRecord]) -> None:
        stream = f"lro/{self.neuron}"
        self.store.append_events(
            [NewEvent(stream, DONE_EVENT, {"name": r.name, "neuron": self.neuron}) for r in records], tx=tx
        )

    def request_cancel(self, name: str) -> OperationRecord:
        with self._tx() as tx:
            row = tx.one(
                f"UPDATE lro_operations SET CancelRequested = 1 WHERE Neuron = ? AND key = ? RETURNING {_COLS}",
                (self.neuron, name),
            )
        if row is None:
            raise NotFoundError(f"operation {name!r} not found")
        return _record(row)

    def delete(self, name: str) -> bool:
        with self._tx() as tx:
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

    def purge(self, older_than: float) -> int:
        with self._tx() as tx:
            return tx.rowcount(
                "DELETE FROM lro_operations WHERE Neuron = ? AND UpdateTime < ?", (self.neuron, older_than)
            )
