"""``FanOut.stored_status``: what the store alone says of every route, for readers without the sinks."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from errands.core import FakeClock, FanOut, Journal, MemoryStore, Route, RouteState
from errands.core.testing import InMemorySink


@pytest.fixture
def store(clock: FakeClock) -> Iterator[Any]:
    s = MemoryStore(clock=clock)
    yield s
    s.close()


def test_stored_status_matches_the_running_fanout(store: Any) -> None:
    journal = Journal(store)
    events = [journal.append(f"s/{i % 2}", "thing.happened", {"i": i}) for i in range(6)]
    fanout = FanOut(store, [Route("audit", InMemorySink(poison=[events[2].id])), Route("other", InMemorySink())])
    try:
        fanout.drain()
        journal.append("s/0", "thing.happened", {"i": 6})
        stored = {s.name: s for s in FanOut.stored_status(store)}
        live = {s.name: s for s in fanout.status()}
    finally:
        fanout.close()
    assert set(stored) == {"audit", "other"}
    for name in stored:
        assert (stored[name].cursor, stored[name].behind, stored[name].dead) == (
            live[name].cursor, live[name].behind, live[name].dead)
        assert stored[name].state is RouteState.RUNNING and stored[name].retry_at is None
    assert stored["audit"].dead == 1 and stored["audit"].behind == 1


def test_stored_status_of_a_store_without_routes_is_empty(store: Any) -> None:
    assert FanOut.stored_status(store) == []
