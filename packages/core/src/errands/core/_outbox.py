"""The outbox engine: durable effects with leases, retries, observe-then-retry, compensation and human gates.

Every state change of an effect or an obligation and its journal event (``effect.<status>.<connector>.<tool>``,
``obligation.<status>.<kind>``, on the stream ``effect/<key>``) commit in one transaction. Claims are batch
``UPDATE ... RETURNING`` statements that bump a fencing token; completions of a whole batch commit once, and
a completion whose token is stale changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, List, Mapping, Sequence, TypeVar

from ._backoff import backoff
from ._leases import DEFAULT_LEASE_FOR, LeaseBatch, is_infrastructure_error
from ._protocols import capabilities_of
from ._runtime import CallRunner, drain
from ._values import (
    CompensationOutcome,
    CompensationResult,
    ConnectorCapabilities,
    DispatchOutcome,
    DispatchResult,
    Effect,
    EffectStatus,
    Event,
    Obligation,
    Observation,
    ObservationOutcome,
    Semantics,
    _StrEnum,
)
from ._worker import retry_infrastructure
from .errors import (
    ConfigError,
    EffectConflictError,
    NotFoundError,
    PayloadError,
    PermanentError,
    TransientError,
    error_text,
)
from .store._sql import POSTGRES, SQLITE, JSONText, Migration, Tx, _encode_str, dumps, in_clause, json_value, loads
from .store._stores import _EVENT_COLS, NewEvent, SQLStore, _event_from_row, as_epoch, default_owner

log = logging.getLogger("errands.outbox")

DEFAULT_PAYLOAD_LIMIT = 1024 * 1024
_INLINE_BELOW = 0.0002  # seconds: connectors faster than this on average are called inline
MAX_KEY_LENGTH = 512


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


_OUTBOX_V1 = """
        CREATE TABLE IF NOT EXISTS em_effects (
            key TEXT PRIMARY KEY,
            connector TEXT NOT NULL,
            tool TEXT NOT NULL,
            payload TEXT NOT NULL,
            business_key TEXT,
            semantics TEXT NOT NULL,
            run_id TEXT,
            metadata TEXT,
            human_gate INTEGER NOT NULL,
            not_before {double} NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            observations INTEGER NOT NULL DEFAULT 0,
            next_attempt_at {double},
            lease_owner TEXT,
            lease_token {bigint} NOT NULL DEFAULT 0,
            flagged INTEGER NOT NULL DEFAULT 0,
            response TEXT,
            error TEXT,
            external_ref TEXT,
            created_at {double} NOT NULL,
            updated_at {double} NOT NULL,
            journal_from {bigint} NOT NULL DEFAULT 0
        )/*effects table options*/;
        CREATE INDEX IF NOT EXISTS em_effects_due ON em_effects (status, next_attempt_at)
            WHERE next_attempt_at IS NOT NULL;
        CREATE INDEX IF NOT EXISTS em_effects_run ON em_effects (run_id) WHERE run_id IS NOT NULL;
        CREATE TABLE IF NOT EXISTS em_obligations (
            id {serial_pk},
            effect_key TEXT NOT NULL,
            kind TEXT NOT NULL,
            payload TEXT,
            run_id TEXT,
            compensator TEXT,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            next_attempt_at {double},
            lease_owner TEXT,
            lease_token {bigint} NOT NULL DEFAULT 0,
            response TEXT,
            error TEXT,
            created_at {double} NOT NULL,
            updated_at {double} NOT NULL,
            UNIQUE (effect_key, kind)
        );
        CREATE INDEX IF NOT EXISTS em_obligations_due ON em_obligations (status, next_attempt_at);
        CREATE INDEX IF NOT EXISTS em_obligations_run ON em_obligations (run_id, id)
"""


# Version 2: the cursor of fresh effects. A submitted effect due at once is written with no
# ``next_attempt_at`` (so no entry in ``em_effects_due``); its ``effect.pending`` journal event announces it, and
# the dispatcher claims fresh effects by reading the journal from this cursor. Rows already pending when the
# cursor is created keep their ``next_attempt_at`` and are claimed through the index as before.
_OUTBOX_V2 = """
        INSERT INTO em_kv (namespace, key, value, version, updated_at)
            SELECT 'outbox', 'fresh', CAST(COALESCE(MAX(position), 0) AS TEXT), 1, 0 FROM em_events WHERE 1 = 1
            ON CONFLICT (namespace, key) DO NOTHING
"""


def outbox_migrations(dialect: str) -> List[Migration]:
    """The outbox schema for ``dialect``. On SQLite the effects table is clustered on its key
    (``WITHOUT ROWID``): one b-tree less to write on every submit."""
    options = " WITHOUT ROWID" if dialect == SQLITE else ""
    return [Migration(1, _OUTBOX_V1.replace("/*effects table options*/", options)), Migration(2, _OUTBOX_V2)]


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

    @property
    def obligation(self) -> Obligation:
        """The value handed to a compensator."""
        return Obligation(
            effect_key=self.effect_key, kind=self.kind, payload=self.payload, run_id=self.run_id,
            attempt=self.attempts, compensator=self.compensator,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (times as ISO 8601)."""
        return _record_dict(self)


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


R = TypeVar("R")


def _maker(cls: type[R]) -> Callable[[tuple[Any, ...]], R]:
    """A builder of ``cls`` (a frozen slotted dataclass) from all its field values in declaration order: what
    its ``__init__`` does with keywords, at a third of the cost. For the values built once per effect on the
    hot paths; it checks nothing, so callers pass every field."""
    setters = tuple(getattr(cls, f.name).__set__ for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    new = object.__new__

    def make(values: tuple[Any, ...]) -> R:
        obj = new(cls)
        for set_field, value in zip(setters, values):
            set_field(obj, value)
        return obj

    return make


_new_effect_record = _maker(EffectRecord)
_new_effect_outcome = _maker(EffectOutcome)
_new_effect = _maker(Effect)


_E_COLS = (
    "key, connector, tool, payload, business_key, semantics, run_id, metadata, human_gate, not_before, "
    "status, attempts, max_attempts, observations, next_attempt_at, lease_owner, lease_token, flagged, "
    "response, error, external_ref, created_at, updated_at"
)
_O_COLS = (
    "id, effect_key, kind, payload, run_id, compensator, status, attempts, max_attempts, next_attempt_at, "
    "lease_owner, lease_token, response, error, created_at, updated_at"
)
_E_INSERT = (
    "INSERT INTO em_effects (key, connector, tool, payload, business_key, semantics, run_id, metadata, "
    "human_gate, not_before, status, attempts, max_attempts, observations, next_attempt_at, flagged, "
    "created_at, updated_at, journal_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, 0, ?, 0, ?, ?, ?)"
)
_E_INSERT_NEW = _E_INSERT + " ON CONFLICT (key) DO NOTHING"
_LIVE = (EffectStatus.PENDING, EffectStatus.DISPATCHING, EffectStatus.UNKNOWN, EffectStatus.AWAITING_APPROVAL)


def _due_at(status: str, next_at: float | None, not_before: float, created: float) -> float | None:
    """When an effect is next looked at. A fresh one (``PENDING`` with no ``next_attempt_at``, announced by its
    journal event) is due since it was submitted, or since its ``dispatch_at`` if that came later."""
    if next_at is None and status == "PENDING":
        return max(float(created), float(not_before))
    return next_at


def _effect_record(row: Sequence[Any]) -> EffectRecord:
    (key, connector, tool, payload, business_key, semantics, run_id, metadata, human_gate, not_before, status,
     attempts, max_attempts, observations, next_at, owner, _token, flagged, response, error, ref,
     created, updated) = row
    next_at = _due_at(status, next_at, not_before, created)
    return EffectRecord(
        key=key, connector=connector, tool=tool, payload=loads(payload), status=EffectStatus(status),
        semantics=Semantics(semantics), attempts=int(attempts), max_attempts=int(max_attempts),
        observations=int(observations), business_key=business_key, run_id=run_id,
        human_gate=bool(human_gate), metadata=loads(metadata) or {}, flagged=bool(flagged),
        response=loads(response), error=error, external_ref=ref, next_attempt_at=_ts(next_at),
        lease_owner=owner, created_at=_ts(created), updated_at=_ts(updated),
    )


def _obligation_record(row: Sequence[Any]) -> ObligationRecord:
    (id_, effect_key, kind, payload, run_id, compensator, status, attempts, max_attempts, next_at, _owner,
     _token, response, error, created, updated) = row
    return ObligationRecord(
        id=int(id_), effect_key=effect_key, kind=kind, payload=loads(payload), status=ObligationStatus(status),
        attempts=int(attempts), max_attempts=int(max_attempts), run_id=run_id, compensator=compensator,
        response=loads(response), error=error, next_attempt_at=_ts(next_at), created_at=_ts(created),
        updated_at=_ts(updated),
    )


def _subject(status: str, connector: str, tool: str) -> str:
    base = f"effect.{status.lower()}.{connector}"
    return f"{base}.{tool}" if tool else base


# Events go to one stream per connector (``effects/<connector>``, numbered by journal position: no stream
# counter row to write on every submit) and per compensation kind (``obligations/<kind>``), in order; a
# stream per effect would add a journal stream row and scatter index writes on every submit. ``data`` always
# starts with the effect key, which ``Outbox.history`` relies on.
_EVENT_NAMES: dict[tuple[str, str, str], tuple[str, str, str, str]] = {}


def _event_names(connector: str, tool: str, status: str) -> tuple[str, str, str, str]:
    """Stream, type, subject and the JSON after the key, for an effect event (cached: a handful per outbox)."""
    names = _EVENT_NAMES.get((connector, tool, status))
    if names is None:
        names = (f"effects/{connector}", f"effect.{status.lower()}", _subject(status, connector, tool),
                 f',"connector":{_encode_str(connector)},"tool":{_encode_str(tool)},"status":{_encode_str(status)}')
        if len(_EVENT_NAMES) < 4096:
            _EVENT_NAMES[(connector, tool, status)] = names
    return names


def _effect_event_with(key: str, connector: str, tool: str, status: str, tail: str) -> NewEvent:
    """An effect event whose ``data`` members after ``key``, ``connector``, ``tool`` and ``status`` are the JSON
    text ``tail`` (each member with its leading comma). The JSON is written from a template: the same text
    ``dumps`` would give, at a fraction of the cost; submit and dispatch pass their few members directly."""
    names = _event_names(connector, tool, status)
    return NewEvent(names[0], names[1], JSONText(f'{{"key":{_encode_str(key)}{names[3]}{tail}}}'), names[2])


def _submitted_event(row: Sequence[Any]) -> NewEvent:
    """The event of a new effect row (``_row_of``): its status with its semantics and run."""
    semantics, run_id = row[5], row[6]
    return _effect_event_with(row[0], row[1], row[2], row[10], f',"semantics":{_encode_str(semantics)}' + (
        "" if run_id is None else f',"run_id":{_encode_str(run_id)}'))


def _effect_event(key: str, connector: str, tool: str, status: str, **data: Any) -> NewEvent:
    tail = "".join(f',"{name}":{"true" if value is True else json_value(value)}'
                   for name, value in data.items() if value is not None)
    return _effect_event_with(key, connector, tool, status, tail)


def _obligation_event(ob_id: int, effect_key: str, kind: str, status: str, **data: Any) -> NewEvent:
    body = {"key": effect_key, "id": ob_id, "kind": kind, "status": status}
    body.update({k: v for k, v in data.items() if v is not None})
    return NewEvent(
        stream=f"obligations/{kind}", type=f"obligation.{status.lower()}",
        data=body, subject=f"obligation.{status.lower()}.{kind}",
    )


_STATUS = {s.value: s for s in EffectStatus}
_SEMANTICS = {s.value: s for s in Semantics}
_MARK_FRESH = 1.0  # seconds a journal mark taken from this outbox's own appends is reused
_FRESH_SCAN = 5000  # journal positions one claim looks through for fresh effects


def _journal_mark(tx: Tx) -> int:
    """A journal position below every event appended later in this transaction."""
    row = tx.one("SELECT MAX(position) FROM em_events")
    return int(row[0]) if row and row[0] is not None else 0


def _json_or_text(value: Any) -> str | None:
    """Connector responses are stored as JSON; a response that is not JSON is stored as its repr."""
    if value is None:
        return None
    try:
        return dumps(value, field="response")
    except PayloadError:
        return json.dumps(repr(value))


def _check_str(field_name: str, value: Any, *, optional: bool = False, allow_empty: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or (not allow_empty and not value):
        what = "a string" if allow_empty else "a non-empty string"
        raise ConfigError(
            f"{field_name} must be {what}{' or None' if optional else ''}, got {value!r}",
            field=field_name, value=value,
        )


F = TypeVar("F", bound=Callable[..., Any])

_SKIPPED = object()  # a call not made: its lease lapsed before it started


class _BatchLease(LeaseBatch):
    """The leases of one claimed batch of effects or obligations (``held``: key or id -> fencing token),
    extended by one ``UPDATE`` per beat."""

    __slots__ = ("held", "ident", "status", "store", "table")

    def __init__(self, store: SQLStore, table: str, ident: str, status: str, held: Mapping[Any, int],
                 expires: float, lease_for: float, what: str) -> None:
        self.store = store
        self.table, self.ident, self.status = table, ident, status
        self.held = dict(held)
        super().__init__(store.clock, self.held, expires=expires, lease_for=lease_for, what=what)

    def _extend(self, keys: list[Any], until: float) -> set[Any]:
        live = [(k, self.held[k]) for k in keys]
        still: set[Any] = set()
        cast = "BIGINT" if self.ident == "id" else "TEXT"
        with self.store.transaction() as tx:
            for i in range(0, len(live), 500):
                chunk = live[i:i + 500]
                rows = tx.query(
                    f"UPDATE {self.table} SET next_attempt_at = ? WHERE status = ? AND ({self.ident}, lease_token) "
                    f"IN (VALUES {', '.join([f'(CAST(? AS {cast}), CAST(? AS BIGINT))'] * len(chunk))}) "
                    f"RETURNING {self.ident}",
                    (until, self.status, *(v for pair in chunk for v in pair)),
                )
                still.update(r[0] for r in rows)
        return {int(v) for v in still} if self.ident == "id" else still


class Outbox:
    """Durable effects: submit them (in your own transaction if you like); a worker dispatches, observes and
    compensates them.

    Args:
        store: an open store (``open_store(url)``).
        connectors: name -> connector instance. None: the registry's named instances (looked up at use,
            so connectors registered later count).
        payload_limit: the largest payload, in bytes of JSON (1 MiB by default).
        lease_for: seconds a dispatch, observation or compensation holds its effect before another worker
            may take it (10 by default). A heartbeat renews the leases of a claimed batch every
            ``lease_for / 3`` while its connector calls run, so a slow counterparty keeps them, and a worker
            killed outright leaves them to lapse within ``lease_for``.
        batch_size: how many effects one ``*_once`` step claims.
        max_in_flight: how many connector calls run at once within a step (a ``Worker`` passes its own).
        max_attempts: dispatch attempts before an effect is ``FAILED`` (an ``Effect`` may override).
        max_observations: inconclusive observations (``STUCK``/``UNKNOWN``) before an effect is flagged.
        compensation_attempts: attempts before an obligation is ``STUCK``.
        backoff_base: the first retry delay in seconds; it doubles per attempt, with jitter.
        backoff_cap: the longest retry delay in seconds.
        owner: this worker's name in leases (host:pid:thread by default).
        seed: seeds the jitter (tests).

    Example:
        >>> from errands.core import Effect, Outbox, open_store
        >>> from errands.core.testing import FakeConnector
        >>> outbox = Outbox(open_store("memory://"), connectors={"bank": FakeConnector()})
        >>> outbox.submit(Effect(key="order-42", connector="bank", payload={"cents": 500})).status
        <EffectStatus.PENDING: 'PENDING'>
        >>> [o.status for o in outbox.dispatch_once()]
        [<EffectStatus.CONFIRMED: 'CONFIRMED'>]
    """

    def __init__(
        self, store: SQLStore, connectors: Mapping[str, Any] | None = None, *,
        payload_limit: int = DEFAULT_PAYLOAD_LIMIT, lease_for: float = DEFAULT_LEASE_FOR, batch_size: int = 100,
        max_in_flight: int = 16, max_attempts: int = 5, max_observations: int = 5,
        compensation_attempts: int = 5, backoff_base: float = 1.0, backoff_cap: float = 300.0,
        owner: str | None = None, seed: int | None = None,
    ) -> None:
        problems = []
        for name, value, low in (
            ("payload_limit", payload_limit, 1), ("batch_size", batch_size, 1), ("max_in_flight", max_in_flight, 1),
            ("max_attempts", max_attempts, 1), ("max_observations", max_observations, 1),
            ("compensation_attempts", compensation_attempts, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                problems.append(f"{name} must be an integer >= {low}, got {value!r}")
        for name, fvalue in (("lease_for", lease_for), ("backoff_base", backoff_base), ("backoff_cap", backoff_cap)):
            if not isinstance(fvalue, (int, float)) or isinstance(fvalue, bool) or fvalue <= 0:
                problems.append(f"{name} must be a positive number of seconds, got {fvalue!r}")
        if connectors is not None and not isinstance(connectors, Mapping):
            problems.append(f"connectors must be a mapping of name to connector, got {type(connectors).__name__}")
        if problems:
            raise ConfigError("Outbox: " + "; ".join(problems), field=problems[0].split(" ", 1)[0])
        self.store = store
        self._connectors: dict[str, Any] | None = dict(connectors) if connectors is not None else None
        if self._connectors is not None:
            for name, conn in self._connectors.items():
                if not callable(getattr(conn, "dispatch", None)):
                    raise ConfigError(
                        f"connectors[{name!r}] must have a dispatch(effect) method, got {type(conn).__name__}",
                        field=f"connectors.{name}", value=type(conn).__name__,
                    )
        self.payload_limit = payload_limit
        self.lease_for = float(lease_for)
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.max_observations = max_observations
        self.compensation_attempts = compensation_attempts
        self.backoff_base = float(backoff_base)
        self.backoff_cap = float(backoff_cap)
        self.owner = owner or default_owner()
        self._rng = random.Random(seed)
        self._compensators: dict[str, Callable[[Obligation], Any]] = {}
        self._latency: dict[str, float] = {}
        self._caps: dict[str, tuple[Any, ConnectorCapabilities]] = {}
        self._mark: tuple[int, float] | None = None
        self._runner = CallRunner(max_in_flight)
        self._own_runner = True
        store.migrate("outbox", outbox_migrations(store.dialect))

    # -- configuration -----------------------------------------------------------------------
    @property
    def max_in_flight(self) -> int:
        return self._runner.max_in_flight

    def use_runner(self, runner: CallRunner) -> None:
        """Run connector calls through ``runner`` (a ``Worker`` shares one across engines)."""
        if self._own_runner:
            self._runner.close()
        self._runner = runner
        self._own_runner = False

    def close(self) -> None:
        """Stop this outbox's call threads (after the calls in flight)."""
        if self._own_runner:
            self._runner.close()

    @property
    def connectors(self) -> dict[str, Any]:
        """The connectors this outbox dispatches through, by name."""
        if self._connectors is not None:
            return self._connectors
        from ._plugins import get_registry

        return get_registry().connector_instances

    def connector(self, name: str) -> Any:
        """The connector named ``name``.

        Raises:
            ConfigError: no such connector here.
        """
        conns = self.connectors
        try:
            return conns[name]
        except KeyError:
            raise ConfigError(
                f"effect.connector {name!r} is not a known connector; known: {', '.join(sorted(conns)) or 'none'} "
                "(pass it in Outbox(connectors=...) or register it by name)",
                field="effect.connector", value=name,
            ) from None

    def compensator(self, kind: str) -> Callable[[F], F]:
        """Decorator: ``fn(obligation) -> CompensationResult | CompensationOutcome | None`` (None means
        compensated) compensates obligations of ``kind``, ahead of the connector's ``compensate``.

        Example:
            >>> @outbox.compensator("refund")                       # doctest: +SKIP
            ... def refund(obligation): bank.refund(obligation.payload["cents"])
        """
        _check_str("kind", kind)

        def register(fn: F) -> F:
            if not callable(fn):
                raise ConfigError(f"compensator for {kind!r} must be callable", field="compensator", value=fn)
            self._compensators[kind] = fn
            return fn

        return register

    def _backoff(self, attempt: int, retry_after: float | None = None) -> float:
        return backoff(attempt, base=self.backoff_base, cap=self.backoff_cap, retry_after=retry_after, rng=self._rng)

    # -- submit ------------------------------------------------------------------------------
    def _journal(self, tx: Tx, events: Sequence[NewEvent]) -> None:
        """Append events this engine built (well-formed by construction: not validated again) in ``tx``."""
        if events:
            _rows, positions = self.store._write_events(tx, events)
            self._note_append(positions[0])

    def _note_append(self, first: int) -> None:
        """Remember the position before this outbox's latest append (its first event at ``first``): positions
        only grow (a rolled-back append frees positions from its first one up), so it is below every event
        appended from now on."""
        self._mark = (first - 1, time.monotonic())

    def _mark_for(self, tx: Tx) -> int:
        """A journal position below every event appended later in ``tx`` (an effect's ``journal_from``):
        taken from this outbox's last append when that is recent, else read from the journal."""
        mark = self._mark
        if mark is not None and time.monotonic() - mark[1] < _MARK_FRESH:
            return mark[0]
        return _journal_mark(tx)

    def _caps_of(self, name: str) -> ConnectorCapabilities:
        """The capabilities of connector ``name``, computed once per connector instance."""
        conn = self.connector(name)
        cached = self._caps.get(name)
        if cached is None or cached[0] is not conn:
            cached = (conn, capabilities_of(conn))
            self._caps[name] = cached
        return cached[1]

    @staticmethod
    def _check_fields(effect: Any) -> None:
        """Raise the specific ``ConfigError`` for the first malformed field of ``effect``."""
        if not isinstance(effect, Effect):
            raise ConfigError(f"effect must be an errands.core.Effect, got {type(effect).__name__}",
                              field="effect", value=type(effect).__name__)
        _check_str("effect.key", effect.key)
        if len(effect.key) > MAX_KEY_LENGTH:
            raise ConfigError(f"effect.key is {len(effect.key)} characters; the limit is {MAX_KEY_LENGTH}",
                              field="effect.key", value=effect.key[:40] + "...")
        _check_str("effect.connector", effect.connector)
        _check_str("effect.tool", effect.tool, allow_empty=True)
        _check_str("effect.business_key", effect.business_key, optional=True)
        _check_str("effect.run_id", effect.run_id, optional=True)
        try:
            Semantics(effect.semantics)
        except ValueError:
            raise ConfigError(
                f"effect.semantics must be one of {', '.join(s.value for s in Semantics)}, got {effect.semantics!r}",
                field="effect.semantics", value=effect.semantics,
            ) from None
        if not isinstance(effect.human_gate, bool):
            raise ConfigError(f"effect.human_gate must be True or False, got {effect.human_gate!r}",
                              field="effect.human_gate", value=effect.human_gate)
        if not isinstance(effect.metadata, Mapping):
            raise ConfigError(f"effect.metadata must be a mapping, got {type(effect.metadata).__name__}",
                              field="effect.metadata", value=type(effect.metadata).__name__)

    def _row_of(self, effect: Any, now: float, *, inline: bool = False) -> tuple[Any, ...]:
        # The common shape passes one cheap test; anything else gets the field-by-field checks, which raise
        # the specific error (or accept, e.g. str subclasses).
        if not (
            type(effect) is Effect and type(effect.key) is str and 0 < len(effect.key) <= MAX_KEY_LENGTH
            and type(effect.connector) is str and effect.connector and type(effect.tool) is str
            and (effect.business_key is None or (type(effect.business_key) is str and effect.business_key))
            and (effect.run_id is None or (type(effect.run_id) is str and effect.run_id))
            and type(effect.semantics) is Semantics and type(effect.human_gate) is bool
            and type(effect.metadata) is dict
        ):
            self._check_fields(effect)
        semantics = effect.semantics if type(effect.semantics) is Semantics else Semantics(effect.semantics)
        max_attempts = self.max_attempts if effect.max_attempts is None else effect.max_attempts
        if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
            raise ConfigError(f"effect.max_attempts must be an integer >= 1, got {effect.max_attempts!r}",
                              field="effect.max_attempts", value=effect.max_attempts)
        if effect.dispatch_at is None:
            not_before = now
        else:
            try:
                not_before = as_epoch(effect.dispatch_at, now)
            except ConfigError as exc:
                raise ConfigError(f"effect.dispatch_at: {exc}", field="effect.dispatch_at",
                                  value=effect.dispatch_at) from None
        payload = dumps(effect.payload, field="effect.payload", limit=self.payload_limit)
        metadata = dumps(dict(effect.metadata), field="effect.metadata", limit=self.payload_limit) \
            if effect.metadata else None
        if inline:
            if semantics is Semantics.NON_IDEMPOTENT:
                raise ConfigError(
                    f"effect {effect.key!r} is NON_IDEMPOTENT and cannot run inline: an unknown outcome must be "
                    "observed before any retry; submit it and let the worker dispatch it",
                    field="effect.semantics", value=str(semantics),
                )
            status = EffectStatus.DISPATCHING
        else:
            caps = self._caps_of(effect.connector)
            if semantics is Semantics.NON_IDEMPOTENT and not (
                caps.can_observe or caps.can_compensate or effect.business_key or effect.human_gate
                or (effect.tool and effect.tool in self._compensators) or effect.connector in self._compensators
            ):
                raise ConfigError(
                    f"effect {effect.key!r} is NON_IDEMPOTENT but has no safety net: connector "
                    f"{effect.connector!r} cannot observe or compensate; give it a business_key, human_gate=True, "
                    "or register a compensator for its tool",
                    field="effect.semantics", value=str(semantics),
                )
            if semantics is Semantics.OBSERVE_ONLY and not caps.can_observe:
                raise ConfigError(
                    f"effect {effect.key!r} is OBSERVE_ONLY but connector {effect.connector!r} cannot observe",
                    field="effect.semantics", value=str(semantics),
                )
            if effect.human_gate:
                status = EffectStatus.AWAITING_APPROVAL
            elif semantics is Semantics.OBSERVE_ONLY:
                status = EffectStatus.UNKNOWN
            else:
                status = EffectStatus.PENDING
        if status is EffectStatus.AWAITING_APPROVAL or (status is EffectStatus.PENDING and not_before <= now):
            # Awaiting a human, or fresh and due at once: a fresh effect is claimed through its journal event
            # (``_claim_fresh``), so it takes no entry in the due index.
            next_at = None
        else:
            next_at = max(now, not_before)
        return (
            effect.key, effect.connector, effect.tool, payload, effect.business_key, semantics.value,
            effect.run_id, metadata, int(effect.human_gate), not_before, status.value, max_attempts,
            next_at, now, now,
        )

    def submit(self, effect: Effect, conn: Any = None) -> EffectRecord:
        """Record ``effect`` durably; the worker dispatches it.

        Idempotent on ``effect.key``: the same key with the same payload returns the stored record.

        Args:
            effect: the effect.
            conn: the caller's own sqlite3/psycopg connection to the same database: the effect then commits or
                rolls back with the caller's transaction (the transactional outbox).

        Raises:
            ConfigError: bad input (empty key, unknown connector, wrong types, no safety net for
                ``NON_IDEMPOTENT``); nothing is stored.
            PayloadError: the payload is not JSON or over ``payload_limit``.
            EffectConflictError: the key exists with a different payload, connector or tool.
        """
        row = self._row_of(effect, self.store.clock.now())
        with self.store.transaction(conn) as tx:
            row = (*row, self._mark_for(tx))
            # Insert first and look only on a conflict (the common case is a new key).
            if tx.rowcount(_E_INSERT_NEW, row) == 1:
                self._note_append(self.store._append_engine_event(tx, _submitted_event(row)))
                return self._fresh_record(row, effect)
            got = tx.one(f"SELECT {_E_COLS} FROM em_effects WHERE key = ?", (row[0],))
        if got is None:
            # Not stored and not inserted: only a concurrent delete could do this; go the general way.
            return self.submit_many([effect], conn=conn)[0]
        rec = _effect_record(got)
        self._check_same(row, rec)
        return rec

    def submit_many(self, effects: Iterable[Effect], conn: Any = None) -> List[EffectRecord]:
        """Record many effects in one transaction: all of them, or (on any error) none.

        Returns:
            One record per effect, in order (the stored one for keys submitted before).
        """
        now = self.store.clock.now()
        effects = list(effects)
        rows = [self._row_of(e, now) for e in effects]
        if not rows:
            return []
        with self.store.transaction(conn) as tx:
            mark = self._mark_for(tx)
            return self._insert(tx, [(*row, mark) for row in rows], effects)

    def _insert(self, tx: Tx, rows: List[tuple[Any, ...]], effects: List[Effect]) -> List[EffectRecord]:
        by_key: dict[str, tuple[Any, ...]] = {}
        for row in rows:
            seen = by_key.get(row[0])
            if seen is not None:
                self._check_same(row, seen)
            else:
                by_key[row[0]] = row
        existing: dict[str, EffectRecord] = {}
        keys = list(by_key)
        if len(keys) == 1:
            # One effect: insert first and look only on a conflict (the common case is a new key).
            row = by_key[keys[0]]
            if tx.rowcount(_E_INSERT_NEW, row) == 1:
                self._journal(tx, [_submitted_event(row)])
                return [self._fresh_record(r, e) for r, e in zip(rows, effects)]
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            for r in tx.query(f"SELECT {_E_COLS} FROM em_effects WHERE key IN {in_clause(len(chunk))}", chunk):
                existing[r[0]] = _effect_record(r)
        new_rows = [row for key, row in by_key.items() if key not in existing]
        for key, rec in existing.items():
            self._check_same(by_key[key], rec)
        if new_rows:
            if tx.dialect == POSTGRES:
                for row in new_rows:
                    if tx.rowcount(_E_INSERT_NEW, row) != 1:
                        got = tx.one(f"SELECT {_E_COLS} FROM em_effects WHERE key = ?", (row[0],))
                        assert got is not None
                        rec = _effect_record(got)
                        self._check_same(row, rec)
                        existing[row[0]] = rec
                new_rows = [row for row in new_rows if row[0] not in existing]
            else:
                tx.executemany(_E_INSERT, new_rows)
            self._journal(tx, [_submitted_event(r) for r in new_rows])
        out = []
        for row, effect in zip(rows, effects):
            stored = existing.get(row[0])
            out.append(stored if stored is not None else self._fresh_record(row, effect))
        return out

    @staticmethod
    def _fresh_record(row: tuple[Any, ...], effect: Effect) -> EffectRecord:
        (key, connector, tool, _payload, business_key, semantics, run_id, _metadata, human_gate, not_before, status,
         max_attempts, next_at, created, _updated) = row[:15]
        created_at = _ts(created)
        next_at = _due_at(status, next_at, not_before, created)
        next_attempt_at = created_at if next_at == created else _ts(next_at)
        return _new_effect_record((
            key, connector, tool, effect.payload, _STATUS[status], _SEMANTICS[semantics], 0, max_attempts, 0,
            business_key, run_id, bool(human_gate), dict(effect.metadata), False, None, None, None, next_attempt_at,
            None, created_at, created_at,
        ))

    @staticmethod
    def _check_same(row: tuple[Any, ...], other: tuple[Any, ...] | EffectRecord) -> None:
        key, connector, tool, payload = row[0], row[1], row[2], loads(row[3])
        if isinstance(other, EffectRecord):
            o_connector, o_tool, o_payload = other.connector, other.tool, other.payload
        else:
            o_connector, o_tool, o_payload = other[1], other[2], loads(other[3])
        if (connector, tool) != (o_connector, o_tool) or payload != o_payload:
            what = "payload" if payload != o_payload else "connector/tool"
            raise EffectConflictError(
                f"effect key {key!r} was submitted before with a different {what}; use a new key for a new effect",
                key=key,
            )

    # -- inline ------------------------------------------------------------------------------
    def run_inline(self, effect: Effect, fn: Callable[[Effect], Any]) -> EffectRecord:
        """Run ``fn(effect)`` now, in this thread, and record its result once.

        ``fn`` may return a ``DispatchResult`` or any JSON value (recorded as the response of a confirmed
        effect); if it raises, the effect is recorded ``FAILED`` with the error and the exception propagates.
        A replay with the same key returns the stored record without calling ``fn`` (unless a previous run
        died mid-way and its lease lapsed). ``NON_IDEMPOTENT`` effects are refused (``ConfigError``).
        """
        now = self.store.clock.now()
        row = self._row_of(effect, now, inline=True)
        lease_until = now + self.lease_for
        try:
            token, stored = self._claim_inline(effect, row, now, lease_until)
        except Exception as exc:
            if is_infrastructure_error(exc):
                self._release_inline(effect.key, now)
            raise
        if stored is not None:
            return stored
        lease = _BatchLease(self.store, "em_effects", "key", "DISPATCHING", {effect.key: token}, lease_until,
                            self.lease_for, f"inline effect {effect.key}")
        try:
            try:
                value = fn(effect)
                if hasattr(value, "__await__"):
                    value = self._runner.call(lambda aw: aw, value)
            except Exception as exc:
                self._finish_inline(effect, token, EffectStatus.FAILED, None, None, error_text(exc), lease)
                raise
            if isinstance(value, DispatchResult):
                status = EffectStatus.CONFIRMED if value.outcome is DispatchOutcome.CONFIRMED else (
                    EffectStatus.FAILED if value.outcome is DispatchOutcome.FAILED else EffectStatus.UNKNOWN)
                return self._finish_inline(effect, token, status, value.response, value.external_ref, value.error,
                                           lease)
            return self._finish_inline(effect, token, EffectStatus.CONFIRMED, value, None, None, lease)
        finally:
            lease.stop()

    def _claim_inline(self, effect: Effect, row: tuple[Any, ...], now: float,
                      lease_until: float) -> tuple[int, EffectRecord | None]:
        """Lease ``effect`` for an inline run: ``(token, None)``, or ``(0, the stored record to return)``."""
        with self.store.transaction() as tx:
            got = tx.one(f"SELECT {_E_COLS} FROM em_effects WHERE key = ?", (effect.key,))
            if got is None:
                live = (*row[:10], EffectStatus.DISPATCHING.value, row[11], lease_until, now, now, _journal_mark(tx))
                tx.execute(_E_INSERT, live)
                tx.execute("UPDATE em_effects SET attempts = 1, lease_token = 1, lease_owner = ? WHERE key = ?",
                           (self.owner, effect.key))
                token, attempts = 1, 1
                self._journal(tx, [_effect_event(effect.key, effect.connector, effect.tool, "DISPATCHING", attempt=1)])
            else:
                rec = _effect_record(got)
                self._check_same(row, rec)
                lapsed = rec.status in (EffectStatus.PENDING, EffectStatus.DISPATCHING) and (
                    got[14] is None or float(got[14]) <= now)
                if not lapsed:
                    return 0, rec
                token, attempts = int(got[16]) + 1, rec.attempts + 1
                tx.execute(
                    "UPDATE em_effects SET status = ?, lease_token = ?, lease_owner = ?, attempts = ?, "
                    "next_attempt_at = ?, updated_at = ? WHERE key = ?",
                    (EffectStatus.DISPATCHING.value, token, self.owner, attempts, lease_until, now, effect.key),
                )
                self._journal(
                    tx, [_effect_event(effect.key, effect.connector, effect.tool, "DISPATCHING", attempt=attempts)])
        return token, None

    def _release_inline(self, key: str, now: float) -> None:
        """After a store fault in an inline claim, let a replay take the effect at once if the claim committed
        after all (``fn`` never ran)."""
        def release(_attempt: int) -> None:
            with self.store.transaction() as tx:
                tx.execute("UPDATE em_effects SET next_attempt_at = ?, lease_owner = NULL WHERE key = ? AND "
                           "lease_owner = ? AND status = 'DISPATCHING' AND updated_at = ?", (now, key, self.owner, now))

        try:
            retry_infrastructure(release, clock=self.store.clock, what=f"releasing inline effect {key}")
        except Exception as again:
            log.warning("could not release inline effect %s after a store fault (%s); its lease lapses within %ss",
                        key, error_text(again), self.lease_for)

    def _finish_inline(self, effect: Effect, token: int, status: EffectStatus, response: Any,
                       ref: str | None, error: str | None, lease: _BatchLease) -> EffectRecord:
        def record(_attempt: int) -> None:
            now = self.store.clock.now()
            with self.store.transaction() as tx:
                n = tx.rowcount(
                    "UPDATE em_effects SET status = ?, response = ?, external_ref = ?, error = ?, "
                    "next_attempt_at = NULL, lease_owner = NULL, updated_at = ? WHERE key = ? AND lease_token = ? "
                    "AND status = 'DISPATCHING'",
                    (status.value, _json_or_text(response), ref, error, now, effect.key, token),
                )
                if n == 1:
                    self._journal(tx, [_effect_event(effect.key, effect.connector, effect.tool, status.value,
                                                     error=error, external_ref=ref)])

        retry_infrastructure(lambda attempt: lease.recorded(lambda: record(attempt)), clock=self.store.clock,
                             what=f"recording inline effect {effect.key}", keep_going=lease.alive)
        return self.get(effect.key)

    # -- human gate, redrive, cancel ------------------------------------------------------
    def _transition(self, key: str, allowed: Sequence[EffectStatus], to: EffectStatus, verb: str,
                    sets: str = "", params: Sequence[Any] = (), **event: Any) -> EffectRecord:
        now = self.store.clock.now()
        with self.store.transaction() as tx:
            got = tx.one(f"SELECT {_E_COLS} FROM em_effects WHERE key = ?", (key,))
            if got is None:
                raise NotFoundError(f"no effect with key {key!r}")
            rec = _effect_record(got)
            if rec.status not in allowed:
                raise ConfigError(
                    f"cannot {verb} effect {key!r}: it is {rec.status}, and only "
                    f"{' or '.join(s.value for s in allowed)} effects can be {verb}d",
                    field="key", value=key,
                )
            next_at = max(now, float(got[9])) if to in (EffectStatus.PENDING, EffectStatus.UNKNOWN) else None
            tx.execute(
                f"UPDATE em_effects SET status = ?, next_attempt_at = ?, lease_owner = NULL, updated_at = ?{sets} "
                "WHERE key = ?",
                (to.value, next_at, now, *params, key),
            )
            self._journal(tx, [_effect_event(key, rec.connector, rec.tool, to.value, **event)])
            got = tx.one(f"SELECT {_E_COLS} FROM em_effects WHERE key = ?", (key,))
            assert got is not None
            return _effect_record(got)

    def approve(self, key: str, *, by: str | None = None) -> EffectRecord:
        """Let a human-gated effect go: ``AWAITING_APPROVAL`` -> ``PENDING``.

        Raises:
            NotFoundError: no such effect.
            ConfigError: the effect is not awaiting approval.
        """
        return self._transition(key, (EffectStatus.AWAITING_APPROVAL,), EffectStatus.PENDING, "approve",
                                approved_by=by)

    def reject(self, key: str, *, reason: str | None = None, by: str | None = None) -> EffectRecord:
        """Refuse a human-gated effect: ``AWAITING_APPROVAL`` -> ``CANCELLED``; it is never dispatched."""
        return self._transition(key, (EffectStatus.AWAITING_APPROVAL,), EffectStatus.CANCELLED, "reject",
                                ", error = ?", (f"rejected: {reason or 'no reason given'}",), rejected_by=by,
                                reason=reason)

    def cancel(self, key: str, *, reason: str | None = None) -> EffectRecord:
        """Withdraw an effect not yet dispatched (``PENDING`` or ``AWAITING_APPROVAL``) -> ``CANCELLED``."""
        return self._transition(key, (EffectStatus.PENDING, EffectStatus.AWAITING_APPROVAL), EffectStatus.CANCELLED,
                                "cancel", ", error = ?", (f"cancelled: {reason or 'no reason given'}",),
                                reason=reason)

    def redrive(self, key: str) -> EffectRecord:
        """Queue a ``FAILED`` or ``CANCELLED`` effect (or a flagged ``UNKNOWN`` one) again with fresh attempts.

        A flagged ``UNKNOWN`` effect whose connector can observe goes back to observation; otherwise it is
        dispatched again: redriving is the human's decision that a new delivery is wanted.
        """
        rec = self.get(key)
        if rec.status is EffectStatus.UNKNOWN and not rec.flagged:
            raise ConfigError(f"cannot redrive effect {key!r}: it is UNKNOWN and still being observed",
                              field="key", value=key)
        to = EffectStatus.PENDING
        if rec.status is EffectStatus.UNKNOWN or rec.semantics is Semantics.OBSERVE_ONLY:
            conn = self.connectors.get(rec.connector)
            if conn is not None and capabilities_of(conn).can_observe:
                to = EffectStatus.UNKNOWN
        return self._transition(
            key, (EffectStatus.FAILED, EffectStatus.CANCELLED, EffectStatus.UNKNOWN), to, "redrive",
            ", attempts = 0, observations = 0, flagged = 0", (), redriven=True,
        )

    # -- claims and completion -----------------------------------------------------------------
    def _can_observe(self, name: str) -> bool:
        conn = self.connectors.get(name)
        if conn is None:
            return False
        cached = self._caps.get(name)
        if cached is None or cached[0] is not conn:
            cached = (conn, capabilities_of(conn))
            self._caps[name] = cached
        return cached[1].can_observe

    def _known(self) -> List[str]:
        return sorted(self.connectors)

    def dispatch_once(self, limit: int | None = None) -> List[EffectOutcome]:
        """Claim due effects (``PENDING``, or ``DISPATCHING`` with a lapsed lease unless ``NON_IDEMPOTENT``),
        dispatch them with up to ``max_in_flight`` at once, and record every result in one transaction.

        Returns:
            One outcome per claimed effect.
        """
        known = self._known()
        if not known:
            return []
        now = self.store.clock.now()
        until = now + self.lease_for
        try:
            with self.store.transaction() as tx:
                rows = tx.query(
                    "UPDATE em_effects SET status = 'DISPATCHING', lease_owner = ?, lease_token = lease_token + 1, "
                    "attempts = attempts + 1, next_attempt_at = ?, updated_at = ? WHERE key IN (SELECT key FROM "
                    "em_effects WHERE status IN ('PENDING', 'DISPATCHING') AND next_attempt_at <= ? AND NOT "
                    "(status = 'DISPATCHING' AND semantics = 'NON_IDEMPOTENT') "
                    f"AND connector IN {in_clause(len(known))} ORDER BY next_attempt_at LIMIT ?{tx.skip_locked}) "
                    "RETURNING key, connector, tool, payload, business_key, semantics, run_id, metadata, "
                    "max_attempts, attempts, lease_token",
                    (self.owner, until, now, now, *known, limit or self.batch_size),
                )
                room = (limit or self.batch_size) - len(rows)
                if room > 0:
                    rows += self._claim_fresh(tx, room, known, now, until)
                if not rows:
                    return []
                self._journal(tx, [_effect_event_with(r[0], r[1], r[2], "DISPATCHING", f',"attempt":{r[9]}')
                                   for r in rows])
        except Exception as exc:
            self._release_failed_claim(exc, "dispatch", now)
            raise
        claimed = [self._claimed_effect(r) for r in rows]
        lease = _BatchLease(self.store, "em_effects", "key", "DISPATCHING", {c[0].key: c[2] for c in claimed},
                            until, self.lease_for, f"{len(claimed)} effects dispatched by {self.owner}")
        try:
            def call(item: tuple[Effect, int, int, int]) -> Any:
                return self._dispatch_call(item, lease)

            results: List[tuple[bool, Any]] = []
            if any(c[0].connector not in self._latency for c in claimed[1:]):
                # A connector not timed yet: its first call runs alone, to learn whether it is quick.
                results = self._runner.map(call, claimed[:1], inline=True)
            rest = claimed[len(results):]
            fast = all(self._latency.get(c[0].connector, 1.0) < _INLINE_BELOW for c in rest)
            results += self._runner.map(call, rest, inline=fast)
            return self._complete_dispatch(claimed, results, lease)
        finally:
            lease.stop()

    def _release_failed_claim(self, exc: BaseException, step: str, now: float) -> None:
        """After an infrastructure fault in a claim, give back at once what the claim may have committed
        unbeknown to this worker (a commit whose acknowledgement was lost): no connector was called for it,
        so it is due again now, with the attempt it was charged given back. The rows are found by this
        worker's name and the claim's timestamp."""
        if not is_infrastructure_error(exc):
            return

        def release(_attempt: int) -> None:
            with self.store.transaction() as tx:
                if step == "dispatch":
                    rows = tx.query(
                        "UPDATE em_effects SET status = 'PENDING', attempts = attempts - 1, next_attempt_at = ?, "
                        "lease_owner = NULL WHERE lease_owner = ? AND status = 'DISPATCHING' AND updated_at = ? "
                        "RETURNING key, connector, tool",
                        (now, self.owner, now),
                    )
                    self._journal(tx, [_effect_event(k, c, t, "PENDING", released="store fault during claim")
                                       for k, c, t in rows])
                elif step == "reconcile":
                    tx.execute(
                        "UPDATE em_effects SET observations = observations - 1, next_attempt_at = ?, "
                        "lease_owner = NULL WHERE lease_owner = ? AND status = 'UNKNOWN' AND updated_at = ?",
                        (now, self.owner, now),
                    )
                else:
                    rows = tx.query(
                        "UPDATE em_obligations SET status = 'PENDING', attempts = attempts - 1, next_attempt_at = ?, "
                        "lease_owner = NULL WHERE lease_owner = ? AND status = 'COMPENSATING' AND updated_at = ? "
                        "RETURNING id, effect_key, kind",
                        (now, self.owner, now),
                    )
                    self._journal(tx, [_obligation_event(int(i), k, kind, "PENDING",
                                                         released="store fault during claim")
                                       for i, k, kind in rows])

        try:
            retry_infrastructure(release, clock=self.store.clock, what=f"releasing a failed {step} claim")
        except Exception as again:
            log.warning("could not release a %s claim after a store fault (%s); its leases lapse within %ss",
                        step, error_text(again), self.lease_for)

    def _claim_fresh(self, tx: Tx, room: int, known: Sequence[str], now: float, until: float) -> List[Any]:
        """Claim up to ``room`` fresh effects (submitted due at once, never attempted), found through their
        ``effect.pending`` events after the fresh cursor, which moves past what was looked at.

        Claims are serialised on the cursor row (SQLite's write lock; a row lock on PostgreSQL, where a claim
        finding it taken leaves fresh effects to that worker). A fresh effect of a connector this outbox does
        not know is given a ``next_attempt_at``, so that a worker that knows it claims it through the index.
        """
        lock = " FOR UPDATE SKIP LOCKED" if tx.dialect == POSTGRES else ""
        got = tx.one(f"SELECT value FROM em_kv WHERE namespace = 'outbox' AND key = 'fresh'{lock}")
        if got is None:
            # Removed: put it back at the start of the journal. Or taken by another worker (PostgreSQL): leave
            # fresh effects to that one.
            if tx.rowcount("INSERT INTO em_kv (namespace, key, value, version, updated_at) VALUES "
                           "('outbox', 'fresh', '0', 1, ?) ON CONFLICT (namespace, key) DO NOTHING", (now,)) != 1:
                return []
            got = ("0",)
        start = cursor = int(got[0])
        top_row = tx.one("SELECT MAX(position) FROM em_events")
        top = int(top_row[0]) if top_row is not None and top_row[0] is not None else 0
        key = "json_extract(data, '$.key')" if tx.dialect == SQLITE else "CAST(data AS jsonb) ->> 'key'"
        rows: List[Any] = []
        while not rows and cursor < top:
            # A window at a time, so that a long run of other events is passed over in bounded steps.
            upto = min(top, cursor + _FRESH_SCAN)
            events = tx.query(
                f"SELECT position, {key} FROM em_events WHERE position > ? AND position <= ? AND "
                "type = 'effect.pending' AND stream LIKE 'effects/%' ORDER BY position LIMIT ?",
                (cursor, upto, room),
            )
            cursor = int(events[-1][0]) if len(events) == room else upto
            if events:
                rows = self._claim_keys(tx, [k for _pos, k in events], known, now, until)
        if cursor != start:
            tx.execute("UPDATE em_kv SET value = ?, version = version + 1, updated_at = ? "
                       "WHERE namespace = 'outbox' AND key = 'fresh'", (str(cursor), now))
        return rows

    def _claim_keys(self, tx: Tx, keys: List[str], known: Sequence[str], now: float, until: float) -> List[Any]:
        """Lease the fresh effects among ``keys``; hand those of connectors unknown here to the index."""
        rows: List[Any] = []
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            rows += tx.query(
                "UPDATE em_effects SET status = 'DISPATCHING', lease_owner = ?, lease_token = lease_token + 1, "
                "attempts = attempts + 1, next_attempt_at = ?, updated_at = ? WHERE key IN "
                f"{in_clause(len(chunk))} AND status = 'PENDING' AND next_attempt_at IS NULL AND connector IN "
                f"{in_clause(len(known))} RETURNING key, connector, tool, payload, business_key, semantics, run_id, "
                "metadata, max_attempts, attempts, lease_token",
                (self.owner, until, now, *chunk, *known),
            )
        if len(rows) < len(keys):
            # Cancelled, approved or redriven since (nothing to do here), or of a connector unknown to this outbox.
            claimed = {r[0] for r in rows}
            rest = [k for k in keys if k not in claimed]
            for i in range(0, len(rest), 500):
                chunk = rest[i:i + 500]
                tx.execute(
                    "UPDATE em_effects SET next_attempt_at = not_before WHERE key IN "
                    f"{in_clause(len(chunk))} AND status = 'PENDING' AND next_attempt_at IS NULL",
                    chunk,
                )
        return rows

    @staticmethod
    def _claimed_effect(r: Sequence[Any]) -> tuple[Effect, int, int, int]:
        attempts, token, max_attempts = int(r[9]), int(r[10]), int(r[8])
        metadata = loads(r[7]) if r[7] is not None else {}
        metadata["errands.attempt"] = attempts
        metadata["errands.lease_token"] = token
        # Effect(key, connector, payload, tool, business_key, semantics, run_id, human_gate, dispatch_at,
        # max_attempts, metadata)
        effect = _new_effect((r[0], r[1], loads(r[3]), r[2], r[4], _SEMANTICS[r[5]], r[6], False, None, max_attempts,
                              metadata))
        return effect, attempts, token, max_attempts

    def _dispatch_call(self, item: tuple[Effect, int, int, int], lease: _BatchLease) -> Any:
        effect = item[0]
        if not lease.holds(effect.key):
            return _SKIPPED
        started = time.perf_counter()
        try:
            return self._runner.call(self.connector(effect.connector).dispatch, effect)
        finally:
            # A moving average of each connector's call time: connectors answering in well under a
            # millisecond are called inline, where a thread hand-off would cost more than the call.
            spent = time.perf_counter() - started
            old = self._latency.get(effect.connector)
            self._latency[effect.connector] = spent if old is None else 0.8 * old + 0.2 * spent

    def _complete_dispatch(
        self, claimed: Sequence[tuple[Effect, int, int, int]], results: Sequence[tuple[bool, Any]],
        lease: _BatchLease,
    ) -> List[EffectOutcome]:
        now = self.store.clock.now()
        updates: list[tuple[tuple[Any, ...], EffectOutcome, NewEvent]] = []
        skipped: list[EffectOutcome] = []
        for (effect, attempts, token, max_attempts), (ok, value) in zip(claimed, results):
            if value is _SKIPPED:
                skipped.append(self._lost_outcome(effect.key, attempts, EffectStatus.DISPATCHING))
                continue
            updates.append(self._dispatch_transition(effect, attempts, token, max_attempts, ok, value, now))
        return self._record_batch(updates, "DISPATCHING", lease, skipped=skipped)

    @staticmethod
    def _lost_outcome(key: str, attempts: int, status: EffectStatus) -> EffectOutcome:
        log.warning("lease on effect %s lapsed before its call started; another worker may hold it", key)
        return EffectOutcome(key=key, outcome=None, status=status, attempts=attempts, lease_lost=True)

    def _record_batch(self, updates: Sequence[tuple[tuple[Any, ...], EffectOutcome, NewEvent]], held: str,
                      lease: _BatchLease, obligations: Sequence[tuple[str, tuple[Any, ...]]] = (),
                      skipped: Sequence[EffectOutcome] = ()) -> List[EffectOutcome]:
        """Record a batch's results in one transaction, again after an infrastructure fault while the leases
        last: the connectors' answers are known, and a fault must cost a retry, not the answers."""
        if not updates:
            return list(skipped)
        out = retry_infrastructure(
            lambda attempt: lease.recorded(lambda: self._apply(updates, held, obligations, again=attempt > 0)),
            clock=self.store.clock, what=f"recording {len(updates)} effect results", keep_going=lease.alive)
        return out + list(skipped)

    def _dispatch_transition(
        self, effect: Effect, attempts: int, token: int, max_attempts: int, ok: bool, value: Any, now: float,
    ) -> tuple[tuple[Any, ...], EffectOutcome, NewEvent]:
        if ok and type(value) is DispatchResult and value.outcome is DispatchOutcome.CONFIRMED:
            # The common answer, with no branch to weigh.
            said_ref, said_error = value.external_ref, value.error
            return (
                ("CONFIRMED", None, _json_or_text(value.response), said_error, said_ref, 0, now, effect.key, token),
                # EffectOutcome(key, outcome, status, attempts, error, flagged, lease_lost)
                _new_effect_outcome((effect.key, DispatchOutcome.CONFIRMED, EffectStatus.CONFIRMED, attempts,
                                     said_error, False, False)),
                _effect_event_with(
                    effect.key, effect.connector, effect.tool, "CONFIRMED", f',"attempt":{attempts},"outcome":"CONFIRMED"'
                    + ("" if said_error is None else ',"error":' + json_value(said_error))
                    + ("" if said_ref is None else ',"external_ref":' + json_value(said_ref))),
            )
        can_observe = self._can_observe(effect.connector)
        non_idem = effect.semantics is Semantics.NON_IDEMPOTENT
        outcome: DispatchOutcome | None = None
        response: Any = None
        ref: str | None = None
        error: str | None = None
        retry_after: float | None = None
        if ok and isinstance(value, DispatchResult):
            outcome, response, ref, error, retry_after = (
                DispatchOutcome(value.outcome), value.response, value.external_ref, value.error, value.retry_after)
        elif ok:
            error = f"connector {effect.connector!r} returned {type(value).__name__}, not a DispatchResult"
        else:
            error = error_text(value)
            retry_after = getattr(value, "retry_after", None)
        if outcome is DispatchOutcome.CONFIRMED:
            kind = "confirmed"
        elif outcome is DispatchOutcome.FAILED or (not ok and isinstance(value, PermanentError)):
            kind = "failed"
        elif outcome is DispatchOutcome.PENDING:
            kind = "accepted"
        elif not ok and isinstance(value, TransientError) and not non_idem:
            # The connector says it did not deliver: retry after backoff, no observation needed.
            kind = "retry"
        else:
            kind = "unknown"
        flagged = 0
        next_at: float | None = None
        if kind == "confirmed":
            status = EffectStatus.CONFIRMED
        elif kind == "failed":
            status = EffectStatus.FAILED
        elif kind == "accepted":
            status = EffectStatus.UNKNOWN if can_observe else EffectStatus.CONFIRMED
            next_at = now + self._backoff(1, retry_after) if can_observe else None
        elif kind == "unknown" and can_observe:
            status = EffectStatus.UNKNOWN
            next_at = now + self._backoff(1, retry_after)
        elif kind == "unknown" and non_idem:
            # Never re-dispatched blind and nothing can observe it: a human decides (redrive or not).
            status, flagged = EffectStatus.UNKNOWN, 1
            error = (error or "outcome unknown") + "; NON_IDEMPOTENT and the connector cannot observe: flagged"
        elif attempts >= max_attempts:
            status = EffectStatus.FAILED
            error = f"{error or 'outcome unknown'} (gave up after {attempts} attempts)"
        else:
            status = EffectStatus.PENDING
            next_at = now + self._backoff(attempts, retry_after)
        params = (status.value, next_at, _json_or_text(response), error, ref, flagged, now, effect.key, token)
        out = EffectOutcome(key=effect.key, outcome=outcome, status=status, attempts=attempts, error=error,
                            flagged=bool(flagged))
        ev = _effect_event(effect.key, effect.connector, effect.tool, status.value, attempt=attempts,
                           outcome=None if outcome is None else outcome.value, error=error, external_ref=ref,
                           flagged=True if flagged else None)
        return params, out, ev

    def _apply(self, updates: Sequence[tuple[tuple[Any, ...], EffectOutcome, NewEvent]], held: str,
               obligations: Sequence[tuple[str, tuple[Any, ...]]] = (), *, again: bool = False) -> List[EffectOutcome]:
        """Record a batch of completions in one transaction, each fenced by its lease token.

        ``again``: an earlier try met a store fault and may have committed anyway (its acknowledgement lost);
        a completion it recorded (the token unchanged, the status it set) counts as recorded, not as lost.
        """
        out: List[EffectOutcome] = []
        events: list[NewEvent] = []
        lost: set[str] = set()
        with self.store.transaction() as tx:
            held_keys = self._fenced_update(tx, [u[0] for u in updates], held)
            recorded = self._recorded_before(tx, [u[0] for u in updates if u[0][7] not in held_keys]) \
                if again and len(held_keys) < len(updates) else set()
            for _params, outcome, event in updates:
                if outcome.key in held_keys:
                    out.append(outcome)
                    events.append(event)
                elif outcome.key in recorded:
                    out.append(outcome)
                else:
                    lost.add(outcome.key)
                    log.warning("lease on effect %s lapsed before its result was recorded", outcome.key)
                    out.append(EffectOutcome(key=outcome.key, outcome=outcome.outcome, status=EffectStatus.DISPATCHING
                                             if held == "DISPATCHING" else EffectStatus.UNKNOWN,
                                             attempts=outcome.attempts, error=outcome.error, lease_lost=True))
            for effect_key, ob_row in obligations:
                if effect_key in lost:
                    continue
                ob = self._insert_obligation(tx, ob_row)
                if ob is not None:
                    events.append(ob)
            if events:
                self._journal(tx, events)
        return out

    @staticmethod
    def _recorded_before(tx: Tx, rows: Sequence[tuple[Any, ...]]) -> set[str]:
        """The keys among completions ``rows`` (``_fenced_update``'s shape) that stand as recorded: the lease
        token unchanged since, the status the completion set, no lease owner."""
        want = {row[7]: (int(row[8]), row[0]) for row in rows}
        keys = list(want)
        done: set[str] = set()
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            for key, token, status, owner in tx.query(
                    f"SELECT key, lease_token, status, lease_owner FROM em_effects WHERE key IN {in_clause(len(chunk))}",
                    chunk):
                if owner is None and (int(token), status) == want[key]:
                    done.add(key)
        return done

    @staticmethod
    def _fenced_update(tx: Tx, rows: Sequence[tuple[Any, ...]], held: str) -> set[str]:
        """Apply completions ``(status, next_at, response, error, ref, flagged, now, key, token)`` where the
        lease token still matches, one statement per chunk; returns the keys that were still held."""
        if tx.dialect == SQLITE and rows:
            # One prepared statement run per completion: when every lease was still held (the rule) the count
            # of changed rows says so. Otherwise undo it and take the statement that names the keys held.
            tx.execute("SAVEPOINT em_fenced")
            changed = tx.raw.executemany(
                "UPDATE em_effects SET status = ?, next_attempt_at = ?, response = COALESCE(?, response), error = ?, "
                "external_ref = COALESCE(?, external_ref), flagged = ?, lease_owner = NULL, updated_at = ? "
                f"WHERE key = ? AND lease_token = ? AND status = '{held}'",
                rows,
            ).rowcount
            if changed == len(rows):
                tx.execute("RELEASE em_fenced")
                return {row[7] for row in rows}
            tx.execute("ROLLBACK TO em_fenced")
            tx.execute("RELEASE em_fenced")
        done: set[str] = set()
        row_sql = ("(CAST(? AS TEXT), CAST(? AS DOUBLE PRECISION), CAST(? AS TEXT), CAST(? AS TEXT), "
                   "CAST(? AS TEXT), CAST(? AS INTEGER), CAST(? AS DOUBLE PRECISION), CAST(? AS TEXT), "
                   "CAST(? AS BIGINT))")
        for i in range(0, len(rows), 1000):
            chunk = rows[i:i + 1000]
            got = tx.query(
                "WITH v (status, next_at, response, error, ref, flagged, now, key, token) AS (VALUES "
                + ", ".join([row_sql] * len(chunk))
                + ") UPDATE em_effects SET status = v.status, next_attempt_at = v.next_at, "
                "response = COALESCE(v.response, em_effects.response), error = v.error, "
                "external_ref = COALESCE(v.ref, em_effects.external_ref), flagged = v.flagged, lease_owner = NULL, "
                "updated_at = v.now FROM v WHERE em_effects.key = v.key AND em_effects.lease_token = v.token "
                f"AND em_effects.status = '{held}' RETURNING em_effects.key",
                [value for row in chunk for value in row],
            )
            done.update(r[0] for r in got)
        return done

    # -- reconciler ------------------------------------------------------------------------------
    def reconcile_once(self, limit: int | None = None) -> List[EffectOutcome]:
        """Observe effects whose outcome is unknown and act on the answer: ``CONFIRMED`` -> confirmed;
        ``ABSENT`` -> dispatched again; ``DUPLICATE`` -> confirmed and a compensation owed (same transaction);
        ``STUCK``/``UNKNOWN`` -> observed again after backoff, flagged after ``max_observations``.

        ``NON_IDEMPOTENT`` effects whose dispatch lease lapsed (a worker died mid-call) become ``UNKNOWN``
        here first: they are observed, never dispatched blind.
        """
        now = self.store.clock.now()
        until = now + self.lease_for
        known = self._known()
        try:
            with self.store.transaction() as tx:
                lapsed = tx.query(
                    "UPDATE em_effects SET status = 'UNKNOWN', lease_owner = NULL, updated_at = ?, "
                    "error = 'lease lapsed during dispatch; outcome unknown' WHERE key IN (SELECT key FROM em_effects "
                    "WHERE status = 'DISPATCHING' AND semantics = 'NON_IDEMPOTENT' AND next_attempt_at <= ?"
                    f"{tx.skip_locked}) RETURNING key, connector, tool",
                    (now, now),
                )
                if lapsed:
                    self._journal(tx, [_effect_event(k, c, t, "UNKNOWN", error="lease lapsed during dispatch")
                                       for k, c, t in lapsed])
                if not known:
                    return []
                rows = tx.query(
                    "UPDATE em_effects SET lease_owner = ?, lease_token = lease_token + 1, "
                    "observations = observations + 1, next_attempt_at = ?, updated_at = ? WHERE key IN (SELECT key "
                    f"FROM em_effects WHERE status = 'UNKNOWN' AND next_attempt_at <= ? AND connector IN "
                    f"{in_clause(len(known))} ORDER BY next_attempt_at LIMIT ?{tx.skip_locked}) RETURNING key, "
                    "connector, tool, payload, business_key, semantics, run_id, metadata, max_attempts, attempts, "
                    "lease_token, observations, flagged",
                    (self.owner, until, now, now, *known, limit or self.batch_size),
                )
        except Exception as exc:
            self._release_failed_claim(exc, "reconcile", now)
            raise
        if not rows:
            return []
        claimed = [(self._claimed_effect(r), int(r[11]), bool(r[12])) for r in rows]
        lease = _BatchLease(self.store, "em_effects", "key", "UNKNOWN", {c[0][0].key: c[0][2] for c in claimed},
                            until, self.lease_for, f"{len(claimed)} effects observed by {self.owner}")
        try:
            results = self._runner.map(lambda item: self._observe_call(item, lease), [c[0] for c in claimed])
            now = self.store.clock.now()
            updates: list[tuple[tuple[Any, ...], EffectOutcome, NewEvent]] = []
            obligations: list[tuple[str, tuple[Any, ...]]] = []
            skipped: list[EffectOutcome] = []
            for ((effect, attempts, token, max_attempts), observations, was_flagged), (ok, value) in zip(
                    claimed, results):
                if value is _SKIPPED:
                    skipped.append(self._lost_outcome(effect.key, attempts, EffectStatus.UNKNOWN))
                    continue
                upd, ob = self._observe_transition(effect, attempts, token, max_attempts, observations, was_flagged,
                                                   ok, value, now)
                updates.append(upd)
                if ob is not None:
                    obligations.append((effect.key, ob))
            return self._record_batch(updates, "UNKNOWN", lease, obligations, skipped)
        finally:
            lease.stop()

    def _observe_call(self, item: tuple[Effect, int, int, int], lease: _BatchLease) -> Any:
        effect = item[0]
        if not lease.holds(effect.key):
            return _SKIPPED
        conn = self.connector(effect.connector)
        if not capabilities_of(conn).can_observe:
            raise ConfigError(f"connector {effect.connector!r} cannot observe", field="connector",
                              value=effect.connector)
        return conn.observe(effect)

    def _observe_transition(
        self, effect: Effect, attempts: int, token: int, max_attempts: int, observations: int, was_flagged: bool,
        ok: bool, value: Any, now: float,
    ) -> tuple[tuple[tuple[Any, ...], EffectOutcome, NewEvent], tuple[Any, ...] | None]:
        outcome: ObservationOutcome | None = None
        response: Any = None
        ref: str | None = None
        error: str | None = None
        if ok and isinstance(value, Observation):
            outcome, response, ref = ObservationOutcome(value.outcome), value.response, value.external_ref
        elif ok:
            error = f"connector {effect.connector!r} observe returned {type(value).__name__}, not an Observation"
        else:
            error = error_text(value)
        cannot_observe = not ok and isinstance(value, ConfigError)
        flagged = 0
        next_at: float | None = None
        obligation: tuple[Any, ...] | None = None
        observe_only = effect.semantics is Semantics.OBSERVE_ONLY
        if outcome is ObservationOutcome.CONFIRMED:
            status = EffectStatus.CONFIRMED
        elif outcome is ObservationOutcome.DUPLICATE:
            status = EffectStatus.CONFIRMED
            obligation = (effect.key, "duplicate", _json_or_text({"payload": effect.payload, "observed": response}),
                          effect.run_id, effect.connector, ObligationStatus.PENDING.value,
                          self.compensation_attempts, now, now, now)
        elif outcome is ObservationOutcome.ABSENT and not observe_only:
            if attempts >= max_attempts:
                status = EffectStatus.FAILED
                error = f"observed ABSENT after {attempts} dispatch attempts"
            else:
                status, next_at = EffectStatus.PENDING, now
        elif cannot_observe:
            status, flagged = EffectStatus.UNKNOWN, 1
        else:
            status = EffectStatus.UNKNOWN
            if outcome is not None and error is None:
                error = f"observed {outcome.value}"
            if observations >= self.max_observations:
                flagged = 1
                next_at = now + self.backoff_cap
            else:
                next_at = now + self._backoff(observations)
        params = (status.value, next_at, _json_or_text(response), error, ref, flagged, now, effect.key, token)
        out = EffectOutcome(key=effect.key, outcome=outcome, status=status, attempts=attempts, error=error,
                            flagged=bool(flagged))
        ev = _effect_event(
            effect.key, effect.connector, effect.tool, status.value, observation=None if outcome is None else
            outcome.value, observations=observations, error=error, external_ref=ref,
            flagged=True if flagged else None, newly_flagged=True if flagged and not was_flagged else None,
        )
        return (params, out, ev), obligation

    # -- obligations -----------------------------------------------------------------------------
    _O_INSERT = (
        "INSERT INTO em_obligations (effect_key, kind, payload, run_id, compensator, status, max_attempts, "
        "next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (effect_key, kind) DO NOTHING RETURNING id"
    )

    def _insert_obligation(self, tx: Tx, row: tuple[Any, ...]) -> NewEvent | None:
        got = tx.one(self._O_INSERT, row)
        if got is None:
            return None
        return _obligation_event(int(got[0]), row[0], row[1], row[5])

    def register_compensation(
        self, effect_key: str, kind: str, payload: Any = None, *, run_id: str | None = None,
        compensator: str | None = None, due: bool = False, conn: Any = None,
    ) -> ObligationRecord:
        """Record that ``effect_key`` owes a compensation of ``kind`` (idempotent on the pair).

        It stays ``REGISTERED`` until ``compensate_run(run_id)`` (or is due at once with ``due=True``).

        Args:
            effect_key: the effect it compensates (must exist).
            kind: what kind of compensation (``"refund"``); a ``@outbox.compensator(kind)`` function runs it,
                else the compensator connector's ``compensate``.
            payload: JSON data for the compensator.
            run_id: the saga it belongs to (default: the effect's ``run_id``).
            compensator: the connector that compensates (default: the effect's connector).
            due: make it due now instead of waiting for ``compensate_run``.
            conn: the caller's own connection (joins the caller's transaction).

        Raises:
            NotFoundError: no such effect.
            EffectConflictError: the pair was registered before with a different payload.
        """
        _check_str("effect_key", effect_key)
        _check_str("kind", kind)
        _check_str("run_id", run_id, optional=True)
        _check_str("compensator", compensator, optional=True)
        text = dumps(payload, field="payload", limit=self.payload_limit)
        now = self.store.clock.now()
        with self.store.transaction(conn) as tx:
            eff = tx.one("SELECT connector, run_id FROM em_effects WHERE key = ?", (effect_key,))
            if eff is None:
                raise NotFoundError(f"no effect with key {effect_key!r} to owe a compensation for")
            status = ObligationStatus.PENDING if due else ObligationStatus.REGISTERED
            row = (effect_key, kind, text, run_id or eff[1], compensator or eff[0], status.value,
                   self.compensation_attempts, now if due else None, now, now)
            event = self._insert_obligation(tx, row)
            if event is not None:
                self._journal(tx, [event])
            got = tx.one(f"SELECT {_O_COLS} FROM em_obligations WHERE effect_key = ? AND kind = ?", (effect_key, kind))
            assert got is not None
            rec = _obligation_record(got)
        if rec.payload != payload:
            raise EffectConflictError(
                f"a {kind!r} compensation for {effect_key!r} was registered before with a different payload",
                key=effect_key)
        return rec

    def compensate_run(self, run_id: str) -> List[ObligationRecord]:
        """Start the saga rollback of ``run_id``: its effects not yet dispatched are cancelled and its
        registered obligations become due, to be compensated last-registered first (LIFO: each waits until
        every later one of the run is compensated). The worker (or ``compensate_once``) runs them.

        Returns:
            The run's obligations made due, in the order they will be compensated.
        """
        _check_str("run_id", run_id)
        now = self.store.clock.now()
        with self.store.transaction() as tx:
            cancelled = tx.query(
                "UPDATE em_effects SET status = 'CANCELLED', next_attempt_at = NULL, updated_at = ?, "
                "error = 'cancelled: run compensated' WHERE run_id = ? AND status IN ('PENDING', 'AWAITING_APPROVAL') "
                "RETURNING key, connector, tool",
                (now, run_id),
            )
            rows = tx.query(
                "UPDATE em_obligations SET status = 'PENDING', next_attempt_at = ?, updated_at = ? "
                f"WHERE run_id = ? AND status = 'REGISTERED' RETURNING {_O_COLS}",
                (now, now, run_id),
            )
            events = [_effect_event(k, c, t, "CANCELLED", reason="run compensated") for k, c, t in cancelled]
            recs = sorted((_obligation_record(r) for r in rows), key=lambda o: -o.id)
            events += [_obligation_event(o.id, o.effect_key, o.kind, "PENDING", run_id=run_id) for o in recs]
            if events:
                self._journal(tx, events)
        return recs

    def compensate_once(self, limit: int | None = None) -> List[ObligationOutcome]:
        """Claim due obligations (LIFO within a run), compensate them, record every result in one transaction."""
        now = self.store.clock.now()
        until = now + self.lease_for
        try:
            with self.store.transaction() as tx:
                rows = tx.query(
                    "UPDATE em_obligations SET status = 'COMPENSATING', lease_owner = ?, "
                    "lease_token = lease_token + 1, attempts = attempts + 1, next_attempt_at = ?, updated_at = ? "
                    "WHERE id IN (SELECT o.id FROM em_obligations o WHERE o.status IN ('PENDING', 'COMPENSATING') "
                    "AND o.next_attempt_at <= ? AND NOT EXISTS (SELECT 1 FROM em_obligations l WHERE "
                    "l.run_id = o.run_id AND l.id > o.id AND l.status IN ('PENDING', 'COMPENSATING', 'STUCK')) "
                    f"ORDER BY o.id DESC LIMIT ?{tx.skip_locked}) RETURNING {_O_COLS}",
                    (self.owner, until, now, now, limit or self.batch_size),
                )
                if not rows:
                    return []
                self._journal(
                    tx, [_obligation_event(int(r[0]), r[1], r[2], "COMPENSATING", attempt=int(r[7])) for r in rows])
        except Exception as exc:
            self._release_failed_claim(exc, "compensate", now)
            raise
        claimed = [(_obligation_record(r), int(r[11])) for r in rows]
        lease = _BatchLease(self.store, "em_obligations", "id", "COMPENSATING", {c[0].id: c[1] for c in claimed},
                            until, self.lease_for, f"{len(claimed)} obligations compensated by {self.owner}")
        try:
            results = self._runner.map(lambda rec: self._compensate_call(rec, lease), [c[0] for c in claimed])
            now = self.store.clock.now()
            done: list[tuple[ObligationRecord, int, tuple[Any, ...], ObligationOutcome]] = []
            skipped: list[ObligationOutcome] = []
            for (rec, token), (ok, value) in zip(claimed, results):
                if value is _SKIPPED:
                    log.warning("lease on obligation %s lapsed before its call started; another worker may hold it",
                                rec.id)
                    skipped.append(ObligationOutcome(id=rec.id, effect_key=rec.effect_key, kind=rec.kind, outcome=None,
                                                     status=ObligationStatus.COMPENSATING, attempts=rec.attempts,
                                                     lease_lost=True))
                    continue
                params, outcome = self._compensation_transition(rec, ok, value, now)
                done.append((rec, token, params, outcome))
            if not done:
                return skipped
            out = retry_infrastructure(
                lambda attempt: lease.recorded(lambda: self._apply_compensations(done, now, again=attempt > 0)),
                clock=self.store.clock, what=f"recording {len(done)} compensation results", keep_going=lease.alive)
            return out + skipped
        finally:
            lease.stop()

    def _apply_compensations(self, done: Sequence[tuple[ObligationRecord, int, tuple[Any, ...], ObligationOutcome]],
                             now: float, *, again: bool) -> List[ObligationOutcome]:
        """Record compensation results in one transaction, each fenced by its lease token (``again``: as in
        ``_apply``, a result an earlier faulty try committed counts as recorded)."""
        out: List[ObligationOutcome] = []
        events: list[NewEvent] = []
        with self.store.transaction() as tx:
            for rec, token, params, outcome in done:
                n = tx.rowcount(
                    "UPDATE em_obligations SET status = ?, next_attempt_at = ?, response = ?, error = ?, "
                    "lease_owner = NULL, updated_at = ? WHERE id = ? AND lease_token = ? AND status = 'COMPENSATING'",
                    (*params, now, rec.id, token),
                )
                if n != 1 and again:
                    got = tx.one("SELECT lease_token, status, lease_owner FROM em_obligations WHERE id = ?", (rec.id,))
                    if got is not None and int(got[0]) == token and got[1] == params[0] and got[2] is None:
                        out.append(outcome)
                        continue
                if n != 1:
                    out.append(ObligationOutcome(id=rec.id, effect_key=rec.effect_key, kind=rec.kind,
                                                 outcome=outcome.outcome, status=ObligationStatus.COMPENSATING,
                                                 attempts=rec.attempts, error=outcome.error, lease_lost=True))
                    continue
                out.append(outcome)
                events.append(_obligation_event(rec.id, rec.effect_key, rec.kind, outcome.status.value,
                                                attempt=rec.attempts, error=outcome.error))
            if events:
                self._journal(tx, events)
        return out

    def _compensate_call(self, rec: ObligationRecord, lease: _BatchLease) -> Any:
        if not lease.holds(rec.id):
            return _SKIPPED
        fn = self._compensators.get(rec.kind)
        if fn is not None:
            return fn(rec.obligation)
        conn = self.connectors.get(rec.compensator or "")
        if conn is None or not capabilities_of(conn).can_compensate:
            return CompensationResult(
                outcome=CompensationOutcome.STUCK,
                error=f"no compensator for kind {rec.kind!r}: register @outbox.compensator({rec.kind!r}) or use a "
                f"connector that can compensate (compensator {rec.compensator!r})",
            )
        return conn.compensate(rec.obligation)

    def _compensation_transition(
        self, rec: ObligationRecord, ok: bool, value: Any, now: float,
    ) -> tuple[tuple[Any, ...], ObligationOutcome]:
        outcome: CompensationOutcome | None = None
        response: Any = None
        error: str | None = None
        retry_after: float | None = None
        if ok and (value is None or isinstance(value, CompensationOutcome)):
            outcome = CompensationOutcome(value or CompensationOutcome.COMPENSATED)
        elif ok and isinstance(value, CompensationResult):
            outcome, response, error, retry_after = (
                CompensationOutcome(value.outcome), value.response, value.error, value.retry_after)
        elif ok:
            error = f"compensator returned {type(value).__name__}, not a CompensationResult"
        else:
            error = error_text(value)
            retry_after = getattr(value, "retry_after", None)
        next_at: float | None = None
        if outcome is CompensationOutcome.COMPENSATED:
            status = ObligationStatus.COMPENSATED
        elif outcome is CompensationOutcome.STUCK or (not ok and isinstance(value, PermanentError)):
            status = ObligationStatus.STUCK
        elif rec.attempts >= rec.max_attempts:
            status = ObligationStatus.STUCK
            error = f"{error or (outcome.value if outcome else 'failed')} (gave up after {rec.attempts} attempts)"
        else:
            status = ObligationStatus.PENDING
            next_at = now + self._backoff(rec.attempts, retry_after)
        return (status.value, next_at, _json_or_text(response), error), ObligationOutcome(
            id=rec.id, effect_key=rec.effect_key, kind=rec.kind, outcome=outcome, status=status,
            attempts=rec.attempts, error=error,
        )

    def redrive_obligation(self, obligation_id: int) -> ObligationRecord:
        """Make a ``STUCK`` obligation due again with fresh attempts."""
        now = self.store.clock.now()
        with self.store.transaction() as tx:
            row = tx.one(
                "UPDATE em_obligations SET status = 'PENDING', attempts = 0, next_attempt_at = ?, updated_at = ? "
                f"WHERE id = ? AND status = 'STUCK' RETURNING {_O_COLS}",
                (now, now, obligation_id),
            )
            if row is None:
                raise ConfigError(f"obligation {obligation_id!r} does not exist or is not STUCK",
                                  field="id", value=obligation_id)
            rec = _obligation_record(row)
            self._journal(tx, [_obligation_event(rec.id, rec.effect_key, rec.kind, "PENDING", redriven=True)])
        return rec

    # -- views ---------------------------------------------------------------------------------
    def get(self, key: str) -> EffectRecord:
        """The record of effect ``key``.

        Raises:
            NotFoundError: no such effect.
        """
        with self.store.read() as tx:
            row = tx.one(f"SELECT {_E_COLS} FROM em_effects WHERE key = ?", (key,))
        if row is None:
            raise NotFoundError(f"no effect with key {key!r}")
        return _effect_record(row)

    def list(
        self, status: EffectStatus | str | None = None, connector: str | None = None, limit: int = 100, *,
        flagged: bool | None = None, run_id: str | None = None,
    ) -> List[EffectRecord]:
        """Effects, oldest first, filtered by status, connector, flag and run."""
        where, params = self._filters(status, connector, flagged, run_id)
        with self.store.read() as tx:
            rows = tx.query(f"SELECT {_E_COLS} FROM em_effects{where} ORDER BY created_at, key LIMIT ?",
                            (*params, int(limit)))
        return [_effect_record(r) for r in rows]

    @staticmethod
    def _filters(status: Any, connector: str | None, flagged: bool | None,
                 run_id: str | None) -> tuple[str, List[Any]]:
        clauses: List[str] = []
        params: List[Any] = []
        if status is not None:
            try:
                status = EffectStatus(str(status).upper())
            except ValueError:
                raise ConfigError(
                    f"status must be one of {', '.join(s.value for s in EffectStatus)}, got {status!r}",
                    field="status", value=status) from None
            clauses.append("status = ?")
            params.append(status.value)
        if connector is not None:
            clauses.append("connector = ?")
            params.append(connector)
        if flagged is not None:
            clauses.append("flagged = ?")
            params.append(int(flagged))
        if run_id is not None:
            clauses.append("run_id = ?")
            params.append(run_id)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def obligations(
        self, status: ObligationStatus | str | None = None, *, effect_key: str | None = None,
        run_id: str | None = None, limit: int = 100,
    ) -> List[ObligationRecord]:
        """Obligations, oldest first."""
        clauses: List[str] = []
        params: List[Any] = []
        if status is not None:
            try:
                status = ObligationStatus(str(status).upper())
            except ValueError:
                raise ConfigError(
                    f"status must be one of {', '.join(s.value for s in ObligationStatus)}, got {status!r}",
                    field="status", value=status) from None
            clauses.append("status = ?")
            params.append(status.value)
        if effect_key is not None:
            clauses.append("effect_key = ?")
            params.append(effect_key)
        if run_id is not None:
            clauses.append("run_id = ?")
            params.append(run_id)
        where = " WHERE " + " AND ".join(clauses) if clauses else ""
        with self.store.read() as tx:
            rows = tx.query(f"SELECT {_O_COLS} FROM em_obligations{where} ORDER BY id LIMIT ?", (*params, int(limit)))
        return [_obligation_record(r) for r in rows]

    def history(self, key: str, limit: int = 1000) -> List[Event]:
        """The journal events of effect ``key`` and its obligations, oldest first.

        A scan of the effect's connector stream (and the obligation streams) from the effect's first event:
        meant for inspection, not for hot paths.
        """
        with self.store.read() as tx:
            got = tx.one("SELECT connector, journal_from FROM em_effects WHERE key = ?", (key,))
            if got is None:
                raise NotFoundError(f"no effect with key {key!r}")
            prefix = '{"key":' + json.dumps(key, ensure_ascii=False) + ","
            pattern = prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"
            rows = tx.query(
                f"SELECT {_EVENT_COLS} FROM em_events WHERE position > ? AND (stream = ? OR stream LIKE "
                "'obligations/%') AND data LIKE ? ESCAPE '!' ORDER BY position LIMIT ?",
                (int(got[1]), f"effects/{got[0]}", pattern, int(limit)),
            )
        # LIKE ignores ASCII case on SQLite: keep the exact key only.
        return [e for e in map(_event_from_row, rows) if isinstance(e.data, dict) and e.data.get("key") == key]

    def stats(self) -> dict[str, Any]:
        """Counts: ``effects`` by status, ``flagged`` effects, ``obligations`` by status, and ``due`` (effects
        a worker would take now)."""
        now = self.store.clock.now()
        with self.store.read() as tx:
            eff = dict(tx.query("SELECT status, COUNT(*) FROM em_effects GROUP BY status"))
            flagged = tx.one("SELECT COUNT(*) FROM em_effects WHERE flagged = 1")
            due = tx.one(
                "SELECT COUNT(*) FROM em_effects WHERE status IN ('PENDING', 'UNKNOWN') AND (next_attempt_at <= ? "
                "OR (status = 'PENDING' AND next_attempt_at IS NULL))",
                (now,))
            obs = dict(tx.query("SELECT status, COUNT(*) FROM em_obligations GROUP BY status"))
        return {
            "effects": {s.value: int(eff.get(s.value, 0)) for s in EffectStatus},
            "flagged": int(flagged[0]) if flagged else 0,
            "due": int(due[0]) if due else 0,
            "obligations": {s.value: int(obs.get(s.value, 0)) for s in ObligationStatus},
        }

    def drain(self, max_steps: int = 10_000) -> int:
        """Run dispatch, reconcile and compensate steps until one round finds nothing due now.

        Returns:
            How many items the steps handled.
        """
        return drain(lambda: len(self.dispatch_once()) + len(self.reconcile_once()) + len(self.compensate_once()),
                     max_steps)


__all__ = [
    "EffectOutcome",
    "EffectRecord",
    "ObligationOutcome",
    "ObligationRecord",
    "ObligationStatus",
    "Outbox",
]
