"""Waking the engines' drivers: the one mechanism by which a driver (``Worker``, ``TaskEngine.drain``) learns
that there is work to claim, instead of sleeping a poll interval.

- In process: ``notify(store, channel)`` after a commit wakes every ``Wake`` subscribed to that database and
  channel (a submit wakes a local worker at once; an engine whose slot freed wakes its driver).
- Across processes: on PostgreSQL the submitting transaction sends ``NOTIFY`` (``Tx.notify``), and a worker
  listens on a connection of its own (``SQLStore.listen``), which wakes it the same way. Where the store has
  no notifications (SQLite), ``Idle`` paces a short adaptive poll: 1 ms after the last work found, doubling
  up to the poll interval while nothing comes.

Channels are the engines' names: ``tasks`` (tasks and reactions), ``outbox``, ``fanout``, ``durable``, ``lro``.
A spurious wake costs one pass that finds nothing; a missed one costs at most one poll interval.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Iterable

TASKS, OUTBOX = "tasks", "outbox"
#: What engines' submits and slot releases notify; what a ``Worker`` listens to.
CHANNELS = (TASKS, OUTBOX, "fanout", "durable", "lro")
#: The first wait after a pass that found nothing, where the store cannot notify (seconds).
FIRST_POLL = 0.001

_lock = threading.Lock()
_subscribers: dict[tuple[str, str], weakref.WeakSet[Wake]] = {}


def store_key(store: Any) -> str:
    """Which database ``store`` is, for in-process wakes: its URL (two stores on one database share it)."""
    return str(getattr(store, "url", id(store)))


class Wake:
    """One driver's wake-up: set by ``notify`` (or a listener), waited on between passes.

    ``set`` before ``wait`` is never lost: the driver clears it before a pass (``clear``) and waits after, so a
    notification that lands during the pass cuts the wait short. ``woken`` counts waits cut short this way and
    ``notified`` the notifications that came from the database (``LISTEN``), for operators and tests.
    """

    __slots__ = ("__weakref__", "_cond", "_set", "notified", "woken")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._set = False
        self.woken = 0
        self.notified = 0

    def set(self, *, remote: bool = False) -> None:
        with self._cond:
            if remote:
                self.notified += 1
            self._set = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._set = False

    @property
    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None) -> bool:
        """Wait until set (True, and counted in ``woken``) or ``timeout`` seconds pass (False); clears it."""
        with self._cond:
            if not self._set:
                self._cond.wait(timeout)
            was, self._set = self._set, False
            if was:
                self.woken += 1
            return was


def subscribe(store: Any, wake: Wake, channels: Iterable[str] = CHANNELS) -> None:
    """Wake ``wake`` whenever ``notify(store, channel)`` runs for one of ``channels`` in this process."""
    key = store_key(store)
    with _lock:
        for channel in channels:
            _subscribers.setdefault((key, channel), weakref.WeakSet()).add(wake)


def unsubscribe(store: Any, wake: Wake) -> None:
    key = store_key(store)
    with _lock:
        for (k, _), wakes in _subscribers.items():
            if k == key:
                wakes.discard(wake)


def notify(store: Any, channel: str) -> None:
    """There is work for ``channel`` on ``store``'s database (a submit committed, a slot freed): wake the drivers
    of this process that serve it."""
    with _lock:
        wakes = _subscribers.get((store_key(store), channel))
        targets = list(wakes) if wakes else ()
    for wake in targets:
        wake.set()


def remote(store: Any, channel: str | None) -> None:
    """A notification from the database (``LISTEN``) for ``channel`` (None: every channel, after the listening
    connection was opened again and may have missed some)."""
    key = store_key(store)
    with _lock:
        targets = {w for (k, c), wakes in _subscribers.items() if k == key and (channel is None or c == channel)
                   for w in wakes}
    for wake in targets:
        wake.set(remote=channel is not None)


class Idle:
    """How long a driver waits after a pass that found nothing: ``FIRST_POLL``, doubling at each empty pass up to
    ``poll_interval``; back to the start when a pass finds work. With ``notified`` (the store wakes the driver
    on new work) it waits the whole ``poll_interval`` at once: the wait ends on a notification anyway."""

    __slots__ = ("_next", "poll_interval")

    def __init__(self, poll_interval: float) -> None:
        self.poll_interval = poll_interval
        self._next = FIRST_POLL

    def worked(self) -> None:
        self._next = FIRST_POLL

    def next(self, *, notified: bool) -> float:
        if notified:
            return self.poll_interval
        wait = min(self._next, self.poll_interval)
        self._next = min(self._next * 2, self.poll_interval)
        return wait
