"""Fan-out's rows on a real store: the journal read by position (``Store.events_at``), the parked events and
route cursors of ``_fanout_table``, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from errands.core import FakeClock, FanOut, Journal, NewEvent, Route, open_store
from errands.core import _fanout_table as table
from errands.core.testing import InMemorySink


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path / 'f.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = open_store(url, clock=FakeClock())
    yield s
    s.close()


def test_events_at_reads_the_journal_by_position_oldest_first(store: Any) -> None:
    events = Journal(store).append_many([NewEvent(f"orders/{i % 3}", "order.placed", {"n": i}) for i in range(1200)])
    by_position = {e.position: e for e in events}
    wanted = [events[900].position, events[3].position, events[3].position, events[1100].position]
    got = store.events_at(wanted)
    assert [e.position for e in got] == sorted({*wanted})
    assert [(e.id, e.data) for e in got] == [(by_position[p].id, by_position[p].data) for p in sorted({*wanted})]
    everything = store.events_at([e.position for e in reversed(events)])  # more than one chunk
    assert [e.id for e in everything] == [e.id for e in events]
    assert store.events_at([]) == []
    assert store.events_at([events[-1].position + 1, 0]) == []  # positions with no event are left out


def test_parked_events_and_cursors_as_the_command_line_reads_them(store: Any) -> None:
    events = Journal(store).append_many([NewEvent("orders/1", "order.placed", {"n": i}) for i in range(6)])
    refuse = InMemorySink(poison=[events[1].id, events[4].id])
    fanout = FanOut(store, [Route("partner", refuse, batch_size=3), Route("audit", InMemorySink())])
    assert fanout.drain() == 4 + 6
    with store.read() as tx:
        assert table.cursors(tx) == [("audit", events[-1].position), ("partner", events[-1].position)]
        assert table.parked_counts(tx) == {"partner": 2}
        rows = table.parked(tx, None, 10)
        assert [(r.route, r.position, r.attempts, r.redrive) for r in rows] == [
            ("partner", events[1].position, 1, False), ("partner", events[4].position, 1, False)]
        assert table.parked_ids(tx, "partner", [events[4].id, "x/1"]) == {events[4].id}
    assert fanout.redrive("partner", [events[4].id]) == 1
    with store.read() as tx:
        assert table.to_redrive(tx, "partner", 10) == [events[4].position]
    fanout.close()
