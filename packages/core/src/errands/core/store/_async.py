"""The async path: store work written once, for sync callers, run on behalf of a coroutine.

``SQLStore.run_async(fn, *args, conn=None, **kwargs)`` is the one mechanism every ``*_async`` twin uses:

- with an async caller connection (psycopg ``AsyncConnection``; SQLAlchemy ``AsyncConnection`` /
  ``AsyncSession`` over psycopg or aiosqlite), the driver under it is resolved once on the loop
  (``join_async``); then ``fn`` runs in a greenlet on the caller's event loop, and each DBAPI call it makes is
  awaited on the caller's connection (the technique of SQLAlchemy's asyncio extension): the SQL exists once,
  and the loop is never blocked. On a SQLite store over aiosqlite, whose connection runs each statement in a
  thread of its own, ``fn`` runs whole in that thread, on the ``sqlite3`` connection under it: one round trip
  to the thread instead of one per statement;
- with a sync caller connection (thread-bound: sqlite3, a Django connection), ``fn`` runs in the caller's
  thread, on the caller's connection, as the sync method would;
- without a connection, a SQLite store's work runs in a thread off the loop, and a PostgreSQL store's
  transactions take connections from a psycopg ``AsyncConnectionPool`` (one per event loop, closed when that
  loop shuts down if ``close_async`` did not close it), through the same greenlet bridge.

Errors raised by ``fn`` propagate unchanged. A cancelled task leaves no transaction half-open: the
cancellation is thrown into ``fn`` where it waits in a bridge, the store's own transaction rolls back (shielded
from the cancellation) and its connection goes back to the pool; work already running in a thread (SQLite's, or
aiosqlite's) finishes; the caller's own transaction is the caller's to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator, Sequence, TypeVar

from ..errors import ConfigError, MissingDependencyError
from ._sql import POSTGRES, SQLITE, Tx

if TYPE_CHECKING:  # pragma: no cover
    from ._stores import SQLStore

_T = TypeVar("_T")

# How many bridges are running in this process: while none is, a store's transaction need not ask greenlet
# which greenlet it is on (the hot path of sync callers). Counted under a lock: loops may run in many threads.
_live = 0
_live_lock = threading.Lock()


def _greenlet() -> Any:
    try:
        return importlib.import_module("greenlet")  # untyped: looked up by name
    except ImportError as exc:  # pragma: no cover - greenlet ships with the postgres extra and sqlalchemy[asyncio]
        raise MissingDependencyError("greenlet", "postgres") from exc


_bridge_class: Any = None


def _bridge_type() -> Any:
    """The greenlet class of bridges (made once, when greenlet is first needed)."""
    global _bridge_class
    if _bridge_class is None:
        glet = _greenlet()

        class Bridge(glet.greenlet):  # type: ignore[misc,name-defined]  # greenlet's class, imported lazily
            store: Any = None

        _bridge_class = Bridge
    return _bridge_class


def can_await() -> bool:
    """Whether sync code here runs in a bridge (ours, or SQLAlchemy's ``run_sync``) that can await."""
    if _live == 0 and "sqlalchemy" not in sys.modules:
        return False
    if "greenlet" not in sys.modules:
        return False
    current = sys.modules["greenlet"].getcurrent()
    return isinstance(current, _bridge_type()) or bool(getattr(current, "__sqlalchemy_greenlet_provider__", False))


def await_(awaitable: Awaitable[_T]) -> _T:
    """Wait for ``awaitable`` from sync code running in a bridge: the bridge awaits it on the event loop."""
    if not can_await():
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise ConfigError(
            "an async connection was used from sync code: call the method's *_async twin (await "
            "outbox.submit_async(effect, conn=conn)), which runs the store's work on your event loop",
            field="conn", value="async connection",
        )
    current = sys.modules["greenlet"].getcurrent()
    result: _T = current.parent.switch(awaitable)
    return result


def bridged_store() -> Any:
    """The store whose own transactions the current bridge runs on the event loop, or None."""
    if _live == 0:
        return None
    current = sys.modules["greenlet"].getcurrent()
    return getattr(current, "store", None) if isinstance(current, _bridge_type()) else None


async def bridge(fn: Callable[[], _T], store: Any = None) -> _T:
    """Run ``fn()`` in a greenlet on this event loop, awaiting here each awaitable it passes to ``await_``.

    Args:
        fn: sync code.
        store: a store whose own transactions (those without ``conn``) take connections from its async pool
            while ``fn`` runs (a PostgreSQL store), or None.
    """
    global _live
    glet = _bridge_type()(fn, parent=sys.modules["greenlet"].getcurrent())
    glet.store = store
    with _live_lock:
        _live += 1
    try:
        result = glet.switch()
        while not glet.dead:
            try:
                value = await result
            except BaseException:  # thrown into fn, which decides (CancelledError included)
                result = glet.throw(*sys.exc_info())
            else:
                result = glet.switch(value)
    finally:
        with _live_lock:
            _live -= 1
    out: _T = result
    return out


# -- adapters: the sync DBAPI calls of ``Tx`` over an async driver, each awaited through the bridge ----------


class _Done:
    """A finished SQLite statement (its rows read): what ``sqlite3.Connection.execute`` returns, in short."""

    __slots__ = ("_rows", "lastrowid", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int, lastrowid: Any) -> None:
        self._rows = rows
        self.rowcount = rowcount
        self.lastrowid = lastrowid

    def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows


def _statement(raw: Any, sql: str, params: Sequence[Any]) -> _Done:
    """One statement on a ``sqlite3.Connection``, in its thread: rows, rowcount and lastrowid at once."""
    cur = raw.execute(sql, params)
    try:
        return _Done(cur.fetchall(), cur.rowcount, cur.lastrowid)
    finally:
        cur.close()


def _statements(raw: Any, sql: str, rows: list[Any]) -> _Done:
    cur = raw.executemany(sql, rows)
    try:
        return _Done([], cur.rowcount, cur.lastrowid)
    finally:
        cur.close()


def in_driver_thread(driver: Any) -> Callable[..., Awaitable[Any]] | None:
    """``call(fn, *args)``: ``fn(*args)`` run in the thread of an ``aiosqlite.Connection``, in one round trip
    (the queue SQLAlchemy's aiosqlite dialect also uses), or None where this aiosqlite has no such queue."""
    call = getattr(driver, "_execute", None)
    return call if call is not None and hasattr(driver, "_conn") else None


async def _aio_execute(conn: Any, sql: str, params: Sequence[Any]) -> _Done:
    call = in_driver_thread(conn)
    if call is not None:
        done: _Done = await call(_statement, conn._conn, sql, params)
        return done
    cur = await conn.execute(sql, params)
    try:
        rows = list(await cur.fetchall())
        return _Done(rows, cur.rowcount, cur.lastrowid)
    finally:
        await cur.close()


async def _aio_executemany(conn: Any, sql: str, rows: Any) -> _Done:
    call = in_driver_thread(conn)
    if call is not None:
        done: _Done = await call(_statements, conn._conn, sql, list(rows))
        return done
    cur = await conn.executemany(sql, list(rows))
    try:
        return _Done([], cur.rowcount, cur.lastrowid)
    finally:
        await cur.close()


class AioSQLiteConnection:
    """An ``aiosqlite.Connection`` seen as a ``sqlite3.Connection`` by the store's SQL."""

    __slots__ = ("driver",)

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Done:
        return await_(_aio_execute(self.driver, sql, params))

    def executemany(self, sql: str, rows: Any) -> _Done:
        return await_(_aio_executemany(self.driver, sql, rows))

    @property
    def in_transaction(self) -> bool:
        return bool(self.driver.in_transaction)

    @property
    def isolation_level(self) -> Any:
        return self.driver.isolation_level


class _AsyncPGCursor:
    __slots__ = ("_cur",)

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    def execute(self, sql: Any, params: Sequence[Any] = ()) -> _AsyncPGCursor:
        await_(self._cur.execute(sql, params))
        return self

    def executemany(self, sql: Any, rows: Any, *, returning: bool = False) -> None:
        await_(self._cur.executemany(sql, rows, returning=returning))

    def fetchone(self) -> Any:
        return await_(self._cur.fetchone())

    def fetchall(self) -> list[Any]:
        rows: list[Any] = await_(self._cur.fetchall())
        return rows

    def nextset(self) -> bool | None:
        more: bool | None = self._cur.nextset()
        return more

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)


class AsyncPGConnection:
    """A psycopg ``AsyncConnection`` seen as a psycopg ``Connection`` by the store's SQL."""

    __slots__ = ("driver",)

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def cursor(self) -> _AsyncPGCursor:
        return _AsyncPGCursor(self.driver.cursor())

    def execute(self, sql: Any, params: Sequence[Any] = ()) -> _AsyncPGCursor:
        return self.cursor().execute(sql, params)

    @property
    def info(self) -> Any:
        return self.driver.info

    @property
    def autocommit(self) -> bool:
        return bool(self.driver.autocommit)

    @property
    def closed(self) -> bool:
        return bool(self.driver.closed)


# -- a PostgreSQL store's own transactions on the event loop ---------------------------------------------------


class _LoopPool:
    """The async pool of one event loop, and the task that closes it (``_close_with_loop``)."""

    __slots__ = ("guard", "pool")

    def __init__(self, pool: Any, guard: asyncio.Task[None]) -> None:
        self.pool = pool
        self.guard = guard


async def _close_with_loop(pool: Any, started: asyncio.Event) -> None:
    """Wait until cancelled, then close ``pool``: cancelled by ``close_async``, by ``close``, or by the shutdown
    of its loop (``asyncio.run`` cancels every task left, then waits for them all).

    psycopg_pool's maintenance workers catch the cancellation of the task they run (a connection attempt, a
    reset) and go back to waiting for the next one: a loop ended while the pool connects would wait for them
    forever. Closing the pool sends each of them its stop."""
    try:
        started.set()
        await asyncio.get_running_loop().create_future()
    finally:
        await pool.close()


async def _open_pool(store: Any) -> _LoopPool:
    try:
        import psycopg_pool
    except ImportError as exc:  # pragma: no cover - a PostgresStore has it already
        raise MissingDependencyError("psycopg-pool", "postgres") from exc
    sync = store._pool
    pool = psycopg_pool.AsyncConnectionPool(
        store._conninfo, kwargs={"autocommit": False}, min_size=sync.min_size, max_size=sync.max_size,
        open=False, name=f"{sync.name}:async", timeout=sync.timeout, max_lifetime=sync.max_lifetime,
        max_idle=sync.max_idle, reconnect_timeout=sync.reconnect_timeout,
        check=psycopg_pool.AsyncConnectionPool.check_connection,
    )
    # The guard first, running (a task cancelled before its first step would never reach its ``finally``): from
    # its opening on, the pool closes when its loop ends.
    started = asyncio.Event()
    guard = asyncio.get_running_loop().create_task(_close_with_loop(pool, started), name=f"{sync.name}:async-close")
    try:
        await started.wait()
        await pool.open(wait=False)
    except BaseException:
        guard.cancel()
        raise
    return _LoopPool(pool, guard)


def _pools(store: Any) -> weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[_LoopPool]]:
    pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Future[_LoopPool]] | None = getattr(
        store, "_async_pools", None)
    if pools is None:
        pools = weakref.WeakKeyDictionary()
        store._async_pools = pools
    return pools


async def async_pool(store: Any) -> Any:
    """This event loop's ``AsyncConnectionPool`` of a PostgreSQL store, opened on first use."""
    loop = asyncio.get_running_loop()
    pools = _pools(store)
    opening = pools.get(loop)
    if opening is None:
        opening = pools[loop] = asyncio.ensure_future(_open_pool(store))
    try:
        return (await asyncio.shield(opening)).pool
    except Exception:
        if pools.get(loop) is opening:
            del pools[loop]
        raise


@contextlib.contextmanager
def pooled_async(store: Any) -> Iterator[Tx]:
    """One transaction of ``store``'s own, on a connection of this loop's async pool (inside a bridge)."""
    pool = await_(async_pool(store))
    driver = await_(pool.getconn())
    try:
        try:
            yield Tx(AsyncPGConnection(driver), POSTGRES)
        except BaseException:
            if not driver.closed:
                try:
                    await_(asyncio.shield(driver.rollback()))
                except Exception:  # the connection is gone; the error to report is the first
                    pass
            raise
        await_(driver.commit())
    finally:
        # Shielded: a cancellation here must not keep the connection out of the pool. A connection returned
        # inside a transaction (a commit cancelled mid-way) is rolled back or discarded by the pool.
        await_(asyncio.shield(pool.putconn(driver)))


async def close_pools(store: Any) -> None:
    """Close the async pool of this event loop (``SQLStore.close_async``)."""
    opening = _pools(store).pop(asyncio.get_running_loop(), None)
    if opening is None:
        return
    try:
        held = await opening
    except Exception:  # never opened: nothing to close
        return
    held.guard.cancel()
    await asyncio.wait([held.guard])  # the pool closed (not ``await guard``: its cancellation is not ours)


def close_all_pools(store: Any) -> None:
    """Close every async pool of ``store`` whose loop still runs (``SQLStore.close``): best effort."""
    pools = _pools(store)
    for loop, opening in list(pools.items()):
        pools.pop(loop, None)
        if loop.is_closed() or not opening.done() or opening.cancelled() or opening.exception() is not None:
            continue
        guard = opening.result().guard
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            guard.cancel()
        elif loop.is_running():
            loop.call_soon_threadsafe(guard.cancel)


# -- run_async ---------------------------------------------------------------------------------------------------


async def run_async(store: SQLStore, fn: Callable[..., _T], args: tuple[Any, ...], kwargs: dict[str, Any],
                    conn: Any) -> _T:
    """``SQLStore.run_async``."""
    from ._connections import Joined, is_async_connection, join_async

    own = store if store.dialect == POSTGRES and hasattr(store, "_pool") else None
    if conn is None:
        if own is not None:
            _greenlet()
            return await bridge(lambda: fn(*args, **kwargs), own)
        return await asyncio.to_thread(fn, *args, **kwargs)
    if not is_async_connection(conn):
        # A sync connection belongs to its thread (sqlite3, Django's per-thread connections): use it there.
        return fn(*args, conn=conn, **kwargs)
    # Resolved once, here on the loop: the driver under the caller's connection, inside its transaction.
    joined = await join_async(conn)
    if joined.dialect == SQLITE and store.dialect == SQLITE:
        call = in_driver_thread(joined.driver)
        if call is not None:
            # aiosqlite runs every statement in a thread of its own: the whole of fn runs there, on the
            # sqlite3 connection under it, in one round trip instead of one per statement.
            here = Joined(joined.driver._conn, SQLITE, joined.driver, conn)
            result: _T = await call(functools.partial(fn, *args, conn=here, **kwargs))
            return result
    _greenlet()
    return await bridge(lambda: fn(*args, conn=joined, **kwargs), own)
