"""Pub/Sub: ``PubSubConnector`` publishes effects, ``PubSubSink`` publishes journal events.

Both hold one ``google.cloud.pubsub_v1.PublisherClient`` (built at first use, so the ``pubsub`` extra is
needed only then). The connector publishes through it message by message (the client batches them on its own
threads); the sink, handed batches by the relay, sends each as ``Publish`` requests of its own on the client's
channel. Vendor errors are mapped here, once.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from datetime import datetime, timezone
from typing import Any, ClassVar, Mapping, Sequence

from errands.core import (
    ConfigError,
    ConnectorCapabilities,
    DispatchOutcome,
    DispatchResult,
    Effect,
    Event,
    PayloadError,
    PermanentError,
    Semantics,
    TransientError,
    telemetry,
)

from ._imports import require

__all__ = ["PubSubConnector", "PubSubSink"]

EFFECT_KEY = "errands-effect-key"
BUSINESS_KEY = "errands-business-key"
RUN_ID = "errands-run-id"
CONNECTOR = "errands-connector"
TOOL = "errands-tool"


_JSON = json.JSONEncoder(separators=(",", ":"))

#: The most bytes of messages ``PubSubSink`` puts in one ``Publish`` request (Pub/Sub's limit is 10 MB).
MAX_REQUEST_BYTES = 9_000_000


def _message_type() -> Any:
    """The protobuf class of ``PubsubMessage`` (built directly: the proto-plus wrapper costs more per message)."""
    types = require("google.pubsub_v1", package="google-cloud-pubsub", extra="pubsub")
    return types.PubsubMessage.pb()


def _rpc(client: Any) -> Any:
    """``send(topic, messages, timeout)``: one ``Publish`` request through ``client``'s own channel and credentials
    (the generated client's ``publish``, which the batching ``PublisherClient`` overrides with its per-message one)."""
    pubsub = require("google.pubsub_v1", package="google-cloud-pubsub", extra="pubsub")
    gapic, request_type = pubsub.PublisherClient, pubsub.PublishRequest

    def send(topic: str, messages: list[Any], timeout: float) -> Any:
        request = request_type.wrap(request_type.pb()(topic=topic, messages=messages))
        # One attempt within ``timeout``: the relay retries a failed batch with its backoff.
        return gapic.publish(client, request=request, retry=None, timeout=timeout)

    return send


def _cloudevent_time(when: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, as ``Event.to_cloudevent`` writes it."""
    if when.tzinfo is timezone.utc:
        return when.isoformat().replace("+00:00", "Z")
    return when.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _check_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field} must be a non-empty string, got {value!r}", field=field, value=value)
    if field.endswith("topic") and len(value) < 3 and not value.startswith("projects/"):
        raise ConfigError(
            f"{field} must be a Pub/Sub topic id of 3 to 255 characters, got {value!r}", field=field, value=value
        )
    return value


def _check_positive(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{field} must be a positive number of seconds, got {value!r}", field=field, value=value)
    return float(value)


class _Publisher:
    """The shared part: one lazily built publisher client and the topic path."""

    def __init__(self, project: str, topic: str, ordering: bool, publisher: Any, batch_max_messages: int,
                 batch_max_latency: float) -> None:
        self.project = _check_name("project", project)
        self.topic = _check_name("topic", topic)
        self.ordering = bool(ordering)
        self._client = publisher
        self._batch = (batch_max_messages, batch_max_latency)
        self._lock = threading.Lock()

    @property
    def topic_path(self) -> str:
        if self.topic.startswith("projects/"):
            return self.topic
        return f"projects/{self.project}/topics/{self.topic}"

    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    pubsub = require("google.cloud.pubsub_v1", package="google-cloud-pubsub", extra="pubsub")
                    self._client = pubsub.PublisherClient(
                        batch_settings=pubsub.types.BatchSettings(
                            max_messages=self._batch[0], max_latency=self._batch[1]
                        ),
                        publisher_options=pubsub.types.PublisherOptions(enable_message_ordering=self.ordering),
                    )
        return self._client

    def resume(self, ordering_key: str) -> None:
        if self.ordering and ordering_key:
            self.client().resume_publish(self.topic_path, ordering_key)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.stop()


class _OnTopic:
    """What the connector and the sink share: the publisher they hold and what it publishes to."""

    _pub: _Publisher

    @property
    def topic(self) -> str:
        return self._pub.topic

    @property
    def ordering(self) -> bool:
        return self._pub.ordering

    def close(self) -> None:
        """Flush and stop the publisher."""
        self._pub.close()


def _classify(exc: BaseException) -> str:
    """``"timeout"``, ``"transient"`` or ``"permanent"`` for an error a publish future raised."""
    if isinstance(exc, (concurrent.futures.TimeoutError, TimeoutError)):
        return "timeout"
    exceptions = require("google.api_core.exceptions", package="google-api-core", extra="pubsub")
    if isinstance(exc, (exceptions.DeadlineExceeded, exceptions.ServiceUnavailable, exceptions.Aborted,
                        exceptions.Cancelled)):
        return "timeout"
    if isinstance(exc, exceptions.InvalidArgument):
        return "permanent"
    # NOT_FOUND / PERMISSION_DENIED are configuration (a missing topic, a missing role): retrying after
    # the fix delivers, so they never park events for good. A paused ordering key is resumed and retried.
    return "transient"


class PubSubConnector(_OnTopic):
    """Publishes each effect's payload (JSON) to a Pub/Sub topic.

    Attributes on every message: ``errands-effect-key``, ``errands-connector``, and when set
    ``errands-business-key``, ``errands-run-id``, ``errands-tool``. Subscribers dedup on the effect key:
    Pub/Sub cannot be asked whether a message was published, so this connector cannot observe and its
    effects are at-least-once.

    With ``ordering=True`` the publisher enables message ordering and each message carries an ordering key:
    ``effect.metadata["ordering_key"]``, else the business key, else the run id. After a failed publish on
    a key the key is resumed (``resume_publish``) so the retry is not refused.

    Args:
        project: the Google Cloud project id.
        topic: the topic id (or full ``projects/…/topics/…`` path).
        ordering: enable ordering keys.
        timeout: seconds to wait for the publish to be acknowledged; longer → ``UNKNOWN``.
        attributes: extra attributes on every message.
        publisher: a ready ``PublisherClient`` (else one is built at first use).

    Example:
        >>> connector = PubSubConnector("my-project", "orders")
        >>> outbox = Outbox(store, connectors={"orders.events": connector})  # doctest: +SKIP
    """

    name: ClassVar[str] = "pubsub"
    capabilities: ClassVar[ConnectorCapabilities] = ConnectorCapabilities(
        can_observe=False, can_compensate=False, default_semantics=Semantics.AT_LEAST_ONCE
    )

    def __init__(
        self,
        project: str,
        topic: str,
        ordering: bool = False,
        *,
        timeout: float = 30.0,
        attributes: Mapping[str, str] | None = None,
        publisher: Any = None,
    ) -> None:
        self._pub = _Publisher(project, topic, ordering, publisher, 100, 0.005)
        self.timeout = _check_positive("timeout", timeout)
        self.attributes = dict(attributes or {})
        for k, v in self.attributes.items():
            if not isinstance(v, str) or k.startswith("goog"):
                raise ConfigError(
                    f"attributes[{k!r}] must be a string value under a key not starting with 'goog', got {v!r}",
                    field=f"attributes.{k}", value=v,
                )

    @property
    def project(self) -> str:
        return self._pub.project

    def ordering_key(self, effect: Effect) -> str:
        """The ordering key of ``effect`` ("" when ordering is off)."""
        if not self.ordering:
            return ""
        return str(effect.metadata.get("ordering_key") or effect.business_key or effect.run_id or "")

    def message(self, effect: Effect) -> tuple[bytes, dict[str, str]]:
        """The data and attributes published for ``effect``."""
        try:
            data = json.dumps(effect.payload, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise PayloadError(f"effect {effect.key!r}: payload is not JSON-serialisable: {exc}",
                               field="payload") from exc
        attrs = telemetry.inject({**self.attributes, EFFECT_KEY: effect.key, CONNECTOR: effect.connector})
        if effect.business_key:
            attrs[BUSINESS_KEY] = effect.business_key
        if effect.run_id:
            attrs[RUN_ID] = effect.run_id
        if effect.tool:
            attrs[TOOL] = effect.tool
        return data, attrs

    def dispatch(self, effect: Effect) -> DispatchResult:
        """Publish ``effect`` and wait for the message id.

        Returns:
            ``CONFIRMED`` with the message id as ``external_ref``; ``UNKNOWN`` on a timeout or a transient
            error (the message may have been published); ``FAILED`` when Pub/Sub rejects the message.
        """
        data, attrs = self.message(effect)
        key = self.ordering_key(effect)
        client = self._pub.client()
        try:
            future = client.publish(self._pub.topic_path, data, ordering_key=key, **attrs)
            message_id = future.result(timeout=self.timeout)
        except Exception as exc:
            kind = _classify(exc)
            self._pub.resume(key)
            error = f"{type(exc).__name__}: {exc}"
            if kind == "permanent":
                return DispatchResult(outcome=DispatchOutcome.FAILED, error=error)
            return DispatchResult(outcome=DispatchOutcome.UNKNOWN, error=error)
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED, external_ref=str(message_id),
                              response={"message_id": str(message_id)})


class PubSubSink(_OnTopic):
    """Publishes journal events to a Pub/Sub topic in CloudEvents binary mode.

    Each message's data is the event's ``data`` as JSON; its attributes are ``ce-specversion``, ``ce-id``
    (the event id, the dedup key downstream), ``ce-source``, ``ce-type``, ``ce-subject``, ``ce-time`` and
    ``content-type``. With ``ordering=True`` the ordering key is the event's stream, so subscribers with
    message ordering see each stream in journal order.

    ``publish`` sends the batch as ``Publish`` requests (``batch_max_messages`` messages each, in order) and
    returns once every one was acknowledged: a timeout or a transient error raises ``TransientError`` (the batch
    is retried; duplicates carry the same ``ce-id``), a message Pub/Sub refuses raises ``PermanentError``.

    Args:
        project: the Google Cloud project id.
        topic: the topic id (or full path).
        ordering: ordering key = stream.
        timeout: seconds to wait for a batch to be acknowledged.
        batch_max_messages: messages per ``Publish`` request.
        batch_max_latency: seconds the client waits to fill a request (for a client shared with a
            ``PubSubConnector``; the sink sends its batches at once).
        publisher: a ready ``PublisherClient`` (else one is built at first use).
    """

    name: ClassVar[str] = "pubsub"

    def __init__(
        self,
        project: str,
        topic: str,
        ordering: bool = False,
        *,
        timeout: float = 60.0,
        batch_max_messages: int = 1000,
        batch_max_latency: float = 0.01,
        publisher: Any = None,
    ) -> None:
        if isinstance(batch_max_messages, bool) or not isinstance(batch_max_messages, int) or not (
            1 <= batch_max_messages <= 1000
        ):
            raise ConfigError(
                f"batch_max_messages must be an integer from 1 to 1000 (the Pub/Sub limit), got "
                f"{batch_max_messages!r}", field="batch_max_messages", value=batch_max_messages,
            )
        self._pub = _Publisher(project, topic, ordering, publisher, batch_max_messages,
                               _check_positive("batch_max_latency", batch_max_latency))
        self.timeout = _check_positive("timeout", timeout)

    @staticmethod
    def message(event: Event) -> tuple[bytes, dict[str, str]]:
        """The data and ``ce-*`` attributes of ``event`` (CloudEvents Pub/Sub binding, binary mode)."""
        try:
            data = _JSON.encode(event.data).encode()
        except (TypeError, ValueError) as exc:
            raise PermanentError(f"event {event.id!r}: data is not JSON-serialisable: {exc}") from exc
        attrs = {
            "ce-specversion": "1.0",
            "ce-id": event.id,
            "ce-source": event.source,
            "ce-type": event.type,
            "ce-time": _cloudevent_time(event.time),
            "content-type": "application/json",
        }
        if event.subject:
            attrs["ce-subject"] = event.subject
        return data, attrs

    def publish(self, events: Sequence[Event]) -> None:
        """Publish ``events`` and wait until Pub/Sub has acknowledged all of them.

        The batch goes as Pub/Sub ``Publish`` requests of its own, in order (at most ``batch_max_messages``
        messages and ``MAX_REQUEST_BYTES`` each): the relay has batched the events already, so the client's
        per-message batching (its threads, futures and timers) is left out. With ``ordering`` each message
        carries its stream as ordering key; the relay holds one batch of a stream in flight at a time and the
        requests of a batch go one after another, so a stream's messages reach Pub/Sub in journal order.

        Raises:
            TransientError: a timeout or a retryable error; the batch is retried (the requests already
                acknowledged are sent again: duplicates carry the same ``ce-id``).
            PermanentError: Pub/Sub refused a message (too large, invalid attributes).
        """
        if not events:
            return
        client = self._pub.client()
        topic = self._pub.topic_path
        send = _rpc(client)
        message_type = _message_type()
        ordering = self.ordering
        limit = self._pub._batch[0]
        chunk: list[Any] = []
        size = 0
        done = 0
        for event in events:
            data, attrs = self.message(event)
            try:
                message = message_type(data=data, attributes=attrs, ordering_key=event.stream if ordering else "")
            except (TypeError, ValueError) as exc:
                raise PermanentError(f"event {event.id!r} cannot be published to {topic}: {exc}") from exc
            weight = len(data) + sum(len(k) + len(v) for k, v in attrs.items()) + 64
            if chunk and (len(chunk) >= limit or size + weight > MAX_REQUEST_BYTES):
                done = self._send(send, topic, chunk, done, len(events))
                chunk, size = [], 0
            chunk.append(message)
            size += weight
        self._send(send, topic, chunk, done, len(events))

    def _send(self, send: Any, topic: str, messages: list[Any], done: int, total: int) -> int:
        """One ``Publish`` request of ``messages``, waited for; how many of the batch are acknowledged then."""
        try:
            send(topic, messages, self.timeout)
        except Exception as exc:
            kind = _classify(exc)
            message = (f"{total - done} of {total} events not published to {topic}: {type(exc).__name__}: {exc}")
            if kind == "permanent":
                raise PermanentError(message) from exc
            raise TransientError(message) from exc
        return done + len(messages)
