"""``Worker.run_async``: every engine inside an application's event loop. Async connectors, sinks and
handlers run on that loop, sync ones on the bounded pool, store work off the loop; stopping (or cancelling)
finishes what is in flight and loses nothing. ``App(worker_in_process=True)`` runs it from ``lifespan``."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
import uvicorn
from errands.core import App, ConfigError, DispatchOutcome, DispatchResult, Effect, EffectStatus, StoreScheduler
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

pytestmark = pytest.mark.timeout(60)


class AsyncBank:
    """An ``async def dispatch`` connector: records the loop and thread each call ran on."""

    name = "bank"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.started: list[str] = []
        self.finished: list[str] = []
        self.loops: list[asyncio.AbstractEventLoop] = []
        self.threads: list[int] = []

    async def dispatch(self, effect: Effect) -> DispatchResult:
        self.started.append(effect.key)
        self.loops.append(asyncio.get_running_loop())
        self.threads.append(threading.get_ident())
        await asyncio.sleep(self.delay)
        self.finished.append(effect.key)
        return DispatchResult(DispatchOutcome.CONFIRMED, external_ref=f"B-{effect.key}")


class SlowLedger:
    """A sync connector: sleeps, and records the threads its calls ran on and how many ran at once."""

    name = "ledger"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.running = 0
        self.most = 0

    def dispatch(self, effect: Effect) -> DispatchResult:
        with self._lock:
            self.threads.append(threading.current_thread())
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.delay)
        with self._lock:
            self.running -= 1
        return DispatchResult(DispatchOutcome.CONFIRMED)


class AsyncAudit:
    """An async sink: records the loop each batch was published on."""

    def __init__(self) -> None:
        self.types: list[str] = []
        self.loops: list[asyncio.AbstractEventLoop] = []

    async def publish(self, batch: Any) -> None:
        self.loops.append(asyncio.get_running_loop())
        self.types.extend(e.type for e in batch)


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    """Wait (off the loop: predicates read the store) until ``predicate()``."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def status(app: App, key: str) -> EffectStatus:
    return app.outbox.get(key).status


def test_an_endpoint_submits_and_the_in_process_worker_delivers_on_the_apps_loop(tmp_path: Path) -> None:
    bank, ledger, audit = AsyncBank(), SlowLedger(), AsyncAudit()
    app = App(f"sqlite:///{tmp_path / 'app.db'}", connectors={"bank": bank, "ledger": ledger},
              sinks={"audit": audit}, worker_in_process=True, poll_interval=0.05)
    seen: dict[str, tuple[asyncio.AbstractEventLoop, int]] = {}

    @app.on("effect.confirmed.bank")
    async def receipt(event: Any) -> None:
        seen["reaction"] = (asyncio.get_running_loop(), threading.get_ident())

    @app.task("notify")
    async def notify(params: Any) -> str:
        seen["task"] = (asyncio.get_running_loop(), threading.get_ident())
        return str(params["to"])

    async def pay(request: Request) -> JSONResponse:
        connector = request.path_params["connector"]
        key = request.path_params["key"]
        rec = await asyncio.to_thread(app.outbox.submit, Effect(key=key, connector=connector, payload={"n": 1}))
        assert app.running_worker is not None
        app.running_worker.wake()
        return JSONResponse({"status": rec.status.value})

    async def submit_task(request: Request) -> JSONResponse:
        task_id = await asyncio.to_thread(app.tasks.submit, "notify", {"to": "ops"})
        return JSONResponse({"id": task_id})

    web = Starlette(routes=[Route("/pay/{connector}/{key}", pay, methods=["POST"]),
                            Route("/tasks", submit_task, methods=["POST"])], lifespan=app.lifespan)

    async def main() -> str:
        loop = asyncio.get_running_loop()
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(web, host="127.0.0.1", port=port, lifespan="on", log_level="warning"))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            assert not serving.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                assert (await client.post("/pay/bank/pay-1")).json() == {"status": "PENDING"}
                for i in range(3):
                    await client.post(f"/pay/ledger/led-{i}")
                task_id = (await client.post("/tasks")).json()["id"]
                await until(lambda: status(app, "pay-1") is EffectStatus.CONFIRMED
                            and all(status(app, f"led-{i}") is EffectStatus.CONFIRMED for i in range(3)))
                await until(lambda: "reaction" in seen and "task" in seen and "effect.confirmed" in audit.types)
                await until(lambda: app.tasks.get(task_id).status.value == "SUCCEEDED")
        finally:
            server.should_exit = True
            await serving
        me = threading.get_ident()
        assert bank.loops == [loop] and bank.threads == [me]      # the async connector ran on the app's loop
        assert set(audit.loops) == {loop}                          # so did the async sink
        assert seen["reaction"] == (loop, me) and seen["task"] == (loop, me)
        assert ledger.threads and all(t.ident != me for t in ledger.threads)  # the sync one: off the loop
        return str(task_id)

    task_id = asyncio.run(main())
    assert app.running_worker is None                   # stopped at shutdown, and the app closed
    record = app.tasks.get(task_id)
    assert record is not None and record.result == "ops"
    app.close()


def test_sync_calls_run_on_the_pool_and_the_loop_stays_responsive(tmp_path: Path) -> None:
    ledger = SlowLedger(delay=0.15)
    app = App(f"sqlite:///{tmp_path / 'app.db'}", connectors={"ledger": ledger}, max_in_flight=4)
    keys = [f"led-{i}" for i in range(12)]
    for key in keys:
        app.outbox.submit(Effect(key=key, connector="ledger", payload={}))

    async def main() -> list[float]:
        worker = app.worker(poll_interval=0.02)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run_async(stop))
        gaps: list[float] = []

        async def tick() -> None:
            while not stop.is_set():
                t = time.monotonic()
                await asyncio.sleep(0.005)
                gaps.append(time.monotonic() - t)

        ticker = asyncio.create_task(tick())
        await until(lambda: all(status(app, k) is EffectStatus.CONFIRMED for k in keys))
        stop.set()
        await running
        await ticker
        return gaps

    gaps = asyncio.run(main())
    assert len(gaps) > 20
    assert max(gaps) < 0.1, f"the loop was blocked for {max(gaps):.3f}s"   # one call alone sleeps 0.15s
    assert 2 <= ledger.most <= 4                                             # the pool, bounded by the budget
    assert any(t.name.startswith("errands-call") for t in ledger.threads)
    assert all(t is not threading.main_thread() for t in ledger.threads)
    app.close()


@pytest.mark.parametrize("how", ["stop", "cancel"])
def test_stopping_mid_flight_finishes_what_is_in_flight_and_loses_nothing(tmp_path: Path, how: str) -> None:
    bank = AsyncBank(delay=0.3)
    app = App(f"sqlite:///{tmp_path / 'app.db'}", connectors={"bank": bank}, max_in_flight=3,
              outbox_options={"batch_size": 3})
    ran: list[str] = []

    @app.task("slow")
    async def slow(params: Any) -> None:
        await asyncio.sleep(0.3)
        ran.append(params["n"])

    keys = [f"pay-{i}" for i in range(8)]
    for key in keys:
        app.outbox.submit(Effect(key=key, connector="bank", payload={}))
    task_id = app.tasks.submit("slow", {"n": "t1"})

    async def main() -> None:
        worker = app.worker(poll_interval=0.02)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run_async(stop))
        await until(lambda: bool(bank.started) and app.tasks.in_flight == 1, timeout=10)
        if how == "stop":
            stop.set()
            await running
        else:
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running

    asyncio.run(main())
    # Whatever had started finished and was recorded before run_async returned; the rest was not claimed.
    assert bank.started and sorted(bank.finished) == sorted(bank.started)
    assert set(keys) - set(bank.started)
    for key in keys:
        expected = EffectStatus.CONFIRMED if key in bank.started else EffectStatus.PENDING
        assert status(app, key) is expected, key
    assert ran == ["t1"] and app.tasks.get(task_id).status.value == "SUCCEEDED"
    # Nothing lost: the next worker delivers the rest, each effect once.
    worker = app.worker()
    worker.drain()
    worker.close()
    assert all(status(app, k) is EffectStatus.CONFIRMED for k in keys)
    assert sorted(bank.finished) == sorted(keys)
    app.close()


def test_a_threading_event_stops_it_and_async_timer_handlers_run_on_the_loop(tmp_path: Path) -> None:
    app = App(f"sqlite:///{tmp_path / 'app.db'}")
    fired: list[tuple[asyncio.AbstractEventLoop, Any]] = []

    async def on_timer(topic: str, payload: Any) -> None:
        fired.append((asyncio.get_running_loop(), payload))

    StoreScheduler(app.store).schedule("ping", {"n": 1}, at=time.time() - 1, key="ping-1")

    async def main() -> asyncio.AbstractEventLoop:
        worker = app.worker(poll_interval=0.02)
        worker.on_timer("ping", on_timer)
        stop = threading.Event()
        running = asyncio.create_task(worker.run_async(stop))
        await until(lambda: bool(fired))
        stop.set()
        await asyncio.wait_for(running, 5)
        return asyncio.get_running_loop()

    loop = asyncio.run(main())
    assert fired == [(loop, {"n": 1})]
    app.close()


def test_run_async_refuses_a_stop_that_is_not_an_event(tmp_path: Path) -> None:
    app = App(f"sqlite:///{tmp_path / 'app.db'}")
    worker = app.worker()
    with pytest.raises(ConfigError) as err:
        asyncio.run(worker.run_async(True))  # type: ignore[arg-type]  # the wrong type is the point
    assert err.value.field == "stop"
    worker.close()
    with pytest.raises(ConfigError):
        App("memory://", worker_in_process="yes")  # type: ignore[arg-type]  # the wrong type is the point
    app.close()


def test_the_lifespan_runs_no_worker_unless_asked(tmp_path: Path) -> None:
    app = App(f"sqlite:///{tmp_path / 'app.db'}", connectors={"bank": AsyncBank()})

    async def main() -> None:
        async with app.lifespan():
            assert app.running_worker is None
            await asyncio.to_thread(app.outbox.submit, Effect(key="pay-1", connector="bank", payload={}))
            await asyncio.sleep(0.3)
            assert await asyncio.to_thread(status, app, "pay-1") is EffectStatus.PENDING

    asyncio.run(main())


def test_a_call_runner_awaits_on_a_given_loop_and_lets_it_go_when_closed() -> None:
    from errands.core.runtime import CallRunner, run_sync

    async def where() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        runner = CallRunner(2, loop=loop)
        assert runner.loop is loop
        assert await asyncio.to_thread(runner.call, where) is loop            # from a thread: on this loop
        results = await asyncio.to_thread(runner.map, lambda _: where(), [1, 2, 3])
        assert results == [(True, loop)] * 3

        def current() -> Any:
            with runner.as_current():
                return run_sync(where())

        assert await asyncio.to_thread(current) is loop                         # run_sync follows the runner
        assert await asyncio.to_thread(run_sync, where()) is not loop           # elsewhere: the shared runner
        coro = where()
        with pytest.raises(RuntimeError):
            runner.run(coro)                                                    # from the loop itself: refused
        coro.close()
        await asyncio.to_thread(runner.close)
        assert runner.loop is None and loop.is_running()                        # let go of, never stopped
        assert await asyncio.to_thread(runner.call, where) is not loop          # its own loop thread again
        await asyncio.to_thread(runner.close)

    asyncio.run(main())
    with pytest.raises(ConfigError):
        CallRunner(1).use_loop("loop")  # type: ignore[arg-type]  # the wrong type is the point
    stopped = asyncio.new_event_loop()
    runner = CallRunner(1, loop=stopped)
    coro = where()
    with pytest.raises(RuntimeError, match="not running"):
        runner.run(coro)
    coro.close()
    stopped.close()
