"""What the outbox stores and reports: effect and obligation records, step outcomes, and the shapes of the rows
its tables hand back (column order here, SQL in the table modules)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, NamedTuple, Sequence

from .._values import (
    CompensationOutcome,
    DispatchOutcome,
    Effect,
    EffectStatus,
    Obligation,
    ObservationOutcome,
    Semantics,
    _StrEnum,
)
from ..errors import PayloadError
from ..store import dumps, loads


class ObligationStatus(_StrEnum):
    """Where a compensation owed stands.

    ``REGISTERED`` obligations wait for ``compensate_run`` (or are made due at once when registered
    with ``due=True``, as the reconciler does on ``DUPLICATE``).
    """

    REGISTERED = "REGISTERED"
    PENDING = "PENDING"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    STUCK = "STUCK"


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(float(value), tz=timezone.utc)


def _record_dict(record: Any) -> dict[str, Any]:
    """A record's fields as a JSON-ready mapping: times as ISO 8601, enums as their values."""
    out: dict[str, Any] = {}
    for name in record.__slots__:
        value = getattr(record, name)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, _StrEnum):
            value = str(value)
        elif isinstance(value, Mapping):
            value = dict(value)
        out[name] = value
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class EffectRecord:
    """The stored state of one effect.

    ``attempts`` counts dispatches started, ``observations`` the reconciler's ``observe`` calls;
    ``flagged`` marks an effect whose outcome stayed inconclusive and needs a human (it is still observed,
    never dropped). ``next_attempt_at`` is when the worker looks at it next (for a leased effect: when the
    lease lapses), None when nothing is scheduled.
    """

    key: str
    connector: str
    tool: str
    payload: Any
    status: EffectStatus
    semantics: Semantics
    attempts: int
    max_attempts: int
    observations: int = 0
    business_key: str | None = None
    run_id: str | None = None
    human_gate: bool = False
    metadata: Mapping[str, Any] = field(default_factory=dict)
    flagged: bool = False
    response: Any = None
    error: str | None = None
    external_ref: str | None = None
    next_attempt_at: datetime | None = None
    lease_owner: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def effect(self) -> Effect:
        """The submitted effect."""
        return Effect(
            key=self.key, connector=self.connector, payload=self.payload, tool=self.tool,
            business_key=self.business_key, semantics=self.semantics, run_id=self.run_id,
            human_gate=self.human_gate, max_attempts=self.max_attempts, metadata=dict(self.metadata),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (times as ISO 8601)."""
        return _record_dict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class ObligationRecord:
    """The stored state of one compensation owed. ``id`` orders obligations: a run compensates LIFO."""

    id: int
    effect_key: str
    kind: str
    payload: Any
    status: ObligationStatus
    attempts: int
    max_attempts: int
    run_id: str | None = None
    compensator: str | None = None
    response: Any = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (times as ISO 8601)."""
        return _record_dict(self)

    @property
    def obligation(self) -> Obligation:
        """The value handed to a compensator."""
        return Obligation(
            effect_key=self.effect_key, kind=self.kind, payload=self.payload, run_id=self.run_id,
            attempt=self.attempts, compensator=self.compensator,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EffectOutcome:
    """What one ``dispatch_once`` / ``reconcile_once`` step did to one effect.

    ``outcome`` is the connector's answer (a ``DispatchOutcome`` or ``ObservationOutcome``; None when
    the call raised, see ``error``); ``status`` the effect's status afterwards. ``lease_lost`` means the
    lease lapsed before completion and another worker owns the effect now: nothing was recorded.
    """

    key: str
    outcome: DispatchOutcome | ObservationOutcome | None
    status: EffectStatus
    attempts: int
    error: str | None = None
    flagged: bool = False
    lease_lost: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ObligationOutcome:
    """What one ``compensate_once`` step did to one obligation."""

    id: int
    effect_key: str
    kind: str
    outcome: CompensationOutcome | None
    status: ObligationStatus
    attempts: int
    error: str | None = None
    lease_lost: bool = False


class Claimed(NamedTuple):
    """An effect this worker leased for one call: the effect handed to the connector (its metadata carries
    ``errands.attempt`` and ``errands.lease_token``) and the stored counts its transition weighs."""

    effect: Effect
    attempts: int
    token: int
    max_attempts: int
    observations: int = 0
    flagged: bool = False
    human_gate: bool = False


class NewEffect(NamedTuple):
    """An effect admitted for storage, field for field as its row is written (JSON as text): a tuple, so that a
    batch of them goes to the database as they are."""

    key: str
    connector: str
    tool: str
    payload: str
    business_key: str | None
    semantics: str
    run_id: str | None
    metadata: str | None
    human_gate: int
    not_before: float
    status: str
    max_attempts: int
    next_attempt_at: float | None
    created_at: float
    updated_at: float


class NewObligation(NamedTuple):
    """A compensation owed, to be recorded (``payload`` as a value: the table stores it as JSON)."""

    effect_key: str
    kind: str
    payload: Any
    run_id: str | None
    compensator: str | None
    status: ObligationStatus
    max_attempts: int
    next_attempt_at: float | None


class Touched(NamedTuple):
    """An effect a bulk statement changed, as its event names it."""

    key: str
    connector: str
    tool: str
    run_id: str | None
    business_key: str | None


class StoredEffect(NamedTuple):
    """An effect as read for a change: its record, and the stored times and token the record does not show."""

    record: EffectRecord
    not_before: float
    next_attempt_at: float | None
    token: int


def stored_json(value: Any) -> str | None:
    """How a connector's or compensator's answer is stored: as JSON, or when it is not JSON, as the JSON string of
    its repr (an answer must never be lost for its type)."""
    if value is None:
        return None
    try:
        return dumps(value, field="response")
    except PayloadError:
        return json.dumps(repr(value))


# Stored text to enum, by lookup: rows are read by the batch.
_STATUS = {s.value: s for s in EffectStatus}
_SEMANTICS = {s.value: s for s in Semantics}

# The effect columns a stored row holds, in the order ``effect_from_row`` reads them.
EFFECT_COLUMNS = (
    "key", "connector", "tool", "payload", "business_key", "semantics", "run_id", "metadata", "human_gate",
    "not_before", "status", "attempts", "max_attempts", "observations", "next_attempt_at", "lease_owner",
    "lease_token", "flagged", "response", "error", "external_ref", "created_at", "updated_at",
)

# The columns a claim hands back, in the order ``claimed_from_row`` reads them.
CLAIM_COLUMNS = (
    "key", "connector", "tool", "payload", "business_key", "semantics", "run_id", "metadata", "max_attempts",
    "attempts", "lease_token", "observations", "flagged", "human_gate",
)

OBLIGATION_COLUMNS = (
    "id", "effect_key", "kind", "payload", "run_id", "compensator", "status", "attempts", "max_attempts",
    "next_attempt_at", "lease_owner", "lease_token", "response", "error", "created_at", "updated_at",
)


def effect_from_row(row: Sequence[Any]) -> StoredEffect:
    """The stored effect of a row in ``EFFECT_COLUMNS`` order."""
    (key, connector, tool, payload, business_key, semantics, run_id, metadata, human_gate, not_before, status,
     attempts, max_attempts, observations, next_at, owner, token, flagged, response, error, ref,
     created, updated) = row
    record = EffectRecord(
        key=key, connector=connector, tool=tool, payload=loads(payload), status=_STATUS[status],
        semantics=_SEMANTICS[semantics], attempts=int(attempts), max_attempts=int(max_attempts),
        observations=int(observations), business_key=business_key, run_id=run_id,
        human_gate=bool(human_gate), metadata=loads(metadata) or {}, flagged=bool(flagged),
        response=loads(response), error=error, external_ref=ref, next_attempt_at=_ts(next_at),
        lease_owner=owner, created_at=_ts(created), updated_at=_ts(updated),
    )
    return StoredEffect(record, float(not_before), None if next_at is None else float(next_at), int(token))


def new_effect_record(row: NewEffect, effect: Effect, created: datetime | None = None,
                      metadata: Mapping[str, Any] | None = None) -> EffectRecord:
    """The record of an effect just inserted from ``row``: what reading it back would give, without the read.
    ``created``: ``row.created_at`` as a datetime, when the caller has it (the rows of one batch share it);
    ``metadata``: what the row stores, when it is not ``effect.metadata`` (``admit``)."""
    if created is None:
        created = _ts(row.created_at)
    due = created if row.next_attempt_at == row.created_at else _ts(row.next_attempt_at)
    return EffectRecord(
        key=row.key, connector=row.connector, tool=row.tool, payload=effect.payload, status=_STATUS[row.status],
        semantics=_SEMANTICS[row.semantics], attempts=0, max_attempts=row.max_attempts,
        business_key=row.business_key, run_id=row.run_id, human_gate=bool(row.human_gate),
        metadata=dict(effect.metadata if metadata is None else metadata), next_attempt_at=due, created_at=created, updated_at=created,
    )


def claimed_from_row(row: Sequence[Any]) -> Claimed:
    """The claimed effect of a row in ``CLAIM_COLUMNS`` order."""
    (key, connector, tool, payload, business_key, semantics, run_id, metadata, max_attempts, attempts, token,
     observations, flagged, human_gate) = row
    attempts, token, max_attempts = int(attempts), int(token), int(max_attempts)
    meta = loads(metadata) if metadata is not None else {}
    meta["errands.attempt"] = attempts
    meta["errands.lease_token"] = token
    effect = Effect(key=key, connector=connector, payload=loads(payload), tool=tool, business_key=business_key,
                    semantics=_SEMANTICS[semantics], run_id=run_id, max_attempts=max_attempts, metadata=meta)
    return Claimed(effect, attempts, token, max_attempts, int(observations), bool(flagged), bool(human_gate))


def obligation_from_row(row: Sequence[Any]) -> tuple[ObligationRecord, int]:
    """The record of a row in ``OBLIGATION_COLUMNS`` order, and its lease token."""
    (id_, effect_key, kind, payload, run_id, compensator, status, attempts, max_attempts, next_at, _owner,
     token, response, error, created, updated) = row
    record = ObligationRecord(
        id=int(id_), effect_key=effect_key, kind=kind, payload=loads(payload), status=ObligationStatus(status),
        attempts=int(attempts), max_attempts=int(max_attempts), run_id=run_id, compensator=compensator,
        response=loads(response), error=error, next_attempt_at=_ts(next_at), created_at=_ts(created),
        updated_at=_ts(updated),
    )
    return record, int(token)
