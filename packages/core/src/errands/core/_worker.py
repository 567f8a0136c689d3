"""The worker loop: runs every engine's ``*_once`` step until told to stop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
import time
from typing import Any, Callable, Mapping, Sequence, TypeVar, Union

from . import _wake, telemetry
from ._clock import Clock
from ._journal import StoreScheduler
from ._leases import is_infrastructure_error
from ._runtime import CallRunner
from .errors import ConfigError
from .store._stores import SQLStore

log = logging.getLogger("errands.worker")

Job = Callable[[], Any]
T = TypeVar("T")
#: What stops ``Worker.run_async``: an ``asyncio.Event`` of the running loop, or a ``threading.Event``.
StopEvent = Union[asyncio.Event, threading.Event]

#: Waits (seconds of the store's clock) before each retry of an engine's own store write that met an
#: infrastructure fault: about four seconds in all, well inside the default lease.
RETRY_DELAYS = (0.0, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


def retry_infrastructure(fn: Callable[[int], T], *, clock: Clock, what: str,
                         keep_going: Callable[[], bool] | None = None,
                         delays: Sequence[float] = RETRY_DELAYS) -> T:
    """``fn(attempt)`` (attempt 0 first), called again after each infrastructure error (a locked
    database, a dropped connection, a serialization failure: ``is_infrastructure_error``) once for each
    of ``delays`` (waited first), while ``keep_going()`` (the lease is still held) allows.

    Engines record what they already know (a connector's answer, a timer fired) through it, so that a
    fault costs a retry instead of the result. Any other error, or the last infrastructure one, propagates.
    ``fn`` must be safe to call again after a fault at commit, when the first call may have committed.
    An engine for which giving up is cheap (durable replays an abandoned invocation from its checkpoints)
    passes fewer ``delays`` than ``RETRY_DELAYS``, so that a worker does not sit on one item for seconds.
    """
    attempt = 0
    while True:
        try:
            return fn(attempt)
        except Exception as exc:
            if (not is_infrastructure_error(exc) or attempt >= len(delays)
                    or (keep_going is not None and not keep_going())):
                raise
            delay = delays[attempt]
            log.info("%s met an infrastructure fault (%s: %s); retrying in %.2fs", what, type(exc).__name__,
                     exc, delay)
        attempt += 1
        if delay:
            clock.sleep(delay)

def _amount(result: Any) -> int:
    if result is None:
        return 0
    if isinstance(result, bool):
        return int(result)
    if isinstance(result, int):
        return result
    try:
        return len(result)
    except TypeError:
        return 1


class Worker:
    """Runs dispatch, reconcile, compensate, fan-out, timers and tasks until stopped.

    Each pass calls every job once. A pass that started work is followed by the next at once; after a pass
    that found nothing the worker waits until it is woken: by a submit in this process, by an engine whose
    slot freed (so it claims the next work as soon as it can run it, even when every slot was busy), by a
    ``NOTIFY`` of a submitting transaction in another process (PostgreSQL: the worker runs ``LISTEN`` on
    a connection of its own), or by ``wake()``; at the latest after ``poll_interval`` (delayed work coming due).
    Where the store cannot notify (SQLite) the wait is an adaptive poll: 1 ms after the last work found,
    doubling up to ``poll_interval`` while nothing comes (``errands.core._wake``). SIGTERM and SIGINT stop it
    after the current pass: leases in flight finish, or lapse and are taken again by the next worker; nothing
    is lost.

    ``run()`` loops in the calling thread; ``await run_async()`` runs the same loop inside an application's
    event loop: the passes (store work, sync user code) in threads, async user code on that loop.

    The worker's ``runner`` (one ``CallRunner``, the one concurrency budget) is lent to the outbox, the
    fan-out and every job's engine that takes one (``use_runner``: the task engine, the reactor), so async
    connectors, sinks and handlers all await on one loop. Such an engine is one the worker runs: ``close``
    waits for its work in flight (its ``close()``) and takes the runner back.

    Args:
        store: the open store.
        outbox: an ``Outbox`` (dispatch, reconcile and compensate steps).
        fanout: a ``FanOut`` (its ``run_once`` step).
        scheduler: the timer scheduler (a ``StoreScheduler`` on ``store`` by default).
        timer_handlers: topic -> handler for timers fired by this worker.
        jobs: further ``() -> amount`` callables run every pass (task engines, lro, durable).
        poll_interval: the longest wait after a pass that found nothing (when no notification comes).
        max_in_flight: the most effects or batches in flight at once, passed to the engines.
    """

    def __init__(
        self, store: SQLStore, *, outbox: Any = None, fanout: Any = None, scheduler: StoreScheduler | None = None,
        timer_handlers: Mapping[str, Callable[[str, Any], Any]] | None = None, jobs: Sequence[Job] = (),
        poll_interval: float = 0.2, max_in_flight: int = 16,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.fanout = fanout
        self.scheduler = scheduler or StoreScheduler(store)
        self.timer_handlers: dict[str, Callable[[str, Any], Any]] = dict(timer_handlers or {})
        self.poll_interval = poll_interval
        self.max_in_flight = max_in_flight
        self._signal = _wake.Wake()
        self._listener: Any = None
        self._jobs: list[tuple[str, Job]] = []
        self._lent: list[Any] = []  # engines of jobs given this worker's runner: closed and given back by close
        self.runner = CallRunner(max_in_flight)
        use_runner = getattr(outbox, "use_runner", None)
        if callable(use_runner):
            use_runner(self.runner)
        use_runner = getattr(fanout, "use_runner", None)
        if callable(use_runner):
            use_runner(self.runner)
        if outbox is not None:
            for step in ("dispatch_once", "reconcile_once", "compensate_once"):
                fn = getattr(outbox, step, None)
                if fn is not None:
                    self._jobs.append((f"outbox.{step}", fn))
        if fanout is not None:
            self._jobs.append(("fanout.run_once", fanout.run_once))
        self._jobs.append(("timers", self._fire_timers))
        for job in jobs:
            self.add_job(getattr(job, "__qualname__", repr(job)), job)
        self.passes = 0
        self.faulted = False  # whether the last pass met a store fault
        telemetry.watch(self)

    def add_job(self, name: str, job: Job) -> None:
        """Run ``job()`` every pass; if it is a method of an engine that takes a runner (``use_runner``),
        that engine awaits async user code through this worker's runner."""
        self._jobs.append((name, job))
        owner = getattr(job, "__self__", None)
        if owner is not None and all(owner is not part for part in (*self._lent, self.outbox, self.fanout)):
            use_runner = getattr(owner, "use_runner", None)
            if callable(use_runner):
                use_runner(self.runner)
                self._lent.append(owner)

    def on_timer(self, topic: str, handler: Callable[[str, Any], Any]) -> None:
        self.timer_handlers[topic] = handler

    def _fire_timers(self) -> int:
        if not self.timer_handlers:
            return 0
        return self.scheduler.fire_due(self.timer_handlers)

    def step(self) -> int:
        """Run every job once. Returns how much work was done.

        A job that fails is logged and the pass goes on; a store fault (a locked database, a dropped
        connection: ``is_infrastructure_error``) is logged as a warning without a traceback, and the job's
        work is taken up again on a later pass.
        """
        done = 0
        self.faulted = False
        with self.runner.as_current():  # timer handlers and attached engines await on the worker's loop
            for name, job in self._jobs:
                try:
                    done += _amount(job())
                except Exception as exc:
                    if is_infrastructure_error(exc):
                        self.faulted = True
                        log.warning("worker job %s met a store fault (%s: %s); it runs again next pass", name,
                                    type(exc).__name__, exc)
                    else:
                        log.exception("worker job %s failed; continuing", name)
        self.passes += 1
        return done

    def drain(self, max_passes: int = 10_000) -> int:
        """Run passes until one finds nothing to do (due now). Returns the total amount of work.

        A pass that met a store fault does not count as finding nothing: the next one runs after a short
        pause (doubling up to a second while the faults go on).
        """
        total = 0
        faulted = 0
        for _ in range(max_passes):
            n = self.step()
            total += n
            if self.faulted:
                faulted += 1
                time.sleep(min(1.0, 0.01 * 2 ** min(faulted, 7)))
                continue
            faulted = 0
            if n == 0:
                break
        return total

    def wake(self) -> None:
        """Cut the current wait short: the next pass runs now."""
        self._signal.set()

    @property
    def woken(self) -> int:
        """How many of this worker's waits were cut short by a wake (a submit, a freed slot, a notification)."""
        return self._signal.woken

    @property
    def notified(self) -> int:
        """How many notifications from the database (PostgreSQL ``NOTIFY``) reached this worker."""
        return self._signal.notified

    @property
    def listening(self) -> bool:
        """Whether this worker hears other processes' submits now (its ``LISTEN`` connection is up)."""
        return self._listener is not None and self._listener.connected.is_set()

    def run(self, stop: threading.Event | None = None) -> None:
        """Loop until ``stop`` is set, or SIGTERM/SIGINT when run in the main thread."""
        stop = stop or threading.Event()
        restore: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            def _on_signal(signum: int, _frame: Any) -> None:
                log.info("signal %s: stopping after this pass", signum)
                stop.set()
                self.wake()

            for sig in (signal.SIGTERM, signal.SIGINT):
                restore[int(sig)] = signal.signal(sig, _on_signal)
        try:
            self._serve(stop.is_set, stop)
        finally:
            for signum, handler in restore.items():
                signal.signal(signum, handler)
            self.close()

    def _serve(self, stopped: Callable[[], bool], stop: threading.Event | None = None) -> None:
        """The one loop of ``run`` and ``run_async``, until ``stopped()``: a pass; after a pass that found
        nothing, a wait until woken (``_wake``) or the idle pace elapses; after a store fault, a pause doubling
        up to a second. ``stop`` being set wakes the wait."""
        idle = _wake.Idle(self.poll_interval)
        store = self.store
        served = threading.Event()
        if stop is not None:
            def watch() -> None:
                while not stop.wait(1.0):
                    if served.is_set():
                        return
                self.wake()

            threading.Thread(target=watch, name="errands-worker-stop", daemon=True).start()
        _wake.subscribe(store, self._signal)
        listen = getattr(store, "listen", None)  # a plugin's store may have no notifications
        self._listener = listen(_wake.CHANNELS, lambda channel: _wake.remote(store, channel)) if listen else None
        faulted = 0
        try:
            while not stopped():
                self._signal.clear()  # a wake from now on (during the pass) cuts the next wait short
                done = self.step()
                if self.faulted:
                    faulted += 1
                    self._signal.wait(min(1.0, 0.01 * 2 ** min(faulted, 7)))
                    continue
                faulted = 0
                if done:
                    idle.worked()
                    continue
                self._signal.wait(idle.next(notified=self.listening))
        finally:
            served.set()
            listener, self._listener = self._listener, None
            if listener is not None:
                listener.close()
            _wake.unsubscribe(store, self._signal)

    async def run_async(self, stop: StopEvent | None = None) -> None:
        """Run every engine inside the running event loop until ``stop`` is set, then close the worker.

        The loop of ``run`` (the same passes) runs on a thread of its own, so store work (claims,
        completions), sync user code (on the bounded pool, as in ``run``) and the idle sleep never block the
        event loop; async connectors, sinks and handlers (``async def dispatch``, ``publish``, ``@app.on``,
        ``@app.task``, timer, lro handlers) are awaited *on this loop*, where an application's async clients
        live. Leases, heartbeats and the one concurrency budget are those of ``run``.

        Stopping (``stop`` set, or the task running this coroutine cancelled) ends the loop after the
        current pass: calls in flight finish and are recorded, running tasks finish, then the worker closes
        and this returns (a cancellation is raised again afterwards). Signals are the application's: none
        is handled here.

        Args:
            stop: an ``asyncio.Event`` (of this loop) or a ``threading.Event``; None: run until cancelled.
        """
        if stop is not None and not isinstance(stop, (asyncio.Event, threading.Event)):
            raise ConfigError(f"run_async(stop=...) takes an asyncio.Event or a threading.Event, got "
                              f"{type(stop).__name__}", field="stop", value=type(stop).__name__)
        loop = asyncio.get_running_loop()
        halt = threading.Event()
        given = stop if isinstance(stop, threading.Event) else None

        def stopped() -> bool:
            return halt.is_set() or (given is not None and given.is_set())

        finished: concurrent.futures.Future[None] = concurrent.futures.Future()

        def serve() -> None:
            try:
                try:
                    self._serve(stopped, given)
                finally:
                    self.close()  # here, off the loop: it waits for calls in flight, which the loop runs
            except BaseException as exc:  # handed to the coroutine, which raises it
                finished.set_exception(exc)
            else:
                finished.set_result(None)

        self.runner.use_loop(loop)
        thread = threading.Thread(target=serve, name="errands-worker", daemon=True)
        thread.start()
        done: asyncio.Future[Any] = asyncio.wrap_future(finished)
        watcher: asyncio.Future[Any] | None = None
        waiting = [done]
        if isinstance(stop, asyncio.Event):
            watcher = asyncio.ensure_future(stop.wait())
            waiting.append(watcher)
        cancelled = False
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            cancelled = True
        finally:
            if watcher is not None:
                watcher.cancel()
        halt.set()
        self.wake()
        while not done.done():  # the pass in flight finishes on its thread, its async calls on this loop
            try:
                await asyncio.wait([done])
            except asyncio.CancelledError:
                cancelled = True
        thread.join()
        done.result()
        if cancelled:
            raise asyncio.CancelledError

    def close(self) -> None:
        """Close the engines this worker runs and its call runner (``run`` and ``run_async`` do so when they
        stop): the outbox and the fan-out, and every engine lent the runner, which finishes its work in flight
        and gets its own runner back."""
        for part in (self.outbox, self.fanout):
            close = getattr(part, "close", None)
            if callable(close):
                close()
        for part in self._lent:
            close = getattr(part, "close", None)
            if callable(close):
                close()
            part.use_runner(None)
        self.runner.close()
