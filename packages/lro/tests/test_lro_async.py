"""The ``*_async`` twins of ``LroClient`` and ``Operation``, and ``new_operation(conn=)``."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from typing import Any, Iterator

import pytest
from errands.core import ConfigError, NotFoundError, open_store
from errands.core.store import SQLStore
from errands.lro import Config, LroClient, Operation, ResumableHandler, SQLOperationStore
from google.protobuf import struct_pb2
from google.rpc import code_pb2

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def lro(tmp_path: Any) -> Iterator[LroClient]:
    client = LroClient(Config(neuron="svc", store=f"sqlite:///{tmp_path / 'ops.db'}", wait_initial=0.01,
                              wait_maximum=0.05))
    yield client
    client.close()


def _threads_of(client: LroClient) -> list[int]:
    """Record the thread of every read of the operation store."""
    seen: list[int] = []
    get = client.store.get

    def spy(name: str) -> Any:
        seen.append(threading.get_ident())
        return get(name)

    client.store.get = spy  # type: ignore[method-assign]
    return seen


def test_the_operation_twins_write_as_the_sync_methods_do(lro: LroClient) -> None:
    async def main() -> None:
        op = await lro.new_operation_async("operations/a1", {"step": 0}, private_state={"n": 1})
        assert op.version == 1 and not op.done
        assert (await op.save_metadata_async({"step": 1})) is op
        await op.save_private_state_async({"n": 2})
        await op.save_resume_point_async("half-way")
        op.set_metadata({"step": 2})
        await op.save_async()
        got = await lro.get_operation_async("operations/a1")
        assert got.version == 5 and got.resume_point == "half-way"
        assert got.decode_private_state() == {"n": 2}
        assert dict(struct_pb2.Struct.FromString(got.operation_pb().metadata.value)) == {"step": 2.0}
        await got.complete_async({"ok": True})
        assert (await lro.get_operation_pb_async("operations/a1")).done

        other = await lro.new_operation_async("operations/a2")
        await other.fail_async("no %s", "capacity", code=code_pb2.RESOURCE_EXHAUSTED)
        pb = lro.get_operation_pb("operations/a2")
        assert pb.error.code == code_pb2.RESOURCE_EXHAUSTED and pb.error.message == "no capacity"
        with pytest.raises(ConfigError):
            await other.fail_async("ok", code=code_pb2.OK)

    asyncio.run(main())


def test_the_client_twins_list_cancel_and_delete(lro: LroClient) -> None:
    async def main() -> None:
        for i in range(4):
            op = await lro.new_operation_async(f"operations/l{i}")
            if i % 2:
                await op.complete_async()
        ops, token = await lro.list_operations_async("done = true")
        assert [o.name for o in ops] == ["operations/l1", "operations/l3"] and token == ""
        ops, token = await lro.list_operations_async(page_size=3)
        assert len(ops) == 3 and token
        with pytest.raises(ConfigError):
            await lro.list_operations_async("colour = blue")
        await lro.cancel_operation_async("operations/l0")  # no resume pending: cancelled at once
        pb = lro.get_operation_pb("operations/l0")
        assert pb.done and pb.error.code == code_pb2.CANCELLED
        await lro.delete_operation_async("operations/l2")
        with pytest.raises(NotFoundError):
            await lro.get_operation_async("operations/l2")
        with pytest.raises(NotFoundError):
            await lro.delete_operation_async("operations/l2")
        with pytest.raises(NotFoundError):
            await lro.cancel_operation_async("operations/none")

    asyncio.run(main())


def test_the_twins_run_the_store_off_the_event_loop(lro: LroClient) -> None:
    seen = _threads_of(lro)

    async def main() -> int:
        op = await lro.new_operation_async("operations/t1")
        await lro.get_operation_async(op.name)
        await lro.wait_operation_async(op.name, 0.05)
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert seen and loop_thread not in seen


def test_wait_operation_async_polls_without_blocking_the_loop(lro: LroClient) -> None:
    async def main() -> None:
        op = await lro.new_operation_async("operations/w1", {"step": 1})
        started = time.monotonic()
        pb = await lro.wait_operation_async(op.name, 0.2)
        assert not pb.done and pb.name == op.name and time.monotonic() - started >= 0.19

        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        async def finish_later() -> None:
            await asyncio.sleep(0.3)
            await (await lro.get_operation_async(op.name)).complete_async({"ok": True})

        tick = asyncio.create_task(ticker())
        finish = asyncio.create_task(finish_later())
        pb = await lro.wait_operation_async(op.name, 20)
        stop.set()
        await tick
        await finish
        assert pb.done and pb.HasField("response")
        assert ticks >= 10  # the loop kept running while the wait polled
        with pytest.raises(NotFoundError):
            await lro.wait_operation_async("operations/none", 1)

    asyncio.run(main())


def test_resume_via_tasks_async_is_resumed_by_the_local_scheduler(lro: LroClient) -> None:
    async def step(op: Operation) -> None:
        state = op.decode_private_state() or {"n": 0}
        state["n"] += 1
        if state["n"] < 2:
            op.set_private_state(state)
            await op.resume_via_tasks_async("step")
        else:
            await op.complete_async({"n": state["n"]})

    lro.add_resumable_handlers(ResumableHandler("step", step))

    async def main() -> None:
        op = await lro.new_operation_async("operations/r1")
        await op.resume_via_tasks_async("step")
        stop = threading.Event()

        def worker() -> None:
            while not stop.is_set():
                if lro.run_due() == 0:
                    time.sleep(0.02)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        try:
            pb = await lro.wait_operation_async(op.name, 30)
        finally:
            stop.set()
            thread.join()
        assert pb.done and dict(struct_pb2.Struct.FromString(pb.response.value)) == {"n": 2.0}

    asyncio.run(main())


def test_twins_inside_a_batch_join_its_transaction(lro: LroClient) -> None:
    assert lro.core_store is not None
    commits = 0
    real = lro.core_store.transaction

    def counting(conn: Any = None) -> Any:
        nonlocal commits
        commits += 1
        return real(conn)

    lro.core_store.transaction = counting  # type: ignore[method-assign]

    async def main() -> None:
        with lro.batch():
            op = await lro.new_operation_async("operations/b1")
            await op.save_metadata_async({"step": 1})
            await op.resume_via_tasks_async("later", delay=60)
        with pytest.raises(RuntimeError), lro.batch():
            await lro.new_operation_async("operations/b2")
            raise RuntimeError("nothing of the block happens")

    asyncio.run(main())
    assert commits == 2  # one transaction per batch, the second rolled back
    assert lro.get_operation("operations/b1").version == 3
    with pytest.raises(NotFoundError):
        lro.get_operation("operations/b2")


class _Wrapped:
    """An OperationStore that is not an errands SQL store (as the Spanner one is)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name in {"create", "get", "save", "request_cancel", "delete", "list", "purge", "now"}:
            return getattr(self._inner, name)
        raise AttributeError(name)


def test_twins_on_another_operation_store_run_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    class Recorder:
        def schedule(self, topic: str, payload: Any, at: Any, key: str | None = None) -> str:
            return key or ""

    async def refused(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("not an errands SQL store: its run_async is not used")

    inner = open_store("memory://")
    monkeypatch.setattr(SQLStore, "run_async", refused)
    with LroClient(Config(neuron="svc", store=_Wrapped(SQLOperationStore(inner, "svc")), scheduler=Recorder(),
                          host="https://svc.example")) as c:
        assert c.core_store is None
        seen = _threads_of(c)

        async def main() -> int:
            op = await c.new_operation_async("operations/s1")
            await op.resume_via_tasks_async("h", delay=5)
            await op.save_metadata_async({"step": 1})
            assert (await c.get_operation_async(op.name)).version == op.version
            await (await c.get_operation_async(op.name)).complete_async()
            assert (await c.wait_operation_async(op.name, 1)).done
            with pytest.raises(ConfigError) as err:
                await c.new_operation_async("operations/s2", conn=object())
            assert err.value.field == "conn"
            return threading.get_ident()

        loop_thread = asyncio.run(main())
        assert seen and loop_thread not in seen
    inner.close()


# -- new_operation(conn=) ------------------------------------------------------------------------------


def test_new_operation_with_conn_commits_with_the_callers_transaction(lro: LroClient) -> None:
    assert lro.core_store is not None
    conn = lro.core_store.connect()
    try:
        conn.execute("CREATE TABLE orders (id TEXT PRIMARY KEY, operation TEXT)")
        conn.commit()
        op = lro.new_operation("operations/c1", {"order": "o1"}, conn=conn)
        conn.execute("INSERT INTO orders VALUES (?, ?)", ("o1", op.name))
        with pytest.raises(NotFoundError):
            lro.get_operation("operations/c1")  # not committed yet: invisible to the store
        conn.commit()
        assert lro.get_operation("operations/c1").version == 1
        assert conn.execute("SELECT operation FROM orders").fetchall() == [("operations/c1",)]
    finally:
        conn.close()


def test_new_operation_with_conn_rolls_back_with_the_callers_transaction(lro: LroClient) -> None:
    assert lro.core_store is not None
    conn = lro.core_store.connect()
    try:
        lro.new_operation("operations/c2", conn=conn)
        conn.rollback()
        with pytest.raises(NotFoundError):
            lro.get_operation("operations/c2")
        lro.new_operation("operations/c2")  # the name is free: nothing was kept
    finally:
        conn.close()


def test_new_operation_async_with_conn(lro: LroClient) -> None:
    path = getattr(lro.core_store, "path", None)
    assert path is not None
    # The twin uses the connection from a worker thread.
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)

    async def main() -> None:
        await lro.new_operation_async("operations/c3", conn=conn)
        conn.rollback()
        await lro.new_operation_async("operations/c4", conn=conn)
        conn.commit()

    try:
        asyncio.run(main())
        with pytest.raises(NotFoundError):
            lro.get_operation("operations/c3")
        assert lro.get_operation("operations/c4").version == 1
    finally:
        conn.close()


def test_new_operation_refuses_conn_it_cannot_join(lro: LroClient) -> None:
    with pytest.raises(ConfigError) as err:
        lro.new_operation("operations/x1", conn="not a connection")
    assert err.value.field == "conn"
    assert lro.core_store is not None
    conn = lro.core_store.connect()
    try:
        with pytest.raises(ConfigError) as err, lro.batch():
            lro.new_operation("operations/x2", conn=conn)
        assert err.value.field == "conn"
    finally:
        conn.close()
    with pytest.raises(NotFoundError):
        lro.get_operation("operations/x2")


# -- async handlers fired by run_due in batches (resume_batch > 1) ----------------------------------------


def _batched(tmp_path: Any, clock: Any, batch: int = 10) -> LroClient:
    return LroClient(Config(neuron="svc", store=f"sqlite:///{tmp_path / 'batched.db'}", resume_batch=batch,
                            retry_delay=0.0), clock=clock)


@pytest.mark.timeout(20)
def test_async_handlers_fired_in_a_batch_write_in_its_transaction(tmp_path: Any, clock: Any) -> None:
    # On SQLite the batch's transaction holds the store's lock on the thread of run_due: an async handler
    # run on another thread waited for it at its first write, and the batch waited for the handler.
    with _batched(tmp_path, clock) as c:
        threads: set[int] = set()

        async def plain(op: Operation) -> None:  # sync writes inside an async handler
            await asyncio.sleep(0)
            threads.add(threading.get_ident())
            op.set_metadata({"by": "plain"}).save()
            op.complete({"name": op.name})

        async def twins(op: Operation) -> None:  # the awaited *_async twins
            await asyncio.sleep(0)
            threads.add(threading.get_ident())
            state = op.decode_private_state() or {"n": 0}
            state["n"] += 1
            if state["n"] < 2:
                await op.set_private_state(state).save_metadata_async({"step": 1})
                await op.resume_via_tasks_async("twins")
            else:
                await op.complete_async({"n": state["n"]})

        c.add_resumable_handlers(ResumableHandler("plain", plain), ResumableHandler("twins", twins))
        with c.batch():
            for i in range(6):
                c.new_operation(f"operations/p{i}").resume_via_tasks("plain")
                c.new_operation(f"operations/t{i}").resume_via_tasks("twins")
        assert c.run_due() == 12  # two batches; the twins scheduled their next resume in theirs
        assert len(c.list_operations("done = true")[0]) == 6
        assert c.run_due() == 6
        done, _ = c.list_operations("done = true")
        assert len(done) == 12 and not any(pb.HasField("error") for pb in done)
        assert dict(struct_pb2.Struct.FromString(c.get_operation_pb("operations/t3").response.value)) == {"n": 2.0}
        assert c.get_operation("operations/p2").version == 4  # created, scheduled, its metadata saved, completed
        assert threads == {threading.get_ident()}  # in the batch's thread, which holds its transaction
        assert c.scheduler.pending() == 0


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_handler_failing_in_a_batch_undoes_what_it_should(tmp_path: Any, clock: Any, kind: str) -> None:
    # The same outcomes for sync and async handlers: a handler that raises fails its own operation (or is
    # retried, on TransientError) and the rest of the batch commits, its own earlier writes included; a store
    # fault abandons the whole batch, which is rolled back and fired again.
    from errands.core import InfrastructureError, TransientError

    armed = {"fault": True, "wait": True}

    def before(op: Operation) -> None:
        if op.name.endswith("fault") and armed["fault"]:
            armed["fault"] = False
            raise InfrastructureError("the store went away")
        if op.name.endswith("fails"):
            raise RuntimeError("it breaks")
        if op.name.endswith("waits") and armed["wait"]:
            raise TransientError("later")

    def sync_handler(op: Operation) -> None:
        op.save_metadata({"step": "started"})
        before(op)
        op.complete({"ok": True})

    async def async_handler(op: Operation) -> None:
        if op.name.endswith("0"):
            op.save_metadata({"step": "started"})
        else:
            await op.save_metadata_async({"step": "started"})
        await asyncio.sleep(0)
        before(op)
        await op.complete_async({"ok": True})

    with _batched(tmp_path, clock) as c:
        c.add_resumable_handlers(ResumableHandler("h", sync_handler if kind == "sync" else async_handler))
        names = ["operations/ok0", "operations/ok1", "operations/fails", "operations/waits", "operations/fault"]
        for name in names:
            c.new_operation(name).resume_via_tasks("h")

        assert c.run_due() == 0  # the store fault rolled the whole batch back
        assert c.list_operations("done = true")[0] == []
        assert all(c.get_operation(name).version == 2 for name in names)  # not even the metadata saves
        assert c.scheduler.pending() == 5

        assert c.run_due() == 4
        done = {pb.name: pb for pb in c.list_operations("done = true")[0]}
        assert sorted(done) == ["operations/fails", "operations/fault", "operations/ok0", "operations/ok1"]
        assert done["operations/fails"].error.code == code_pb2.INTERNAL
        assert done["operations/fails"].error.message == "it breaks"
        assert not done["operations/ok0"].HasField("error")
        waits = c.get_operation("operations/waits")
        assert not waits.done and waits.version == 3  # its metadata save committed with the batch
        assert dict(struct_pb2.Struct.FromString(waits.operation_pb().metadata.value)) == {"step": "started"}

        armed["wait"] = False
        assert c.run_due() == 1
        assert len(c.list_operations("done = true")[0]) == 5
        assert c.scheduler.pending() == 0


@pytest.mark.timeout(20)
def test_async_handlers_in_batches_share_their_threads_loop_until_the_client_closes(
    tmp_path: Any, clock: Any
) -> None:
    loops: list[asyncio.AbstractEventLoop] = []
    left: list[asyncio.Task[None]] = []

    async def handler(op: Operation) -> None:
        loops.append(asyncio.get_running_loop())
        left.append(asyncio.get_running_loop().create_task(asyncio.sleep(3600)))  # never awaited by it
        await op.complete_async()

    c = _batched(tmp_path, clock, batch=2)
    c.add_resumable_handlers(ResumableHandler("h", handler))
    for i in range(3):
        c.new_operation(f"operations/l{i}").resume_via_tasks("h")
    assert c.run_due() == 3
    c.new_operation("operations/l3").resume_via_tasks("h")
    assert c.run_due() == 1
    assert len(loops) == 4 and len(set(loops)) == 1  # two batches, then another pass: one loop
    c.close()
    assert loops[0].is_closed() and all(task.cancelled() for task in left)


@pytest.mark.timeout(20)
def test_the_loop_of_a_thread_that_ended_is_closed(tmp_path: Any, clock: Any) -> None:
    import gc

    loops: list[asyncio.AbstractEventLoop] = []

    async def handler(op: Operation) -> None:
        loops.append(asyncio.get_running_loop())
        op.complete()

    with _batched(tmp_path, clock, batch=2) as c:
        c.add_resumable_handlers(ResumableHandler("h", handler))
        for i in range(2):
            c.new_operation(f"operations/e{i}").resume_via_tasks("h")
        thread = threading.Thread(target=c.run_due)
        thread.start()
        thread.join()
        gc.collect()
        assert len(loops) == 2 and loops[0].is_closed()  # not kept for a thread that is gone
        assert len(c.list_operations("done = true")[0]) == 2
