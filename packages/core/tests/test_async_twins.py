"""The ``*_async`` twins over ``SQLStore.run_async``: they never block the event loop (SQLite work in a thread,
PostgreSQL's on an async pool), errors come through unchanged, and a cancelled call leaves no transaction open."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest

from errands.core import Effect, EffectStatus, Journal, Outbox, TaskEngine
from errands.core.errors import EffectConflictError, NotFoundError
from errands.core.store import NewEvent, SQLStore, open_store


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: Any, tmp_path: Path) -> Iterator[SQLStore]:
    url = f"sqlite:///{tmp_path / 'app.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = open_store(url)
    try:
        yield s
    finally:
        s.close()


def effect(key: str, **kw: Any) -> Effect:
    return Effect(key=key, connector="bank", payload={"cents": 5}, **kw)


async def while_ticking(work: Awaitable[Any], release: Callable[[], None], after: float = 0.3) -> tuple[Any, int]:
    """Await ``work`` beside a task ticking every 10 ms; ``release()`` (what blocks the work) after ``after``
    seconds. Returns the work's result and how many ticks happened meanwhile."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    asyncio.get_running_loop().call_later(after, release)
    try:
        result = await work
    finally:
        ticker.cancel()
    return result, ticks


def _blocker(store: SQLStore) -> Any:
    """Another connection holding the lock the outbox needs to write."""
    if store.dialect == "sqlite":
        conn: Any = sqlite3.connect(store.path, isolation_level=None)  # type: ignore[attr-defined]
        conn.execute("BEGIN IMMEDIATE")
        return conn
    import psycopg

    conn = psycopg.connect(store.url)
    conn.execute("LOCK TABLE em_effects IN ACCESS EXCLUSIVE MODE")
    return conn


def test_a_submit_waiting_on_a_lock_does_not_block_the_loop(store: SQLStore) -> None:
    outbox = Outbox(store, connectors=["bank"])
    if store.dialect == "postgresql":
        def no_sync_pool() -> Any:
            raise AssertionError("run_async took a connection of the sync pool")
        store._checkout = no_sync_pool  # type: ignore[attr-defined]
    blocker = _blocker(store)

    async def main() -> tuple[Any, int]:
        return await while_ticking(outbox.submit_async(effect("waits")), blocker.rollback)

    try:
        record, ticks = asyncio.run(main())
    finally:
        blocker.close()
    assert record.status is EffectStatus.PENDING
    assert ticks >= 10  # the loop kept running while the submit waited ~0.3 s
    store.__dict__.pop("_checkout", None)
    assert outbox.get("waits").key == "waits"


def test_errors_raised_by_the_work_come_through_unchanged(store: SQLStore) -> None:
    outbox = Outbox(store, connectors=["bank"])
    outbox.submit(effect("same"))

    async def main() -> None:
        with pytest.raises(EffectConflictError):
            await Outbox(store, connectors=["bank"]).submit_async(
                Effect(key="same", connector="bank", payload={"cents": 6}))
        with pytest.raises(NotFoundError):
            await outbox.get_async("absent")

        class Boom(Exception):
            pass

        def boom() -> None:
            raise Boom

        with pytest.raises(Boom):
            await store.run_async(boom)

    asyncio.run(main())


def test_a_cancelled_submit_leaves_no_transaction_open(postgres_url: str) -> None:
    import psycopg

    store = open_store(postgres_url)
    outbox = Outbox(store, connectors=["bank"])
    blocker = _blocker(store)

    async def main() -> None:
        task = asyncio.create_task(outbox.submit_async(effect("cancelled")))
        await asyncio.sleep(0.2)  # the insert waits on the lock
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        blocker.rollback()
        # The store still works on this loop afterwards, through the same pool.
        assert (await outbox.submit_async(effect("after"))).key == "after"
        await store.close_async()

    try:
        asyncio.run(main())
        with psycopg.connect(postgres_url, autocommit=True) as watcher:
            open_tx = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%'").fetchone()
        assert open_tx is not None and open_tx[0] == 0
        with pytest.raises(NotFoundError):
            outbox.get("cancelled")
        assert outbox.get("after").status is EffectStatus.PENDING
    finally:
        blocker.close()
        store.close()


def test_run_inline_async_awaits_an_async_fn_on_the_callers_loop(store: SQLStore) -> None:
    outbox = Outbox(store, connectors=["bank"])
    calls: list[asyncio.AbstractEventLoop] = []

    async def charge(e: Effect) -> dict[str, Any]:
        calls.append(asyncio.get_running_loop())
        await asyncio.sleep(0.01)
        return {"charged": e.payload["cents"]}

    async def main() -> None:
        rec = await outbox.run_inline_async(effect("inline"), charge)
        assert rec.status is EffectStatus.CONFIRMED and rec.response == {"charged": 5}
        assert calls == [asyncio.get_running_loop()]
        again = await outbox.run_inline_async(effect("inline"), charge)  # a replay: the record, no call
        assert again.status is EffectStatus.CONFIRMED and len(calls) == 1

        async def fails(e: Effect) -> None:
            raise ValueError("declined")

        with pytest.raises(ValueError, match="declined"):
            await outbox.run_inline_async(effect("inline-fails"), fails)
        assert (await outbox.get_async("inline-fails")).status is EffectStatus.FAILED
        rec = await outbox.run_inline_async(effect("inline-sync"), lambda e: {"sync": True})
        assert rec.response == {"sync": True}
        await store.close_async()

    asyncio.run(main())


def test_every_twin(store: SQLStore) -> None:
    outbox, journal, tasks = Outbox(store, connectors=["bank"]), Journal(store), TaskEngine(store)

    async def main() -> None:
        [a, b] = await outbox.submit_many_async([effect("gate-a", human_gate=True), effect("gate-b", human_gate=True)])
        assert a.status is EffectStatus.AWAITING_APPROVAL
        assert (await outbox.approve_async("gate-a", by="ops")).status is EffectStatus.PENDING
        assert (await outbox.reject_async("gate-b", reason="no")).status is EffectStatus.CANCELLED
        assert (await outbox.redrive_async("gate-b")).status is EffectStatus.PENDING
        assert [r.key for r in await outbox.list_async(connector="bank")] == ["gate-a", "gate-b"]
        assert (await outbox.get_async("gate-a")).key == "gate-a"
        event = await journal.append_async("orders/1", "order.placed", {"n": 1})
        more = await journal.append_many_async([NewEvent("orders/1", "order.paid", {"n": 2})])
        assert [e.id for e in [event, *more]] == ["orders/1/1", "orders/1/2"]
        assert [e.type for e in await journal.read_async(stream="orders/1")] == ["order.placed", "order.paid"]
        task_id = await tasks.submit_async("emails.send", {"to": "a@example.com"}, delay=5)
        got = await tasks.get_async(task_id)
        assert got is not None and got.type == "emails.send"
        await store.close_async()

    asyncio.run(main())


def test_a_sync_connection_given_to_a_twin_is_used_in_the_callers_thread(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'app.db'}")
    outbox = Outbox(store, connectors=["bank"])
    conn = sqlite3.connect(store.path)  # type: ignore[attr-defined]  # bound to this thread

    async def main() -> None:
        await outbox.submit_async(effect("mine"), conn=conn)

    try:
        asyncio.run(main())
        conn.rollback()
        with pytest.raises(NotFoundError):
            outbox.get("mine")
    finally:
        conn.close()
        store.close()


def _run_in_thread(main: Callable[[], Awaitable[None]], seconds: float) -> bool:
    """``asyncio.run(main())`` in a thread of its own: whether it returned within ``seconds``."""
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if errors:
        raise errors[0]
    return not thread.is_alive()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when", ["the pool is opening", "the pool is connecting", "a connection is checked out"])
def test_a_loop_ended_without_close_async_does_not_hang(postgres_url: str, when: str) -> None:
    """``asyncio.run(main())`` without ``close_async()``: the loop's shutdown cancels every task left, and the
    async pool's workers catch the cancellation of the task they run (a connection attempt, say) and go back to
    waiting for the next; the pool closes with its loop, so that the shutdown ends."""
    import socket

    import psycopg

    store = open_store(postgres_url)
    outbox = Outbox(store, connectors=["bank"])
    listener = socket.socket()
    blocker = None
    if when != "a connection is checked out":
        # A server that accepts and never answers: the pool's connection attempt waits for it.
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        store._conninfo = f"postgresql://postgres@127.0.0.1:{listener.getsockname()[1]}/x"  # type: ignore[attr-defined]
    else:
        blocker = _blocker(store)  # the submit holds its connection, waiting on a lock

    async def main() -> None:
        asyncio.create_task(outbox.submit_async(effect("left")))
        if when == "the pool is opening":
            # Three steps: the pool's opening begun, the task that closes it with its loop created and not yet
            # started (a task cancelled before its first step never runs its body).
            for _ in range(3):
                await asyncio.sleep(0)
        else:
            await asyncio.sleep(0.3)  # and return: no close_async, the submit still waiting

    try:
        assert _run_in_thread(main, 20), f"asyncio.run did not return ({when})"
        if blocker is not None:
            blocker.rollback()
        with psycopg.connect(postgres_url, autocommit=True) as watcher:
            open_tx = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%'").fetchone()
        assert open_tx is not None and open_tx[0] == 0
        with pytest.raises(NotFoundError):
            outbox.get("left")
    finally:
        listener.close()
        if blocker is not None:
            blocker.close()
        store.close()
