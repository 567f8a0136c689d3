from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import pytest
from errands.core import (
    ConfigError,
    Event,
    FakeClock,
    FanOut,
    Journal,
    MemoryStore,
    NewEvent,
    NotFoundError,
    Route,
    RouteState,
    TransientError,
    open_store,
)
from errands.core._fanout import PASS_WINDOWS
from errands.core.testing import InMemorySink, SinkContract


@pytest.fixture
def store(clock: FakeClock) -> Any:
    s = MemoryStore(clock=clock)
    yield s
    s.close()


def append(store: Any, n: int, streams: int = 4, subject: str = "order.placed") -> list[Event]:
    return Journal(store).append_many(
        [NewEvent(f"orders/{i % streams}", "order.placed", {"i": i}, subject=subject) for i in range(n)]
    )


def per_stream_in_order(ids: Sequence[str]) -> bool:
    last: dict[str, int] = {}
    for i in ids:
        stream, _, seq = i.rpartition("/")
        if int(seq) > last.get(stream, 0) + 1:
            return False
        last[stream] = int(seq)
    return True


def first_deliveries_in_order(ids: Sequence[str]) -> bool:
    """Each stream's events, counting only the first delivery of each, in order with no gap (what a consumer that
    drops duplicates by event id sees)."""
    seen: set[str] = set()
    return per_stream_in_order([i for i in ids if not (i in seen or seen.add(i))])


class TestInMemorySinkContract(SinkContract):
    @pytest.fixture
    def sink(self) -> InMemorySink:
        return InMemorySink()

    def delivered(self, sink: InMemorySink) -> list[dict[str, Any]]:
        return sink.envelopes()


def test_relays_matching_events_and_moves_the_cursor(store: Any) -> None:
    journal = Journal(store)
    journal.append("orders/1", "order.placed", {"n": 1})
    journal.append("pay/1", "payment.done", {"n": 2}, subject="payment.done")
    journal.append("orders/1", "order.shipped", {"n": 3}, subject="order.shipped.eu")
    sink = InMemorySink()
    fanout = FanOut(store, [Route(name="audit", sink=sink, subjects=["order.**"])])
    assert fanout.run_once() == 2
    assert sink.ids == ["orders/1/1", "orders/1/2"]
    assert fanout.run_once() == 0
    assert store.get_cursor("fanout:audit") == journal.last_position()
    journal.append("orders/1", "order.closed", subject="order.closed")
    assert fanout.run_once() == 1
    assert sink.ids[-1] == "orders/1/3"


def test_cursor_is_durable_across_instances(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    store = open_store(url)
    one_pass = 10 * PASS_WINDOWS  # a pass reads at most PASS_WINDOWS windows of batch_size x max_in_flight
    append(store, one_pass + 20)
    first = InMemorySink()
    FanOut(store, [Route("r", first, batch_size=10)]).run_once()
    assert len(first.ids) == one_pass
    store.close()
    store = open_store(url)
    second = InMemorySink()
    assert FanOut(store, [Route("r", second, batch_size=10)]).drain() == 20
    assert sorted(first.ids + second.ids, key=lambda i: (i.split("/")[1], int(i.split("/")[2]))) == sorted(
        {*first.ids, *second.ids}, key=lambda i: (i.split("/")[1], int(i.split("/")[2])))
    assert len(set(first.ids) | set(second.ids)) == one_pass + 20
    store.close()


def test_batches_and_in_flight_lanes_keep_stream_order(store: Any) -> None:
    append(store, 500, streams=7)
    sink = InMemorySink()
    fanout = FanOut(store, [Route("r", sink, batch_size=16, max_in_flight=4)])
    assert fanout.drain() == 500
    assert len(set(sink.ids)) == 500 and per_stream_in_order(sink.ids)
    assert max(len(b) for b in sink.batches) <= 16
    fanout.close()


def test_parallel_lanes_publish_concurrently(store: Any) -> None:
    append(store, 40, streams=8)
    barrier = threading.Barrier(2, timeout=5)
    entered = []

    class Slow(InMemorySink):
        def publish(self, events: Sequence[Event]) -> None:
            entered.append(1)
            if len(entered) <= 2:
                barrier.wait()  # the first two batches must be in publish at the same time
            super().publish(events)

    sink = Slow()
    fanout = FanOut(store, [Route("r", sink, batch_size=5, max_in_flight=2)])
    assert fanout.drain() == 40
    assert len(sink.ids) == 40
    fanout.close()


def test_transient_error_retries_with_backoff_honouring_retry_after(store: Any, clock: FakeClock) -> None:
    append(store, 5)
    sink = InMemorySink(transient_failures=2, retry_after=30)
    fanout = FanOut(store, [Route("r", sink)])
    assert fanout.run_once() == 0
    assert fanout.run_once() == 0 and sink.calls == 1  # waiting out retry_after
    clock.advance(29)
    assert fanout.run_once() == 0 and sink.calls == 1
    clock.advance(2)
    assert fanout.run_once() == 0 and sink.calls == 2
    status = fanout.status()[0]
    assert status.retry_at is not None and status.behind == 5
    clock.advance(31)
    assert fanout.run_once() == 5
    assert sink.ids == [e.id for e in Journal(store).read(0)]


def test_backoff_without_retry_after_grows(store: Any, clock: FakeClock) -> None:
    append(store, 1)
    sink = InMemorySink(transient_failures=3)
    fanout = FanOut(store, [Route("r", sink)], retry_base=1.0, retry_cap=100)
    delays = []
    for _ in range(3):
        fanout.run_once()
        delays.append(fanout.status()[0].retry_at - clock.now())  # type: ignore[operator]
        clock.advance(200)
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 2.0 <= delays[2] <= 4.0
    assert fanout.run_once() == 1


def test_poison_event_is_parked_and_the_route_moves_on(store: Any) -> None:
    events = append(store, 20, streams=2)
    poison = events[7].id
    sink = InMemorySink(poison=[poison])
    fanout = FanOut(store, [Route("r", sink, batch_size=5)])
    assert fanout.drain() == 19
    assert poison not in sink.ids and len(set(sink.ids)) == 19
    later = [e.id for e in events[8:]]
    assert set(later) <= set(sink.ids)
    dead = fanout.dead("r")
    assert [d.event.id for d in dead] == [poison]
    assert "refused" in dead[0].error and dead[0].attempts == 1 and not dead[0].redrive
    assert dead[0].event.data == {"i": 7}
    assert fanout.status()[0].dead == 1
    # Redrive while it is still refused: stays parked, attempts counted.
    assert fanout.redrive("r") == 1
    assert fanout.run_once() == 0
    assert fanout.dead("r")[0].attempts == 2
    sink.accept(poison)
    assert fanout.redrive("r", [poison]) == 1
    assert fanout.run_once() == 1
    assert sink.ids.count(poison) == 1
    assert fanout.dead("r") == []
    assert fanout.run_once() == 0


def test_redrive_of_an_unknown_event_names_it(store: Any) -> None:
    fanout = FanOut(store, [Route("r", InMemorySink())])
    with pytest.raises(NotFoundError, match="no parked event 'x/1'"):
        fanout.redrive("r", ["x/1"])
    assert fanout.redrive("r") == 0


def test_a_permanent_failure_of_a_whole_batch_parks_only_the_failing_events(store: Any) -> None:
    events = append(store, 10, streams=1)
    sink = InMemorySink(poison=[events[2].id, events[6].id])
    fanout = FanOut(store, [Route("r", sink, batch_size=10)])
    assert fanout.run_once() == 8
    assert [d.event.id for d in fanout.dead("r")] == [events[2].id, events[6].id]
    assert sink.ids == [e.id for i, e in enumerate(events) if i not in (2, 6)]


def test_stop_route_error_stops_the_route_and_says_so(store: Any, caplog: Any) -> None:
    append(store, 5)
    sink = InMemorySink(gone=True)
    fanout = FanOut(store, [Route("hooks", sink)])
    with caplog.at_level(logging.ERROR, logger="errands.fanout"):
        assert fanout.run_once() == 0
    assert "route hooks stopped" in caplog.text
    status = fanout.status()[0]
    assert status.state is RouteState.STOPPED and "gone" in (status.reason or "")
    assert status.cursor == 0 and fanout.dead("hooks") == []
    calls = sink.calls
    assert fanout.run_once() == 0 and sink.calls == calls
    sink.gone = False
    assert fanout.resume("hooks") is True
    assert fanout.run_once() == 5
    assert fanout.status()[0].state is RouteState.RUNNING


def test_unexpected_exception_is_retried_not_lost(store: Any, clock: FakeClock) -> None:
    append(store, 3)
    calls = []

    class Flaky(InMemorySink):
        def publish(self, events: Sequence[Event]) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("boom")
            super().publish(events)

    sink = Flaky()
    fanout = FanOut(store, [Route("r", sink)])
    assert fanout.run_once() == 0
    clock.advance(120)
    assert fanout.run_once() == 3


def test_failure_in_one_lane_does_not_redeliver_other_lanes_in_process(store: Any, clock: FakeClock) -> None:
    append(store, 40, streams=8)
    failing: set[str] = set()

    class OneLaneFails(InMemorySink):
        def publish(self, events: Sequence[Event]) -> None:
            if failing and any(e.stream in failing for e in events):
                raise TransientError("busy", retry_after=1)
            super().publish(events)

    sink = OneLaneFails()
    failing.add("orders/0")
    fanout = FanOut(store, [Route("r", sink, batch_size=50, max_in_flight=4)])
    fanout.run_once()
    first = list(sink.ids)
    assert first and all(not i.startswith("orders/0/") for i in first)
    failing.clear()
    clock.advance(2)
    fanout.drain()
    assert len(sink.ids) == 40 == len(set(sink.ids))
    assert per_stream_in_order(sink.ids)


def test_async_sink(store: Any) -> None:
    append(store, 12)
    got: list[str] = []

    class AsyncSink:
        name = "async"

        async def publish(self, events: Sequence[Event]) -> None:
            got.extend(e.id for e in events)

    fanout = FanOut(store, [Route("r", AsyncSink(), batch_size=5, max_in_flight=2)])
    assert fanout.drain() == 12
    assert sorted(got) == sorted(e.id for e in Journal(store).read(0))
    fanout.close()


def test_start_at_end_skips_history(store: Any) -> None:
    append(store, 5)
    sink = InMemorySink()
    fanout = FanOut(store, [Route("late", sink, start="end")])
    assert fanout.run_once() == 0
    append(store, 2)
    assert fanout.run_once() == 2


def test_two_routes_have_their_own_cursors(store: Any) -> None:
    append(store, 6)
    a, b = InMemorySink(), InMemorySink(transient_failures=1, retry_after=60)
    fanout = FanOut(store, [Route("a", a), Route("b", b)])
    assert fanout.run_once() == 6
    assert len(a.ids) == 6 and b.ids == []
    assert {s.name: s.behind for s in fanout.status()} == {"a": 0, "b": 6}


def test_bad_routes_are_refused_with_every_problem_named(store: Any) -> None:
    with pytest.raises(ConfigError) as info:
        Route("bad name", object(), subjects="order.*", batch_size=0)  # type: ignore[arg-type]
    text = str(info.value)
    assert "route name" in text and "sink must have a publish" in text
    assert "subjects must be a list" in text and "batch_size must be a positive integer, got 0" in text
    with pytest.raises(ConfigError, match=r"'\*\*' may only be the last token"):
        Route("r", InMemorySink(), subjects=["**.x"])
    with pytest.raises(ConfigError, match="used twice"):
        FanOut(store, [Route("r", InMemorySink()), Route("r", InMemorySink())])


def test_close_closes_sinks(store: Any) -> None:
    sink = InMemorySink()
    FanOut(store, [Route("r", sink)]).close()
    assert sink.closed


def test_runs_in_the_worker(store: Any) -> None:
    from errands.core import Worker

    append(store, 25)
    sink = InMemorySink()
    worker = Worker(store, fanout=FanOut(store, [Route("r", sink, batch_size=10)]))
    worker.drain()
    assert len(sink.ids) == 25


def test_from_config(store: Any) -> None:
    from errands.core import ErrandsConfig

    sink = InMemorySink()
    config = ErrandsConfig(store="memory://", connectors={}, sinks={"audit": sink},
                            routes={"audit": {"subjects": ["order.**"], "batch_size": 3}}, worker={}, raw={})
    fanout = FanOut.from_config(store, config)
    assert fanout.routes[0].batch_size == 3 and fanout.routes[0].subjects == ["order.**"]
    append(store, 4)
    assert fanout.drain() == 4


@pytest.mark.services
def test_on_postgres(postgres_url: str) -> None:
    store = open_store(postgres_url)
    try:
        events = append(store, 200, streams=5)
        sink = InMemorySink(poison=[events[50].id])
        fanout = FanOut(store, [Route("pg", sink, batch_size=20, max_in_flight=3)])
        assert fanout.drain() == 199
        for s in range(5):
            seqs = [int(i.rsplit("/", 1)[1]) for i in sink.ids if i.startswith(f"orders/{s}/")]
            assert seqs == sorted(set(seqs))
        assert [d.event.id for d in fanout.dead("pg")] == [events[50].id]
        sink.accept(events[50].id)
        fanout.redrive("pg")
        assert fanout.run_once() == 1
        fanout.close()
    finally:
        store.close()


def test_events_appended_in_the_callers_transaction_are_relayed_only_once_committed(tmp_path: Any) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'tx.db'}")
    sink = InMemorySink()
    fanout = FanOut(store, [Route("r", sink)])
    journal = Journal(store)
    conn = store.connect()
    conn.execute("CREATE TABLE orders (id TEXT)")
    conn.commit()
    conn.execute("INSERT INTO orders VALUES ('42')")
    journal.append("orders/42", "order.placed", {"n": 1}, conn=conn)
    conn.rollback()
    assert fanout.run_once() == 0 and journal.read(0) == []
    conn.execute("INSERT INTO orders VALUES ('43')")
    journal.append("orders/43", "order.placed", {"n": 2}, conn=conn)
    conn.commit()
    conn.close()
    assert fanout.run_once() == 1 and sink.ids == ["orders/43/1"]
    fanout.close()
    store.close()


def test_two_relays_on_one_route_deliver_everything_and_notice_each_other(tmp_path: Any, caplog: Any) -> None:
    url = f"sqlite:///{tmp_path / 'two.db'}"
    store_a, store_b = open_store(url), open_store(url)
    append(store_a, 100, streams=3)
    sink = InMemorySink()
    a = FanOut(store_a, [Route("shared", sink, batch_size=10)])
    b = FanOut(store_b, [Route("shared", sink, batch_size=10)])
    a.status(), b.status()  # both hold cursor 0
    assert a.run_once() == 10 * PASS_WINDOWS
    with caplog.at_level(logging.WARNING, logger="errands.fanout"):
        b.run_once()  # publishes from its stale cursor, then its compare-and-set fails
    assert "moved by another process" in caplog.text
    for _ in range(20):
        a.run_once()
        b.run_once()
    assert set(sink.ids) == {e.id for e in Journal(store_a).read(0, limit=200)}
    # The stale relay's redeliveries come after the other relay's first ones: in order once duplicates are dropped.
    assert first_deliveries_in_order(sink.ids)
    assert store_a.get_cursor("fanout:shared") == 100
    for part in (a, b, store_a, store_b):
        part.close()
