"""``InMemorySink``: a sink for tests that keeps what it received and fails on demand."""

from __future__ import annotations

import threading
from typing import Any, ClassVar, Iterable, Sequence

from .._values import Event
from ..errors import PermanentError, TransientError


class InMemorySink:
    """Keeps every accepted event in memory, in arrival order.

    Args:
        poison: event ids refused with ``PermanentError`` (any batch holding one is refused) until
            ``accept(id)``.
        transient_failures: how many ``publish`` calls fail with ``TransientError`` before it accepts.
        retry_after: the ``retry_after`` those transient failures carry.
        gone: refuse everything with a ``PermanentError`` that stops the route (like a webhook 410).
    """

    name: ClassVar[str] = "memory"

    def __init__(
        self, *, poison: Iterable[str] = (), transient_failures: int = 0, retry_after: float | None = None,
        gone: bool = False,
    ) -> None:
        self.events: list[Event] = []
        self.batches: list[list[str]] = []
        self.poison = set(poison)
        self.transient_failures = transient_failures
        self.retry_after = retry_after
        self.gone = gone
        self.calls = 0
        self.closed = False
        self._lock = threading.Lock()

    def publish(self, events: Sequence[Event]) -> None:
        with self._lock:
            self.calls += 1
            if self.gone:
                err = PermanentError("the endpoint is gone")
                err.stop_route = True
                raise err
            if self.transient_failures > 0:
                self.transient_failures -= 1
                raise TransientError("the sink is busy", retry_after=self.retry_after)
            bad = [e.id for e in events if e.id in self.poison]
            if bad:
                raise PermanentError(f"event {bad[0]} refused")
            self.events.extend(events)
            self.batches.append([e.id for e in events])

    def accept(self, event_id: str) -> None:
        """Stop refusing ``event_id``."""
        with self._lock:
            self.poison.discard(event_id)

    @property
    def ids(self) -> list[str]:
        """Ids of the accepted events, in arrival order (repeats included)."""
        with self._lock:
            return [e.id for e in self.events]

    def envelopes(self) -> list[dict[str, Any]]:
        """The CloudEvents envelopes of the accepted events, in arrival order."""
        with self._lock:
            return [e.to_cloudevent() for e in self.events]

    def close(self) -> None:
        self.closed = True
