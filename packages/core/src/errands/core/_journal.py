"""The journal (append-only event log) and the store-backed timer scheduler."""

from __future__ import annotations

import inspect
import logging
from datetime import datetime
from typing import Any, Awaitable, Callable, Mapping, Sequence

from ._leases import DEFAULT_LEASE_FOR, LeaseBatch
from ._runtime import run_sync
from ._values import Event, Lease
from .errors import LeaseLostError
from .store._stores import NewEvent, SQLStore, as_epoch, new_id

log = logging.getLogger("errands.scheduler")


class Journal:
    """Append-only events with a global order and a per-stream ``seq``.

    Args:
        store: an open store.

    Example:
        >>> journal = Journal(open_store("memory://"))
        >>> journal.append("orders/42", "order.placed", {"total": 10}).id
        'orders/42/1'
    """

    def __init__(self, store: SQLStore) -> None:
        self.store = store

    def append(
        self, stream: str, type: str, data: Any = None, subject: str | None = None, conn: Any = None
    ) -> Event:
        """Append one event; with ``conn`` it commits or rolls back with the caller's transaction.

        ``subject`` defaults to ``type``.
        """
        return self.store.append_events([NewEvent(stream, type, data, subject)], conn=conn)[0]

    def append_many(self, events: Sequence[NewEvent], conn: Any = None) -> list[Event]:
        """Append many events in one transaction."""
        return self.store.append_events(list(events), conn=conn)

    def read(
        self, after: int = 0, limit: int = 1000, subjects: Sequence[str] | None = None,
        stream: str | None = None,
    ) -> list[Event]:
        """Events after global position ``after``, oldest first."""
        return self.store.read_events(after, limit, subjects, stream=stream)

    def last_position(self) -> int:
        return self.store.last_position()


TIMER_QUEUE = "em.timers"

TimerHandler = Callable[[str, Any], "Awaitable[None] | None"]


class StoreScheduler:
    """Timers kept in the store and fired by the worker: each fires once (re-fired only if its handler
    crashed before completing), and ``cancel(key)`` removes it.

    Args:
        store: an open store.
        lease_for: seconds a firing holds its timer before another worker may take it (10 by default); a
            heartbeat renews the leases of the claimed timers, all in one statement, while handlers run.
        retry_delay: seconds before a timer whose handler raised fires again.
        queue: the store queue the timers live in. An engine that fires its own timers gives them a queue
            of their own, so that no other worker's ``fire_due`` claims (and parks) them.
    """

    name = "store"

    def __init__(
        self, store: SQLStore, *, lease_for: float = DEFAULT_LEASE_FOR, retry_delay: float = 5.0,
        queue: str = TIMER_QUEUE,
    ) -> None:
        self.store = store
        self.lease_for = lease_for
        self.retry_delay = retry_delay
        self.queue = queue

    def schedule(self, topic: str, payload: Any, at: datetime | float, key: str | None = None) -> str:
        """Fire ``payload`` under ``topic`` at ``at`` (aware datetime or epoch seconds).

        Returns:
            The timer key; scheduling an existing key again changes nothing.
        """
        key = key or new_id()
        when = as_epoch(at, self.store.clock.now())
        self.store.enqueue(self.queue, [(key, {"topic": topic, "payload": payload}, when)])
        return key

    def cancel(self, key: str) -> bool:
        return self.store.dequeue(self.queue, key)

    def pending(self) -> int:
        return self.store.queue_size(self.queue)

    def fire_due(
        self, handlers: Mapping[str, TimerHandler] | Callable[[str, Any], Any], limit: int = 100
    ) -> int:
        """Fire due timers through ``handlers`` (by topic, or one callable for all).

        A handler that raises leaves its timer to fire again after ``retry_delay``. Timers whose topic
        has no handler here are released for another worker. While handlers run, one heartbeat renews the
        leases of every timer claimed; a timer whose lease was lost meanwhile is left to the worker that
        holds it now. A store fault while completing or releasing timers is retried (it never fires a
        timer again by itself).

        Returns:
            How many timers fired and completed.
        """
        from ._worker import retry_infrastructure  # _worker imports this module

        leases = self.store.claim(self.queue, limit, lease_for=self.lease_for)
        if not leases:
            return 0
        held = _TimerLeases(self.store, leases, self.lease_for)
        done: list[Lease] = []
        again: list[Lease] = []
        unknown: list[Lease] = []
        try:
            for lease in leases:
                topic, payload = lease.payload["topic"], lease.payload["payload"]
                fn = handlers.get(topic) if isinstance(handlers, Mapping) else handlers
                if fn is None:
                    unknown.append(lease)
                    continue
                if not held.holds(lease.key):
                    log.warning("timer %s: its lease lapsed before it fired; another worker may hold it", lease.key)
                    continue
                try:
                    result = fn(topic, payload)
                    if inspect.isawaitable(result):
                        run_sync(result)
                    done.append(lease)
                except Exception:
                    log.exception("timer %s (%s) failed; retrying in %ss", lease.key, topic, self.retry_delay)
                    again.append(lease)
            held.stop()  # the handlers are done: what remains is to settle the leases
            fired = 0
            if done:
                fired = retry_infrastructure(lambda _a: held.settle(done, None), clock=self.store.clock,
                                             what=f"completing {len(done)} timers", keep_going=held.alive)
            if again or unknown:
                retry_infrastructure(lambda _a: held.settle(again + unknown, self.retry_delay),
                                     clock=self.store.clock, what=f"releasing {len(again) + len(unknown)} timers",
                                     keep_going=held.alive)
            return fired
        finally:
            held.stop()


class _TimerLeases(LeaseBatch):
    """The leases of one batch of claimed timers: renewed together by one heartbeat (one ``extend`` of every
    lease still held per beat), settled together, and known locally to be held until ``expires``."""

    def __init__(self, store: SQLStore, leases: Sequence[Lease], lease_for: float) -> None:
        self.store = store
        self.leases = {lease.key: lease for lease in leases}
        super().__init__(store.clock, self.leases, expires=min(lease.expires_at for lease in leases),
                         lease_for=lease_for, what=f"{len(leases)} timers")

    def _extend(self, keys: list[Any], until: float) -> set[Any]:
        live = [self.leases[k] for k in keys]
        try:
            self.store.extend(live, lease_for=self.lease_for)
            return set(keys)
        except LeaseLostError:
            # One of them went to another worker: find which, one by one (rare).
            still = set()
            for lease in live:
                try:
                    self.store.extend([lease], lease_for=self.lease_for)
                    still.add(lease.key)
                except LeaseLostError:
                    pass
            return still

    def settle(self, leases: Sequence[Lease], delay: float | None) -> int:
        """Complete (``delay`` None) or release ``leases`` in one transaction, or one by one when some lease
        was lost; returns how many were this worker's to settle."""
        with self._lock:
            mine = [lease for lease in leases if lease.key not in self.lost]
            try:
                self._settle(mine, delay)
                return len(mine)
            except LeaseLostError:
                count = 0
                for lease in mine:
                    try:
                        self._settle([lease], delay)
                        count += 1
                    except LeaseLostError:
                        self.lost.add(lease.key)
                return count

    def _settle(self, leases: Sequence[Lease], delay: float | None) -> None:
        if not leases:
            return
        if delay is None:
            self.store.complete(leases)
        else:
            self.store.release(leases, delay=delay)
