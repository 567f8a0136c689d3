"""Operators' control of effects: ``Outbox.resolve`` settles an effect's outcome without a connector call,
``resolve_obligation`` settles a compensation owed, ``approve`` hands its payload to the connector, and every
effect event carries ``run_id`` and ``business_key`` (an operator's, ``by`` too). ``StoreScheduler.due`` lists due
timers. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any, ClassVar, Iterator

import pytest
from errands.core import (
    CompensationOutcome,
    CompensationResult,
    ConnectorCapabilities,
    DispatchOutcome,
    DispatchResult,
    Effect,
    EffectStatus,
    FakeClock,
    NotFoundError,
    Obligation,
    ObligationStatus,
    Observation,
    ObservationOutcome,
    Outbox,
    Semantics,
    StoreScheduler,
    Worker,
    open_store,
)
from errands.core._cli import main
from errands.core.errors import ConfigError
from errands.core.outbox import _effect_table, _transitions
from errands.core.outbox._records import EffectRecord, StoredEffect

NOW = 1_700_000_000.0


class Recorder:
    """A counterparty that records every call. ``answer`` is what ``dispatch`` says (an unknown outcome by
    default: the acknowledgement lost); ``observe`` says ``seen``."""

    name: ClassVar[str] = "rec"

    def __init__(self, *, can_observe: bool = False, answer: DispatchOutcome = DispatchOutcome.UNKNOWN,
                 seen: ObservationOutcome = ObservationOutcome.UNKNOWN) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str]] = []
        self.effects: list[Effect] = []
        self.answer = answer
        self.seen = seen
        self.capabilities = ConnectorCapabilities(can_observe=can_observe, can_compensate=True,
                                                  default_semantics=Semantics.IDEMPOTENT)

    def dispatch(self, effect: Effect) -> DispatchResult:
        with self.lock:
            self.calls.append(("dispatch", effect.key))
            self.effects.append(effect)
        return DispatchResult(outcome=self.answer)

    def observe(self, effect: Effect) -> Observation:
        with self.lock:
            self.calls.append(("observe", effect.key))
        return Observation(outcome=self.seen)

    def compensate(self, obligation: Obligation) -> CompensationResult:
        with self.lock:
            self.calls.append(("compensate", obligation.effect_key))
        return CompensationResult(outcome=CompensationOutcome.COMPENSATED)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'resolve.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(url: str, clock: FakeClock) -> Iterator[Any]:
    s = open_store(url, clock=clock)
    yield s
    s.close()


def outbox_of(store: Any, conn: Any, **kw: Any) -> Outbox:
    kw.setdefault("max_observations", 2)
    return Outbox(store, connectors={"rec": conn}, seed=3, **kw)


def effect(key: str, **kw: Any) -> Effect:
    kw.setdefault("business_key", f"order-{key}")
    kw.setdefault("run_id", "run-7")
    return Effect(key=key, connector="rec", tool="pay", payload={"cents": 100}, **kw)


def flagged_unknown(outbox: Outbox, key: str = "k") -> EffectRecord:
    """An effect delivered once whose outcome stayed unknown: ``NON_IDEMPOTENT`` and a connector that cannot
    observe, so flagged for a human at once."""
    outbox.submit(effect(key, semantics=Semantics.NON_IDEMPOTENT))
    outbox.dispatch_once()
    rec = outbox.get(key)
    assert (rec.status, rec.flagged) == (EffectStatus.UNKNOWN, True)
    return rec


def events_of(outbox: Outbox, key: str) -> list[dict[str, Any]]:
    return [dict(e.data) for e in outbox.history(key)]


def test_resolving_a_flagged_unknown_effect_confirms_it_without_dispatching(store: Any, clock: FakeClock) -> None:
    conn = Recorder()
    outbox = outbox_of(store, conn)
    flagged_unknown(outbox)
    conn.calls.clear()
    rec = outbox.resolve("k", "CONFIRMED", response={"id": "tx-1"}, external_ref="tx-1", by="ada")
    assert (rec.status, rec.flagged, rec.response, rec.external_ref, rec.error) == (
        EffectStatus.CONFIRMED, False, {"id": "tx-1"}, "tx-1", None)
    assert rec.next_attempt_at is None
    outbox.drain()
    clock.advance(3600)
    worker = Worker(store, outbox=outbox, poll_interval=0.01)
    try:
        worker.drain()
    finally:
        worker.close()
    assert conn.calls == []
    assert outbox.get("k").status is EffectStatus.CONFIRMED
    last = events_of(outbox, "k")[-1]
    assert last == {"key": "k", "connector": "rec", "tool": "pay", "status": "CONFIRMED", "resolved": "CONFIRMED",
                    "by": "ada", "external_ref": "tx-1", "run_id": "run-7", "business_key": "order-k"}


def test_resolving_an_observed_unknown_effect_stops_its_observations(store: Any, clock: FakeClock) -> None:
    conn = Recorder(can_observe=True)
    outbox = outbox_of(store, conn, backoff_cap=5)
    outbox.submit(effect("k"))
    outbox.dispatch_once()
    for _ in range(3):
        clock.advance(10)
        outbox.reconcile_once()
    assert outbox.get("k").flagged
    conn.calls.clear()
    assert outbox.resolve("k", EffectStatus.CONFIRMED, by="ada").status is EffectStatus.CONFIRMED
    clock.advance(3600)
    assert outbox.drain() == 0 and conn.calls == []


def test_absent_dispatches_again_with_fresh_attempts(store: Any) -> None:
    conn = Recorder()
    outbox = outbox_of(store, conn)
    flagged_unknown(outbox)
    rec = outbox.resolve("k", ObservationOutcome.ABSENT, by="ada")
    assert (rec.status, rec.attempts, rec.flagged) == (EffectStatus.PENDING, 0, False)
    conn.answer = DispatchOutcome.CONFIRMED
    conn.calls.clear()
    outbox.drain()
    assert conn.calls == [("dispatch", "k")]
    assert outbox.get("k").status is EffectStatus.CONFIRMED
    assert conn.effects[-1].metadata["errands.attempt"] == 1


def test_duplicate_confirms_and_owes_the_compensation(store: Any) -> None:
    conn = Recorder()
    outbox = outbox_of(store, conn)
    flagged_unknown(outbox)
    with pytest.raises(ConfigError, match="needs compensate_kind") as err:
        outbox.resolve("k", "DUPLICATE", by="ada")
    assert err.value.field == "compensate_kind"
    assert outbox.get("k").status is EffectStatus.UNKNOWN and outbox.obligations(effect_key="k") == []
    rec = outbox.resolve("k", "duplicate", response={"count": 2}, compensate_kind="refund", by="ada")
    assert rec.status is EffectStatus.CONFIRMED
    (owed,) = outbox.obligations(effect_key="k")
    assert (owed.kind, owed.status, owed.run_id, owed.compensator, owed.payload) == (
        "refund", ObligationStatus.PENDING, "run-7", "rec", {"payload": {"cents": 100}, "observed": {"count": 2}})
    conn.calls.clear()
    outbox.drain()
    assert conn.calls == [("compensate", "k")]
    assert outbox.obligations(effect_key="k")[0].status is ObligationStatus.COMPENSATED
    kinds = [(e.type, e.data.get("by")) for e in outbox.history("k")]
    assert ("effect.confirmed", "ada") in kinds and ("obligation.pending", None) in kinds


def test_failed_records_the_error(store: Any) -> None:
    outbox = outbox_of(store, Recorder())
    flagged_unknown(outbox)
    rec = outbox.resolve("k", "FAILED", error="the bank refused it", by="ada")
    assert (rec.status, rec.error, rec.flagged) == (EffectStatus.FAILED, "the bank refused it", False)
    outbox.submit(effect("p"))
    assert outbox.resolve("p", "FAILED").error == "resolved FAILED by an operator"


def test_refusals_change_nothing(store: Any, clock: FakeClock) -> None:
    conn = Recorder(answer=DispatchOutcome.CONFIRMED)
    outbox = outbox_of(store, conn)
    outbox.submit(effect("done"))
    outbox.dispatch_once()
    outbox.submit(effect("gated", human_gate=True))
    before = {k: outbox.get(k) for k in ("done", "gated")}
    positions = store.last_position()
    cases = [
        ("done", "CONFIRMED", {}, "it is CONFIRMED \\(finished\\)"),
        ("gated", "ABSENT", {}, "approve it to dispatch it"),
        ("gated", "CONFIRMED", {"compensate_kind": "refund"}, "compensate_kind applies to DUPLICATE only"),
        ("gated", "MAYBE", {}, "status must be one of CONFIRMED, FAILED, ABSENT, DUPLICATE"),
    ]
    for key, status, kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            outbox.resolve(key, status, **kw)
    with pytest.raises(NotFoundError):
        outbox.resolve("nobody", "CONFIRMED")
    assert {k: outbox.get(k) for k in before} == before and store.last_position() == positions


def test_a_live_lease_is_refused_and_a_lapsed_one_resolved(store: Any, clock: FakeClock) -> None:
    conn = Recorder(answer=DispatchOutcome.CONFIRMED)
    outbox = outbox_of(store, conn, lease_for=30)
    outbox.submit(effect("k"))
    # A worker claimed it and died mid-call: DISPATCHING, leased.
    with store.transaction() as tx:
        (claimed,) = _effect_table.claim_for_dispatch(tx, "dead-worker", clock.now() + 30, clock.now(), ["rec"], 10)
    held = outbox.get("k")
    with pytest.raises(ConfigError, match="leased to dead-worker"):
        outbox.resolve("k", "CONFIRMED")
    assert outbox.get("k") == held
    clock.advance(31)
    assert outbox.resolve("k", "CONFIRMED", by="ada").status is EffectStatus.CONFIRMED
    # The dead worker's completion, fenced by its stale token, records nothing over the decision.
    with store.transaction() as tx:
        done = _effect_table.complete(tx, [_transitions.dispatch_transition(
            claimed, (True, DispatchResult(outcome=DispatchOutcome.FAILED)), can_observe=False,
            now=clock.now(), delay=lambda _a, _r: 1.0)], "DISPATCHING")
    assert done == set() and outbox.get("k").status is EffectStatus.CONFIRMED
    assert conn.calls == []


def test_resolve_obligation(store: Any) -> None:
    outbox = outbox_of(store, Recorder(answer=DispatchOutcome.CONFIRMED))
    outbox.submit(effect("k"))
    outbox.drain()
    ob = outbox.register_compensation("k", "refund", {"cents": 100})
    assert ob.status is ObligationStatus.REGISTERED
    stuck = outbox.resolve_obligation(ob.id, "STUCK", by="ada")
    assert (stuck.status, stuck.error) == (ObligationStatus.STUCK, "resolved STUCK by ada")
    with pytest.raises(ConfigError, match="it is STUCK already"):
        outbox.resolve_obligation(ob.id, "STUCK")
    done = outbox.resolve_obligation(ob.id, ObligationStatus.COMPENSATED, result={"refund": "r-1"}, by="grace")
    assert (done.status, done.response, done.error) == (ObligationStatus.COMPENSATED, {"refund": "r-1"}, None)
    positions = store.last_position()
    for status, message in (("COMPENSATED", "it is COMPENSATED \\(finished\\)"),
                            ("DONE", "status must be one of COMPENSATED, STUCK")):
        with pytest.raises(ConfigError, match=message):
            outbox.resolve_obligation(ob.id, status)
    with pytest.raises(NotFoundError):
        outbox.resolve_obligation(ob.id + 100, "STUCK")
    assert store.last_position() == positions and outbox.obligations(effect_key="k")[0] == done
    events = [e.data for e in outbox.history("k") if e.type.startswith("obligation.")]
    assert [(e["status"], e.get("by"), e.get("resolved")) for e in events] == [
        ("REGISTERED", None, None), ("STUCK", "ada", "STUCK"), ("COMPENSATED", "grace", "COMPENSATED")]


def test_approve_hands_its_payload_to_the_connector(store: Any) -> None:
    conn = Recorder(answer=DispatchOutcome.CONFIRMED)
    outbox = outbox_of(store, conn)
    outbox.submit(effect("g", human_gate=True, metadata={"tenant": "t1"}))
    rec = outbox.approve("g", payload={"limit": 500}, by="ada")
    assert rec.metadata == {"tenant": "t1", "errands.approval": {"limit": 500}}
    outbox.drain()
    (sent,) = conn.effects
    assert sent.metadata["errands.approval"] == {"limit": 500} and sent.metadata["tenant"] == "t1"
    approved = [e.data for e in outbox.history("g") if e.type == "effect.pending"][-1]
    assert approved["by"] == approved["approved_by"] == "ada"
    outbox.submit(effect("r", human_gate=True))
    rejected = outbox.reject("r", reason="no", by="grace")
    assert rejected.status is EffectStatus.CANCELLED
    assert outbox.history("r")[-1].data["by"] == "grace"


def test_every_effect_event_carries_run_id_and_business_key(store: Any, clock: FakeClock) -> None:
    conn = Recorder(can_observe=True, seen=ObservationOutcome.CONFIRMED)
    outbox = outbox_of(store, conn)
    outbox.submit(effect("k"))
    outbox.drain()
    clock.advance(60)
    outbox.drain()
    assert outbox.get("k").status is EffectStatus.CONFIRMED
    events = [e.data for e in outbox.history("k")]
    assert [e["status"] for e in events] == ["PENDING", "DISPATCHING", "UNKNOWN", "CONFIRMED"]
    assert all((e["run_id"], e["business_key"]) == ("run-7", "order-k") for e in events)
    outbox.run_inline(effect("i"), lambda _e: {"ok": True})
    outbox.submit(effect("c"))
    outbox.compensate_run("run-7")
    for key in ("i", "c"):
        assert all((e.data["run_id"], e.data["business_key"]) == ("run-7", f"order-{key}")
                   for e in outbox.history(key))


def test_the_async_twins(store: Any) -> None:
    outbox = outbox_of(store, Recorder())
    flagged_unknown(outbox)
    outbox.submit(effect("g", human_gate=True))
    outbox.submit(effect("r", human_gate=True))

    async def run() -> tuple[Any, ...]:
        resolved = await outbox.resolve_async("k", "DUPLICATE", compensate_kind="refund", by="ada")
        (owed,) = outbox.obligations(effect_key="k")
        settled = await outbox.resolve_obligation_async(owed.id, "COMPENSATED", by="ada")
        approved = await outbox.approve_async("g", payload="ok", by="ada")
        rejected = await outbox.reject_async("r", reason="no", by="ada")
        return resolved, settled, approved, rejected

    resolved, settled, approved, rejected = asyncio.run(run())
    assert resolved.status is EffectStatus.CONFIRMED and settled.status is ObligationStatus.COMPENSATED
    assert approved.metadata["errands.approval"] == "ok" and rejected.status is EffectStatus.CANCELLED


def test_scheduler_due_lists_the_due_timers(store: Any, clock: FakeClock) -> None:
    timers = StoreScheduler(store, lease_for=30)
    now = clock.now()
    timers.schedule("remind", {"order": 1}, at=now - 5, key="t1")
    timers.schedule("remind", {"order": 2}, at=now, key="t2")
    timers.schedule("later", {"order": 3}, at=now + 60, key="t3")
    due = timers.due()
    assert [(t.key, t.topic, t.payload, t.due_at.timestamp(), t.attempts) for t in due] == [
        ("t1", "remind", {"order": 1}, now - 5, 0), ("t2", "remind", {"order": 2}, now, 0)]
    assert [t.key for t in timers.due(limit=1)] == ["t1"]
    (lease,) = store.claim(timers.queue, 1, lease_for=30)  # a worker holds t1 now
    assert [t.key for t in timers.due()] == ["t2"]
    clock.advance(61)
    assert [(t.key, t.attempts) for t in timers.due()] == [("t1", 1), ("t2", 0), ("t3", 0)]
    assert lease.key == "t1" and timers.pending() == 3
    assert due[0].to_dict()["due_at"].startswith("20")
    with pytest.raises(ConfigError, match="limit must be an integer >= 1"):
        timers.due(limit=0)


def test_the_commands(url: str, store: Any, capsys: pytest.CaptureFixture[str], clock: FakeClock) -> None:
    outbox = outbox_of(store, Recorder())
    flagged_unknown(outbox, "k")
    flagged_unknown(outbox, "d")
    outbox.submit(effect("g", human_gate=True))
    StoreScheduler(store).schedule("remind", {"order": 1}, at=clock.now() - 1, key="t1")
    assert main(["effects", "resolve", "k", "confirmed", "--by", "ada", "--store", url, "--external-ref", "x-1",
                 "--response", '{"id": 1}']) == 0
    assert capsys.readouterr().out.strip() == "k: CONFIRMED"
    rec = outbox.get("k")
    assert (rec.status, rec.response, rec.external_ref) == (EffectStatus.CONFIRMED, {"id": 1}, "x-1")
    assert main(["effects", "resolve", "d", "DUPLICATE", "--compensate-kind", "refund", "--store", url,
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "CONFIRMED"
    (owed,) = outbox.obligations(effect_key="d")
    assert main(["obligations", "resolve", str(owed.id), "COMPENSATED", "--result", '"by hand"', "--by", "ada",
                 "--store", url]) == 0
    assert capsys.readouterr().out.strip() == f"{owed.id} (d, refund): COMPENSATED"
    assert outbox.obligations(effect_key="d")[0].response == "by hand"
    assert main(["effects", "approve", "g", "--payload", '{"limit": 5}', "--store", url]) == 0
    assert outbox.get("g").metadata["errands.approval"] == {"limit": 5}
    capsys.readouterr()
    assert main(["effects", "resolve", "g", "CONFIRMED", "--response", "not json", "--store", url]) == 1
    assert "--response must be JSON" in capsys.readouterr().err
    assert main(["effects", "resolve", "k", "FAILED", "--store", url]) == 1
    assert "cannot resolve effect 'k': it is CONFIRMED (finished)" in capsys.readouterr().err
    assert main(["timers", "due", "--store", url, "--json"]) == 0
    (timer,) = json.loads(capsys.readouterr().out)
    assert (timer["key"], timer["topic"], timer["payload"]) == ("t1", "remind", {"order": 1})
    assert main(["timers", "due", "--store", url, "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert "t1" in out and "remind" in out


# -- the pure transitions, without a store --------------------------------------------------------------------
def stored(status: EffectStatus, *, owner: str | None = None, next_at: float | None = None,
           semantics: Semantics = Semantics.IDEMPOTENT, flagged: bool = False) -> StoredEffect:
    rec = EffectRecord(key="k", connector="bank", tool="", payload={"cents": 5}, status=status, semantics=semantics,
                       attempts=2, max_attempts=5, run_id="r", business_key="b", flagged=flagged, lease_owner=owner,
                       error="earlier")
    return StoredEffect(rec, NOW, next_at, 4)


def resolve(s: StoredEffect, status: Any, **kw: Any) -> _transitions.Change:
    return _transitions.resolve(s, NOW, status=status, compensation_attempts=3, **kw)


def test_resolve_transitions() -> None:
    c = resolve(stored(EffectStatus.UNKNOWN, flagged=True), "CONFIRMED", by="ada", response={"a": 1})
    assert (c.status, c.next_attempt_at, c.error, c.unflag, c.response, c.obligation) == (
        EffectStatus.CONFIRMED, None, None, True, {"a": 1}, None)
    data = json.loads(c.event.data)
    assert data["resolved"] == "CONFIRMED" and data["by"] == "ada"
    c = resolve(stored(EffectStatus.PENDING), "ABSENT")
    assert (c.status, c.next_attempt_at, c.fresh_attempts) == (EffectStatus.PENDING, NOW, True)
    c = resolve(stored(EffectStatus.DISPATCHING, owner="w", next_at=NOW), "DUPLICATE", compensate_kind="refund")
    assert c.obligation is not None and (c.obligation.kind, c.obligation.max_attempts,
                                         c.obligation.next_attempt_at) == ("refund", 3, NOW)
    assert resolve(stored(EffectStatus.AWAITING_APPROVAL), "FAILED", by="ada").error == "resolved FAILED by ada"
    with pytest.raises(ConfigError, match="leased to w"):
        resolve(stored(EffectStatus.UNKNOWN, owner="w", next_at=NOW + 1), "CONFIRMED")
    with pytest.raises(ConfigError, match="OBSERVE_ONLY"):
        resolve(stored(EffectStatus.UNKNOWN, semantics=Semantics.OBSERVE_ONLY), "ABSENT")
    for status in (EffectStatus.CONFIRMED, EffectStatus.FAILED, EffectStatus.CANCELLED):
        with pytest.raises(ConfigError, match="finished"):
            resolve(stored(status), "CONFIRMED")
    with pytest.raises(ConfigError) as err:
        resolve(stored(EffectStatus.PENDING), 3)
    assert (err.value.field, err.value.value) == ("status", 3)
