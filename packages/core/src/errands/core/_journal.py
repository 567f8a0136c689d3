"""The journal (append-only event log) and the store-backed timer scheduler."""

from __future__ import annotations

import inspect
import logging
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Mapping, NamedTuple, Sequence

from . import telemetry
from ._leases import DEFAULT_LEASE_FOR, LeaseBatch, is_infrastructure_error
from ._runtime import run_sync
from ._values import Event, Lease
from .errors import ConfigError, LeaseLostError, TransientError
from .store._sql import Tx
from .store._stores import NewEvent, SQLStore, as_epoch, new_id

log = logging.getLogger("errands.scheduler")
APPEND = "errands.journal.append"


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
        with telemetry.span(APPEND, stream=stream, subject=subject or type, count=1):
            return self.store.append_events([NewEvent(stream, type, data, subject)], conn=conn)[0]

    async def append_async(
        self, stream: str, type: str, data: Any = None, subject: str | None = None, conn: Any = None
    ) -> Event:
        """``append`` for coroutines, without blocking the event loop (``SQLStore.run_async``); ``conn`` may also
        be an async connection or session."""
        return await self.store.run_async(self.append, stream, type, data, subject, conn=conn)

    def append_many(self, events: Sequence[NewEvent], conn: Any = None) -> list[Event]:
        """Append many events in one transaction (the caller's, with ``conn``)."""
        with telemetry.span(APPEND, count=len(events)):
            return self.store.append_events(list(events), conn=conn)

    async def append_many_async(self, events: Sequence[NewEvent], conn: Any = None) -> list[Event]:
        """``append_many`` for coroutines (``SQLStore.run_async``)."""
        return await self.store.run_async(self.append_many, list(events), conn=conn)

    def read(
        self, after: int = 0, limit: int = 1000, subjects: Sequence[str] | None = None,
        stream: str | None = None,
    ) -> list[Event]:
        """Events after global position ``after``, oldest first."""
        return self.store.read_events(after, limit, subjects, stream=stream)

    async def read_async(
        self, after: int = 0, limit: int = 1000, subjects: Sequence[str] | None = None,
        stream: str | None = None,
    ) -> list[Event]:
        """``read`` for coroutines (``SQLStore.run_async``)."""
        return await self.store.run_async(self.read, after, limit, subjects, stream)

    def last_position(self) -> int:
        return self.store.last_position()


TIMER_QUEUE = "em.timers"

TimerHandler = Callable[[str, Any], "Awaitable[None] | None"]

#: ``transaction(payloads)`` of ``StoreScheduler.fire_due``: opens the transaction one group of timers fires
#: in, given the group's payloads (so that it can read what they need in one query).
GroupTransaction = Callable[[Sequence[Any]], AbstractContextManager[Tx]]


class DueTimer(NamedTuple):
    """A timer due now (``StoreScheduler.due``): its key, topic and payload, when it fell due, and how many times
    it was claimed to fire (more than none: a handler raised, or a worker died while it fired)."""

    key: str
    topic: str
    payload: Any
    due_at: datetime
    attempts: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (the time as ISO 8601)."""
        return {"key": self.key, "topic": self.topic, "payload": self.payload, "due_at": self.due_at.isoformat(),
                "attempts": self.attempts}


class StoreScheduler:
    """Timers kept in the store and fired by the worker: each fires once (re-fired only if its handler
    crashed before completing), and ``cancel(key)`` removes it.

    Args:
        store: an open store.
        lease_for: seconds a firing holds its timer before another worker may take it (10 by default); a
            heartbeat renews the leases of the claimed timers, all in one statement, while handlers run.
        retry_delay: seconds before a timer whose handler raised fires again.
        queue: the store queue the timers live in. An engine that fires its own timers gives them a queue
            of their own, so that no other worker's ``fire_due`` claims them.
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

    def due(self, limit: int = 100) -> list[DueTimer]:
        """The timers due now that no worker holds (the next ``fire_due`` would fire them), earliest first;
        nothing is claimed.

        Raises:
            ConfigError: ``limit`` is not an integer >= 1.
        """
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError(f"limit must be an integer >= 1, got {limit!r}", field="limit", value=limit)
        return [
            DueTimer(key, item.get("topic", "") if isinstance(item, dict) else "",
                     item.get("payload") if isinstance(item, dict) else item,
                     datetime.fromtimestamp(at, tz=timezone.utc), attempts)
            for key, item, at, attempts in self.store.due_items(self.queue, limit)
        ]

    def fire_due(
        self, handlers: Mapping[str, TimerHandler] | Callable[[str, Any], Any], limit: int = 100, *,
        group: int = 1, transaction: GroupTransaction | None = None,
    ) -> int:
        """Fire due timers through ``handlers`` (by topic, or one callable for all).

        A handler that raises leaves its timer to fire again after ``retry_delay`` (a ``TransientError`` or
        a store fault is logged without a traceback: neither is a bug). Timers whose topic has no handler
        here are released at once, for a worker that has one. While handlers run, one heartbeat renews the
        leases of every timer claimed; a timer whose lease was lost meanwhile is left to the worker that
        holds it now. A store fault while completing or releasing timers is retried (it never fires a
        timer again by itself).

        Args:
            handlers: the handlers, ``fn(topic, payload)``, sync or async.
            limit: at most this many timers are claimed.
            group: with ``transaction``, at most this many timers fire in one transaction.
            transaction: fire the timers in groups, each inside the transaction ``transaction(payloads)``
                opens, and complete or release the group's timers in that same transaction: what the
                handlers wrote and the acknowledgement of their timers commit together, one commit per
                group. A group whose transaction fails, or one of whose handlers raises a store fault (the
                transaction cannot be trusted after one), records nothing: its timers fire again after
                ``retry_delay``.

        Returns:
            How many timers fired and completed.
        """
        leases = self.store.claim(self.queue, limit, lease_for=self.lease_for)
        if not leases:
            return 0
        held = _TimerLeases(self.store, leases, self.lease_for)
        mine: list[tuple[Lease, TimerHandler]] = []
        unknown: list[Lease] = []
        for lease in leases:
            fn = handlers.get(lease.payload["topic"]) if isinstance(handlers, Mapping) else handlers
            if fn is None:
                unknown.append(lease)
            else:
                mine.append((lease, fn))
        done: list[Lease] = []
        again: list[Lease] = []
        fired = 0
        try:
            if transaction is None:
                for lease, fn in mine:
                    ok = self._fire(held, lease, fn, in_group=False)
                    if ok is not None:
                        (done if ok else again).append(lease)
            else:
                size = max(1, group)
                for i in range(0, len(mine), size):
                    fired += self._fire_group(held, mine[i:i + size], transaction, again)
            held.stop()  # the handlers are done: what remains is to settle the leases
            fired += self._settle(held, done, None)
            self._settle(held, again, self.retry_delay)
            self._settle(held, unknown, 0.0)
            return fired
        finally:
            held.stop()

    def _settle(self, held: _TimerLeases, leases: Sequence[Lease], delay: float | None) -> int:
        """Complete (``delay`` None) or release ``leases``, retried through store faults while they may
        still be this worker's; returns how many were settled."""
        from ._worker import retry_infrastructure  # _worker imports this module

        if not leases:
            return 0
        what = f"{'completing' if delay is None else 'releasing'} {len(leases)} timers"
        return retry_infrastructure(lambda _a: held.settle(leases, delay), clock=self.store.clock, what=what,
                                    keep_going=held.alive)

    def _fire(self, held: _TimerLeases, lease: Lease, fn: TimerHandler, *, in_group: bool) -> bool | None:
        """Call the handler of one timer: True if it returned, False if it raised (the timer fires again),
        None if the timer's lease may have passed to another worker (it is not fired). In a group, a store
        fault is raised: it abandons the group's transaction."""
        if not held.holds(lease.key):
            log.warning("timer %s: its lease lapsed before it fired; another worker may hold it", lease.key)
            return None
        topic = lease.payload["topic"]
        try:
            result = fn(topic, lease.payload["payload"])
            if result is not None and inspect.isawaitable(result):  # most handlers return None: no ABC check
                run_sync(result)
            return True
        except TransientError as exc:
            log.info("timer %s (%s) fires again in %ss: %s", lease.key, topic, self.retry_delay, exc)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                log.exception("timer %s (%s) failed; retrying in %ss", lease.key, topic, self.retry_delay)
            elif in_group:
                raise
            else:
                log.warning("timer %s (%s) met a store fault (%s: %s); retrying in %ss", lease.key, topic,
                            type(exc).__name__, exc, self.retry_delay)
        return False

    def _fire_group(
        self, held: _TimerLeases, group: Sequence[tuple[Lease, TimerHandler]], transaction: GroupTransaction,
        abandoned: list[Lease],
    ) -> int:
        """Fire one group in one transaction with its acknowledgement; returns how many timers it completed.
        The leases of a group whose transaction failed go to ``abandoned``, to be released."""
        leases = [lease for lease, _ in group]
        try:
            with transaction([lease.payload["payload"] for lease in leases]) as tx:
                done: list[Lease] = []
                again: list[Lease] = []
                for lease, fn in group:
                    ok = self._fire(held, lease, fn, in_group=True)
                    if ok is not None:
                        (done if ok else again).append(lease)
                held.settle_in(tx, done, None)
                held.settle_in(tx, again, self.retry_delay)
            return len(done)
        except Exception as exc:
            held.unsettle(leases)  # whatever the transaction did, the leases are still to renew and release
            log.warning("a group of %d timers was abandoned (%s: %s); they fire again in %ss", len(leases),
                        type(exc).__name__, exc, self.retry_delay)
            abandoned.extend(leases)
            return 0


class _TimerLeases(LeaseBatch):
    """The leases of one batch of claimed timers: renewed together by one heartbeat (one ``extend`` of every
    lease still held per beat), settled together, and known locally to be held until ``expires``.

    Timers settled inside a group's transaction while the batch still runs are ``settled``: neither renewed
    (their rows are gone, or released to others) nor counted as lost."""

    def __init__(self, store: SQLStore, leases: Sequence[Lease], lease_for: float) -> None:
        self.store = store
        self.leases = {lease.key: lease for lease in leases}
        self.settled: set[str] = set()
        super().__init__(store.clock, self.leases, expires=min(lease.expires_at for lease in leases),
                         lease_for=lease_for, what=f"{len(leases)} timers")

    def _extend(self, keys: list[Any], until: float) -> set[Any]:
        settled = self.settled
        live = [self.leases[k] for k in keys if k not in settled]
        try:
            if live:
                self.store.extend(live, lease_for=self.lease_for)
            return set(keys)
        except LeaseLostError:
            # One went to another worker, or was settled while this renewal waited: find which, one by one.
            still = {k for k in keys if k in settled}
            for lease in live:
                if lease.key in settled:
                    still.add(lease.key)
                    continue
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

    def settle_in(self, tx: Tx, leases: Sequence[Lease], delay: float | None) -> None:
        """Complete or release ``leases`` inside the caller's transaction ``tx``. A lease that was lost
        raises ``LeaseLostError``: the caller's transaction then holds part of the work and must roll back.

        It takes no lock: a renewal may be waiting on the store for ``tx`` to end (SQLite has one writer),
        holding the batch's lock; the leases are marked settled first, so that renewal skips them."""
        mine = [lease for lease in leases if lease.key not in self.lost]
        if len(mine) < len(leases):
            raise LeaseLostError(f"{len(leases) - len(mine)} of {len(leases)} timers went to another worker")
        self.settled.update(lease.key for lease in mine)
        self._settle(mine, delay, tx=tx)

    def unsettle(self, leases: Sequence[Lease]) -> None:
        """``leases`` were not settled after all (their transaction failed): renew them again."""
        self.settled.difference_update(lease.key for lease in leases)

    def _settle(self, leases: Sequence[Lease], delay: float | None, *, tx: Tx | None = None) -> None:
        if not leases:
            return
        if delay is None:
            self.store.complete(leases, tx=tx)
        else:
            self.store.release(leases, delay=delay, tx=tx)
