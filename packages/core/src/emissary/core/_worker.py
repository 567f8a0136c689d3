"""The worker loop: runs every engine's ``*_once`` step until told to stop."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable, Mapping, Sequence

from ._journal import StoreScheduler
from ._store import SQLStore

log = logging.getLogger("emissary.worker")

Job = Callable[[], Any]


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

    Each pass calls every job once; when a pass finds no work the worker sleeps ``poll_interval``
    seconds (or until ``wake()``). SIGTERM and SIGINT stop it after the current pass: leases in flight
    finish, or lapse and are taken again by the next worker; nothing is lost.

    Args:
        store: the open store.
        outbox: an ``Outbox`` (dispatch, reconcile and compensate steps).
        fanout: a ``FanOut`` (its ``run_once`` step).
        scheduler: the timer scheduler (a ``StoreScheduler`` on ``store`` by default).
        timer_handlers: topic -> handler for timers fired by this worker.
        jobs: further ``() -> amount`` callables run every pass (task engines, lro, durable).
        poll_interval: seconds to sleep after a pass that found nothing.
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
        self._wake = threading.Event()
        self._jobs: list[tuple[str, Job]] = []
        if outbox is not None:
            for step in ("dispatch_once", "reconcile_once", "compensate_once"):
                fn = getattr(outbox, step, None)
                if fn is not None:
                    self._jobs.append((f"outbox.{step}", fn))
        if fanout is not None:
            self._jobs.append(("fanout.run_once", fanout.run_once))
        self._jobs.append(("timers", self._fire_timers))
        for job in jobs:
            self._jobs.append((getattr(job, "__qualname__", repr(job)), job))
        self.passes = 0

    def add_job(self, name: str, job: Job) -> None:
        self._jobs.append((name, job))

    def on_timer(self, topic: str, handler: Callable[[str, Any], Any]) -> None:
        self.timer_handlers[topic] = handler

    def _fire_timers(self) -> int:
        if not self.timer_handlers:
            return 0
        return self.scheduler.fire_due(self.timer_handlers)

    def step(self) -> int:
        """Run every job once. Returns how much work was done."""
        done = 0
        for name, job in self._jobs:
            try:
                done += _amount(job())
            except Exception:
                log.exception("worker job %s failed; continuing", name)
        self.passes += 1
        return done

    def drain(self, max_passes: int = 10_000) -> int:
        """Run passes until one finds nothing to do (due now). Returns the total amount of work."""
        total = 0
        for _ in range(max_passes):
            n = self.step()
            total += n
            if n == 0:
                break
        return total

    def wake(self) -> None:
        self._wake.set()

    def run(self, stop: threading.Event | None = None) -> None:
        """Loop until ``stop`` is set, or SIGTERM/SIGINT when run in the main thread."""
        stop = stop or threading.Event()
        restore: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            def _on_signal(signum: int, _frame: Any) -> None:
                log.info("signal %s: stopping after this pass", signum)
                stop.set()
                self._wake.set()

            for sig in (signal.SIGTERM, signal.SIGINT):
                restore[int(sig)] = signal.signal(sig, _on_signal)
        try:
            while not stop.is_set():
                if self.step() == 0:
                    self._wake.wait(self.poll_interval)
                    self._wake.clear()
        finally:
            for signum, handler in restore.items():
                signal.signal(signum, handler)
            for part in (self.outbox, self.fanout):
                close = getattr(part, "close", None)
                if callable(close):
                    close()
