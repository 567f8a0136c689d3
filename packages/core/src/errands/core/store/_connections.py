"""The caller's own transaction: every kind of connection ``conn=`` accepts, resolved to one ``Tx``.

``conn=`` takes a ``sqlite3.Connection``, a psycopg ``Connection`` or ``AsyncConnection``, a SQLAlchemy
``Connection``, ``Session``, ``AsyncConnection`` or ``AsyncSession`` (and their ``scoped_session`` proxies), or
Django's connection (``django.db.connection``, inside ``transaction.atomic()``). The store's statements run on
the DBAPI connection under it, inside the caller's transaction: they commit or roll back with it (with the ORM
objects the session flushes in it). SQLAlchemy, Django, psycopg and aiosqlite are recognised by the names of
their types and never imported here.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import weakref
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ._async import AioSQLiteConnection, AsyncPGConnection, await_, can_await
from ._sql import POSTGRES, SQLITE, Tx

if TYPE_CHECKING:  # pragma: no cover
    from ._stores import SQLStore

#: What ``conn=`` accepts, as error messages list it.
ACCEPTED = (
    "sqlite3.Connection",
    "psycopg.Connection",
    "psycopg.AsyncConnection (through the *_async methods)",
    "sqlalchemy Connection or Session (orm)",
    "sqlalchemy.ext.asyncio AsyncConnection or AsyncSession (through the *_async methods)",
    "Django's django.db.connection (inside transaction.atomic())",
)

_ASYNC_KINDS = frozenset({"psycopg-async", "aiosqlite", "sa-async-connection", "sa-async-session",
                          "sa-async-scoped"})

# (top-level module, class name) -> kind, matched along the type's MRO (so that subclasses count).
_KINDS = {
    ("psycopg", "Connection"): "psycopg",
    ("psycopg", "AsyncConnection"): "psycopg-async",
    ("aiosqlite", "Connection"): "aiosqlite",
    ("sqlalchemy", "Connection"): "sa-connection",
    ("sqlalchemy", "Session"): "sa-session",
    ("sqlalchemy", "scoped_session"): "sa-scoped",
    ("sqlalchemy", "AsyncConnection"): "sa-async-connection",
    ("sqlalchemy", "AsyncSession"): "sa-async-session",
    ("sqlalchemy", "async_scoped_session"): "sa-async-scoped",
    ("django", "ConnectionProxy"): "django",
    ("django", "BaseDatabaseWrapper"): "django",
}

_DIALECT_NAMES = {SQLITE: "SQLite", POSTGRES: "PostgreSQL"}


class Joined:
    """A caller's async connection resolved once, on its event loop (``join_async``): the connection the store's
    SQL runs on (an adapter of the async driver, or the ``sqlite3.Connection`` under an aiosqlite one, in that
    driver's thread), the driver (the key of the same-database verdict), and the caller's object (named in
    errors)."""

    __slots__ = ("caller", "dialect", "driver", "raw")

    def __init__(self, raw: Any, dialect: str, driver: Any, caller: Any) -> None:
        self.raw = raw
        self.dialect = dialect
        self.driver = driver
        self.caller = caller


def kind_of(conn: Any) -> str | None:
    """The kind of caller connection ``conn`` is, or None for a type ``conn=`` does not accept."""
    if isinstance(conn, sqlite3.Connection):
        return "sqlite3"
    if type(conn) is Joined:
        return "joined"
    if isinstance(conn, AioSQLiteConnection):
        return "aiosqlite-adapted"
    if isinstance(conn, AsyncPGConnection):
        return "psycopg-adapted"
    for cls in type(conn).__mro__:
        kind = _KINDS.get((cls.__module__.partition(".")[0], cls.__name__))
        if kind is not None:
            return kind
    return None


def is_async_connection(conn: Any) -> bool:
    """Whether ``conn`` is an async connection or session (its work must be awaited on its event loop)."""
    return kind_of(conn) in _ASYNC_KINDS


def _type_name(conn: Any) -> str:
    if type(conn) is Joined:
        conn = conn.caller
    return f"{type(conn).__module__}.{type(conn).__qualname__}"


def _unknown(conn: Any, why: str = "") -> ConfigError:
    return ConfigError(
        f"conn must be the caller's connection to the store's database{why}: one of {'; '.join(ACCEPTED)}; "
        f"got {_type_name(conn)}",
        field="conn", value=_type_name(conn),
    )


async def async_driver(conn: Any) -> Any:
    """The async DBAPI driver connection (psycopg ``AsyncConnection``, ``aiosqlite.Connection``) under an async
    caller connection, inside the caller's transaction (begun here if SQLAlchemy had not begun it)."""
    kind = kind_of(conn)
    if kind == "sa-async-scoped":
        conn, kind = conn(), "sa-async-session"
    if kind == "sa-async-session":
        conn, kind = await conn.connection(), "sa-async-connection"
    if kind == "sa-async-connection":
        if not conn.in_transaction():
            await conn.begin()
        fairy = await conn.get_raw_connection()
        driver = fairy.driver_connection
        if kind_of(driver) not in ("psycopg-async", "aiosqlite"):
            raise _unknown(conn, f" (SQLAlchemy's {conn.dialect.name}+{conn.dialect.driver} driver is not "
                                 "supported: use postgresql+psycopg or sqlite+aiosqlite)")
        return driver
    return conn


async def join_async(conn: Any) -> Joined:
    """An async caller connection resolved on this event loop, for ``run_async``: the driver under it (inside the
    caller's transaction) and the adapter the store's SQL runs on in a bridge."""
    driver = await async_driver(conn)
    if kind_of(driver) == "aiosqlite":
        return Joined(AioSQLiteConnection(driver), SQLITE, driver, conn)
    return Joined(AsyncPGConnection(driver), POSTGRES, driver, conn)


def _driver(conn: Any, kind: str | None) -> tuple[Any, str]:
    """The DBAPI connection (or an adapter of an async one) and dialect under ``conn``."""
    if kind == "joined":
        return conn.raw, conn.dialect
    if kind == "sqlite3":
        return conn, SQLITE
    if kind == "psycopg":
        return conn, POSTGRES
    if kind == "aiosqlite-adapted":
        return conn, SQLITE
    if kind == "psycopg-adapted":
        return conn, POSTGRES
    if kind in _ASYNC_KINDS:
        if not can_await():
            raise ConfigError(
                f"conn is an async {_type_name(conn)}: a sync method cannot wait for it; call the method's "
                "*_async twin instead (await outbox.submit_async(effect, conn=conn), await "
                "journal.append_async(..., conn=conn), await tasks.submit_async(..., conn=conn))",
                field="conn", value=_type_name(conn),
            )
        driver = await_(async_driver(conn))
        if kind_of(driver) == "aiosqlite":
            return AioSQLiteConnection(driver), SQLITE
        return AsyncPGConnection(driver), POSTGRES
    if kind == "sa-scoped":
        conn, kind = conn(), "sa-session"
    if kind == "sa-session":
        # The session's connection, inside its transaction (begun now if it had none).
        conn, kind = conn.connection(), "sa-connection"
    if kind == "sa-connection":
        if not conn.in_transaction():
            conn.begin()  # autobegin, as the connection's first statement would: the caller commits it
        driver = conn.connection.driver_connection
        inner = kind_of(driver)
        if inner not in ("sqlite3", "psycopg", "psycopg-async", "aiosqlite"):
            raise _unknown(conn, f" (SQLAlchemy's {conn.dialect.name}+{conn.dialect.driver} driver is not "
                                 "supported: use sqlite (pysqlite), postgresql+psycopg or their async twins)")
        return _driver(driver, inner)
    if kind == "django":
        if not conn.in_atomic_block:
            raise ConfigError(
                f"Django's connection {conn.alias!r} is not inside a transaction: call this inside "
                "`with transaction.atomic():`, so that the work commits or rolls back with yours",
                field="conn", value=f"django connection {conn.alias!r}",
            )
        conn.ensure_connection()
        driver = conn.connection
        inner = kind_of(driver)
        if inner not in ("sqlite3", "psycopg"):
            raise _unknown(conn, f" (Django's {conn.vendor} backend on {_type_name(driver)} is not supported: "
                                 "use the sqlite3 backend, or the postgresql backend with psycopg 3 installed)")
        return _driver(driver, inner)
    raise _unknown(conn)


# What each DBAPI connection is connected to (SQLite: the real path of its main database file, "" in memory;
# PostgreSQL: ``pg_server``), keyed weakly by the connection (or the async driver under an adapter): a connection
# cannot change database, so it is asked once. ``sqlite3.Connection`` takes no weak reference: it is asked each
# time (a statement in the caller's thread).
_connected_to: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
# The real path of each store's database file, resolved once.
_store_files: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _verdict_key(conn: Any, raw: Any) -> Any:
    """What the verdict on ``raw`` is cached under: the async driver of a resolved connection or of an adapter,
    else the DBAPI connection itself."""
    if type(conn) is Joined:
        return conn.driver
    return getattr(raw, "driver", raw) if isinstance(raw, (AioSQLiteConnection, AsyncPGConnection)) else raw


def _cached(key: Any, find: Any) -> Any:
    try:
        return _connected_to[key]
    except KeyError:
        pass
    except TypeError:  # no weak reference to this connection (sqlite3)
        return find()
    value = _connected_to[key] = find()
    return value


def _sqlite_file(raw: Any) -> str:
    """The real path of the main database file of ``raw`` ("" for an in-memory or temporary database)."""
    for row in raw.execute("PRAGMA database_list").fetchall():
        if row[1] == "main":
            return os.path.realpath(row[2]) if row[2] else ""
    return ""  # pragma: no cover - every connection has a main database


def _store_file(store: SQLStore, path: str) -> str:
    try:
        return _store_files[store]
    except (KeyError, TypeError):
        real = os.path.realpath(path)
        with contextlib.suppress(TypeError):
            _store_files[store] = real
        return real


def _check_sqlite(store: SQLStore, conn: Any, raw: Any) -> None:
    path = str(getattr(store, "path", ""))
    theirs = _cached(_verdict_key(conn, raw), lambda: _sqlite_file(raw))
    in_memory = path == ":memory:" or "mode=memory" in path
    same = (theirs == "" and in_memory) if (theirs == "" or in_memory) else theirs == _store_file(store, path)
    if not same:
        raise ConfigError(
            f"conn ({_type_name(conn)}) is connected to the SQLite database {theirs or ':memory:'!r}, but this "
            f"store is {store.redacted_url!r} ({path}): pass a connection to the store's database file",
            field="conn", value=theirs or ":memory:",
        )
    if (raw.isolation_level is None or getattr(raw, "autocommit", None) is True) and not raw.in_transaction:
        raise ConfigError(
            f"conn ({_type_name(conn)}) is in autocommit mode outside a transaction: the work would commit on its "
            "own. Begin a transaction first (BEGIN, or a connection with the default isolation_level)",
            field="conn", value="autocommit",
        )


def pg_server(info: Any) -> tuple[str, str, int]:
    """``(dbname, host, port)`` of a psycopg connection's ``info``: the server address where libpq knows it."""
    return str(info.dbname), str(getattr(info, "hostaddr", "") or info.host), int(info.port)


def _check_postgres(store: SQLStore, conn: Any, raw: Any) -> None:
    ours = getattr(store, "server", None)
    if ours is not None:
        theirs = _cached(_verdict_key(conn, raw), lambda: pg_server(raw.info))
        if theirs != ours:
            raise ConfigError(
                f"conn ({_type_name(conn)}) is connected to PostgreSQL database {theirs[0]!r} on "
                f"{theirs[1]}:{theirs[2]}, but this store is {store.redacted_url!r} (database {ours[0]!r} on "
                f"{ours[1]}:{ours[2]}): pass a connection to the store's database",
                field="conn", value=f"{theirs[0]}@{theirs[1]}:{theirs[2]}",
            )
    if raw.autocommit and raw.info.transaction_status.name == "IDLE":
        raise ConfigError(
            f"conn ({_type_name(conn)}) is in autocommit mode outside a transaction: the work would commit on its "
            "own. Open a transaction first (`with conn.transaction():`) or connect with autocommit=False",
            field="conn", value="autocommit",
        )


def caller_tx(store: SQLStore, conn: Any) -> Tx:
    """The caller's connection ``conn``, of any accepted kind, as a ``Tx`` inside the caller's transaction.

    Raises:
        ConfigError: ``conn`` is of no accepted kind (the message lists them), is async in sync code (use the
            ``*_async`` twin), is connected to another database than the store's (the message names both), or
            would commit on its own (autocommit outside a transaction, Django outside ``atomic()``).
    """
    raw, dialect = _driver(conn, kind_of(conn))
    if dialect != store.dialect:
        raise ConfigError(
            f"conn ({_type_name(conn)}) is a {_DIALECT_NAMES[dialect]} connection, but this store is "
            f"{_DIALECT_NAMES.get(store.dialect, store.dialect)} ({store.redacted_url!r}): pass a connection to "
            "the store's database",
            field="conn", value=_type_name(conn),
        )
    if dialect == SQLITE:
        _check_sqlite(store, conn, raw)
    else:
        _check_postgres(store, conn, raw)
    return Tx(raw, dialect)


def caller_transaction(store: SQLStore, conn: Any) -> contextlib.AbstractContextManager[Tx]:
    """``store.transaction(conn)`` for a caller's connection: the work joins the caller's transaction, which the
    caller commits or rolls back."""
    return contextlib.nullcontext(caller_tx(store, conn))
