"""Spanner: ``SpannerOperationStore``, lro's ``OperationStore`` on the alis operations table.

One table per neuron, ``{project}_{neuron}_Operations`` (hyphens as underscores), with the alis columns
(``key``, ``Operation`` as ``PROTO<google.longrunning.Operation>``, ``State``, ``ResumePoint``,
``UpdateTime``; rows deleted 90 days after their last save) and the bookkeeping lro needs for
compare-and-set saves and cooperative cancellation (``Version``, ``Done``, ``CancelRequested``,
``ResumePath``, ``ResumeToken``). Every write runs in a read-write transaction that first reads the row, so
a save over a stale version raises ``LeaseLostError`` and changes nothing.
"""

from __future__ import annotations

import base64
import re
import threading
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Sequence, TypeVar
from urllib.parse import urlsplit

from errands.core import AlreadyExistsError, ConfigError, LeaseLostError, NotFoundError

from ._imports import require

__all__ = ["SpannerOperationStore", "SpannerStore", "operations_ddl", "operations_descriptor_set"]

T = TypeVar("T")

_TABLE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")
_PROTO_TYPES = ("google.longrunning.Operation", "google.rpc.Status", "google.protobuf.Any")
_COLUMNS = ("key", "Operation", "State", "ResumePoint", "UpdateTime", "Version", "Done", "CancelRequested",
            "ResumePath", "ResumeToken")


def table_name(project: str, neuron: str) -> str:
    """The alis table of a neuron: ``{project}_{neuron}_Operations`` with hyphens as underscores."""
    return f"{project}_{neuron}_Operations".replace("-", "_")


def operations_ddl(table: str, *, ttl_days: int = 90, proto_bundle: bool = True) -> list[str]:
    """The DDL statements of one neuron's operations table (and the proto bundle it needs).

    Args:
        table: the table name.
        ttl_days: rows are deleted this many days after ``UpdateTime``.
        proto_bundle: include ``CREATE PROTO BUNDLE`` (once per database).
    """
    if not _TABLE.match(table):
        raise ConfigError(f"table must be a Spanner identifier (a letter, then letters, digits, '_'), got {table!r}",
                          field="table", value=table)
    statements = []
    if proto_bundle:
        statements.append(f"CREATE PROTO BUNDLE ({', '.join(f'`{t}`' for t in _PROTO_TYPES)})")
    statements += [
        f"""CREATE TABLE {table} (
  `key` STRING(MAX) NOT NULL,
  Operation `google.longrunning.Operation` NOT NULL,
  State BYTES(MAX),
  ResumePoint STRING(MAX),
  UpdateTime TIMESTAMP NOT NULL,
  Version INT64 NOT NULL,
  Done BOOL NOT NULL,
  CancelRequested BOOL NOT NULL,
  ResumePath STRING(MAX),
  ResumeToken STRING(MAX),
) PRIMARY KEY (`key`),
  ROW DELETION POLICY (OLDER_THAN(UpdateTime, INTERVAL {int(ttl_days)} DAY))""",
        f"CREATE INDEX {table}_ByDone ON {table} (Done, `key`)",
        f"CREATE INDEX {table}_ByUpdateTime ON {table} (UpdateTime)",
    ]
    return statements


def operations_descriptor_set() -> bytes:
    """The serialised ``FileDescriptorSet`` the proto bundle needs: the files defining
    ``google.longrunning.Operation``, ``google.rpc.Status`` and ``google.protobuf.Any``, with their imports."""
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


def _epoch(value: Any) -> float:
    return float(value.timestamp())


class SpannerOperationStore:
    """lro's ``OperationStore`` on one Spanner table (one neuron).

    Args:
        project: the Google Cloud project of the Spanner instance.
        instance: the instance id.
        database: the database id.
        neuron: the service whose operations this store holds; names the table.
        table_project: the project in the table name (alis: ``ALIS_OS_PROJECT``); default ``project``.
        table: the table name, overriding ``{table_project}_{neuron}_Operations``.
        clock: the time source of ``UpdateTime`` (``FakeClock`` in tests); default the system clock.
        create_table: create the proto bundle, table and indexes when the table is missing.
        ttl_days: the row deletion policy of a table created here.
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
        ttl_days: int = 90,
        client: Any = None,
    ) -> None:
        problems = [
            ConfigError(f"{f} must be a non-empty id without '/', got {v!r}", field=f, value=v)
            for f, v in (("project", project), ("instance", instance), ("database", database), ("neuron", neuron))
            if not isinstance(v, str) or not v or "/" in v
        ]
        if problems:
            raise ConfigError.collect(problems, "Spanner operation store")
        self.project, self.instance_id, self.database_id, self.neuron = project, instance, database, neuron
        self.table = table or table_name(table_project or project, neuron)
        if not _TABLE.match(self.table):
            raise ConfigError(
                f"table must be a Spanner identifier (a letter, then letters, digits, '_'), got {self.table!r}",
                field="table", value=self.table,
            )
        if isinstance(ttl_days, bool) or not isinstance(ttl_days, int) or ttl_days < 1:
            raise ConfigError(f"ttl_days must be a positive integer, got {ttl_days!r}", field="ttl_days",
                              value=ttl_days)
        self.ttl_days = ttl_days
        self.clock = clock
        spanner = require("google.cloud.spanner", package="google-cloud-spanner", extra="spanner")
        self._client = client or spanner.Client(project=project)
        self._owns_client = client is None
        self._db = self._client.instance(instance).database(database)
        self._lock = threading.Lock()
        if create_table:
            self.create_table()

    # -- schema ----------------------------------------------------------------------------------
    def create_table(self) -> bool:
        """Create the proto bundle (or add its types), the table and its indexes if missing.

        Returns:
            Whether anything was created.
        """
        with self._lock:
            self._db.reload()
            existing = list(self._db.ddl_statements)
            if any(re.match(rf"CREATE TABLE\s+`?{self.table}`?\s*\(", s) for s in existing):
                return False
            bundle = next((s for s in existing if s.startswith("CREATE PROTO BUNDLE")), None)
            statements = operations_ddl(self.table, ttl_days=self.ttl_days, proto_bundle=bundle is None)
            if bundle is not None:
                missing = [t for t in _PROTO_TYPES if t not in bundle]
                if missing:
                    statements.insert(0, f"ALTER PROTO BUNDLE INSERT ({', '.join(f'`{t}`' for t in missing)})")
            self._db.update_ddl(statements, proto_descriptors=operations_descriptor_set()).result(timeout=300)
            return True

    # -- OperationStore --------------------------------------------------------------------------
    def now(self) -> float:
        """The store's clock, epoch seconds."""
        if self.clock is not None:
            return float(self.clock.now())
        import time

        return time.time()

    def _ts(self, epoch: float) -> datetime:
        return datetime.fromtimestamp(epoch, timezone.utc)

    def _record(self, row: Sequence[Any]) -> Any:
        from errands.lro import OperationRecord

        key, op, state, point, t, version, done, cancel, path, token = row
        return OperationRecord(
            name=key, operation=bytes(op) if not hasattr(op, "SerializeToString") else op.SerializeToString(),
            state=None if state is None else base64.b64decode(state), resume_point=point or "", update_time=_epoch(t),
            version=int(version), done=bool(done), cancel_requested=bool(cancel), resume_path=path,
            resume_token=token,
        )

    def _values(self, r: Any) -> list[Any]:
        # The client sends BYTES and PROTO values as given: they must be base64 text already.
        return [r.name, base64.b64encode(r.operation), None if r.state is None else base64.b64encode(r.state),
                r.resume_point, self._ts(r.update_time), r.version, bool(r.done),
                bool(r.cancel_requested), r.resume_path, r.resume_token]

    def _read_one(self, reader: Any, name: str, columns: Sequence[str] = _COLUMNS) -> list[Any] | None:
        spanner = require("google.cloud.spanner", package="google-cloud-spanner", extra="spanner")
        rows = list(reader.read(self.table, list(columns), spanner.KeySet(keys=[[name]]), limit=1))
        return list(rows[0]) if rows else None

    def _run(self, fn: Callable[[Any], T]) -> T:
        """``fn(transaction)`` in a read-write transaction; vendor errors mapped here, once."""
        exceptions = require("google.api_core.exceptions", package="google-api-core", extra="spanner")
        try:
            result: T = self._db.run_in_transaction(fn)
            return result
        except exceptions.AlreadyExists as exc:
            raise AlreadyExistsError(f"operation already exists in {self.table}: {exc.message}") from exc
        except exceptions.NotFound as exc:
            raise NotFoundError(f"Spanner says not found ({self.table}): {exc.message}") from exc

    def create(self, record: Any) -> Any:
        """Insert ``record`` at version 1. Raises ``AlreadyExistsError`` if the name exists."""
        out = replace(record, version=1, update_time=self.now())

        def fn(tx: Any) -> None:
            if self._read_one(tx, record.name, ("key",)) is not None:
                raise AlreadyExistsError(f"operation {record.name!r} already exists; choose another id")
            tx.insert(self.table, list(_COLUMNS), [self._values(out)])

        self._run(fn)
        return out

    def get(self, name: str) -> Any:
        """The stored record. Raises ``NotFoundError``."""
        with self._db.snapshot() as snap:
            row = self._read_one(snap, name)
        if row is None:
            raise NotFoundError(f"operation {name!r} not found")
        return self._record(row)

    def save(self, record: Any, *, expected_version: int) -> Any:
        """Compare-and-set ``record`` over ``expected_version``; returns it at its new version.

        Raises:
            NotFoundError: no such operation.
            OperationDoneError: the stored operation is done.
            LeaseLostError: another writer saved first.
        """
        from errands.lro import OperationDoneError

        out = replace(record, version=expected_version + 1, update_time=self.now())

        def fn(tx: Any) -> Any:
            row = self._read_one(tx, record.name, ("Version", "Done", "CancelRequested"))
            if row is None:
                raise NotFoundError(f"operation {record.name!r} not found")
            version, done, cancel = row
            if done:
                raise OperationDoneError(f"operation {record.name!r} is done; a done operation is final")
            if int(version) != expected_version:
                raise LeaseLostError(
                    f"operation {record.name!r} is no longer at version {expected_version} (now {version}): "
                    "another writer saved first"
                )
            saved = replace(out, cancel_requested=bool(cancel))
            tx.update(self.table, list(_COLUMNS), [self._values(saved)])
            return saved

        return self._run(fn)

    def request_cancel(self, name: str) -> Any:
        """Flag the operation for cancellation (no version bump). Raises ``NotFoundError``."""

        def fn(tx: Any) -> Any:
            row = self._read_one(tx, name)
            if row is None:
                raise NotFoundError(f"operation {name!r} not found")
            tx.update(self.table, ["key", "CancelRequested"], [[name, True]])
            return replace(self._record(row), cancel_requested=True)

        return self._run(fn)

    def delete(self, name: str) -> bool:
        """Remove the operation; whether it existed."""

        def fn(tx: Any) -> bool:
            params, types = self._params(key=name)
            return bool(tx.execute_update(f"DELETE FROM {self.table} WHERE `key` = @key", params=params,
                                          param_types=types))

        return self._run(fn)

    def _params(self, **values: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        spanner = require("google.cloud.spanner", package="google-cloud-spanner", extra="spanner")
        kinds = {str: spanner.param_types.STRING, bool: spanner.param_types.BOOL, int: spanner.param_types.INT64,
                 datetime: spanner.param_types.TIMESTAMP}
        return values, {k: kinds[type(v)] for k, v in values.items()}

    def list(
        self, *, done: bool | None = None, prefix: str = "", after: str = "", limit: int = 100
    ) -> list[Any]:
        """Records ordered by name, names after ``after``, starting with ``prefix``, at most ``limit``."""
        where = ["`key` > @after"]
        values: dict[str, Any] = {"after": after, "limit": int(limit)}
        if done is not None:
            where.append("Done = @done")
            values["done"] = bool(done)
        if prefix:
            where.append("STARTS_WITH(`key`, @prefix)")
            values["prefix"] = prefix
        params, types = self._params(**values)
        sql = f"SELECT {', '.join(f'`{c}`' for c in _COLUMNS)} FROM {self.table} WHERE {' AND '.join(where)} " \
              "ORDER BY `key` LIMIT @limit"
        with self._db.snapshot() as snap:
            rows = list(snap.execute_sql(sql, params=params, param_types=types))
        return [self._record(r) for r in rows]

    def purge(self, older_than: float) -> int:
        """Delete operations last saved before ``older_than`` (epoch seconds); how many.

        Spanner's row deletion policy removes rows ``ttl_days`` after ``UpdateTime`` by itself; this is for
        shorter retention and for the emulator, which never runs TTL deletions.
        """

        def fn(tx: Any) -> int:
            params, types = self._params(t=self._ts(older_than))
            return int(tx.execute_update(f"DELETE FROM {self.table} WHERE UpdateTime < @t", params=params,
                                         param_types=types))

        return self._run(fn)

    def close(self) -> None:
        """Close the Spanner client if this store built it."""
        if self._owns_client:
            close = getattr(self._client, "close", None)
            if callable(close):
                close()


class SpannerStore:
    """The ``spanner://projects/{p}/instances/{i}/databases/{d}`` store URL, as lro's ``Config.store``
    (``LroClient.from_env`` builds it from ``ALIS_MANAGED_SPANNER_*``). It holds operations only: lro asks it
    for one ``SpannerOperationStore`` per neuron.

    Args:
        url: the store URL.
        clock: the time source.
        **options: passed to ``SpannerOperationStore`` (``create_table``, ``ttl_days``).
    """

    name: ClassVar[str] = "spanner"
    schemes: ClassVar[tuple[str, ...]] = ("spanner",)
    _URL = re.compile(r"^projects/([^/]+)/instances/([^/]+)/databases/([^/]+)/?$")

    def __init__(self, url: str, *, clock: Any = None, **options: Any) -> None:
        parts = urlsplit(url) if isinstance(url, str) else None
        match = self._URL.match(f"{parts.netloc}{parts.path}") if parts and parts.scheme == "spanner" else None
        if match is None:
            raise ConfigError(
                f"a Spanner store URL looks like 'spanner://projects/p/instances/i/databases/d', got {url!r}",
                field="store", value=url,
            )
        self.url = url
        self.project, self.instance, self.database = match.groups()
        self.clock = clock
        self.options = options
        self._opened: list[SpannerOperationStore] = []

    def operation_store(self, *, neuron: str, table: str | None = None) -> SpannerOperationStore:
        """The operation store of ``neuron`` (table ``table``, default the alis name)."""
        store = SpannerOperationStore(self.project, self.instance, self.database, neuron, table=table,
                                      clock=self.clock, **self.options)
        self._opened.append(store)
        return store

    def close(self) -> None:
        for store in self._opened:
            store.close()
        self._opened.clear()
