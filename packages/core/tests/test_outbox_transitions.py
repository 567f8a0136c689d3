"""The outbox's decisions on plain values: no store, no clock, no connector. Each transition takes a state and an
answer (and the time, and the retry delay) and gives the new state, the outcome to report and the events to
journal."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from errands.core import (
    CompensationOutcome,
    CompensationResult,
    ConfigError,
    DispatchOutcome,
    DispatchResult,
    Effect,
    EffectStatus,
    Observation,
    ObservationOutcome,
    PermanentError,
    Semantics,
    TransientError,
)
from errands.core.outbox import EffectRecord, ObligationRecord, ObligationStatus
from errands.core.outbox._records import Claimed, StoredEffect
from errands.core.store import JSONText, dumps
from errands.core.outbox._transitions import (
    admitted_status,
    approve,
    cancel,
    compensation_transition,
    dispatch_transition,
    dispatching_event,
    effect_event,
    effect_text,
    first_due,
    inline_result,
    lease_lost,
    not_started,
    obligation_event,
    observe_transition,
    redrive,
    reject,
)

NOW = 1000.0


class Delays:
    """A retry delay that answers ``10 * attempt`` (or the ``retry_after``) and remembers what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, float | None]] = []

    def __call__(self, attempt: int, retry_after: float | None) -> float:
        self.asked.append((attempt, retry_after))
        return retry_after if retry_after is not None else 10.0 * attempt


def claimed(semantics: Semantics = Semantics.IDEMPOTENT, *, attempts: int = 1, max_attempts: int = 3,
            observations: int = 0, flagged: bool = False, tool: str = "pay") -> Claimed:
    effect = Effect(key="k", connector="bank", payload={"cents": 5}, tool=tool, semantics=semantics, run_id="run-1",
                    max_attempts=max_attempts, metadata={"errands.attempt": attempts, "errands.lease_token": 7})
    return Claimed(effect, attempts, 7, max_attempts, observations, flagged)


def dispatched(result: tuple[bool, Any], *, can_observe: bool = False, **kw: Any) -> tuple[Any, Delays]:
    delays = Delays()
    return dispatch_transition(claimed(**kw), result, can_observe=can_observe, now=NOW, delay=delays), delays


# -- dispatch ---------------------------------------------------------------------------------------------------
def test_a_confirmed_dispatch_confirms_and_says_so_in_its_event() -> None:
    answer = DispatchResult(outcome=DispatchOutcome.CONFIRMED, response={"id": 9}, external_ref="tx-9")
    c, delays = dispatched((True, answer))
    assert (c.key, c.token, c.status, c.next_attempt_at, c.response, c.external_ref, c.error, c.flagged) == (
        "k", 7, EffectStatus.CONFIRMED, None, {"id": 9}, "tx-9", None, False)
    assert c.updated_at == NOW and c.obligation is None and delays.asked == []
    assert (c.outcome.key, c.outcome.outcome, c.outcome.status, c.outcome.attempts, c.outcome.lease_lost) == (
        "k", DispatchOutcome.CONFIRMED, EffectStatus.CONFIRMED, 1, False)
    assert (c.event.stream, c.event.type, c.event.subject) == ("effects/bank", "effect.confirmed",
                                                               "effect.confirmed.bank.pay")
    assert json.loads(c.event.data) == {"key": "k", "connector": "bank", "tool": "pay", "status": "CONFIRMED",
                                        "attempt": 1, "outcome": "CONFIRMED", "external_ref": "tx-9",
                                        "run_id": "run-1"}


@pytest.mark.parametrize("result", [
    (True, DispatchResult(outcome=DispatchOutcome.FAILED, error="422 invalid")),
    (False, PermanentError("account closed")),
])
def test_a_permanent_answer_fails_at_once_whatever_the_attempts_left(result: tuple[bool, Any]) -> None:
    c, delays = dispatched(result, can_observe=True, attempts=1, max_attempts=5)
    assert c.status is EffectStatus.FAILED and c.next_attempt_at is None and delays.asked == []
    assert c.error in ("422 invalid", "PermanentError: account closed")
    assert c.event.type == "effect.failed"


def test_a_transient_error_is_retried_after_the_backoff_of_its_attempt_and_its_retry_after() -> None:
    c, delays = dispatched((False, TransientError("503", retry_after=42.0)), attempts=2, can_observe=True)
    assert (c.status, c.next_attempt_at, c.error) == (EffectStatus.PENDING, NOW + 42.0, "TransientError: 503")
    assert delays.asked == [(2, 42.0)]
    c, delays = dispatched((False, TransientError("503")), attempts=2)
    assert (c.status, c.next_attempt_at) == (EffectStatus.PENDING, NOW + 20.0) and delays.asked == [(2, None)]


def test_retries_end_failed_once_the_attempts_are_spent() -> None:
    c, delays = dispatched((False, TransientError("503")), attempts=3, max_attempts=3)
    assert c.status is EffectStatus.FAILED and c.error == "TransientError: 503 (gave up after 3 attempts)"
    assert delays.asked == [] and c.next_attempt_at is None


def test_an_unknown_outcome_is_observed_when_the_connector_can_observe() -> None:
    answer = DispatchResult(outcome=DispatchOutcome.UNKNOWN, retry_after=5.0)
    c, delays = dispatched((True, answer), can_observe=True, attempts=2)
    assert (c.status, c.next_attempt_at, c.flagged) == (EffectStatus.UNKNOWN, NOW + 5.0, False)
    assert delays.asked == [(1, 5.0)]  # the first observation's delay, whatever the attempt
    assert c.outcome.outcome is DispatchOutcome.UNKNOWN and json.loads(c.event.data)["outcome"] == "UNKNOWN"


def test_an_unknown_outcome_of_an_idempotent_effect_a_connector_cannot_observe_is_dispatched_again() -> None:
    c, delays = dispatched((True, DispatchResult(outcome=DispatchOutcome.UNKNOWN)), attempts=1)
    assert (c.status, c.next_attempt_at) == (EffectStatus.PENDING, NOW + 10.0) and delays.asked == [(1, None)]


@pytest.mark.parametrize("result", [
    (True, DispatchResult(outcome=DispatchOutcome.UNKNOWN)),
    (False, TransientError("timeout")),  # for NON_IDEMPOTENT, any doubt is unknown
    (False, RuntimeError("socket closed")),
])
def test_a_non_idempotent_effect_in_doubt_is_never_sent_again_blind(result: tuple[bool, Any]) -> None:
    c, delays = dispatched(result, semantics=Semantics.NON_IDEMPOTENT)
    assert (c.status, c.flagged, c.next_attempt_at) == (EffectStatus.UNKNOWN, True, None)
    assert c.error is not None and c.error.endswith("; NON_IDEMPOTENT and the connector cannot observe: flagged")
    assert json.loads(c.event.data)["flagged"] is True and delays.asked == []
    c, delays = dispatched(result, semantics=Semantics.NON_IDEMPOTENT, can_observe=True)
    assert (c.status, c.flagged, c.next_attempt_at) == (EffectStatus.UNKNOWN, False, NOW + 10.0)


def test_an_accepted_dispatch_is_observed_or_taken_as_confirmed() -> None:
    accepted = (True, DispatchResult(outcome=DispatchOutcome.PENDING, external_ref="job-1"))
    c, delays = dispatched(accepted, can_observe=True)
    assert (c.status, c.next_attempt_at, c.external_ref) == (EffectStatus.UNKNOWN, NOW + 10.0, "job-1")
    assert delays.asked == [(1, None)]
    c, delays = dispatched(accepted, can_observe=False)
    assert (c.status, c.next_attempt_at) == (EffectStatus.CONFIRMED, None) and delays.asked == []


def test_a_connector_answering_something_else_leaves_the_outcome_unknown() -> None:
    c, _ = dispatched((True, {"ok": True}), can_observe=True)
    assert c.status is EffectStatus.UNKNOWN and c.outcome.outcome is None
    assert c.error == "connector 'bank' returned dict, not a DispatchResult"


def test_lost_leases_report_without_recording() -> None:
    c, _ = dispatched((True, DispatchResult(outcome=DispatchOutcome.CONFIRMED)))
    lost = lease_lost(c.outcome, EffectStatus.DISPATCHING)
    assert (lost.status, lost.outcome, lost.lease_lost) == (EffectStatus.DISPATCHING, DispatchOutcome.CONFIRMED, True)
    skipped = not_started(claimed(attempts=2), EffectStatus.UNKNOWN)
    assert (skipped.key, skipped.outcome, skipped.status, skipped.attempts, skipped.lease_lost) == (
        "k", None, EffectStatus.UNKNOWN, 2, True)


# -- observe ----------------------------------------------------------------------------------------------------
def observed(result: tuple[bool, Any], **kw: Any) -> tuple[Any, Delays]:
    delays = Delays()
    c = observe_transition(claimed(**kw), result, max_observations=3, compensation_attempts=4, backoff_cap=300.0,
                           now=NOW, delay=delays)
    return c, delays


def test_an_observation_that_finds_the_effect_confirms_it() -> None:
    c, delays = observed((True, Observation(outcome=ObservationOutcome.CONFIRMED, external_ref="tx-1")),
                         observations=1)
    assert (c.status, c.external_ref, c.obligation, delays.asked) == (EffectStatus.CONFIRMED, "tx-1", None, [])
    assert json.loads(c.event.data) == {"key": "k", "connector": "bank", "tool": "pay", "status": "CONFIRMED",
                            "observation": "CONFIRMED", "observations": 1, "external_ref": "tx-1",
                            "run_id": "run-1"}


def test_a_duplicate_confirms_and_owes_a_compensation_in_the_same_change() -> None:
    c, _ = observed((True, Observation(outcome=ObservationOutcome.DUPLICATE, response={"count": 2})))
    assert c.status is EffectStatus.CONFIRMED and c.response == {"count": 2}
    owed = c.obligation
    assert owed is not None
    assert (owed.effect_key, owed.kind, owed.run_id, owed.compensator, owed.status, owed.max_attempts,
            owed.next_attempt_at) == ("k", "duplicate", "run-1", "bank", ObligationStatus.PENDING, 4, NOW)
    assert owed.payload == {"payload": {"cents": 5}, "observed": {"count": 2}}


def test_an_absent_effect_is_dispatched_again_at_once_or_failed_when_its_attempts_are_spent() -> None:
    absent = (True, Observation(outcome=ObservationOutcome.ABSENT))
    c, delays = observed(absent, attempts=1, max_attempts=3)
    assert (c.status, c.next_attempt_at, delays.asked) == (EffectStatus.PENDING, NOW, [])
    c, _ = observed(absent, attempts=3, max_attempts=3)
    assert c.status is EffectStatus.FAILED and c.error == "observed ABSENT after 3 dispatch attempts"
    c, _ = observed(absent, semantics=Semantics.OBSERVE_ONLY, observations=1)
    assert c.status is EffectStatus.UNKNOWN and c.next_attempt_at == NOW + 10.0  # never dispatched: observed again


@pytest.mark.parametrize("result", [
    (True, Observation(outcome=ObservationOutcome.STUCK)),
    (True, Observation(outcome=ObservationOutcome.UNKNOWN)),
    (False, TransientError("lookup failed")),
])
def test_an_inconclusive_observation_is_made_again_after_backoff_then_flagged(result: tuple[bool, Any]) -> None:
    c, delays = observed(result, observations=2)
    assert (c.status, c.flagged, c.next_attempt_at) == (EffectStatus.UNKNOWN, False, NOW + 20.0)
    assert delays.asked == [(2, None)] and c.error is not None
    c, delays = observed(result, observations=3)
    assert (c.status, c.flagged, c.next_attempt_at, delays.asked) == (EffectStatus.UNKNOWN, True, NOW + 300.0, [])
    assert json.loads(c.event.data)["flagged"] is True and json.loads(c.event.data)["newly_flagged"] is True
    c, _ = observed(result, observations=4, flagged=True)
    assert c.flagged and "newly_flagged" not in json.loads(c.event.data)


def test_observations_say_what_they_saw() -> None:
    c, _ = observed((True, Observation(outcome=ObservationOutcome.STUCK)))
    assert c.error == "observed STUCK" and json.loads(c.event.data)["observation"] == "STUCK"
    c, _ = observed((True, "yes"))
    assert c.error == "connector 'bank' observe returned str, not an Observation" and c.outcome.outcome is None


def test_a_connector_that_cannot_observe_flags_the_effect() -> None:
    c, delays = observed((False, ConfigError("connector 'bank' cannot observe")))
    assert (c.status, c.flagged, c.next_attempt_at, delays.asked) == (EffectStatus.UNKNOWN, True, None, [])


# -- compensations ----------------------------------------------------------------------------------------------
def owed(attempts: int = 1, max_attempts: int = 3) -> ObligationRecord:
    return ObligationRecord(id=4, effect_key="k", kind="refund", payload={"cents": 5},
                            status=ObligationStatus.COMPENSATING, attempts=attempts, max_attempts=max_attempts)


def compensated(result: tuple[bool, Any], **kw: Any) -> tuple[Any, Delays]:
    delays = Delays()
    return compensation_transition(owed(**kw), 9, result, now=NOW, delay=delays), delays


@pytest.mark.parametrize("value", [None, CompensationOutcome.COMPENSATED,
                                   CompensationResult(outcome=CompensationOutcome.COMPENSATED, response="r")])
def test_a_compensation_done_is_compensated(value: Any) -> None:
    c, delays = compensated((True, value))
    assert (c.id, c.token, c.status, c.next_attempt_at, delays.asked) == (4, 9, ObligationStatus.COMPENSATED, None, [])
    assert (c.outcome.outcome, c.outcome.status, c.outcome.attempts) == (
        CompensationOutcome.COMPENSATED, ObligationStatus.COMPENSATED, 1)
    assert (c.event.stream, c.event.type, c.event.subject) == ("obligations/refund", "obligation.compensated",
                                                               "obligation.compensated.refund")
    assert c.event.data == {"key": "k", "id": 4, "kind": "refund", "status": "COMPENSATED", "attempt": 1}


@pytest.mark.parametrize("result", [(True, CompensationResult(outcome=CompensationOutcome.STUCK, error="manual")),
                                    (False, PermanentError("refund refused"))])
def test_a_stuck_compensation_waits_for_a_human(result: tuple[bool, Any]) -> None:
    c, delays = compensated(result, attempts=1, max_attempts=5)
    assert c.status is ObligationStatus.STUCK and c.next_attempt_at is None and delays.asked == []


def test_a_compensation_not_done_is_tried_again_then_stuck() -> None:
    later = CompensationResult(outcome=CompensationOutcome.PENDING, retry_after=60.0)
    c, delays = compensated((True, later), attempts=2)
    assert (c.status, c.next_attempt_at, delays.asked) == (ObligationStatus.PENDING, NOW + 60.0, [(2, 60.0)])
    c, delays = compensated((False, TransientError("busy")), attempts=3, max_attempts=3)
    assert c.status is ObligationStatus.STUCK and c.error == "TransientError: busy (gave up after 3 attempts)"
    c, _ = compensated((True, 42), attempts=3, max_attempts=3)
    assert c.error == "compensator returned int, not a CompensationResult (gave up after 3 attempts)"


# -- inline runs, admission -------------------------------------------------------------------------------------
def test_inline_results() -> None:
    assert inline_result((True, {"sent": 1})) == (EffectStatus.CONFIRMED, {"sent": 1}, None, None)
    assert inline_result((False, RuntimeError("smtp down"))) == (EffectStatus.FAILED, None, None,
                                                                 "RuntimeError: smtp down")
    said = inline_result((True, DispatchResult(outcome=DispatchOutcome.PENDING, external_ref="m-1")))
    assert (said.status, said.external_ref) == (EffectStatus.UNKNOWN, "m-1")
    said = inline_result((True, DispatchResult(outcome=DispatchOutcome.FAILED, error="bounced")))
    assert (said.status, said.error) == (EffectStatus.FAILED, "bounced")


def test_where_a_submitted_effect_starts_and_when_it_is_due() -> None:
    assert admitted_status(Semantics.IDEMPOTENT, False) is EffectStatus.PENDING
    assert admitted_status(Semantics.OBSERVE_ONLY, False) is EffectStatus.UNKNOWN
    assert admitted_status(Semantics.OBSERVE_ONLY, True) is EffectStatus.AWAITING_APPROVAL
    assert first_due(EffectStatus.PENDING, NOW - 5, NOW) == NOW
    assert first_due(EffectStatus.PENDING, NOW + 5, NOW) == NOW + 5
    assert first_due(EffectStatus.AWAITING_APPROVAL, NOW, NOW) is None


# -- operators --------------------------------------------------------------------------------------------------
def stored(status: EffectStatus, *, flagged: bool = False, semantics: Semantics = Semantics.IDEMPOTENT,
           not_before: float = NOW - 1) -> StoredEffect:
    rec = EffectRecord(key="k", connector="bank", tool="", payload={}, status=status, semantics=semantics,
                       attempts=3, max_attempts=3, observations=2, flagged=flagged, error="earlier")
    return StoredEffect(rec, not_before, None, 5)


def test_approve_reject_and_cancel() -> None:
    change = approve(stored(EffectStatus.AWAITING_APPROVAL, not_before=NOW + 60), NOW, by="ada")
    assert (change.status, change.next_attempt_at, change.error, change.fresh_attempts) == (
        EffectStatus.PENDING, NOW + 60, "earlier", False)
    assert change.event.subject == "effect.pending.bank" and json.loads(change.event.data)["approved_by"] == "ada"
    change = reject(stored(EffectStatus.AWAITING_APPROVAL), NOW, reason=None, by="grace")
    assert (change.status, change.next_attempt_at, change.error) == (
        EffectStatus.CANCELLED, None, "rejected: no reason given")
    assert json.loads(change.event.data) == {"key": "k", "connector": "bank", "tool": "", "status": "CANCELLED",
                                 "rejected_by": "grace", "by": "grace"}
    assert cancel(stored(EffectStatus.PENDING), NOW, reason="changed").error == "cancelled: changed"
    with pytest.raises(ConfigError, match="cannot approve effect 'k': it is PENDING"):
        approve(stored(EffectStatus.PENDING), NOW, by=None)
    with pytest.raises(ConfigError, match="only PENDING or AWAITING_APPROVAL"):
        cancel(stored(EffectStatus.DISPATCHING), NOW, reason=None)


def test_redrive_starts_again_with_fresh_attempts_observing_what_can_be_observed() -> None:
    change = redrive(stored(EffectStatus.FAILED), NOW, can_observe=True)
    assert (change.status, change.next_attempt_at, change.fresh_attempts) == (EffectStatus.PENDING, NOW, True)
    assert json.loads(change.event.data)["redriven"] is True
    assert redrive(stored(EffectStatus.UNKNOWN, flagged=True), NOW, can_observe=True).status is EffectStatus.UNKNOWN
    assert redrive(stored(EffectStatus.UNKNOWN, flagged=True), NOW, can_observe=False).status is EffectStatus.PENDING
    watched = stored(EffectStatus.CANCELLED, semantics=Semantics.OBSERVE_ONLY)
    assert redrive(watched, NOW, can_observe=True).status is EffectStatus.UNKNOWN
    with pytest.raises(ConfigError, match="still being observed"):
        redrive(stored(EffectStatus.UNKNOWN), NOW, can_observe=True)
    with pytest.raises(ConfigError, match="only FAILED or CANCELLED or UNKNOWN"):
        redrive(stored(EffectStatus.CONFIRMED), NOW, can_observe=None)
    # Not known (a submit-only outbox): refused where the connector decides, decided where it does not.
    with pytest.raises(ConfigError, match="knows its name only"):
        redrive(watched, NOW, can_observe=None)
    assert redrive(stored(EffectStatus.FAILED), NOW, can_observe=None).status is EffectStatus.PENDING


# -- events -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run_id, business_key", [(None, None), ("run-1", None), (None, "order 7"),
                                                   ("r\u00e9\"\\n", "b\u2028\x01")])
@pytest.mark.parametrize("key, tool", [("k", ""), ("k\u00fc\"'\\", "pay/\u00e9")])
def test_a_claims_event_is_the_json_text_of_effect_event(run_id: str | None, business_key: str | None, key: str,
                                                          tool: str) -> None:
    effect = Effect(key=key, connector="bank", payload=None, tool=tool, run_id=run_id, business_key=business_key)
    ev = dispatching_event(Claimed(effect, 3, 7, 5))
    expected = _present({"key": key, "connector": "bank", "tool": tool, "status": "DISPATCHING", "attempt": 3,
                         "run_id": run_id, "business_key": business_key})
    assert type(ev.data) is JSONText and ev.data == dumps(expected, field="data")
    assert json.loads(ev.data) == expected
    assert (ev.stream, ev.type) == ("effects/bank", "effect.dispatching")
    assert ev.subject == ("effect.dispatching.bank." + tool if tool else "effect.dispatching.bank")


def _present(data: dict[str, Any]) -> dict[str, Any]:
    """An effect event's data as the store's encoder would see it: the members that are not None, in order."""
    return {name: value for name, value in data.items() if value is not None}


@pytest.mark.parametrize("result, semantics, can_observe", [
    ((True, DispatchResult(outcome=DispatchOutcome.CONFIRMED, external_ref="tx-9")), Semantics.IDEMPOTENT, False),
    ((True, DispatchResult(outcome="FAILED", error='no "funds" \u00e9')), Semantics.IDEMPOTENT,  # type: ignore[arg-type]
     False),
    ((True, DispatchResult(outcome=DispatchOutcome.PENDING, retry_after=4.0)), Semantics.IDEMPOTENT, True),
    ((False, TransientError("busy")), Semantics.IDEMPOTENT, False),
    ((False, RuntimeError("boom")), Semantics.NON_IDEMPOTENT, False),
    ((True, "not a result"), Semantics.IDEMPOTENT, True),
])
@pytest.mark.parametrize("run_id, business_key", [("run-1", None), (None, "order-7"), ("r\u00e9\"", "\u2028")])
def test_a_dispatch_event_is_the_json_text_of_effect_event(result: tuple[bool, Any], semantics: Semantics,
                                                            can_observe: bool, run_id: str | None,
                                                            business_key: str | None) -> None:
    c = claimed(semantics)
    c = c._replace(effect=dataclasses.replace(c.effect, run_id=run_id, business_key=business_key))
    done = dispatch_transition(c, result, can_observe=can_observe, now=NOW, delay=Delays())
    outcome = done.outcome.outcome
    expected = _present({"key": "k", "connector": "bank", "tool": "pay", "status": done.status.value, "attempt": 1,
                         "outcome": None if outcome is None else outcome.value, "error": done.error,
                         "external_ref": done.external_ref, "flagged": True if done.flagged else None,
                         "run_id": run_id, "business_key": business_key})
    assert type(done.event.data) is JSONText and done.event.data == dumps(expected, field="data")
    lower = done.status.value.lower()
    assert (done.event.stream, done.event.type, done.event.subject) == (
        "effects/bank", f"effect.{lower}", f"effect.{lower}.bank.pay")


@pytest.mark.parametrize("members", [
    {"attempt": 0, "flagged": True, "retry_after": 2.5, "note": "a \"quoted\" \\ \u00e9 \u2028 \x01"},
    {"response": {"nested": [1, "two", None, False], "\u00fc": 1e100}, "released": None, "count": -3},
    {},
])
def test_effect_text_is_what_the_stores_encoder_writes_for_the_events_data(members: dict[str, Any]) -> None:
    """Every effect event's data is written as text by one builder (``effect_text``), the hot paths' included: the
    text is byte for byte the store's encoding of the same object, escapes, non-ASCII and nested values alike."""
    for status in (EffectStatus.CONFIRMED, "CANCELLED"):
        text = effect_text("k\u00fc\"'", "bank", "pay/\u00e9", status, members.items())
        expected = _present({"key": "k\u00fc\"'", "connector": "bank", "tool": "pay/\u00e9", "status": str(
            status.value if isinstance(status, EffectStatus) else status), **members})
        assert text == dumps(expected, field="data")
        assert json.loads(text) == expected


def test_events_name_their_stream_type_and_subject_and_leave_out_what_is_none() -> None:
    ev = effect_event("k", "bank", "", EffectStatus.DISPATCHING, attempt=2, error=None, flagged=True)
    assert (ev.stream, ev.type, ev.subject) == ("effects/bank", "effect.dispatching", "effect.dispatching.bank")
    assert json.loads(ev.data) == {"key": "k", "connector": "bank", "tool": "", "status": "DISPATCHING",
                                   "attempt": 2, "flagged": True}
    assert list(json.loads(ev.data))[0] == "key"
    ev = obligation_event(3, "k", "refund", ObligationStatus.PENDING, run_id="r", released=None)
    assert (ev.stream, ev.type, ev.subject) == ("obligations/refund", "obligation.pending", "obligation.pending.refund")
    assert ev.data == {"key": "k", "id": 3, "kind": "refund", "status": "PENDING", "run_id": "r"}
