"""PubSubConnector and PubSubSink against the real Pub/Sub emulator."""

from __future__ import annotations

import json
import sys
import uuid
from typing import Any, Iterator

import pytest
from errands.connectors.gcp import PubSubConnector, PubSubSink
from errands.connectors.gcp.testing import EmulatorProcess
from errands.core import (
    ConfigError,
    DispatchOutcome,
    Effect,
    FanOut,
    MissingDependencyError,
    NewEvent,
    PermanentError,
    Route,
    TransientError,
    capabilities_of,
    open_store,
)
from errands.core.testing import free_port

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]

PROJECT = "errands-test"


class PubSub:
    """Topics and subscriptions on the emulator, and pulling everything back."""

    def __init__(self) -> None:
        from google.cloud import pubsub_v1

        self.publisher = pubsub_v1.PublisherClient()
        self.subscriber = pubsub_v1.SubscriberClient()

    def topic(self, ordering: bool = False) -> tuple[str, str]:
        topic = f"t-{uuid.uuid4().hex[:10]}"
        topic_path = self.publisher.topic_path(PROJECT, topic)
        self.publisher.create_topic(name=topic_path)
        sub_path = self.subscriber.subscription_path(PROJECT, f"s-{topic}")
        self.subscriber.create_subscription(
            request={"name": sub_path, "topic": topic_path, "enable_message_ordering": ordering}
        )
        return topic, sub_path

    def pull(self, sub_path: str, expected: int, max_empty: int = 5) -> list[Any]:
        got: list[Any] = []
        empty = 0
        while len(got) < expected and empty < max_empty:
            resp = self.subscriber.pull(
                request={"subscription": sub_path, "max_messages": 1000}, timeout=10
            )
            if not resp.received_messages:
                empty += 1
                continue
            got += [m.message for m in resp.received_messages]
            self.subscriber.acknowledge(
                request={"subscription": sub_path, "ack_ids": [m.ack_id for m in resp.received_messages]}
            )
        return got

    def close(self) -> None:
        self.publisher.stop()
        self.subscriber.close()


@pytest.fixture
def pubsub(pubsub_emulator: EmulatorProcess) -> Iterator[PubSub]:
    ps = PubSub()
    try:
        yield ps
    finally:
        ps.close()


def _effect(key: str, **kw: Any) -> Effect:
    return Effect(key=key, connector="orders.events", payload={"order": key, "total": 5}, **kw)


def test_connector_publishes_payload_with_effect_attributes(pubsub: PubSub) -> None:
    topic, sub = pubsub.topic()
    connector = PubSubConnector(PROJECT, topic)
    try:
        result = connector.dispatch(_effect("order-1", business_key="B-1", run_id="run-9", tool="notify"))
    finally:
        connector.close()
    assert result.outcome is DispatchOutcome.CONFIRMED
    (msg,) = pubsub.pull(sub, 1)
    assert json.loads(msg.data) == {"order": "order-1", "total": 5}
    assert dict(msg.attributes) == {
        "errands-effect-key": "order-1",
        "errands-business-key": "B-1",
        "errands-run-id": "run-9",
        "errands-connector": "orders.events",
        "errands-tool": "notify",
    }
    assert result.external_ref == msg.message_id


def test_connector_cannot_observe() -> None:
    caps = capabilities_of(PubSubConnector(PROJECT, "orders"))
    assert caps.can_observe is False
    assert caps.can_compensate is False


def test_connector_ordering_key_and_resume_after_a_failed_key(pubsub: PubSub) -> None:
    topic = f"t-{uuid.uuid4().hex[:10]}"
    connector = PubSubConnector(PROJECT, topic, ordering=True, timeout=20)
    try:
        # The topic does not exist yet: NOT_FOUND pauses the ordering key in the publisher.
        first = connector.dispatch(_effect("k-1", business_key="customer-7"))
        assert first.outcome is DispatchOutcome.UNKNOWN
        assert "NotFound" in (first.error or "")
        topic_path = pubsub.publisher.topic_path(PROJECT, topic)
        pubsub.publisher.create_topic(name=topic_path)
        sub = pubsub.subscriber.subscription_path(PROJECT, f"s-{topic}")
        pubsub.subscriber.create_subscription(
            request={"name": sub, "topic": topic_path, "enable_message_ordering": True}
        )
        # Without resume_publish the key would stay paused and this would fail at once.
        again = connector.dispatch(_effect("k-1", business_key="customer-7"))
        assert again.outcome is DispatchOutcome.CONFIRMED, again.error
    finally:
        connector.close()
    (msg,) = pubsub.pull(sub, 1)
    assert msg.ordering_key == "customer-7"
    assert msg.attributes["errands-effect-key"] == "k-1"


def test_connector_timeout_is_unknown(pubsub_emulator: EmulatorProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{free_port()}")  # nothing listens there
    connector = PubSubConnector(PROJECT, "orders", timeout=0.5)
    try:
        result = connector.dispatch(_effect("late-1"))
    finally:
        connector._pub._client = None  # a publisher whose messages never leave cannot be flushed
    assert result.outcome is DispatchOutcome.UNKNOWN
    assert "Timeout" in (result.error or "")


def test_sink_publishes_cloudevents_binary_mode(pubsub: PubSub, tmp_path: Any) -> None:
    topic, sub = pubsub.topic()
    store = open_store(f"sqlite:///{tmp_path}/j.db")
    (event,) = store.append_events([NewEvent("orders/42", "order.placed", {"total": 5}, "order.placed")])
    sink = PubSubSink(PROJECT, topic)
    try:
        sink.publish([event])
    finally:
        sink.close()
    (msg,) = pubsub.pull(sub, 1)
    assert json.loads(msg.data) == {"total": 5}
    attrs = dict(msg.attributes)
    assert attrs == {
        "ce-specversion": "1.0",
        "ce-id": "orders/42/1",
        "ce-source": "errands",
        "ce-type": "order.placed",
        "ce-subject": "order.placed",
        "ce-time": event.to_cloudevent()["time"],
        "content-type": "application/json",
    }
    assert msg.ordering_key == ""


def test_sink_missing_topic_is_transient(pubsub: PubSub, tmp_path: Any) -> None:
    store = open_store(f"sqlite:///{tmp_path}/j.db")
    events = store.append_events([NewEvent("s/1", "x.y", {"n": 1})])
    sink = PubSubSink(PROJECT, "no-such-topic", ordering=True, timeout=20)
    try:
        with pytest.raises(TransientError, match="NotFound"):
            sink.publish(events)
    finally:
        sink.close()


def test_sink_unserialisable_data_is_permanent(tmp_path: Any) -> None:
    from datetime import datetime, timezone

    from errands.core import Event

    bad = Event(id="s/1", stream="s", seq=1, subject="a", type="a", data={"x": object()},
                time=datetime.now(timezone.utc))
    with pytest.raises(PermanentError, match="s/1"):
        PubSubSink(PROJECT, "orders").publish([bad])


def test_fanout_relays_10000_events_in_stream_order(pubsub: PubSub, tmp_path: Any) -> None:
    topic, sub = pubsub.topic(ordering=True)
    store = open_store(f"sqlite:///{tmp_path}/j.db")
    streams = [f"orders/{i}" for i in range(50)]
    appended = []
    for start in range(0, 10_000, 1000):
        appended += store.append_events(
            [NewEvent(streams[i % 50], "order.updated", {"i": i}, "order.updated")
             for i in range(start, start + 1000)]
        )
    sink = PubSubSink(PROJECT, topic, ordering=True)
    fanout = FanOut(store, routes=[Route(name="pubsub", sink=sink, batch_size=500, max_in_flight=4)])
    try:
        assert fanout.drain() == 10_000
    finally:
        fanout.close()
        sink.close()
    messages = pubsub.pull(sub, 10_000)
    ids = [m.attributes["ce-id"] for m in messages]
    assert set(ids) == {e.id for e in appended}
    last: dict[str, int] = {}
    for m in messages:
        assert m.ordering_key == m.attributes["ce-id"].rsplit("/", 1)[0]
        seq = int(m.attributes["ce-id"].rsplit("/", 1)[1])
        # Redeliveries may repeat an id; a stream never goes backwards past what was already seen.
        assert seq >= last.get(m.ordering_key, 0), f"{m.ordering_key} out of order at {seq}"
        last[m.ordering_key] = seq
    assert fanout.dead("pubsub") == []


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="topic") as info:
        PubSubConnector(PROJECT, "")
    assert info.value.field == "topic"
    with pytest.raises(ConfigError, match="timeout"):
        PubSubConnector(PROJECT, "orders", timeout=0)
    with pytest.raises(ConfigError, match="batch_max_messages"):
        PubSubSink(PROJECT, "orders", batch_max_messages=5000)
    with pytest.raises(ConfigError, match="goog"):
        PubSubConnector(PROJECT, "orders", attributes={"googx": "1"})


def test_missing_extra_raises_at_use_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "google.cloud.pubsub_v1", None)
    connector = PubSubConnector(PROJECT, "orders")  # constructing needs no extra
    with pytest.raises(MissingDependencyError) as info:
        connector.dispatch(_effect("x-1"))
    assert info.value.extra == "pubsub"
    assert "errands[pubsub]" in str(info.value)


def test_sink_splits_a_batch_into_requests_in_order(pubsub: PubSub, tmp_path: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch over ``batch_max_messages`` (or over ``MAX_REQUEST_BYTES``) goes as several ``Publish`` requests,
    one after another: every event arrives, each stream in journal order."""
    from errands.connectors.gcp import _pubsub

    topic, sub = pubsub.topic(ordering=True)
    store = open_store(f"sqlite:///{tmp_path}/j.db")
    events = store.append_events([NewEvent(f"orders/{i % 2}", "order.updated", {"i": i, "pad": "x" * 40 * (i % 3)})
                                  for i in range(25)])
    sizes: list[int] = []
    real = _pubsub._rpc

    def counted(client: Any) -> Any:
        send = real(client)

        def each(topic: str, messages: list[Any], timeout: float) -> Any:
            sizes.append(len(messages))
            return send(topic, messages, timeout)
        return each

    monkeypatch.setattr(_pubsub, "_rpc", counted)
    sink = PubSubSink(PROJECT, topic, ordering=True, batch_max_messages=4)
    try:
        sink.publish(events[:12])
        assert sizes == [4, 4, 4]
        monkeypatch.setattr(_pubsub, "MAX_REQUEST_BYTES", 600)  # about two messages a request
        sink.publish(events[12:])
    finally:
        sink.close()
    assert sum(sizes) == 25 and max(sizes[3:]) < 4
    messages = pubsub.pull(sub, 25)
    assert sorted(m.attributes["ce-id"] for m in messages) == sorted(e.id for e in events)
    for key in ("orders/0", "orders/1"):
        seqs = [int(m.attributes["ce-id"].rsplit("/", 1)[1]) for m in messages if m.ordering_key == key]
        assert seqs == sorted(seqs)


def test_fanout_parks_only_the_message_pubsub_refuses(pubsub: PubSub, tmp_path: Any) -> None:
    """A message Pub/Sub refuses (``INVALID_ARGUMENT``: here an empty one, as a sink subclass builds it) fails
    the whole request: the relay publishes the batch's events one by one, parks the refused one and delivers the
    others."""
    class Blanking(PubSubSink):
        @staticmethod
        def message(event: Any) -> tuple[bytes, dict[str, str]]:
            return (b"", {}) if event.type == "order.blank" else PubSubSink.message(event)

    topic, sub = pubsub.topic()
    store = open_store(f"sqlite:///{tmp_path}/j.db")
    store.append_events([NewEvent("orders/1", "order.placed", {"n": 1}), NewEvent("orders/1", "order.blank", {}),
                         NewEvent("orders/1", "order.paid", {"n": 3})])
    sink = Blanking(PROJECT, topic, timeout=20)
    fanout = FanOut(store, routes=[Route(name="pubsub", sink=sink, batch_size=10)])
    try:
        assert fanout.drain() == 2
    finally:
        fanout.close()
        sink.close()
    got = sorted(m.attributes["ce-id"] for m in pubsub.pull(sub, 2))
    assert got == ["orders/1/1", "orders/1/3"]
    assert [d.event.id for d in fanout.dead("pubsub")] == ["orders/1/2"]
