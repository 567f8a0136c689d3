"""The one way engines call user code: sync callables on a bounded thread pool, awaitables on one
event loop per runner (an ``httpx.AsyncClient`` stays bound to the loop it was first used on): the runner's
own loop thread, or a loop it is given (an application's, under ``Worker.run_async``).

Every engine (outbox dispatch, fan-out sinks, task handlers, timer handlers, lro and durable bridges)
goes through ``CallRunner``; code outside an engine that must wait for an awaitable from sync code uses
``run_sync``: the runner made current in this context (``CallRunner.as_current``: a worker's, during its
passes), else one process-wide runner.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import threading
from typing import Any, Awaitable, Callable, Iterator, Sequence, TypeVar

from ._values import CompensationResult, DispatchResult, Observation
from .errors import ConfigError

T = TypeVar("T")

# Results that are never awaitable, answered without asking ``inspect.isawaitable`` (which walks the ABCs).
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, dict, list, tuple, DispatchResult, Observation,
                    CompensationResult})


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


class CallRunner:
    """Runs user calls with at most ``max_in_flight`` in flight at once.

    Sync callables run on a thread pool; a callable that returns an awaitable (an ``async def``
    connector method or handler) is awaited on one event loop, so async clients stay bound to a single
    loop: one owned by the runner on a thread of its own, or the loop given with ``loop=`` or
    ``use_loop`` (an application's event loop; the runner never stops or closes it). A batch of one, or
    ``max_in_flight=1``, runs in the calling thread.

    The calls are made from threads (the caller's, the pool's) and wait there: a runner on a given loop is
    called from threads other than that loop's, never from a coroutine on it.

    Args:
        max_in_flight: the bound on concurrent calls (>= 1).
        name: the name of the runner's threads.
        loop: the event loop on which to await async calls; default a loop thread of the runner's own.
    """

    def __init__(self, max_in_flight: int = 16, *, name: str = "errands",
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not isinstance(max_in_flight, int) or isinstance(max_in_flight, bool) or max_in_flight < 1:
            raise ConfigError(
                f"max_in_flight must be a positive integer, got {max_in_flight!r}",
                field="max_in_flight", value=max_in_flight,
            )
        self.max_in_flight = max_in_flight
        self._name = name
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._given: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        if loop is not None:
            self.use_loop(loop)

    def use_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Await async calls on ``loop`` from now on (None: on the runner's own loop thread again).

        ``Worker.run_async`` gives its runner the application's running loop, and takes it back when it
        stops (``close`` does so too)."""
        if loop is not None and not isinstance(loop, asyncio.AbstractEventLoop):
            raise ConfigError(f"CallRunner.use_loop takes an asyncio event loop or None, got {type(loop).__name__}",
                              field="loop", value=type(loop).__name__)
        with self._lock:
            self._given = loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop given with ``use_loop`` (None: async calls go to the runner's own loop thread)."""
        return self._given

    @contextlib.contextmanager
    def as_current(self) -> Iterator[CallRunner]:
        """Make this runner the one ``run_sync`` awaits on, in this context (a worker's passes: timer
        handlers and attached engines that wait for an awaitable then use the worker's loop)."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._given is not None:
                return self._given
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=f"{self._name}-async", daemon=True)
                thread.start()
                self._loop, self._loop_thread = loop, thread
            return self._loop

    def _ensure_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.max_in_flight, thread_name_prefix=f"{self._name}-call"
                )
            return self._pool

    def run(self, aw: Awaitable[Any]) -> Any:
        """Wait for ``aw`` on the runner's loop (its own, or the given one) and return its result (or raise
        its exception)."""
        loop = self._ensure_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError("CallRunner.run was called from its own event loop; await the call instead")
        if loop is self._given and not loop.is_running():
            raise RuntimeError("the event loop given to this CallRunner is not running; an awaitable sent to it "
                               "would never finish")
        # The task runs in a copy of this thread's context (``call_soon_threadsafe`` takes it): a span current
        # here is current in the coroutine.
        return asyncio.run_coroutine_threadsafe(_await(aw), loop).result()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, awaiting the result on the runner's loop if it is awaitable."""
        result = fn(*args)
        if type(result) in _PLAIN:
            return result
        if inspect.isawaitable(result):
            return self.run(result)
        return result

    def _guarded(self, fn: Callable[[T], Any], item: T) -> tuple[bool, Any]:
        try:
            return True, self.call(fn, item)
        except Exception as exc:  # handed back to the engine, which records it on the item
            return False, exc

    def map(self, fn: Callable[[T], Any], items: Sequence[T], *, inline: bool = False) -> list[tuple[bool, Any]]:
        """Call ``fn`` on every item; ``(True, result)`` or ``(False, exception)`` per item, in order.

        ``inline=True`` runs them one after another in the calling thread (for calls so quick that
        handing them to threads costs more than it saves). ``BaseException`` (``KeyboardInterrupt``,
        ``SystemExit``) is not caught: it propagates.
        """
        if inline or len(items) <= 1 or self.max_in_flight == 1:
            return [self._guarded(fn, item) for item in items]
        pool = self._ensure_pool()
        futures = [pool.submit(self._guarded, fn, item) for item in items]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Wait for calls in flight, then stop the pool and the runner's own loop thread; a given loop is
        let go of (never stopped). The runner may be used again: it starts what it needs anew."""
        with self._lock:
            pool, loop, thread = self._pool, self._loop, self._loop_thread
            self._pool = self._loop = self._loop_thread = None
        if pool is not None:
            pool.shutdown(wait=True)
        with self._lock:
            self._given = None
        if loop is not None and thread is not None:
            # The loop shuts down as asyncio.run shuts one down: async generators still suspended on it
            # (an async client's pool held open by one) are closed first, on the loop.
            asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop).result(timeout=5)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            loop.close()


_shared: CallRunner | None = None
_shared_lock = threading.Lock()
_current: contextvars.ContextVar[CallRunner | None] = contextvars.ContextVar("errands_call_runner", default=None)


class Latency:
    """A moving average of the call time of each kind of user call (a connector, a task type), fed by the
    threads that make the calls (hence the lock).

    Calls answering in well under a millisecond are made inline, where a thread hand-off would cost more
    than the call (the outbox's dispatch, the task engine's quick handlers)."""

    QUICK = 0.0002  # seconds

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._average: dict[str, float] = {}

    def record(self, connector: str, seconds: float) -> None:
        with self._lock:
            old = self._average.get(connector)
            self._average[connector] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def untimed(self, connectors: Sequence[str]) -> bool:
        """Whether a call of any one of ``connectors`` was never timed yet."""
        with self._lock:
            return any(name not in self._average for name in connectors)

    def quick(self, connectors: Sequence[str]) -> bool:
        """Whether every one of ``connectors`` answers quickly (one not timed yet does not)."""
        with self._lock:
            return all(self._average.get(name, 1.0) < self.QUICK for name in connectors)


def run_sync(aw: Awaitable[Any]) -> Any:
    """Wait for ``aw`` from sync code, whether or not an event loop runs on this thread: on the loop of
    the runner made current here (``CallRunner.as_current``: a worker's, during its passes), else on the
    one process-wide runner's loop thread (started on first use, a daemon). Called from a coroutine on the
    current runner's own loop, it uses the process-wide one (waiting there would stop that loop for good)."""
    global _shared
    runner = _current.get()
    if runner is not None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is None or (running is not runner._given and running is not runner._loop):
            return runner.run(aw)
    with _shared_lock:
        if _shared is None:
            _shared = CallRunner(1, name="errands-shared")
        runner = _shared
    return runner.run(aw)


def drain(step: Callable[[], int], max_passes: int = 10_000, *, busy: Callable[[], bool] | None = None) -> int:
    """Call ``step()`` (the amount of work one pass did) until a pass does none and ``busy()`` (work still
    running elsewhere, if given) is false, at most ``max_passes`` times. Returns the total amount.

    Every engine's ``drain`` is this loop over its own ``*_once`` steps."""
    total = 0
    for _ in range(max_passes):
        n = step()
        total += n
        if n == 0 and (busy is None or not busy()):
            break
    return total
