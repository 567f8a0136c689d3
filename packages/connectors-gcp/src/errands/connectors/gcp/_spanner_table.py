"""Spanner: ``SpannerOperationStore``, lro's ``OperationStore`` on the alis operations table, the one module
of errands-connectors-gcp with SQL over it.

The table is the one the alis module provisions, ``{project}_{neuron}_Operations`` (hyphens as underscores),
with its five columns and nothing more::

    CREATE TABLE {project}_{neuron}_Operations (
      key STRING(MAX) NOT NULL AS (Operation.name) STORED,
      Operation google.longrunning.Operation,
      State BYTES(MAX),
      ResumePoint STRING(MAX),
      UpdateTime TIMESTAMP OPTIONS (allow_commit_timestamp=true)
    ) PRIMARY KEY (key), ROW DELETION POLICY (OLDER_THAN(UpdateTime, INTERVAL 90 DAY))

lro's bookkeeping (the version of compare-and-set saves, cooperative cancellation, the path and token of the
latest resume) travels in ``State``, ahead of the private state, in a header of its own (``STATE_MAGIC``, one
JSON line); ``done`` is ``Operation.done``. Every write runs in a read-write transaction that reads the row
first, so a save over a stale version raises ``LeaseLostError`` and changes nothing. The store needs no DDL
rights on such a table (``create_table=False``); a table it creates itself (``create_table=True``) may carry
one optional column more, ``Done BOOL AS (IFNULL(Operation.done, FALSE)) STORED`` with an index on
``(Done, key)``, which listings filtered on ``done`` then use.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Sequence, TypeVar
from urllib.parse import urlsplit

from errands.core import AlreadyExistsError, ConfigError, LeaseLostError, NotFoundError

from ._imports import require

__all__ = [
    "ALIS_OPERATIONS_DDL",
    "PROTO_BUNDLE_DDL",
    "STATE_MAGIC",
    "SpannerOperationStore",
    "SpannerStore",
    "decode_state",
    "encode_state",
    "operations_ddl",
    "operations_descriptor_set",
]

T = TypeVar("T")

_TABLE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")
_PROTO_TYPE = "google.longrunning.Operation"
_ALIS_COLUMNS = ("key", "Operation", "State", "ResumePoint", "UpdateTime")
_READ = ", ".join(f"`{c}`" for c in _ALIS_COLUMNS)
#: The first bytes of a ``State`` value that carries lro's bookkeeping (a JSON line) before the private state.
STATE_MAGIC = b"\x00errands.lro/1 "
_MAX_PURGE_BATCH = 10_000
#: The operations table of the alis module, verbatim (``{project}`` and ``{neuron}`` with underscores).
ALIS_OPERATIONS_DDL = (
    "CREATE TABLE {project}_{neuron}_Operations (key STRING(MAX) NOT NULL AS (Operation.name) STORED, "
    "Operation google.longrunning.Operation, State BYTES(MAX), ResumePoint STRING(MAX), "
    "UpdateTime TIMESTAMP OPTIONS (allow_commit_timestamp=true)) PRIMARY KEY (key), "
    "ROW DELETION POLICY (OLDER_THAN(UpdateTime, INTERVAL 90 DAY))"
)
#: The proto bundle the alis table needs.
PROTO_BUNDLE_DDL = f"CREATE PROTO BUNDLE ({_PROTO_TYPE})"


def table_name(project: str, neuron: str) -> str:
    """The alis table of a neuron: ``{project}_{neuron}_Operations`` with hyphens as underscores."""
    return f"{project}_{neuron}_Operations".replace("-", "_")


def _check_table(table: Any) -> str:
    if not isinstance(table, str) or not _TABLE.match(table):
        raise ConfigError(f"table must be a Spanner identifier (a letter, then letters, digits, '_'), got {table!r}",
                          field="table", value=table)
    return table


def operations_ddl(table: str, *, ttl_days: int = 90, proto_bundle: bool = True,
                   done_column: bool = False) -> list[str]:
    """The DDL of one neuron's operations table as the alis module provisions it (and the proto bundle).

    Args:
        table: the table name.
        ttl_days: rows are deleted this many days after ``UpdateTime``.
        proto_bundle: include ``CREATE PROTO BUNDLE (google.longrunning.Operation)`` (once per database).
        done_column: add the optional generated ``Done`` column and its index (not in the alis DDL).
    """
    _check_table(table)
    statements = [f"CREATE PROTO BUNDLE ({_PROTO_TYPE})"] if proto_bundle else []
    done = ", Done BOOL AS (IFNULL(Operation.done, FALSE)) STORED" if done_column else ""
    statements.append(
        f"CREATE TABLE {table} (key STRING(MAX) NOT NULL AS (Operation.name) STORED, "
        f"Operation {_PROTO_TYPE}, State BYTES(MAX), ResumePoint STRING(MAX), "
        f"UpdateTime TIMESTAMP OPTIONS (allow_commit_timestamp=true){done}) PRIMARY KEY (key), "
        f"ROW DELETION POLICY (OLDER_THAN(UpdateTime, INTERVAL {int(ttl_days)} DAY))"
    )
    if done_column:
        statements.append(f"CREATE INDEX {table}_ByDone ON {table} (Done, key)")
    return statements


def operations_descriptor_set() -> bytes:
    """The serialised ``FileDescriptorSet`` the proto bundle needs: the file defining
    ``google.longrunning.Operation`` with its imports (``google.rpc.Status``, ``google.protobuf.Any``...)."""
    descriptor_pb2 = require("google.protobuf.descriptor_pb2", package="protobuf", extra="spanner")
    operations_pb2 = require("google.longrunning.operations_pb2", package="googleapis-common-protos",
                             extra="spanner")
    out = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(file: Any) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dep in file.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        out.file.append(proto)

    add(operations_pb2.DESCRIPTOR)
    return bytes(out.SerializeToString())


@dataclass(frozen=True, slots=True)
class StateHeader:
    """lro's bookkeeping of one row, kept in ``State`` ahead of the private state."""

    version: int = 1
    cancel_requested: bool = False
    resume_path: str | None = None
    resume_token: str | None = None


def encode_state(state: bytes | None, header: StateHeader) -> bytes:
    """``State``: ``STATE_MAGIC``, the header as one JSON line, then the private state (absent: none)."""
    h: dict[str, Any] = {"v": header.version}
    if header.cancel_requested:
        h["c"] = 1
    if header.resume_path is not None:
        h["p"] = header.resume_path
    if header.resume_token is not None:
        h["t"] = header.resume_token
    if state is None:
        h["n"] = 1
    return STATE_MAGIC + json.dumps(h, separators=(",", ":")).encode() + b"\n" + (state or b"")


def decode_state(raw: bytes | None) -> tuple[bytes | None, StateHeader]:
    """The private state and the header of a ``State`` value. A value without the header (written by
    another library on the same table) is all private state, at version 1 with nothing scheduled."""
    if raw is None or not raw.startswith(STATE_MAGIC):
        return raw, StateHeader()
    end = raw.index(b"\n", len(STATE_MAGIC))
    h = json.loads(raw[len(STATE_MAGIC):end])
    state = None if h.get("n") else raw[end + 1:]
    return state, StateHeader(version=int(h["v"]), cancel_requested=bool(h.get("c")), resume_path=h.get("p"),
                              resume_token=h.get("t"))


@dataclass(frozen=True, slots=True)
class _Layout:
    """What the table offers, read from ``INFORMATION_SCHEMA`` once."""

    key_generated: bool
    proto_operation: bool
    done_column: bool
    commit_timestamp: bool


class SpannerOperationStore:
    """lro's ``OperationStore`` on one Spanner table (one neuron), as the alis module provisions it.

    Args:
        project: the Google Cloud project of the Spanner instance.
        instance: the instance id.
        database: the database id.
        neuron: the service whose operations this store holds; names the table.
        table_project: the project in the table name (alis: ``ALIS_OS_PROJECT``); default ``project``.
        table: the table name, overriding ``{table_project}_{neuron}_Operations``.
        clock: the time source of ``UpdateTime`` (``FakeClock`` in tests); default the commit timestamp.
        create_table: create the proto bundle and the table when the table is missing (needs DDL rights).
            False: the table must exist; nothing is ever altered.
        done_column: a table created here gets the optional ``Done`` column and its index.
        ttl_days: the row deletion policy of a table created here.
        database_role: the fine-grained access control role the sessions use (alis ``database_role``).
        purge_batch: rows each partitioned ``DELETE`` of ``purge`` covers at most.
        sessions: the size of the session pool (a ``PingingPool``) read-write transactions use.
        pool: a session pool of your own instead.
        client: a ready ``google.cloud.spanner.Client``.

    Example:
        >>> ops = SpannerOperationStore("my-project", "main", "ops", neuron="launchpad-v1")  # doctest: +SKIP
        >>> client = LroClient(Config(neuron="launchpad-v1", store=ops, scheduler=...))    # doctest: +SKIP
    """

    def __init__(
        self,
        project: str,
        instance: str,
        database: str,
        neuron: str,
        *,
        table_project: str | None = None,
        table: str | None = None,
        clock: Any = None,
        create_table: bool = True,
        done_column: bool = True,
        ttl_days: int = 90,
        database_role: str | None = None,
        purge_batch: int = 1000,
        sessions: int = 10,
        pool: Any = None,
        client: Any = None,
    ) -> None:
        problems = [
            ConfigError(f"{f} must be a non-empty id without '/', got {v!r}", field=f, value=v)
            for f, v in (("project", project), ("instance", instance), ("database", database), ("neuron", neuron))
            if not isinstance(v, str) or not v or "/" in v
        ]
        if isinstance(ttl_days, bool) or not isinstance(ttl_days, int) or ttl_days < 1:
            problems.append(ConfigError(f"ttl_days must be a positive integer, got {ttl_days!r}", field="ttl_days",
                                        value=ttl_days))
        if (isinstance(purge_batch, bool) or not isinstance(purge_batch, int)
                or not 1 <= purge_batch <= _MAX_PURGE_BATCH):
            problems.append(ConfigError(f"purge_batch must be an integer from 1 to {_MAX_PURGE_BATCH}, got "
                                        f"{purge_batch!r}", field="purge_batch", value=purge_batch))
        if isinstance(sessions, bool) or not isinstance(sessions, int) or not 1 <= sessions <= 1000:
            problems.append(ConfigError(f"sessions must be an integer from 1 to 1000, got {sessions!r}",
                                        field="sessions", value=sessions))
        if database_role is not None and (not isinstance(database_role, str) or not database_role):
            problems.append(ConfigError(f"database_role must be a role name, got {database_role!r}",
                                        field="database_role", value=database_role))
        if problems:
            raise ConfigError.collect(problems, "Spanner operation store")
        self.project, self.instance_id, self.database_id, self.neuron = project, instance, database, neuron
        self.table = _check_table(table or table_name(table_project or project, neuron))
        self.ttl_days, self.done_column, self.purge_batch = ttl_days, done_column, purge_batch
        self.database_role = database_role
        self.clock = clock
        spanner = require("google.cloud.spanner", package="google-cloud-spanner", extra="spanner")
        self._spanner = spanner
        self._client = client or spanner.Client(project=project)
        self._owns_client = client is None
        # A pinging pool checks a session's health only when it has been idle for long: a bursty pool (the
        # client's default) asks the server whether the session exists before every read-write transaction.
        pool = spanner.PingingPool(size=sessions, database_role=database_role) if pool is None else pool
        self._db = self._client.instance(instance).database(database, pool=pool, database_role=database_role)
        self._lock = threading.Lock()
        self._layout: _Layout | None = None
        self._create = create_table
        if create_table:
            self.create_table()

    # -- schema ----------------------------------------------------------------------------------
    def create_table(self) -> bool:
        """Create the proto bundle (or add ``google.longrunning.Operation`` to it) and the table if missing.

        Returns:
            Whether anything was created.
        """
        with self._lock:
            self._db.reload()
            existing = list(self._db.ddl_statements)
            if any(re.match(rf"CREATE TABLE\s+`?{self.table}`?\s*\(", s) for s in existing):
                return False
            bundle = next((s for s in existing if s.startswith("CREATE PROTO BUNDLE")), None)
            statements = operations_ddl(self.table, ttl_days=self.ttl_days, proto_bundle=bundle is None,
                                        done_column=self.done_column)
            if bundle is not None and _PROTO_TYPE not in bundle:
                statements.insert(0, f"ALTER PROTO BUNDLE INSERT ({_PROTO_TYPE})")
            self._db.update_ddl(statements, proto_descriptors=operations_descriptor_set()).result(timeout=300)
            self._layout = None
            return True

    def layout(self) -> _Layout:
        """What the table offers (read once from ``INFORMATION_SCHEMA``).

        Raises:
            ConfigError: the table does not exist or lacks one of the alis columns.
        """
        if self._layout is not None:
            return self._layout
        params, types = self._params(t=self.table)
        with self._db.snapshot() as snap:
            columns = {r[0]: (str(r[1]), str(r[2]) == "ALWAYS") for r in snap.execute_sql(
                "SELECT COLUMN_NAME, SPANNER_TYPE, IS_GENERATED FROM INFORMATION_SCHEMA.COLUMNS "
                "WHERE TABLE_SCHEMA = '' AND TABLE_NAME = @t", params=params, param_types=types)}
        with self._db.snapshot() as snap:
            options = {(r[0], r[1]) for r in snap.execute_sql(
                "SELECT COLUMN_NAME, OPTION_NAME FROM INFORMATION_SCHEMA.COLUMN_OPTIONS "
                "WHERE TABLE_SCHEMA = '' AND TABLE_NAME = @t AND OPTION_VALUE = 'TRUE'", params=params,
                param_types=types)}
        missing = [c for c in _ALIS_COLUMNS if c not in columns]
        if missing:
            what = "does not exist" if not columns else f"lacks the alis column(s) {', '.join(missing)}"
            raise ConfigError(
                f"Spanner table {self.table} {what}: provision it with the alis DDL (operations_ddl) or open the "
                "store with create_table=True", field="table", value=self.table,
            )
        self._layout = _Layout(
            key_generated=columns["key"][1],
            proto_operation=not columns["Operation"][0].startswith("BYTES"),
            done_column="Done" in columns and columns["Done"][1] and columns["Done"][0] == "BOOL",
            commit_timestamp=("UpdateTime", "allow_commit_timestamp") in options,
        )
        return self._layout

    # -- OperationStore --------------------------------------------------------------------------
    def now(self) -> float:
        """The store's clock, epoch seconds."""
        if self.clock is not None:
            return float(self.clock.now())
        return time.time()

    def _ts(self, epoch: float) -> datetime:
        return datetime.fromtimestamp(epoch, timezone.utc)

    def _record(self, row: Sequence[Any]) -> Any:
        from errands.lro import OperationRecord
        from google.longrunning import operations_pb2  # type: ignore[import-untyped]

        key, op, raw_state, point, t = row
        operation = self._operation_bytes(op)
        state, h = decode_state(None if raw_state is None else base64.b64decode(raw_state))
        return OperationRecord(
            name=key, operation=operation, state=state, resume_point=point or "",
            update_time=0.0 if t is None else t.timestamp(), version=h.version,
            done=bool(operations_pb2.Operation.FromString(operation).done), cancel_requested=h.cancel_requested,
            resume_path=h.resume_path, resume_token=h.resume_token,
        )

    def _operation_bytes(self, op: Any) -> bytes:
        if op is None:
            return b""
        if hasattr(op, "SerializeToString"):
            return bytes(op.SerializeToString())
        return bytes(op) if self.layout().proto_operation else base64.b64decode(op)

    def _write(self, r: Any, when: Any) -> tuple[list[str], list[Any]]:
        """The columns and values of ``r``. The client sends BYTES and PROTO values as given: base64 text."""
        header = StateHeader(r.version, bool(r.cancel_requested), r.resume_path, r.resume_token)
        columns = ["Operation", "State", "ResumePoint", "UpdateTime"]
        values = [base64.b64encode(r.operation), base64.b64encode(encode_state(r.state, header)), r.resume_point,
                  when]
        if not self.layout().key_generated:
            columns.insert(0, "key")
            values.insert(0, r.name)
        return columns, values

    def _when(self) -> tuple[Any, float | None]:
        """What ``UpdateTime`` gets, and its epoch seconds: the commit timestamp (None: known once committed)
        when the column allows it and no clock is set, else the clock's time."""
        if self.clock is None and self.layout().commit_timestamp:
            return self._spanner.COMMIT_TIMESTAMP, None
        now = self.now()
        return self._ts(now), now

    def _read_one(self, reader: Any, name: str, columns: Sequence[str] = _ALIS_COLUMNS) -> list[Any] | None:
        self.layout()  # a missing table is a ConfigError naming it, not a vendor error
        rows = list(reader.read(self.table, list(columns), self._spanner.KeySet(keys=[[name]]), limit=1))
        return list(rows[0]) if rows else None

    def _run(self, fn: Callable[[Any], T]) -> tuple[T, float | None]:
        """``fn(transaction)`` in a read-write transaction, and its commit time; vendor errors mapped here."""
        exceptions = require("google.api_core.exceptions", package="google-api-core", extra="spanner")
        last: list[Any] = []

        def body(tx: Any) -> T:
            last[:] = [tx]
            return fn(tx)

        try:
            result: T = self._db.run_in_transaction(body)
        except exceptions.AlreadyExists as exc:
            raise AlreadyExistsError(f"operation already exists in {self.table}: {exc.message}") from exc
        except exceptions.NotFound as exc:
            raise NotFoundError(f"Spanner says not found ({self.table}): {exc.message}") from exc
        committed = getattr(last[0], "committed", None) if last else None
        return result, (committed.timestamp() if committed is not None else None)

    def _stamped(self, record: Any, commit: float | None, now: float | None) -> Any:
        """``record`` with the ``UpdateTime`` it was written with: ``now``, or the commit timestamp."""
        from dataclasses import replace

        if now is not None:
            return record if record.update_time == now else replace(record, update_time=now)
        return replace(record, update_time=commit if commit is not None else self.now())

    def create(self, record: Any) -> Any:
        """Insert ``record`` at version 1. Raises ``AlreadyExistsError`` if the name exists."""
        from dataclasses import replace

        if record.name != _name_of(record.operation):
            raise ConfigError(f"record {record.name!r} holds an Operation named otherwise; the key is its name",
                              field="name", value=record.name)
        when, now = self._when()
        out = replace(record, version=1, update_time=now or 0.0)
        columns, values = self._write(out, when)

        exceptions = require("google.api_core.exceptions", package="google-api-core", extra="spanner")
        # One blind insert, committed in one round trip: an existing row makes the commit fail, so there is
        # nothing to read first.
        try:
            with self._db.batch() as batch:
                batch.insert(self.table, columns, [values])
        except exceptions.AlreadyExists as exc:
            raise AlreadyExistsError(f"operation {record.name!r} already exists; choose another id") from exc
        except exceptions.NotFound as exc:
            raise NotFoundError(f"Spanner says not found ({self.table}): {exc.message}") from exc
        committed = getattr(batch, "committed", None)
        return self._stamped(out, committed.timestamp() if committed is not None else None, now)

    def get(self, name: str) -> Any:
        """The stored record. Raises ``NotFoundError``."""
        with self._db.snapshot() as snap:
            row = self._read_one(snap, name)
        if row is None:
            raise NotFoundError(f"operation {name!r} not found")
        return self._record(row)

    def save(self, record: Any, *, expected_version: int) -> Any:
        """Compare-and-set ``record`` over ``expected_version`` (the row read in the same read-write
        transaction); returns it at its new version.

        Raises:
            NotFoundError: no such operation.
            OperationDoneError: the stored operation is done.
            LeaseLostError: another writer saved first.
        """
        from dataclasses import replace

        from errands.lro import OperationDoneError

        when, now = self._when()

        def fn(tx: Any) -> Any:
            row = self._read_one(tx, record.name)
            if row is None:
                raise NotFoundError(f"operation {record.name!r} not found")
            stored = self._record(row)
            if stored.done:
                raise OperationDoneError(f"operation {record.name!r} is done; a done operation is final")
            if stored.version != expected_version:
                raise LeaseLostError(
                    f"operation {record.name!r} is no longer at version {expected_version} (now {stored.version}): "
                    "another writer saved first"
                )
            saved = replace(record, version=expected_version + 1, update_time=now or 0.0,
                            cancel_requested=bool(stored.cancel_requested or record.cancel_requested))
            tx.update(self.table, *self._row(saved, when))
            return saved

        saved, commit = self._run(fn)
        return self._stamped(saved, commit, now)

    def _row(self, r: Any, when: Any) -> tuple[list[str], list[list[Any]]]:
        columns, values = self._write(r, when)
        if "key" not in columns:
            columns.insert(0, "key")  # an update names its row by the key, generated or not
            values.insert(0, r.name)
        return columns, [values]

    def request_cancel(self, name: str) -> Any:
        """Flag the operation for cancellation: ``State`` only, so neither the version nor ``UpdateTime``
        moves. Raises ``NotFoundError``."""
        from dataclasses import replace

        def fn(tx: Any) -> Any:
            row = self._read_one(tx, name)
            if row is None:
                raise NotFoundError(f"operation {name!r} not found")
            out = replace(self._record(row), cancel_requested=True)
            header = StateHeader(out.version, True, out.resume_path, out.resume_token)
            tx.update(self.table, ["key", "State"], [[name, base64.b64encode(encode_state(out.state, header))]])
            return out

        return self._run(fn)[0]

    def delete(self, name: str) -> bool:
        """Remove the operation; whether it existed."""

        def fn(tx: Any) -> bool:
            params, types = self._params(key=name)
            return bool(tx.execute_update(f"DELETE FROM {self.table} WHERE `key` = @key", params=params,
                                          param_types=types))

        return self._run(fn)[0]

    def _params(self, **values: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        pt = require("google.cloud.spanner", package="google-cloud-spanner", extra="spanner").param_types
        kinds = {str: pt.STRING, bool: pt.BOOL, int: pt.INT64, datetime: pt.TIMESTAMP}
        return values, {k: kinds[type(v)] for k, v in values.items()}

    def list(
        self, *, done: bool | None = None, prefix: str = "", after: str = "", limit: int = 100
    ) -> list[Any]:
        """Records ordered by name, names after ``after``, starting with ``prefix``, at most ``limit``.

        ``done`` is the generated ``Done`` column where the table has it, else ``Operation.done`` (a PROTO
        column), else decoded here from each row (a BYTES ``Operation``)."""
        layout = self.layout()
        where = ["`key` > @after"]
        values: dict[str, Any] = {"after": after, "limit": int(limit)}
        if done is not None and (layout.done_column or layout.proto_operation):
            where.append("Done = @done" if layout.done_column else "IFNULL(Operation.done, FALSE) = @done")
            values["done"] = bool(done)
        if prefix:
            where.append("STARTS_WITH(`key`, @prefix)")
            values["prefix"] = prefix
        out: list[Any] = []
        while True:
            params, types = self._params(**values)
            sql = f"SELECT {_READ} FROM {self.table} WHERE {' AND '.join(where)} ORDER BY `key` LIMIT @limit"
            with self._db.snapshot() as snap:
                rows = [self._record(r) for r in snap.execute_sql(sql, params=params, param_types=types)]
            if "done" in values or done is None:
                return rows
            out += [r for r in rows if r.done == done][: int(limit) - len(out)]
            if len(out) >= limit or len(rows) < values["limit"]:
                return out
            values["after"] = rows[-1].name

    def purge(self, older_than: float, *, limit: int | None = None) -> int:
        """Delete operations last saved before ``older_than`` (epoch seconds), at most ``limit`` (None: all);
        how many.

        Each round reads the names of the next ``purge_batch`` expired rows and deletes that key range with
        one partitioned ``DELETE`` (bounded: never the whole table in one statement). Spanner's row deletion
        policy removes rows ``ttl_days`` after ``UpdateTime`` by itself; this is for shorter retention and
        for the emulator, which never runs TTL deletions.
        """
        total = 0
        cutoff = self._ts(older_than)
        while limit is None or total < limit:
            n = self.purge_batch if limit is None else min(self.purge_batch, limit - total)
            params, types = self._params(t=cutoff, n=n)
            with self._db.snapshot() as snap:
                keys = [r[0] for r in snap.execute_sql(
                    f"SELECT `key` FROM {self.table} WHERE UpdateTime < @t ORDER BY `key` LIMIT @n",
                    params=params, param_types=types)]
            if not keys:
                break
            params, types = self._params(t=cutoff, lo=keys[0], hi=keys[-1])
            deleted = int(self._db.execute_partitioned_dml(
                f"DELETE FROM {self.table} WHERE UpdateTime < @t AND `key` >= @lo AND `key` <= @hi",
                params=params, param_types=types))
            total += deleted
            if len(keys) < n or deleted == 0:
                break
        return total

    def close(self) -> None:
        """Close the Spanner client if this store built it."""
        if self._owns_client:
            close = getattr(self._client, "close", None)
            if callable(close):
                close()


def _name_of(operation: bytes) -> str:
    from google.longrunning import operations_pb2

    return str(operations_pb2.Operation.FromString(operation).name)


class SpannerStore:
    """The ``spanner://projects/{p}/instances/{i}/databases/{d}`` store URL, as lro's ``Config.store``
    (``LroClient.from_env`` builds it from ``ALIS_MANAGED_SPANNER_*``). It holds operations only: lro asks it
    for one ``SpannerOperationStore`` per neuron.

    Args:
        url: the store URL; ``?database_role=ROLE`` and ``?create_table=false`` are read from its query.
        clock: the time source.
        **options: passed to ``SpannerOperationStore`` (``create_table``, ``ttl_days``, ``database_role``).
    """

    name: ClassVar[str] = "spanner"
    schemes: ClassVar[tuple[str, ...]] = ("spanner",)
    _URL = re.compile(r"^projects/([^/]+)/instances/([^/]+)/databases/([^/]+)/?$")

    def __init__(self, url: str, *, clock: Any = None, **options: Any) -> None:
        parts = urlsplit(url) if isinstance(url, str) else None
        match = self._URL.match(f"{parts.netloc}{parts.path}") if parts and parts.scheme == "spanner" else None
        if match is None or parts is None:
            raise ConfigError(
                f"a Spanner store URL looks like 'spanner://projects/p/instances/i/databases/d', got {url!r}",
                field="store", value=url,
            )
        from urllib.parse import parse_qs

        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if "database_role" in query:
            options.setdefault("database_role", query.pop("database_role"))
        if "create_table" in query:
            options.setdefault("create_table", query.pop("create_table").lower() in ("1", "true", "yes"))
        if query:
            raise ConfigError(f"unknown Spanner store URL parameter(s) {', '.join(sorted(query))}; known: "
                              "database_role, create_table", field="store", value=url)
        self.url = url
        self.project, self.instance, self.database = match.groups()
        self.clock = clock
        self.options = options
        self._opened: list[SpannerOperationStore] = []

    def operation_store(self, *, neuron: str, table: str | None = None, **options: Any) -> SpannerOperationStore:
        """The operation store of ``neuron`` (table ``table``, default the alis name); ``options`` (such as
        ``database_role``) override the URL's."""
        merged = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        store = SpannerOperationStore(self.project, self.instance, self.database, neuron, table=table,
                                      clock=self.clock, **merged)
        self._opened.append(store)
        return store

    def close(self) -> None:
        for store in self._opened:
            store.close()
        self._opened.clear()
