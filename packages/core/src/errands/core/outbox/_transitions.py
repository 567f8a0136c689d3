"""The outbox's decisions, as pure functions: a stored state and an answer in, the new state, the outcome to report
and the events to journal out.

Nothing here reads the store, the clock or a random source: the time is passed in (``now``), and so is the retry
delay (``delay(attempt, retry_after)``), so that every rule can be checked on plain values. The engine reads
state, calls connectors, hands the answers here and writes what comes back.
"""

from __future__ import annotations

from json.encoder import encode_basestring
from typing import Any, Callable, Iterable, NamedTuple

from .._values import (
    CompensationOutcome,
    CompensationResult,
    DispatchOutcome,
    DispatchResult,
    EffectStatus,
    Observation,
    ObservationOutcome,
    Semantics,
)
from ..errors import ConfigError, PermanentError, TransientError, error_text
from ..store import JSONText, NewEvent, json_value
from ._records import (
    Claimed,
    EffectOutcome,
    NewEffect,
    NewObligation,
    ObligationOutcome,
    ObligationRecord,
    ObligationStatus,
    StoredEffect,
)

#: Seconds before the try after try ``attempt`` (from 1), never sooner than a ``retry_after`` the counterparty gave.
Delay = Callable[[int, "float | None"], float]

#: What a call of user code came to: ``(True, what it returned)`` or ``(False, the exception it raised)``.
CallResult = tuple[bool, Any]

#: The streams of effect events, one per connector; the engine reserves the prefix in the store.
EFFECT_STREAMS = "effects/"


# -- events ---------------------------------------------------------------------------------------------------
def effect_event(key: str, connector: str, tool: str, status: str, **data: Any) -> NewEvent:
    """An effect's journal event: on its connector's stream, typed ``effect.<status>``, with the subject
    ``effect.<status>.<connector>.<tool>`` (no tool token when the effect has none). ``data`` holds the key first
    (``history`` finds an effect's events by it), the connector, tool and status (an ``EffectStatus`` is a string
    and is written as one), then the members given that are not None; it is written as JSON text at once
    (``effect_text``)."""
    return _named(connector, tool, status, JSONText(effect_text(key, connector, tool, status, data.items())))


def effect_text(key: str, connector: str, tool: str, status: str, members: Iterable[tuple[str, Any]]) -> str:
    """The data of an effect event as JSON text: the key, connector, tool and status, then each of ``members``
    whose value is not None, in order; byte for byte what the store's encoder writes for that object (the journal
    stores the text as it is). Every effect event's data is built here, the hot paths' (a submit's, a claim's, an
    answer's) included; a string member is encoded as that encoder encodes a string, any other by ``json_value``,
    and an enum's text is its ``_value_`` (``.value`` is a descriptor call)."""
    named = status if type(status) is str else status._value_  # type: ignore[attr-defined]  # an EffectStatus
    text = (f'{{"key":{_string(key)},"connector":{_string(connector)},"tool":{_string(tool)},'
            f'"status":{_string(named)}')
    for name, value in members:
        if value is not None:
            text += f",{_string(name)}:{_string(value) if type(value) is str else json_value(value)}"
    return text + "}"


def _named(connector: str, tool: str, status: str, body: Any) -> NewEvent:
    """The event of an effect of ``connector`` and ``tool`` reaching ``status``, holding ``body`` (built by the
    caller in ``effect_event``'s order: the transitions every effect of a batch takes build theirs directly)."""
    names = _EVENT_NAMES.get((connector, tool, status))
    if names is None:
        names = _event_names(connector, tool, status)
    return NewEvent(names[0], names[1], body, names[2])


# The stream, type and subject of an effect event, by connector, tool and status: a service has a few of each.
_EVENT_NAMES: dict[tuple[str, str, str], tuple[str, str, str]] = {}


def _event_names(connector: str, tool: str, status: str) -> tuple[str, str, str]:
    lower = status.lower()
    subject = f"effect.{lower}.{connector}.{tool}" if tool else f"effect.{lower}.{connector}"
    names = (f"{EFFECT_STREAMS}{connector}", f"effect.{lower}", subject)
    if len(_EVENT_NAMES) >= 4096:
        _EVENT_NAMES.clear()
    _EVENT_NAMES[(connector, tool, str(status))] = names
    return names


def obligation_event(ob_id: int, effect_key: str, kind: str, status: str, **data: Any) -> NewEvent:
    """An obligation's journal event, on the stream ``obligations/<kind>``; ``data`` starts with the effect key."""
    body: dict[str, Any] = {"key": effect_key, "id": ob_id, "kind": kind, "status": status}
    body.update((name, value) for name, value in data.items() if value is not None)
    lower = status.lower()
    return NewEvent(f"obligations/{kind}", f"obligation.{lower}", body, f"obligation.{lower}.{kind}")


def dispatching_event(claimed: Claimed) -> NewEvent:
    """The event of a claim for dispatch (or of an inline run starting)."""
    effect = claimed.effect
    status = EffectStatus.DISPATCHING
    return _named(effect.connector, effect.tool, status, JSONText(effect_text(
        effect.key, effect.connector, effect.tool, status,
        (("attempt", claimed.attempts), ("run_id", effect.run_id), ("business_key", effect.business_key)))))


_string: Callable[[str], str] = encode_basestring


# -- admission ------------------------------------------------------------------------------------------------
def submitted_event(row: NewEffect) -> NewEvent:
    """The event of an effect just admitted: its first status, with its semantics and run."""
    return _named(row.connector, row.tool, row.status, JSONText(effect_text(
        row.key, row.connector, row.tool, row.status,
        (("semantics", row.semantics), ("run_id", row.run_id), ("business_key", row.business_key)))))


def admitted_status(semantics: Semantics, human_gate: bool) -> EffectStatus:
    """Where a submitted effect starts: awaiting a human, observed only, or due for dispatch."""
    if human_gate:
        return EffectStatus.AWAITING_APPROVAL
    if semantics is Semantics.OBSERVE_ONLY:
        return EffectStatus.UNKNOWN
    return EffectStatus.PENDING


def first_due(status: EffectStatus, not_before: float, now: float) -> float | None:
    """When the worker first looks at a submitted effect: not before its ``dispatch_at``, never while it waits
    for a human."""
    return None if status is EffectStatus.AWAITING_APPROVAL else max(now, not_before)


# -- completions of leased calls ------------------------------------------------------------------------------
class Completion(NamedTuple):
    """What one call does to its leased effect: the state to store (``response`` and ``external_ref`` None keep
    the stored ones), the outcome the step reports, the event to journal and an obligation owed, if any."""

    key: str
    token: int
    status: EffectStatus
    next_attempt_at: float | None
    response: Any
    error: str | None
    external_ref: str | None
    flagged: bool
    updated_at: float
    outcome: EffectOutcome
    event: NewEvent
    obligation: NewObligation | None = None


def _completion(claimed: Claimed, outcome: DispatchOutcome | ObservationOutcome | None, status: EffectStatus,
                next_at: float | None, response: Any, error: str | None, ref: str | None, flagged: bool,
                now: float, event: NewEvent, obligation: NewObligation | None = None) -> Completion:
    key = claimed.effect.key
    reported = EffectOutcome(key=key, outcome=outcome, status=status, attempts=claimed.attempts, error=error,
                             flagged=flagged)
    return Completion(key, claimed.token, status, next_at, response, error, ref, flagged, now, reported, event,
                      obligation)


def dispatch_transition(claimed: Claimed, result: CallResult, *, can_observe: bool, now: float,
                        delay: Delay) -> Completion:
    """A dispatch's answer applied to its effect.

    ``CONFIRMED`` confirms; ``FAILED`` or a ``PermanentError`` fails at once; ``PENDING`` (accepted) is observed
    later when the connector can observe, else taken as confirmed. A ``TransientError`` means not delivered: the
    effect is dispatched again after ``delay(attempts, retry_after)`` (unless ``NON_IDEMPOTENT``, for which every
    doubt counts as unknown). Anything else leaves the outcome unknown: observed after ``delay(1, retry_after)``
    when the connector can observe; flagged for a human when ``NON_IDEMPOTENT`` and it cannot (never sent again
    blind); otherwise dispatched again after backoff. Retries end ``FAILED`` once ``max_attempts`` are spent.
    """
    effect = claimed.effect
    ok, value = result
    attempts = claimed.attempts
    outcome: DispatchOutcome | None = None
    response: Any = None
    ref: str | None = None
    error: str | None = None
    retry_after: float | None = None
    if ok and isinstance(value, DispatchResult):
        outcome, response, ref, error, retry_after = value.outcome, value.response, value.external_ref, value.error, \
            value.retry_after
        if type(outcome) is not DispatchOutcome:
            outcome = DispatchOutcome(outcome)
    elif ok:
        error = f"connector {effect.connector!r} returned {type(value).__name__}, not a DispatchResult"
    else:
        error = error_text(value)
        retry_after = getattr(value, "retry_after", None)
    # A TransientError says the counterparty did not take it: a plain retry, unless NON_IDEMPOTENT (where every
    # doubt counts as unknown). Any other answer not settled first leaves the outcome unknown.
    non_idempotent = effect.semantics is Semantics.NON_IDEMPOTENT
    unknown = ok or non_idempotent or not isinstance(value, TransientError)
    flagged = False
    next_at: float | None = None
    if outcome is DispatchOutcome.CONFIRMED:
        status = EffectStatus.CONFIRMED
    elif outcome is DispatchOutcome.FAILED or (not ok and isinstance(value, PermanentError)):
        status = EffectStatus.FAILED
    elif outcome is DispatchOutcome.PENDING:
        status = EffectStatus.UNKNOWN if can_observe else EffectStatus.CONFIRMED
        next_at = now + delay(1, retry_after) if can_observe else None
    elif unknown and can_observe:
        status = EffectStatus.UNKNOWN
        next_at = now + delay(1, retry_after)
    elif unknown and non_idempotent:
        status, flagged = EffectStatus.UNKNOWN, True
        error = (error or "outcome unknown") + "; NON_IDEMPOTENT and the connector cannot observe: flagged"
    elif attempts >= claimed.max_attempts:
        status = EffectStatus.FAILED
        error = f"{error or 'outcome unknown'} (gave up after {attempts} attempts)"
    else:
        status = EffectStatus.PENDING
        next_at = now + delay(attempts, retry_after)
    key = effect.key
    text = effect_text(key, effect.connector, effect.tool, status, (
        ("attempt", attempts), ("outcome", None if outcome is None else outcome._value_), ("error", error),
        ("external_ref", ref), ("flagged", True if flagged else None), ("run_id", effect.run_id),
        ("business_key", effect.business_key)))
    reported = EffectOutcome(key=key, outcome=outcome, status=status, attempts=attempts, error=error,
                             flagged=flagged)
    return Completion(key, claimed.token, status, next_at, response, error, ref, flagged, now, reported,
                      _named(effect.connector, effect.tool, status, JSONText(text)))


def observe_transition(claimed: Claimed, result: CallResult, *, max_observations: int, compensation_attempts: int,
                       backoff_cap: float, now: float, delay: Delay) -> Completion:
    """An observation's answer applied to its effect.

    ``CONFIRMED`` confirms; ``DUPLICATE`` confirms and owes a ``duplicate`` compensation (due at once);
    ``ABSENT`` sends the effect to dispatch again (``FAILED`` once its attempts are spent; an ``OBSERVE_ONLY``
    effect is only ever observed); a connector that cannot observe (``ConfigError``) flags it. Anything else is
    observed again after ``delay(observations)``, and after ``max_observations`` flagged and observed every
    ``backoff_cap`` seconds: never dropped.
    """
    effect = claimed.effect
    ok, value = result
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
    observations = claimed.observations
    flagged = False
    next_at: float | None = None
    obligation: NewObligation | None = None
    if outcome is ObservationOutcome.CONFIRMED:
        status = EffectStatus.CONFIRMED
    elif outcome is ObservationOutcome.DUPLICATE:
        status = EffectStatus.CONFIRMED
        obligation = NewObligation(effect.key, "duplicate", {"payload": effect.payload, "observed": response},
                                   effect.run_id, effect.connector, ObligationStatus.PENDING, compensation_attempts,
                                   now)
    elif outcome is ObservationOutcome.ABSENT and effect.semantics is not Semantics.OBSERVE_ONLY:
        if claimed.attempts >= claimed.max_attempts:
            status = EffectStatus.FAILED
            error = f"observed ABSENT after {claimed.attempts} dispatch attempts"
        else:
            status, next_at = EffectStatus.PENDING, now
    elif not ok and isinstance(value, ConfigError):
        status, flagged = EffectStatus.UNKNOWN, True
    else:
        status = EffectStatus.UNKNOWN
        if outcome is not None and error is None:
            error = f"observed {outcome.value}"
        if observations >= max_observations:
            flagged = True
            next_at = now + backoff_cap
        else:
            next_at = now + delay(observations, None)
    event = effect_event(
        effect.key, effect.connector, effect.tool, status, observation=outcome, observations=observations,
        error=error, external_ref=ref, flagged=True if flagged else None,
        newly_flagged=True if flagged and not claimed.flagged else None, run_id=effect.run_id,
        business_key=effect.business_key,
    )
    return _completion(claimed, outcome, status, next_at, response, error, ref, flagged, now, event, obligation)


def lease_lost(outcome: EffectOutcome, held: EffectStatus) -> EffectOutcome:
    """The outcome to report for a result whose lease lapsed before it was recorded: nothing was."""
    return EffectOutcome(key=outcome.key, outcome=outcome.outcome, status=held, attempts=outcome.attempts,
                         error=outcome.error, lease_lost=True)


def not_started(claimed: Claimed, held: EffectStatus) -> EffectOutcome:
    """The outcome to report for a call not made: its lease may have passed to another worker before it began."""
    return EffectOutcome(key=claimed.effect.key, outcome=None, status=held, attempts=claimed.attempts,
                         lease_lost=True)


class InlineResult(NamedTuple):
    """What an inline run's function came to, as the effect stores it."""

    status: EffectStatus
    response: Any
    external_ref: str | None
    error: str | None


def inline_result(result: CallResult) -> InlineResult:
    """An inline run's answer: a ``DispatchResult`` as it says (an outcome neither confirmed nor failed is
    unknown), any other value as the response of a confirmed effect, an exception as a failure."""
    ok, value = result
    if not ok:
        return InlineResult(EffectStatus.FAILED, None, None, error_text(value))
    if isinstance(value, DispatchResult):
        status = {DispatchOutcome.CONFIRMED: EffectStatus.CONFIRMED,
                  DispatchOutcome.FAILED: EffectStatus.FAILED}.get(value.outcome, EffectStatus.UNKNOWN)
        return InlineResult(status, value.response, value.external_ref, value.error)
    return InlineResult(EffectStatus.CONFIRMED, value, None, None)


# -- compensations --------------------------------------------------------------------------------------------
class ObligationCompletion(NamedTuple):
    """What one compensation call does to its leased obligation."""

    id: int
    token: int
    status: ObligationStatus
    next_attempt_at: float | None
    response: Any
    error: str | None
    updated_at: float
    outcome: ObligationOutcome
    event: NewEvent


def compensation_transition(record: ObligationRecord, token: int, result: CallResult, *, now: float,
                            delay: Delay) -> ObligationCompletion:
    """A compensator's answer applied to its obligation.

    None or ``COMPENSATED`` compensates; ``STUCK`` or a ``PermanentError`` leaves it ``STUCK`` at once (a human
    looks); anything else is tried again after ``delay(attempts, retry_after)``, ``STUCK`` once
    ``max_attempts`` are spent.
    """
    ok, value = result
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
    elif record.attempts >= record.max_attempts:
        status = ObligationStatus.STUCK
        error = f"{error or (outcome.value if outcome else 'failed')} (gave up after {record.attempts} attempts)"
    else:
        status = ObligationStatus.PENDING
        next_at = now + delay(record.attempts, retry_after)
    reported = ObligationOutcome(id=record.id, effect_key=record.effect_key, kind=record.kind, outcome=outcome,
                                 status=status, attempts=record.attempts, error=error)
    event = obligation_event(record.id, record.effect_key, record.kind, status, attempt=record.attempts, error=error)
    return ObligationCompletion(record.id, token, status, next_at, response, error, now, reported, event)


def obligation_lost(outcome: ObligationOutcome) -> ObligationOutcome:
    """The outcome to report for a compensation whose lease lapsed before its result was recorded: nothing was."""
    return ObligationOutcome(id=outcome.id, effect_key=outcome.effect_key, kind=outcome.kind, outcome=outcome.outcome,
                             status=ObligationStatus.COMPENSATING, attempts=outcome.attempts, error=outcome.error,
                             lease_lost=True)


def obligation_not_started(record: ObligationRecord) -> ObligationOutcome:
    """The outcome to report for a compensation not started: its lease may have passed to another worker."""
    return ObligationOutcome(id=record.id, effect_key=record.effect_key, kind=record.kind, outcome=None,
                             status=ObligationStatus.COMPENSATING, attempts=record.attempts, lease_lost=True)


# -- operators' decisions -------------------------------------------------------------------------------------
class Change(NamedTuple):
    """What an operator's decision does to one effect: its new status, when it is next due, its error, whether
    its attempts, observations and flag start again, and the event to journal. A resolution also sets what the
    counterparty answered (``response`` and ``external_ref``: None keeps the stored ones), clears the flag
    (``unflag``) and may owe a compensation (``obligation``); an approval may carry new ``metadata`` (None keeps
    the stored one)."""

    status: EffectStatus
    next_attempt_at: float | None
    error: str | None
    fresh_attempts: bool
    updated_at: float
    event: NewEvent
    response: Any = None
    external_ref: str | None = None
    unflag: bool = False
    obligation: NewObligation | None = None
    metadata: dict[str, Any] | None = None


def _refuse(rec: Any, verb: str, why: str) -> ConfigError:
    return ConfigError(f"cannot {verb} effect {rec.key!r}: {why}", field="key", value=rec.key)


def _check_status(stored: StoredEffect, allowed: tuple[EffectStatus, ...], verb: str) -> None:
    rec = stored.record
    if rec.status not in allowed:
        raise _refuse(rec, verb, f"it is {rec.status}, and only {' or '.join(s.value for s in allowed)} effects "
                                 f"can be {verb}d")


def _next_due(stored: StoredEffect, to: EffectStatus, now: float) -> float | None:
    return max(now, stored.not_before) if to in (EffectStatus.PENDING, EffectStatus.UNKNOWN) else None


def _operator_event(rec: Any, to: EffectStatus, **data: Any) -> NewEvent:
    return effect_event(rec.key, rec.connector, rec.tool, to, **data, run_id=rec.run_id,
                        business_key=rec.business_key)


def _change(stored: StoredEffect, allowed: tuple[EffectStatus, ...], to: EffectStatus, verb: str, now: float, *,
            error: str | None = None, fresh_attempts: bool = False, metadata: dict[str, Any] | None = None,
            **data: Any) -> Change:
    _check_status(stored, allowed, verb)
    rec = stored.record
    event = _operator_event(rec, to, **data)
    return Change(to, _next_due(stored, to, now), rec.error if error is None else error, fresh_attempts, now, event,
                  metadata=metadata)


#: Where an approval's payload reaches the connector: ``effect.metadata[APPROVAL_METADATA]``.
APPROVAL_METADATA = "errands.approval"


def approve(stored: StoredEffect, now: float, *, by: str | None, payload: Any = None) -> Change:
    """A human lets a gated effect go: ``AWAITING_APPROVAL`` -> ``PENDING``. A ``payload`` (what the approver
    adds: a signed-off amount, a ticket) is kept in the effect's metadata under ``errands.approval``, where the
    connector finds it."""
    metadata = None
    if payload is not None:
        metadata = {**stored.record.metadata, APPROVAL_METADATA: payload}
    return _change(stored, (EffectStatus.AWAITING_APPROVAL,), EffectStatus.PENDING, "approve", now, metadata=metadata,
                   approved_by=by, by=by)


def reject(stored: StoredEffect, now: float, *, reason: str | None, by: str | None) -> Change:
    """A human refuses a gated effect: ``AWAITING_APPROVAL`` -> ``CANCELLED``."""
    return _change(stored, (EffectStatus.AWAITING_APPROVAL,), EffectStatus.CANCELLED, "reject", now,
                   error=f"rejected: {reason or 'no reason given'}", rejected_by=by, by=by, reason=reason)


def cancel(stored: StoredEffect, now: float, *, reason: str | None) -> Change:
    """An effect not yet dispatched is withdrawn: ``PENDING`` or ``AWAITING_APPROVAL`` -> ``CANCELLED``."""
    return _change(stored, (EffectStatus.PENDING, EffectStatus.AWAITING_APPROVAL), EffectStatus.CANCELLED,
                   "cancel", now, error=f"cancelled: {reason or 'no reason given'}", reason=reason)


def redrive(stored: StoredEffect, now: float, *, can_observe: bool | None) -> Change:
    """A human wants a new delivery: a ``FAILED`` or ``CANCELLED`` effect, or a flagged ``UNKNOWN`` one, starts
    again with fresh attempts. It goes back to observation when it is ``UNKNOWN`` or ``OBSERVE_ONLY`` and its
    connector can observe, else to dispatch. ``can_observe`` None: not known here (a submit-only outbox), which
    refuses the redrives that depend on it."""
    rec = stored.record
    if rec.status is EffectStatus.UNKNOWN and not rec.flagged:
        raise _refuse(rec, "redrive", "it is UNKNOWN and still being observed")
    allowed = (EffectStatus.FAILED, EffectStatus.CANCELLED, EffectStatus.UNKNOWN)
    to = EffectStatus.PENDING
    if rec.status in allowed and (rec.status is EffectStatus.UNKNOWN or rec.semantics is Semantics.OBSERVE_ONLY):
        if can_observe is None:
            raise ConfigError(
                f"cannot redrive effect {rec.key!r} here: whether it is observed or dispatched again depends on "
                f"connector {rec.connector!r}, and this outbox knows its name only; redrive it where the "
                "connector is configured",
                field="key", value=rec.key,
            )
        if can_observe:
            to = EffectStatus.UNKNOWN
    return _change(stored, allowed, to, "redrive", now, fresh_attempts=True, redriven=True)


#: What an operator may say of an effect's outcome (``Outbox.resolve``): it happened (``CONFIRMED``), it failed for
#: good (``FAILED``), it never reached the counterparty (``ABSENT``: dispatch it again), or it happened more than
#: once (``DUPLICATE``: confirmed, and a compensation owed).
RESOLUTIONS = ("CONFIRMED", "FAILED", "ABSENT", "DUPLICATE")

# Which resolutions each status takes; any other status (CONFIRMED, FAILED, CANCELLED: finished) takes none.
_RESOLVABLE: dict[EffectStatus, tuple[str, ...]] = {
    EffectStatus.UNKNOWN: RESOLUTIONS,
    EffectStatus.PENDING: RESOLUTIONS,
    EffectStatus.DISPATCHING: RESOLUTIONS,
    EffectStatus.AWAITING_APPROVAL: ("CONFIRMED", "FAILED", "DUPLICATE"),
}


def resolution(status: Any) -> str:
    """``status`` as one of ``RESOLUTIONS`` (an ``EffectStatus``, an ``ObservationOutcome`` or a string, in any
    case).

    Raises:
        ConfigError: anything else.
    """
    name = str(status).upper() if isinstance(status, str) else None
    if name not in RESOLUTIONS:
        raise ConfigError(f"status must be one of {', '.join(RESOLUTIONS)}, got {status!r}", field="status",
                          value=status)
    return name


def lease_live(stored: StoredEffect, now: float) -> bool:
    """Whether a worker holds effect ``stored`` now: dispatching it, or observing it, its lease not lapsed."""
    rec = stored.record
    leased = rec.status is EffectStatus.DISPATCHING or rec.lease_owner is not None
    return leased and stored.next_attempt_at is not None and stored.next_attempt_at > now


def resolve(stored: StoredEffect, now: float, *, status: Any, response: Any = None, error: str | None = None,
            external_ref: str | None = None, compensate_kind: str | None = None, by: str | None = None,
            compensation_attempts: int) -> Change:
    """An operator settles an effect's outcome from what they found at the counterparty (``status`` one of
    ``RESOLUTIONS``), without a connector call.

    It applies to an effect no worker holds that is not finished: ``UNKNOWN`` (flagged or not), ``PENDING``,
    ``DISPATCHING`` with a lapsed lease, or ``AWAITING_APPROVAL`` (not ``ABSENT``: approve it to dispatch it).
    ``CONFIRMED`` confirms; ``FAILED`` fails it (``error`` says why); ``ABSENT`` makes it due for dispatch with
    fresh attempts (never for ``OBSERVE_ONLY``, which is never dispatched); ``DUPLICATE`` confirms it and owes a
    compensation of ``compensate_kind``, due at once (``payload`` and ``observed``, like the reconciler's). Each
    clears the flag; the event carries ``resolved`` (the status given) and ``by``.

    Raises:
        ConfigError: the effect is finished, held by a worker now, or the resolution does not fit it; nothing
            changes.
    """
    status = resolution(status)
    rec = stored.record
    allowed = _RESOLVABLE.get(rec.status, ())
    if not allowed:
        raise _refuse(rec, "resolve", f"it is {rec.status} (finished); only UNKNOWN, PENDING, DISPATCHING with a "
                                      "lapsed lease or AWAITING_APPROVAL effects can be resolved")
    if lease_live(stored, now):
        raise _refuse(rec, "resolve", f"it is {rec.status} and leased to {rec.lease_owner or 'a worker'} until its "
                                      "lease lapses; resolve it once the worker is done or its lease lapsed")
    if status not in allowed:
        raise _refuse(rec, "resolve", f"it is {rec.status}: approve it to dispatch it, or resolve it "
                                      f"{', '.join(allowed)}")
    if (compensate_kind is None) == (status == "DUPLICATE"):
        raise ConfigError(
            "a DUPLICATE resolution needs compensate_kind, the kind of compensation owed (e.g. 'refund')"
            if compensate_kind is None else f"compensate_kind applies to DUPLICATE only, not to {status}",
            field="compensate_kind", value=compensate_kind)
    obligation: NewObligation | None = None
    fresh = False
    if status == "ABSENT":
        if rec.semantics is Semantics.OBSERVE_ONLY:
            raise _refuse(rec, "resolve", "it is OBSERVE_ONLY and never dispatched; resolve it CONFIRMED or FAILED")
        to, fresh = EffectStatus.PENDING, True
    elif status == "FAILED":
        to = EffectStatus.FAILED
        error = error or f"resolved FAILED by {by or 'an operator'}"
    else:
        to = EffectStatus.CONFIRMED
        if status == "DUPLICATE":
            assert compensate_kind is not None
            obligation = NewObligation(rec.key, compensate_kind, {"payload": rec.payload, "observed": response},
                                       rec.run_id, rec.connector, ObligationStatus.PENDING, compensation_attempts,
                                       now)
    event = _operator_event(rec, to, resolved=status, by=by, error=error, external_ref=external_ref,
                            compensate_kind=compensate_kind)
    return Change(to, _next_due(stored, to, now), error, fresh, now, event, response=response,
                  external_ref=external_ref, unflag=True, obligation=obligation)


#: What an operator may say of an obligation (``Outbox.resolve_obligation``).
OBLIGATION_RESOLUTIONS = ("COMPENSATED", "STUCK")


class ObligationChange(NamedTuple):
    """What an operator's resolution does to one obligation."""

    status: ObligationStatus
    response: Any
    error: str | None
    updated_at: float
    event: NewEvent


def resolve_obligation(record: ObligationRecord, leased_until: float | None, now: float, *, status: Any,
                       result: Any = None, by: str | None = None) -> ObligationChange:
    """An operator settles a compensation owed: ``COMPENSATED`` (done by hand, or found done) or ``STUCK`` (stop
    trying; a human follows it up). It applies to an obligation not finished and held by no worker:
    ``REGISTERED``, ``PENDING``, ``STUCK`` (to ``COMPENSATED``) or ``COMPENSATING`` with a lapsed lease
    (``leased_until``: when the lease of a ``COMPENSATING`` one lapses). ``result`` is kept as its response.

    Raises:
        ConfigError: a status other than those two, or an obligation finished, already so, or held by a worker.
    """
    name = str(status).upper() if isinstance(status, str) else None
    if name not in OBLIGATION_RESOLUTIONS:
        raise ConfigError(f"status must be one of {', '.join(OBLIGATION_RESOLUTIONS)}, got {status!r}",
                          field="status", value=status)
    to = ObligationStatus(name)

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"cannot resolve obligation {record.id}: {why}", field="id", value=record.id)

    if record.status is ObligationStatus.COMPENSATED:
        raise refuse("it is COMPENSATED (finished)")
    if record.status is to:
        raise refuse(f"it is {to} already")
    if record.status is ObligationStatus.COMPENSATING and leased_until is not None and leased_until > now:
        raise refuse("it is COMPENSATING and a worker holds it; resolve it once its lease lapsed")
    error = None if to is ObligationStatus.COMPENSATED else f"resolved STUCK by {by or 'an operator'}"
    event = obligation_event(record.id, record.effect_key, record.kind, to, resolved=name, by=by,
                             run_id=record.run_id)
    return ObligationChange(to, result, error, now, event)
