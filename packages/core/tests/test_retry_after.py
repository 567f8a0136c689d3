"""One ``Retry-After`` reading (RFC 9110 §10.2.3) for every connector, sink and engine."""

from __future__ import annotations

import math
from typing import Any

import pytest
from errands.core import (
    MAX_RETRY_AFTER,
    FakeClock,
    FanOut,
    Journal,
    MemoryStore,
    Route,
    TransientError,
    clamp_retry_after,
    parse_retry_after,
)
from errands.core.testing import InMemorySink

NOW = 1445412470.0  # Wed, 21 Oct 2015 07:27:50 GMT


@pytest.mark.parametrize(("value", "expected"), [
    ("0", 0.0), ("30", 30.0), (" 30 ", 30.0), ("1.5", 1.5), (b"12", 12.0),
    ("-4", 0.0),                                   # negative: retry now
    (str(10 ** 12), MAX_RETRY_AFTER),              # absurd but valid delay-seconds: capped
    ("9" * 400, MAX_RETRY_AFTER),                  # so large a float overflows to inf: still capped
    ("", None), ("   ", None), (None, None), ("later", None),
    ("inf", None), ("-inf", None), ("Infinity", None), ("nan", None), ("NaN", None), ("1e3", None),
    ("0x10", None), ("12 seconds", None),
])
def test_delay_seconds(value: Any, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(("value", "expected"), [
    ("Wed, 21 Oct 2015 07:28:00 GMT", 10.0),       # IMF-fixdate
    ("Wednesday, 21-Oct-15 07:28:00 GMT", 10.0),   # obsolete RFC 850 form
    ("Wed Oct 21 07:28:00 2015", 10.0),            # asctime form carries no zone: it is GMT
    ("Wed, 21 Oct 2015 07:28:00", 10.0),           # naive: GMT
    ("Wed, 21 Oct 2015 07:28:00 -0000", 10.0),     # "-0000" (zone unknown): GMT
    ("Wed, 21 Oct 2015 09:28:00 +0200", 10.0),     # an explicit offset is honoured
    ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),        # in the past: retry now
    ("Thu, 22 Oct 2015 07:28:00 GMT", MAX_RETRY_AFTER),  # a day ahead: capped
    ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_AFTER),
    ("Wed, 31 Feb 2015 07:28:00 GMT", None),       # no such day
    ("Wed, 21 Oct 99999 07:28:00 GMT", None),
])
def test_http_dates(value: str, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == (pytest.approx(expected) if expected is not None else None)


def test_the_maximum_can_be_lowered_per_call() -> None:
    assert parse_retry_after("600", maximum=60) == 60.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:38:00 GMT", now=NOW, maximum=60) == 60.0
    assert clamp_retry_after(600, maximum=60) == 60.0


@pytest.mark.parametrize("maximum", [-1.0, math.inf, math.nan])
def test_a_maximum_that_is_not_a_finite_non_negative_number_is_refused(maximum: float) -> None:
    with pytest.raises(ValueError, match="maximum"):
        parse_retry_after("5", maximum=maximum)


@pytest.mark.parametrize(("seconds", "expected"), [
    (7, 7.0), (2.5, 2.5), (0, 0.0), (-3, 0.0), (-math.inf, 0.0),
    (math.inf, MAX_RETRY_AFTER), (1e300, MAX_RETRY_AFTER),
    (math.nan, None), (None, None), (True, None), ("30", None),
])
def test_clamp_bounds_a_number_a_plugin_hands_over(seconds: Any, expected: float | None) -> None:
    assert clamp_retry_after(seconds) == expected


def test_maximum_is_an_hour() -> None:
    assert MAX_RETRY_AFTER == 3600.0


@pytest.fixture
def store(clock: FakeClock) -> Any:
    s = MemoryStore(clock=clock)
    yield s
    s.close()


@pytest.mark.parametrize("retry_after", [math.inf, 1e300])
def test_fanout_route_asked_to_wait_forever_retries_after_the_maximum(store: Any, clock: FakeClock,
                                                                      retry_after: float) -> None:
    Journal(store).append("orders/1", "order.placed", {"n": 1}, subject="order.placed")
    sink = InMemorySink(transient_failures=1, retry_after=retry_after)
    fanout = FanOut(store, [Route("r", sink)])
    assert fanout.run_once() == 0 and sink.calls == 1
    status = fanout.status()[0]
    assert status.retry_at is not None and math.isfinite(status.retry_at)
    clock.advance(MAX_RETRY_AFTER + 1)
    assert fanout.run_once() == 1, "the route waited at most MAX_RETRY_AFTER, not forever"
    fanout.close()


def test_fanout_nan_retry_after_falls_back_to_backoff(store: Any, clock: FakeClock) -> None:
    Journal(store).append("orders/1", "order.placed", {"n": 1}, subject="order.placed")

    class NanSink:
        name = "nan"
        calls = 0

        def publish(self, events: Any) -> None:
            NanSink.calls += 1
            if NanSink.calls == 1:
                raise TransientError("busy", retry_after=math.nan)

    fanout = FanOut(store, [Route("r", NanSink())], retry_base=1.0, retry_cap=10.0)
    fanout.run_once()
    delay = fanout.status()[0].retry_at - clock.now()  # type: ignore[operator]
    assert 0.5 <= delay <= 1.0
    clock.advance(2)
    assert fanout.run_once() == 1
    fanout.close()
