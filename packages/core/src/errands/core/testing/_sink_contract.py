"""``SinkContract``: the behaviour every errands sink must show. Subclass it, supply ``sink`` and
``delivered``."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Sequence

import pytest

from .._fanout import FanOut, Route
from .._journal import Journal
from .._protocols import Sink
from .._values import Event
from ..store._stores import MemoryStore, NewEvent


def _publish(sink: Any, events: Sequence[Event]) -> None:
    result = sink.publish(events)
    if inspect.isawaitable(result):
        async def wait() -> None:
            await result

        asyncio.run(wait())


class SinkContract:
    """Subclass, override the ``sink`` fixture and ``delivered(sink)``.

    ``delivered`` returns the CloudEvents envelopes (dicts) the sink's destination received, in arrival
    order: read back the file, the HTTP server's log, the topic.
    """

    @pytest.fixture
    def sink(self) -> Any:  # pragma: no cover - must be overridden
        raise NotImplementedError("override the sink fixture")

    def delivered(self, sink: Any) -> list[dict[str, Any]]:  # pragma: no cover - must be overridden
        raise NotImplementedError("override delivered(sink)")

    @pytest.fixture
    def contract_store(self) -> Any:
        store = MemoryStore()
        yield store
        store.close()

    def events(self, store: Any, n: int, streams: int = 3) -> list[Event]:
        return Journal(store).append_many([
            NewEvent(f"orders/{i % streams}", "order.placed", {"i": i, "name": "Zoë ✓", "lines": [{"sku": i}]},
                     subject=f"order.placed.s{i % streams}")
            for i in range(n)
        ])

    def test_declares_a_name_and_fits_the_protocol(self, sink: Any) -> None:
        name = getattr(type(sink), "name", None)
        assert isinstance(name, str) and name
        assert isinstance(sink, Sink)

    def test_publishes_cloudevents_envelopes(self, sink: Any, contract_store: Any) -> None:
        events = self.events(contract_store, 3)
        _publish(sink, events)
        got = self.delivered(sink)
        assert [g["id"] for g in got] == [e.id for e in events]
        for envelope, event in zip(got, events):
            assert envelope == event.to_cloudevent()
            assert envelope["specversion"] == "1.0"
            assert {"id", "source", "type", "subject", "time", "datacontenttype", "data"} <= set(envelope)

    def test_empty_batch_delivers_nothing(self, sink: Any) -> None:
        _publish(sink, [])
        assert self.delivered(sink) == []

    def test_keeps_the_order_of_a_batch(self, sink: Any, contract_store: Any) -> None:
        events = self.events(contract_store, 20, streams=2)
        _publish(sink, events)
        assert [g["id"] for g in self.delivered(sink)] == [e.id for e in events]

    def test_accepts_redelivery_of_the_same_events(self, sink: Any, contract_store: Any) -> None:
        events = self.events(contract_store, 4)
        _publish(sink, events)
        _publish(sink, events)
        ids = [g["id"] for g in self.delivered(sink)]
        assert ids == [e.id for e in events] * 2

    def test_relayed_by_fanout_in_order_per_stream(self, sink: Any, contract_store: Any) -> None:
        events = self.events(contract_store, 60, streams=5)
        fanout = FanOut(contract_store, [Route("contract", sink, batch_size=7, max_in_flight=3)],
                        retry_base=0.05, retry_cap=0.2)
        deadline = time.monotonic() + 30
        while fanout.status()[0].behind and time.monotonic() < deadline:
            if fanout.run_once() == 0:
                time.sleep(0.02)
        got = [g["id"] for g in self.delivered(sink)]
        assert set(got) == {e.id for e in events}
        # At least once, in order per stream: a stream never skips ahead of an undelivered event.
        last: dict[str, int] = {}
        for event_id in got:
            stream, _, seq = event_id.rpartition("/")
            assert int(seq) <= last.get(stream, 0) + 1, f"{event_id} arrived before its predecessor"
            last[stream] = int(seq)
        assert fanout.run_once() == 0
        fanout.close()

    def test_close_is_idempotent(self, sink: Any) -> None:
        close = getattr(sink, "close", None)
        if close is None:
            return
        for _ in range(2):
            result = close()
            if inspect.isawaitable(result):
                async def wait(aw: Any = result) -> None:
                    await aw

                asyncio.run(wait())
