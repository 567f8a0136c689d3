"""The journal (append-only event log) and the store-backed timer scheduler."""

from __future__ import annotations

import inspect
import logging
from datetime import datetime
from typing import Any, Awaitable, Callable, Mapping, Sequence

from ._store import NewEvent, SQLStore, as_epoch, new_id
from ._values import Event

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
        lease_for: seconds a firing holds its timer before another worker may take it.
        queue: the store queue the timers live in. An engine that fires its own timers gives them a queue
            of their own, so that no other worker's ``fire_due`` claims (and parks) them.
    """

    name = "store"

    def __init__(
        self, store: SQLStore, *, lease_for: float = 60.0, retry_delay: float = 5.0, queue: str = TIMER_QUEUE
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
        has no handler here are released for another worker.

        Returns:
            How many timers fired and completed.
        """
        leases = self.store.claim(self.queue, limit, lease_for=self.lease_for)
        done, again, unknown = [], [], []
        for lease in leases:
            topic, payload = lease.payload["topic"], lease.payload["payload"]
            fn = handlers.get(topic) if isinstance(handlers, Mapping) else handlers
            if fn is None:
                unknown.append(lease)
                continue
            try:
                result = fn(topic, payload)
                if inspect.isawaitable(result):
                    import asyncio

                    asyncio.run(_await(result))
                done.append(lease)
            except Exception:
                log.exception("timer %s (%s) failed; retrying in %ss", lease.key, topic, self.retry_delay)
                again.append(lease)
        if done:
            self.store.complete(done)
        if again or unknown:
            self.store.release(again + unknown, delay=self.retry_delay)
        return len(done)


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw
