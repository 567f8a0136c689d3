"""Leases shared by every engine: one default duration, one heartbeat that renews a lease while user code
runs, and one rule for which errors are the infrastructure's rather than the user's.

A worker holds a lease on the row it works on (an effect, a task, an execution, a timer) for ``lease_for``
seconds. While user code runs, :func:`heartbeat` renews it every ``lease_for / 3`` seconds from one shared
thread, so a long step keeps its lease however long it runs, and a killed worker's lease lapses within
``lease_for``: with the default of 10 s another worker retries its work within seconds, not minutes.
"""

from __future__ import annotations

import abc
import heapq
import itertools
import logging
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Collection, TypeVar

from ._clock import Clock
from .errors import InfrastructureError, LeaseLostError

R = TypeVar("R")

__all__ = ["DEFAULT_LEASE_FOR", "Beat", "LeaseBatch", "heartbeat", "is_infrastructure_error"]

log = logging.getLogger("errands.leases")

#: The default ``lease_for`` of every engine, in seconds. A heartbeat renews it while user code runs.
DEFAULT_LEASE_FOR = 10.0

_SQLITE_TRANSIENT = ("locked", "busy", "disk i/o error", "unable to open database", "database schema has changed")
_PSYCOPG_TRANSIENT = (
    "OperationalError",  # connection refused, dropped or terminated (AdminShutdown is one), server closing
    "InterfaceError",  # the connection is closed
    "SerializationFailure",
    "DeadlockDetected",
    "LockNotAvailable",
    "QueryCanceled",  # statement_timeout / lock_timeout
    "PoolTimeout",
    "TooManyConnections",
    "CannotConnectNow",
)


def is_infrastructure_error(exc: BaseException) -> bool:
    """True when ``exc`` is a fault of the store's database or of the connection to it: a locked or busy
    SQLite file, a PostgreSQL serialization failure or deadlock, a dropped or terminated connection.

    Engines ask this of errors raised by *their own* store calls, never of errors raised by user code (a
    step that talks to its own database fails as the user's failure, under the user's retry policy). An
    infrastructure error abandons the invocation, which is retried promptly; it is never recorded as the
    execution's, task's or effect's failure.
    """
    if isinstance(exc, InfrastructureError):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return any(marker in text for marker in _SQLITE_TRANSIENT)
    module = type(exc).__module__ or ""
    if module.startswith(("psycopg", "psycopg_pool")):
        return any(cls.__name__ in _PSYCOPG_TRANSIENT for cls in type(exc).__mro__)
    return isinstance(exc, (ConnectionError, TimeoutError)) and module in ("builtins", "socket", "ssl")


class Beat:
    """One lease being renewed. ``lost`` turns true (and stays true) once ``renew`` reports the lease gone;
    from then on the holder must stop writing.

    A beat is taken for every task and effect a worker runs, so it is small: the event that ``wait_lost``
    blocks on is made only when somebody waits."""

    __slots__ = ("_cancelled", "_in_flight", "_lost", "_lost_event", "every", "renew", "what")

    def __init__(self, renew: Callable[[], bool], every: float, what: str) -> None:
        self.renew = renew
        self.every = every
        self.what = what
        self._lost = False
        self._lost_event: threading.Event | None = None
        self._cancelled = False
        self._in_flight = False

    @property
    def lost(self) -> bool:
        """True once the lease is known to be held by someone else (or gone)."""
        return self._lost

    def check(self) -> None:
        """Raise ``LeaseLostError`` if the lease is lost."""
        if self._lost:
            raise LeaseLostError(f"the lease on {self.what} was lost while it ran; another worker may hold it")

    def wait_lost(self, timeout: float | None = None) -> bool:
        """Block until the lease is lost or ``timeout`` passes; True if it was lost."""
        with _LOST:
            if self._lost:
                return True
            if self._lost_event is None:
                self._lost_event = threading.Event()
            event = self._lost_event
        return event.wait(timeout)

    def __enter__(self) -> Beat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop renewing (the holder is done with the lease)."""
        self._cancelled = True

    def _mark_lost(self) -> None:
        with _LOST:
            if self._lost:
                return
            self._lost = True
            event = self._lost_event
        if event is not None:
            event.set()
        log.warning("lease on %s lost: this worker stops writing it", self.what)


#: Guards the rare moments a beat's lease is found lost or waited for (``Beat.wait_lost``).
_LOST = threading.Lock()

#: The scheduler's heap keeps a stopped beat until its time comes, unless it grows past this many entries and
#: twice its live ones: then the stopped ones are dropped at once, so a worker running thousands of quick
#: tasks a second holds only the beats of the work it runs.
_COMPACT_ABOVE = 512


class _Heartbeats:
    """One scheduler thread for the whole process; renewals run on a small pool so that one renewal
    waiting on a busy database does not delay the others."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Beat]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._compact_at = _COMPACT_ABOVE

    def add(self, beat: Beat) -> None:
        with self._cond:
            heap = self._heap
            if len(heap) >= self._compact_at:
                self._compact()
            heapq.heappush(heap, (time.monotonic() + beat.every, next(self._seq), beat))
            if self._thread is None or not self._thread.is_alive():
                self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="errands-heartbeat")
                self._thread = threading.Thread(target=self._run, name="errands-heartbeats", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is not beat:
                return  # the scheduler wakes for an earlier beat anyway: no wake-up for each lease taken
            self._cond.notify()

    def __len__(self) -> int:
        """How many beats the scheduler holds, stopped ones not yet dropped included."""
        return len(self._heap)

    def _compact(self) -> None:
        """Drop the stopped beats (``_cond`` held); the next compaction comes when the heap has doubled."""
        heap = self._heap
        heap[:] = [entry for entry in heap if not entry[2]._cancelled]
        heapq.heapify(heap)
        self._compact_at = max(_COMPACT_ABOVE, 2 * len(heap))

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][2]._cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait(30.0)
                    continue
                due, _, beat = self._heap[0]
                delay = due - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                if beat._in_flight:
                    heapq.heappush(self._heap, (time.monotonic() + beat.every, next(self._seq), beat))
                    continue
                beat._in_flight = True
                pool = self._pool
            assert pool is not None
            pool.submit(self._beat, beat)

    def _beat(self, beat: Beat) -> None:
        try:
            held = beat.renew()
        except Exception as exc:
            # A renewal that meets a locked database or a dropped connection is retried at the next beat:
            # the lease is lost only when the store says someone else holds it.
            held = True
            level = logging.INFO if is_infrastructure_error(exc) else logging.WARNING
            log.log(level, "renewing the lease on %s failed (%s: %s); retrying at the next beat",
                    beat.what, type(exc).__name__, exc)
        finally:
            beat._in_flight = False
        if not held:
            beat._mark_lost()
            return
        if not beat._cancelled:
            with self._cond:
                heapq.heappush(self._heap, (time.monotonic() + beat.every, next(self._seq), beat))
                self._cond.notify()


_HEARTBEATS = _Heartbeats()


def heartbeat(renew: Callable[[], bool], *, lease_for: float, what: str) -> Beat:
    """Renew a lease every ``lease_for / 3`` seconds until the returned :class:`Beat` is stopped (use it
    as a context manager around the user code).

    Args:
        renew: extends the lease by ``lease_for``; returns False when the lease is no longer this worker's
            (fencing token moved on, row gone). It runs on a heartbeat thread; an exception is logged and
            the renewal retried at the next beat.
        lease_for: the lease duration the holder claimed with.
        what: names the leased thing in logs (never a secret).

    Example::

        with heartbeat(lambda: bool(store.extend([lease], lease_for=10.0)), lease_for=10.0, what=key) as beat:
            run_user_code()
        if beat.lost:
            return  # another worker holds it now: write nothing
    """
    beat = Beat(renew, max(lease_for / 3.0, 0.01), what)
    _HEARTBEATS.add(beat)
    return beat



class LeaseBatch(abc.ABC):
    """The leases of one claimed batch, renewed together while user code runs: one heartbeat and one
    :meth:`_extend` per beat for every lease the batch still holds, never one per item.

    It knows, from this worker's side, until when the leases are surely held, so that no call starts on a
    lease that may have passed to another worker (:meth:`holds`), and it stops renewing once the results are
    recorded (:meth:`recorded`), so that a renewal racing the completion does not report a lease lost.
    A subclass sets its own fields, then calls ``super().__init__`` (which starts the heartbeat).
    """

    __slots__ = ("_count", "_keys", "_lock", "beat", "clock", "done", "expires", "lease_for", "lost")

    def __init__(self, clock: Clock, keys: Collection[Any], *, expires: float, lease_for: float, what: str) -> None:
        self.clock = clock
        self._keys = list(keys)
        self._count = len(self._keys)
        self.lost: set[Any] = set()
        self.expires = expires
        self.lease_for = lease_for
        self.done = False
        self._lock = threading.Lock()
        self.beat = heartbeat(self._renew, lease_for=lease_for, what=what)

    @abc.abstractmethod
    def _extend(self, keys: list[Any], until: float) -> set[Any]:
        """Extend the leases on ``keys`` to ``until``; return the keys whose lease is still this worker's."""

    def holds(self, key: Any) -> bool:
        """Whether the lease on ``key`` is surely still this worker's."""
        return key not in self.lost and self.clock.now() < self.expires

    def alive(self) -> bool:
        """Whether any lease of the batch may still be this worker's."""
        return len(self.lost) < self._count and self.clock.now() < self.expires

    def _renew(self) -> bool:
        with self._lock:
            if self.done:
                return True
            live = [k for k in self._keys if k not in self.lost]
            if not live:
                return False
            until = self.clock.now() + self.lease_for
            still = self._extend(live, until)
            self.lost.update(k for k in live if k not in still)
            if still:
                self.expires = until
            return bool(still)

    def recorded(self, record: Callable[[], R]) -> R:
        """Run ``record`` (the completion) with renewals held off, and stop renewing once it succeeded."""
        with self._lock:
            out = record()
            self.done = True
        self.beat.stop()
        return out

    def stop(self) -> None:
        """Stop renewing."""
        self.done = True
        self.beat.stop()
