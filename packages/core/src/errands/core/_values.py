"""Frozen value types shared by every engine."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Mapping


class _StrEnum(str, Enum):
    def __str__(self) -> str:
        return str(self.value)


class Semantics(_StrEnum):
    """What the counterparty guarantees about repeated deliveries of one effect."""

    IDEMPOTENT = "IDEMPOTENT"
    AT_LEAST_ONCE = "AT_LEAST_ONCE"
    NON_IDEMPOTENT = "NON_IDEMPOTENT"
    OBSERVE_ONLY = "OBSERVE_ONLY"


class DispatchOutcome(_StrEnum):
    """What a dispatch achieved: done, accepted for later, unknown (observe before any blind retry), failed."""

    CONFIRMED = "CONFIRMED"
    PENDING = "PENDING"
    UNKNOWN = "UNKNOWN"
    FAILED = "FAILED"


class ObservationOutcome(_StrEnum):
    """What an observation of the counterparty found for an effect key."""

    CONFIRMED = "CONFIRMED"
    ABSENT = "ABSENT"
    DUPLICATE = "DUPLICATE"
    STUCK = "STUCK"
    UNKNOWN = "UNKNOWN"


class CompensationOutcome(_StrEnum):
    """What a compensation attempt achieved."""

    COMPENSATED = "COMPENSATED"
    PENDING = "PENDING"
    STUCK = "STUCK"
    FAILED = "FAILED"


class EffectStatus(_StrEnum):
    """Where an effect is in its lifecycle (see the outbox section of the README)."""

    AWAITING_APPROVAL = "AWAITING_APPROVAL"
    PENDING = "PENDING"
    DISPATCHING = "DISPATCHING"
    CONFIRMED = "CONFIRMED"
    FAILED = "FAILED"
    UNKNOWN = "UNKNOWN"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, slots=True)
class Effect:
    """The intent to cause one side effect, exactly once in effect.

    ``key`` is the idempotency key, unique per store; ``payload`` must be JSON-serialisable.
    """

    key: str
    connector: str
    payload: Any
    tool: str = ""
    business_key: str | None = None
    semantics: Semantics = Semantics.IDEMPOTENT
    run_id: str | None = None
    human_gate: bool = False
    dispatch_at: datetime | float | None = None
    max_attempts: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DispatchResult:
    """A connector's answer to ``dispatch``; ``retry_after`` (seconds) delays the next attempt."""

    outcome: DispatchOutcome
    response: Any = None
    external_ref: str | None = None
    error: str | None = None
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Observation:
    """A connector's answer to ``observe``."""

    outcome: ObservationOutcome
    response: Any = None
    external_ref: str | None = None


@dataclass(frozen=True, slots=True)
class CompensationResult:
    """A connector's or compensator's answer to ``compensate``."""

    outcome: CompensationOutcome
    response: Any = None
    error: str | None = None
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class ConnectorCapabilities:
    """What a connector can do beyond ``dispatch``; inferred from its methods when not declared."""

    can_observe: bool = False
    can_compensate: bool = False
    default_semantics: Semantics = Semantics.IDEMPOTENT


@dataclass(frozen=True, slots=True)
class Obligation:
    """A compensation owed for an effect."""

    effect_key: str
    kind: str
    payload: Any
    run_id: str | None = None
    attempt: int = 0
    compensator: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """One journal entry. ``id`` (``{stream}/{seq}``) is stable and is the dedup key downstream.

    ``seq`` counts within the stream; ``position`` is the global journal position.
    """

    id: str
    stream: str
    seq: int
    subject: str
    type: str
    data: Any
    time: datetime
    position: int = 0
    source: str = "errands"

    def to_cloudevent(self) -> dict[str, Any]:
        """The CloudEvents 1.0 structured JSON envelope of this event."""
        return {
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "time": self.time.astimezone(timezone.utc).isoformat().replace("+00:00", "Z"),
            "datacontenttype": "application/json",
            "data": self.data,
        }

    def to_json(self) -> str:
        """The CloudEvents envelope as compact JSON text."""
        return json.dumps(self.to_cloudevent(), separators=(",", ":"), sort_keys=False)

    @classmethod
    def from_cloudevent(cls, envelope: Mapping[str, Any]) -> Event:
        stream, _, seq = str(envelope["id"]).rpartition("/")
        return cls(
            id=str(envelope["id"]),
            stream=stream,
            seq=int(seq) if seq.isdigit() else 0,
            subject=str(envelope.get("subject", "")),
            type=str(envelope["type"]),
            data=envelope.get("data"),
            time=datetime.fromisoformat(str(envelope["time"]).replace("Z", "+00:00")),
            source=str(envelope.get("source", "errands")),
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """A claim on one queued item. ``token`` fences stale holders out."""

    queue: str
    key: str
    token: int
    owner: str
    expires_at: float
    payload: Any = None
    attempts: int = 0
