"""What a sink's answers mean for a route, as pure functions with no store: whether a publish that raised
failed for now (retry after ``backoff``), refused its events for good (park them) or asked the route to
stop; and where a window of lanes, with the events delivered, leaves the route's cursor.

The engine (``_fanout``) publishes and writes the results through ``_fanout_table`` and the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ._backoff import backoff
from ._values import Event, _StrEnum
from .errors import PermanentError


class RouteState(_StrEnum):
    """Whether a route is delivering."""

    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


class Verdict(_StrEnum):
    """What a ``publish`` that raised means for the events it was given."""

    RETRY = "RETRY"  # failed for now: hold the cursor before them and publish again after a back-off
    PARK = "PARK"  # refused for good: a batch is published again event by event; a single event is parked
    STOP = "STOP"  # the sink asks the route to stop (``stop_route``): hold the cursor until it is resumed


def verdict(exc: Exception) -> Verdict:
    """The verdict on a publish that raised ``exc``. Only a ``PermanentError`` refuses for good; anything
    else a sink raises may pass, so it is retried."""
    if isinstance(exc, PermanentError):
        return Verdict.STOP if getattr(exc, "stop_route", False) else Verdict.PARK
    return Verdict.RETRY


@dataclass
class Lane:
    """One lane of a window (the events of some streams, in order, in batches) and what publishing it did:
    the events delivered and parked, and the event it stopped at (``failed_at``) with the sink's error."""

    batches: list[list[Event]]
    delivered: list[Event] = field(default_factory=list)
    parked: list[tuple[Event, str]] = field(default_factory=list)
    failed_at: Event | None = None
    error: Exception | None = None
    stopped: bool = False

    def hold(self, event: Event, exc: Exception, verdict: Verdict) -> None:
        """Stop the lane at ``event``, which the sink did not take (``RETRY`` or ``STOP``)."""
        self.failed_at, self.error, self.stopped = event, exc, verdict is Verdict.STOP


@dataclass(frozen=True, slots=True)
class Window:
    """Where a published window leaves its route.

    ``cursor`` is just before the earliest event not delivered (or the last position scanned when every lane
    got through); ``ahead`` holds the events past it that were delivered or parked already, to skip when the
    window is read again. ``stop`` is the error of a sink that asked the route to stop; else ``retry``, the
    error to back off on.
    """

    cursor: int
    ahead: dict[str, int]
    delivered: int
    parked: list[tuple[Event, str]]
    stop: Exception | None
    retry: Exception | None


def settle(last: int, lanes: Sequence[Lane]) -> Window:
    """The outcome of a window whose scan ended at position ``last``, published as ``lanes``."""
    held = [lane.failed_at.position for lane in lanes if lane.failed_at is not None]
    cursor = min(held) - 1 if held else last
    done = [ev for lane in lanes for ev in (*lane.delivered, *(e for e, _ in lane.parked))]
    errors = [lane for lane in lanes if lane.error is not None]
    stop = next((lane.error for lane in errors if lane.stopped), None)
    return Window(
        cursor=cursor,
        ahead={ev.id: ev.position for ev in done if ev.position > cursor},
        delivered=sum(len(lane.delivered) for lane in lanes),
        parked=[p for lane in lanes for p in lane.parked],
        stop=stop,
        retry=None if stop is not None or not errors else errors[0].error,
    )


def retry_delay(attempt: int, exc: Exception, *, base: float, cap: float) -> float:
    """Seconds before a route publishes again after its ``attempt``-th failure in a row: the shared
    ``backoff``, or the sink's ``retry_after`` bounded like a ``Retry-After`` header (NaN or none: backoff;
    ``inf`` or absurd: ``MAX_RETRY_AFTER``)."""
    return backoff(attempt, base=base, cap=cap, retry_after=getattr(exc, "retry_after", None))
