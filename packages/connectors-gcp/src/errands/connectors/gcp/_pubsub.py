"""Pub/Sub: ``PubSubConnector`` publishes effects, ``PubSubSink`` publishes journal events.

Both hold one ``google.cloud.pubsub_v1.PublisherClient`` (built at first use, so the ``pubsub`` extra is
needed only then), which batches messages on its own threads. Vendor errors are mapped here, once.
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

    ``publish`` sends the whole batch, then waits for every acknowledgement: a timeout or a transient error
    raises ``TransientError`` (the batch is retried; duplicates carry the same ``ce-id``), a message Pub/Sub
    refuses raises ``PermanentError``.

    Args:
        project: the Google Cloud project id.
        topic: the topic id (or full path).
        ordering: ordering key = stream.
        timeout: seconds to wait for a batch to be acknowledged.
        batch_max_messages: messages per publish request of the client.
        batch_max_latency: seconds the client waits to fill a request.
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

        Raises:
            TransientError: a timeout or a retryable error; the batch is retried.
            PermanentError: Pub/Sub refused a message (too large, invalid attributes).
        """
        if not events:
            return
        client = self._pub.client()
        topic = self._pub.topic_path
        pending: list[tuple[Any, str]] = []
        for event in events:
            data, attrs = self.message(event)
            key = event.stream if self.ordering else ""
            try:
                pending.append((client.publish(topic, data, ordering_key=key, **attrs), key))
            except (TypeError, ValueError) as exc:
                raise PermanentError(f"event {event.id!r} cannot be published to {topic}: {exc}") from exc
            except Exception as exc:
                raise TransientError(f"publishing to {topic} failed: {type(exc).__name__}: {exc}") from exc
        _, not_done = concurrent.futures.wait([f for f, _ in pending], timeout=self.timeout)
        failures: list[tuple[str, BaseException]] = []
        for future, key in pending:
            if future in not_done:
                failures.append((key, concurrent.futures.TimeoutError()))
                continue
            error = future.exception()
            if error is not None:
                failures.append((key, error))
        if not failures:
            return
        for key in {k for k, _ in failures}:
            self._pub.resume(key)
        kinds = {_classify(exc) for _, exc in failures}
        first = failures[0][1]
        message = f"{len(failures)} of {len(events)} events not published to {topic}: {type(first).__name__}: {first}"
        if kinds == {"permanent"}:
            raise PermanentError(message) from first
        raise TransientError(message) from first
