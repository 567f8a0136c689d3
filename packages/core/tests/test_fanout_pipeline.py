"""The relay pipeline: a route keeps up to ``max_in_flight`` batches in flight, commits its cursor as
acknowledgements arrive and never past one that has not, and publishes a stream's (an ordering key's) next batch
only once its previous batch was acknowledged."""

from __future__ import annotations

import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest
from errands.core import Event, FakeClock, FanOut, Journal, NewEvent, Route, TransientError, open_store


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    url = (f"sqlite:///{tmp_path / 'pipe.db'}" if request.param == "sqlite"
           else str(request.getfixturevalue("postgres_url")))
    s = open_store(url, clock=FakeClock())
    yield s
    s.close()


def streams_in_lanes(lanes: int) -> list[str]:
    """One stream name per lane of a route with ``max_in_flight=lanes``, lane 0 first."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < lanes:
        name = f"s{i}"
        found.setdefault(zlib.crc32(name.encode()) % lanes, name)
        i += 1
    return [found[k] for k in range(lanes)]


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class HeldSink:
    """Holds every batch in ``publish`` until the test acknowledges it (``ack``) or fails it (``fail``)."""

    name = "held"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: dict[str, tuple[threading.Event, list[BaseException]]] = {}  # by the batch's first id
        self.delivered: list[str] = []
        self.in_flight: list[list[str]] = []
        self.overlaps: list[tuple[str, ...]] = []

    def publish(self, events: Sequence[Event]) -> None:
        ids = [e.id for e in events]
        streams = {e.stream for e in events}
        gate = threading.Event()
        outcome: list[BaseException] = []
        with self.lock:
            for other in self.in_flight:
                shared = streams & {i.rpartition("/")[0] for i in other}
                if shared:
                    self.overlaps.append(tuple(sorted(shared)))
            self.in_flight.append(ids)
            self.waiting[ids[0]] = (gate, outcome)
        gate.wait(20)
        with self.lock:
            self.in_flight.remove(ids)
            del self.waiting[ids[0]]
            if outcome:
                raise outcome[0]
            self.delivered += ids

    def held(self) -> list[str]:
        with self.lock:
            return sorted(self.waiting)

    def ack(self, first_id: str, error: BaseException | None = None) -> None:
        with self.lock:
            gate, outcome = self.waiting[first_id]
            if error is not None:
                outcome.append(error)
        gate.set()


def run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    return t, out


def test_acknowledgements_out_of_order_move_the_cursor_only_past_the_acknowledged_prefix(store: Any) -> None:
    a, b, c = streams_in_lanes(3)
    # Positions 1..3 are a, b, c: one batch each, all in flight at once.
    Journal(store).append_many([NewEvent(s, "t", {}) for s in (a, b, c)])
    sink = HeldSink()
    fanout = FanOut(store, [Route("r", sink, batch_size=10, max_in_flight=3)])
    thread, out = run_in_thread(fanout.run_once)
    until(lambda: len(sink.held()) == 3, "three batches in flight")
    sink.ack(f"{c}/1")  # the last acknowledged first: the cursor stays before the first
    until(lambda: sink.delivered == [f"{c}/1"], "the last batch acknowledged")
    assert store.get_cursor("fanout:r") == 0
    sink.ack(f"{a}/1")  # now 1 is acknowledged, 2 is not: the cursor moves to 1, not past 2
    until(lambda: store.get_cursor("fanout:r") == 1, "the cursor at 1")
    assert sink.held() == [f"{b}/1"]
    sink.ack(f"{b}/1")
    thread.join(20)
    assert out == [3]
    assert store.get_cursor("fanout:r") == 3
    fanout.close()


def test_a_failed_middle_batch_holds_the_cursor_before_it_and_is_delivered_again_from_there(
    store: Any,
) -> None:
    a, b, c = streams_in_lanes(3)
    Journal(store).append_many([NewEvent(s, "t", {"n": n}) for n in range(2) for s in (a, b, c)])
    sink = HeldSink()
    fanout = FanOut(store, [Route("r", sink, batch_size=10, max_in_flight=3)])
    thread, out = run_in_thread(fanout.run_once)
    until(lambda: len(sink.held()) == 3, "three batches in flight")
    sink.ack(f"{a}/1")
    sink.ack(f"{b}/1", TransientError("busy", retry_after=1))  # the middle batch fails
    sink.ack(f"{c}/1")
    thread.join(20)
    assert out == [4]  # a's and c's two events each
    assert store.get_cursor("fanout:r") == 1  # before b's first event (position 2)
    store.clock.advance(2)
    thread, out = run_in_thread(fanout.run_once)
    until(lambda: sink.held() == [f"{b}/1"], "b published again, and only b")
    sink.ack(f"{b}/1")
    thread.join(20)
    assert out == [2]
    assert sorted(sink.delivered) == sorted(f"{s}/{q}" for s in (a, b, c) for q in (1, 2))
    assert store.get_cursor("fanout:r") == 6
    fanout.close()


def test_a_streams_next_batch_waits_for_the_acknowledgement_of_its_previous_one(store: Any) -> None:
    (a,) = streams_in_lanes(1)
    Journal(store).append_many([NewEvent(a, "t", {"n": n}) for n in range(6)])
    sink = HeldSink()
    fanout = FanOut(store, [Route("r", sink, batch_size=2, max_in_flight=1)])
    thread, out = run_in_thread(fanout.run_once)
    for first in (1, 3, 5):
        until(lambda first=first: sink.held() == [f"{a}/{first}"], f"the batch from {a}/{first}, alone")
        # The cursor follows the acknowledgements while the pass goes on.
        assert store.get_cursor("fanout:r") == first - 1
        sink.ack(f"{a}/{first}")
    thread.join(20)
    assert out == [6]
    assert sink.delivered == [f"{a}/{n}" for n in range(1, 7)]
    assert sink.overlaps == []
    fanout.close()


class CountingSink:
    """Acknowledges at once, in a random order of threads; records which streams were in flight together."""

    name = "counting"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.flying: list[set[str]] = []
        self.overlaps = 0
        self.most = 0
        self.ids: list[str] = []

    def publish(self, events: Sequence[Event]) -> None:
        streams = {e.stream for e in events}
        with self.lock:
            self.overlaps += sum(1 for other in self.flying if other & streams)
            self.flying.append(streams)
            self.most = max(self.most, len(self.flying))
        time.sleep(0.001)  # let other lanes' batches overlap this one
        with self.lock:
            self.flying.remove(streams)
            self.ids += [e.id for e in events]


def test_many_streams_keep_their_order_and_no_two_batches_of_one_stream_fly_together(store: Any) -> None:
    Journal(store).append_many([NewEvent(f"k{i % 13}", "t", {"i": i}) for i in range(1500)])
    sink = CountingSink()
    fanout = FanOut(store, [Route("r", sink, batch_size=7, max_in_flight=4)])
    assert fanout.drain() == 1500
    assert sink.overlaps == 0 and 1 <= sink.most <= 4
    last: dict[str, int] = {}
    for i in sink.ids:
        stream, _, seq = i.rpartition("/")
        assert int(seq) == last.get(stream, 0) + 1, i
        last[stream] = int(seq)
    assert store.get_cursor("fanout:r") == 1500
    fanout.close()


def test_a_store_fault_mid_pass_ends_it_only_after_the_batches_in_flight_answered(store: Any) -> None:
    a, b = streams_in_lanes(2)
    Journal(store).append_many([NewEvent(s, "t", {}) for s in (a, b)])
    sink = HeldSink()
    fanout = FanOut(store, [Route("r", sink, batch_size=10, max_in_flight=2)])
    real = fanout._commit
    faults = [ConnectionError("the database went away")]

    def commit(*args: Any) -> bool:
        if faults:
            raise faults.pop()
        return real(*args)

    fanout._commit = commit  # type: ignore[method-assign]  # a store fault on the first cursor commit
    raised: list[BaseException] = []

    def pass_() -> None:
        try:
            fanout.run_once()
        except ConnectionError as exc:
            raised.append(exc)

    thread = threading.Thread(target=pass_)
    thread.start()
    until(lambda: len(sink.held()) == 2, "two batches in flight")
    sink.ack(f"{a}/1")  # its cursor commit fails
    thread.join(0.3)
    assert thread.is_alive() and sink.held() == [f"{b}/1"]  # still waiting for b's answer
    sink.ack(f"{b}/1")
    thread.join(20)
    assert raised and not thread.is_alive()
    assert store.get_cursor("fanout:r") == 0  # nothing committed: the next pass delivers both again
    fanout.close()


def test_a_sink_publishes_in_the_context_of_the_pass(store: Any) -> None:
    import contextvars

    who: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")
    seen: list[str] = []

    class ContextSink:
        name = "context"

        def publish(self, events: Sequence[Event]) -> None:
            seen.append(who.get())  # e.g. the worker's runner made current, for run_sync in a sink

    a, b = streams_in_lanes(2)
    Journal(store).append_many([NewEvent(s, "t", {}) for s in (a, b)])
    fanout = FanOut(store, [Route("r", ContextSink(), batch_size=10, max_in_flight=2)])
    token = who.set("the worker")
    try:
        assert fanout.run_once() == 2
    finally:
        who.reset(token)
    assert seen == ["the worker", "the worker"]
    fanout.close()
