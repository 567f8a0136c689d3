"""The outbox's decisions, as pure functions: a stored state and an answer in, the new state, the outcome to report
and the events to journal out.

Nothing here reads the store, the clock or a random source: the time is passed in (``now``), and so is the retry
delay (``delay(attempt, retry_after)``), so that every rule can be checked on plain values. The engine reads
state, calls connectors, hands the answers here and writes what comes back.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

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
from ..store import NewEvent
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
    and is written as one), then the members given that are not None."""
    body = {"key": key, "connector": connector, "tool": tool, "status": status}
    for name, value in data.items():
        if value is not None:
            body[name] = value
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
    return effect_event(effect.key, effect.connector, effect.tool, EffectStatus.DISPATCHING, attempt=claimed.attempts)


# -- admission ------------------------------------------------------------------------------------------------
def submitted_event(row: NewEffect) -> NewEvent:
    """The event of an effect just admitted: its first status, with its semantics and run."""
    body: dict[str, Any] = {"key": row.key, "connector": row.connector, "tool": row.tool, "status": row.status,
                            "semantics": row.semantics}
    if row.run_id is not None:
        body["run_id"] = row.run_id
    names = _EVENT_NAMES.get((row.connector, row.tool, row.status)) or _event_names(row.connector, row.tool,
                                                                                    row.status)
    return NewEvent(names[0], names[1], body, names[2])


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
        outcome, response, ref, error, retry_after = (
            DispatchOutcome(value.outcome), value.response, value.external_ref, value.error, value.retry_after)
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
    event = effect_event(effect.key, effect.connector, effect.tool, status, attempt=attempts, outcome=outcome,
                         error=error, external_ref=ref, flagged=True if flagged else None)
    return _completion(claimed, outcome, status, next_at, response, error, ref, flagged, now, event)


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
        effect.key, effect.connector, effect.tool, status, observation=outcome, observations=observations, error=error, external_ref=ref, flagged=True if flagged else None,
        newly_flagged=True if flagged and not claimed.flagged else None,
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
    its attempts, observations and flag start again, and the event to journal."""

    status: EffectStatus
    next_attempt_at: float | None
    error: str | None
    fresh_attempts: bool
    updated_at: float
    event: NewEvent


def _change(stored: StoredEffect, allowed: tuple[EffectStatus, ...], to: EffectStatus, verb: str, now: float, *,
            error: str | None = None, fresh_attempts: bool = False, **data: Any) -> Change:
    rec = stored.record
    if rec.status not in allowed:
        raise ConfigError(
            f"cannot {verb} effect {rec.key!r}: it is {rec.status}, and only "
            f"{' or '.join(s.value for s in allowed)} effects can be {verb}d",
            field="key", value=rec.key,
        )
    next_at = max(now, stored.not_before) if to in (EffectStatus.PENDING, EffectStatus.UNKNOWN) else None
    event = effect_event(rec.key, rec.connector, rec.tool, to, **data)
    return Change(to, next_at, rec.error if error is None else error, fresh_attempts, now, event)


def approve(stored: StoredEffect, now: float, *, by: str | None) -> Change:
    """A human lets a gated effect go: ``AWAITING_APPROVAL`` -> ``PENDING``."""
    return _change(stored, (EffectStatus.AWAITING_APPROVAL,), EffectStatus.PENDING, "approve", now, approved_by=by)


def reject(stored: StoredEffect, now: float, *, reason: str | None, by: str | None) -> Change:
    """A human refuses a gated effect: ``AWAITING_APPROVAL`` -> ``CANCELLED``."""
    return _change(stored, (EffectStatus.AWAITING_APPROVAL,), EffectStatus.CANCELLED, "reject", now,
                   error=f"rejected: {reason or 'no reason given'}", rejected_by=by, reason=reason)


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
        raise ConfigError(f"cannot redrive effect {rec.key!r}: it is UNKNOWN and still being observed",
                          field="key", value=rec.key)
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
