"""What a sink's answers mean for a route, checked on the pure transitions alone: no store, no sink."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest
from errands.core import MAX_RETRY_AFTER, ConfigError, Event, PermanentError, TransientError
from errands.core._fanout_transitions import Lane, Verdict, Window, retry_delay, settle, verdict


def ev(position: int, stream: str = "s/1") -> Event:
    return Event(id=f"{stream}/{position}", stream=stream, seq=position, subject="order.placed", type="order.placed",
                 data={}, time=datetime(2026, 1, 1, tzinfo=timezone.utc), position=position)


class StopRoute(PermanentError):
    stop_route = True


@pytest.mark.parametrize(("exc", "expected"), [
    (TransientError("later"), Verdict.RETRY),
    (ConnectionError("reset"), Verdict.RETRY),  # whatever a sink raises may pass: retried
    (ConfigError("bad"), Verdict.RETRY),
    (PermanentError("refused"), Verdict.PARK),
    (StopRoute("sink says stop"), Verdict.STOP),
])
def test_verdicts(exc: Exception, expected: Verdict) -> None:
    assert verdict(exc) is expected


def test_a_window_every_lane_delivered_moves_the_cursor_to_the_last_position_scanned() -> None:
    a, b = Lane([[ev(1), ev(3)]]), Lane([[ev(2, "s/2")]])
    a.delivered.extend([ev(1), ev(3)])
    b.delivered.append(ev(2, "s/2"))
    assert settle(10, [a, b]) == Window(cursor=10, ahead={}, delivered=3, parked=[], stop=None, retry=None)


def test_parked_events_let_the_cursor_pass_them() -> None:
    lane = Lane([[ev(1), ev(2)]])
    lane.delivered.append(ev(1))
    lane.parked.append((ev(2), "PermanentError: refused"))
    window = settle(5, [lane])
    assert window.cursor == 5 and window.delivered == 1 and window.parked == [(ev(2), "PermanentError: refused")]
    assert window.retry is None and window.stop is None


def test_a_transient_failure_holds_the_cursor_before_the_earliest_event_not_delivered() -> None:
    error = TransientError("503")
    held, through = Lane([[ev(4)], [ev(6)]]), Lane([[ev(5, "s/2"), ev(7, "s/2")]])
    held.delivered.append(ev(4))
    held.hold(ev(6), error, Verdict.RETRY)
    through.delivered.extend([ev(5, "s/2"), ev(7, "s/2")])
    through.parked.append((ev(8, "s/2"), "PermanentError: no"))
    window = settle(9, [held, through])
    assert window.cursor == 5 and window.retry is error and window.stop is None and window.delivered == 3
    # What another lane already delivered or parked past the cursor is skipped when the window is read again.
    assert window.ahead == {"s/2/7": 7, "s/2/8": 8}


def test_a_sink_that_asks_to_stop_stops_the_route_rather_than_backing_off() -> None:
    stop, later = StopRoute("stop"), TransientError("later")
    a, b = Lane([[ev(2)]]), Lane([[ev(3, "s/2")]])
    a.hold(ev(2), later, Verdict.RETRY)
    b.hold(ev(3, "s/2"), stop, Verdict.STOP)
    window = settle(3, [a, b])
    assert window.cursor == 1 and window.stop is stop and window.retry is None
    assert a.stopped is False and b.stopped is True


def test_the_retry_delay_is_the_backoff_or_the_sinks_bounded_retry_after() -> None:
    first = retry_delay(1, TransientError(), base=0.5, cap=60)
    assert 0.25 <= first <= 0.5
    assert 30 <= retry_delay(10, TransientError(), base=0.5, cap=60) <= 60
    assert retry_delay(1, TransientError(retry_after=12), base=0.5, cap=60) == 12
    assert retry_delay(1, TransientError(retry_after=math.inf), base=0.5, cap=60) == MAX_RETRY_AFTER
    assert 0.25 <= retry_delay(1, ValueError("no retry_after"), base=0.5, cap=60) <= 0.5
