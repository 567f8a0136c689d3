"""Bank scenarios on SQLite and PostgreSQL: a counterparty that records what it receives, crashes at the
worst moments, real duplicates and inconclusive observations; then reconciliation and compensation."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
from errands.core import (
    CompensationOutcome,
    CompensationResult,
    DispatchOutcome,
    DispatchResult,
    Effect,
    EffectConflictError,
    EffectStatus,
    FakeClock,
    NotFoundError,
    Obligation,
    ObligationStatus,
    Observation,
    ObservationOutcome,
    Outbox,
    Semantics,
    open_store,
)
from errands.core.testing import ChaosConnector


class Crash(BaseException):
    """The worker process dies here (nothing after this line runs)."""


class Bank:
    """A counterparty with a ledger: it records every transfer it receives, even repeated ones."""

    name: ClassVar[str] = "bank"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[str] = []
        self.reversed: list[str] = []
        self.observed: list[str] = []
        self.crash_before: set[str] = set()
        self.crash_after: set[str] = set()
        self.inconclusive = False

    def dispatch(self, effect: Effect) -> DispatchResult:
        if effect.key in self.crash_before:
            self.crash_before.discard(effect.key)
            raise Crash
        with self.lock:
            self.received.append(effect.key)
        if effect.key in self.crash_after:
            self.crash_after.discard(effect.key)
            raise Crash
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED, external_ref=f"tx-{effect.key}")

    def observe(self, effect: Effect) -> Observation:
        with self.lock:
            self.observed.append(effect.key)
            n = self.received.count(effect.key)
        if self.inconclusive:
            return Observation(outcome=ObservationOutcome.UNKNOWN)
        if n == 0:
            return Observation(outcome=ObservationOutcome.ABSENT)
        if n == 1:
            return Observation(outcome=ObservationOutcome.CONFIRMED, external_ref=f"tx-{effect.key}")
        return Observation(outcome=ObservationOutcome.DUPLICATE, response={"count": n})

    def compensate(self, obligation: Obligation) -> CompensationResult:
        with self.lock:
            self.reversed.append(obligation.effect_key)
        return CompensationResult(outcome=CompensationOutcome.COMPENSATED)

    def deliveries(self, key: str) -> int:
        return self.received.count(key)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Any:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'bank.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = open_store(url, clock=clock)
    yield s
    s.close()


@pytest.fixture
def bank() -> Bank:
    return Bank()


def worker(store: Any, connectors: dict[str, Any], name: str, **kw: Any) -> Outbox:
    kw.setdefault("lease_for", 30)
    kw.setdefault("backoff_base", 1)
    return Outbox(store, connectors=connectors, owner=name, seed=11, **kw)


def transfer(key: str, **kw: Any) -> Effect:
    return Effect(key=key, connector="bank", tool="transfer", payload={"cents": 1250, "to": "acct-9"}, **kw)


def test_crash_before_dispatch_delivers_once(store: Any, bank: Bank, clock: FakeClock) -> None:
    first = worker(store, {"bank": bank}, "w1")
    first.submit(transfer("t1", semantics=Semantics.NON_IDEMPOTENT))
    bank.crash_before.add("t1")
    with pytest.raises(Crash):
        first.dispatch_once()
    assert bank.deliveries("t1") == 0
    restarted = worker(store, {"bank": bank}, "w2")
    clock.advance(31)
    # The lease lapsed with the outcome unknown: a NON_IDEMPOTENT effect is observed first, not re-sent blind.
    [seen] = restarted.reconcile_once()
    assert (seen.outcome, seen.status) == (ObservationOutcome.ABSENT, EffectStatus.PENDING)
    [sent] = restarted.dispatch_once()
    assert sent.status is EffectStatus.CONFIRMED
    assert bank.deliveries("t1") == 1
    rec = restarted.get("t1")
    assert (rec.status, rec.attempts, rec.external_ref) == (EffectStatus.CONFIRMED, 2, "tx-t1")


def test_crash_after_delivery_is_observed_not_resent(store: Any, bank: Bank, clock: FakeClock) -> None:
    first = worker(store, {"bank": bank}, "w1")
    first.submit(transfer("t2", semantics=Semantics.NON_IDEMPOTENT))
    bank.crash_after.add("t2")
    with pytest.raises(Crash):
        first.dispatch_once()
    assert bank.deliveries("t2") == 1
    restarted = worker(store, {"bank": bank}, "w2")
    assert restarted.reconcile_once() == [] and restarted.dispatch_once() == []  # lease still held
    clock.advance(31)
    assert restarted.dispatch_once() == []  # never blind
    [seen] = restarted.reconcile_once()
    assert (seen.outcome, seen.status) == (ObservationOutcome.CONFIRMED, EffectStatus.CONFIRMED)
    assert bank.deliveries("t2") == 1 and bank.observed == ["t2"]
    subjects = [e.subject for e in restarted.history("t2")]
    assert subjects == ["effect.pending.bank.transfer", "effect.dispatching.bank.transfer",
                        "effect.unknown.bank.transfer", "effect.confirmed.bank.transfer"]


def test_lost_ack_then_absent_is_dispatched_again(store: Any, bank: Bank, clock: FakeClock) -> None:
    class DropsRequests:
        name = "bank"
        capabilities = None

        def __init__(self) -> None:
            self.dropped = 0

        def dispatch(self, effect: Effect) -> DispatchResult:
            if self.dropped == 0:
                self.dropped += 1  # the request never reached the bank, and no answer came back
                return DispatchResult(outcome=DispatchOutcome.UNKNOWN, error="timeout")
            return bank.dispatch(effect)

        def observe(self, effect: Effect) -> Observation:
            return bank.observe(effect)

    ob = worker(store, {"bank": DropsRequests()}, "w1")
    ob.submit(transfer("t3"))
    assert ob.dispatch_once()[0].status is EffectStatus.UNKNOWN
    clock.advance(2)
    assert ob.reconcile_once()[0].outcome is ObservationOutcome.ABSENT
    assert ob.dispatch_once()[0].status is EffectStatus.CONFIRMED
    assert bank.deliveries("t3") == 1


def test_real_duplicate_is_confirmed_and_compensated_once(store: Any, bank: Bank, clock: FakeClock) -> None:
    doubling = ChaosConnector(bank, seed=1, duplicate=1.0, lose_ack=1.0)
    ob = worker(store, {"bank": doubling}, "w1")
    ob.submit(transfer("t4", semantics=Semantics.NON_IDEMPOTENT, run_id="order-4"))
    [out] = ob.dispatch_once()
    assert out.status is EffectStatus.UNKNOWN and bank.deliveries("t4") == 2
    clock.advance(2)
    [seen] = ob.reconcile_once()
    assert (seen.outcome, seen.status) == (ObservationOutcome.DUPLICATE, EffectStatus.CONFIRMED)
    [owed] = ob.obligations(effect_key="t4")
    assert (owed.kind, owed.status, owed.run_id, owed.compensator) == (
        "duplicate", ObligationStatus.PENDING, "order-4", "bank")
    assert owed.payload["observed"] == {"count": 2}
    [done] = ob.compensate_once()
    assert done.status is ObligationStatus.COMPENSATED
    clock.advance(3600)
    assert ob.compensate_once() == [] and ob.reconcile_once() == []
    assert bank.reversed == ["t4"]
    subjects = [e.subject for e in ob.history("t4")]
    assert subjects[-4:] == ["effect.confirmed.bank.transfer", "obligation.pending.duplicate",
                             "obligation.compensating.duplicate", "obligation.compensated.duplicate"]


def test_inconclusive_observation_is_flagged_never_dropped(store: Any, bank: Bank, clock: FakeClock) -> None:
    lossy = ChaosConnector(bank, seed=2, lose_ack=1.0)
    ob = worker(store, {"bank": lossy}, "w1", max_observations=3, backoff_cap=60)
    ob.submit(transfer("t5", semantics=Semantics.NON_IDEMPOTENT))
    ob.dispatch_once()
    bank.inconclusive = True
    flags = []
    for _ in range(4):
        clock.advance(61)
        outs = ob.reconcile_once()
        flags += [(o.outcome, o.flagged) for o in outs]
    assert flags[:3] == [(ObservationOutcome.UNKNOWN, False), (ObservationOutcome.UNKNOWN, False),
                         (ObservationOutcome.UNKNOWN, True)]
    assert flags[3] == (ObservationOutcome.UNKNOWN, True)  # still observed after being flagged
    rec = ob.get("t5")
    assert (rec.status, rec.flagged, rec.observations) == (EffectStatus.UNKNOWN, True, 4)
    assert [r.key for r in ob.list(flagged=True)] == ["t5"]
    assert ob.stats()["flagged"] == 1
    assert sum(1 for e in ob.history("t5") if e.data.get("newly_flagged")) == 1
    bank.inconclusive = False  # the bank's lookup works again
    clock.advance(61)
    [seen] = ob.reconcile_once()
    assert seen.status is EffectStatus.CONFIRMED and not seen.flagged
    assert ob.stats()["flagged"] == 0 and bank.deliveries("t5") == 1


def test_saga_compensates_last_registered_first(store: Any, bank: Bank, clock: FakeClock) -> None:
    ob = worker(store, {"bank": bank}, "w1")
    order: list[str] = []

    @ob.compensator("release")
    def release(obligation: Obligation) -> None:
        order.append(obligation.payload["step"])

    for step in ("reserve", "charge", "ship", "notify"):
        ob.submit(transfer(f"saga-{step}", run_id="run-1"))
        if step != "notify":
            ob.dispatch_once()
            ob.register_compensation(f"saga-{step}", "release", {"step": step})
    ob.register_compensation("saga-charge", "refund", {"step": "charge-refund"})  # to the bank connector
    assert ob.obligations(run_id="run-1")[0].status is ObligationStatus.REGISTERED
    assert ob.compensate_once() == []  # nothing is owed until the run is rolled back
    due = ob.compensate_run("run-1")
    assert [(o.effect_key, o.kind) for o in due] == [
        ("saga-charge", "refund"), ("saga-ship", "release"), ("saga-charge", "release"), ("saga-reserve", "release")]
    assert ob.get("saga-notify").status is EffectStatus.CANCELLED  # not yet sent: withdrawn
    done = []
    for _ in range(6):
        done += [o.kind for o in ob.compensate_once()]
    assert done == ["refund", "release", "release", "release"]  # one at a time, LIFO
    assert order == ["ship", "charge", "reserve"] and bank.reversed == ["saga-charge"]
    assert ob.compensate_run("run-1") == []
    assert ob.stats()["obligations"]["COMPENSATED"] == 4


def test_stuck_compensation_is_visible_and_blocks_earlier_steps(store: Any, bank: Bank, clock: FakeClock) -> None:
    ob = worker(store, {"bank": bank}, "w1", compensation_attempts=3)
    calls: Counter[str] = Counter()

    @ob.compensator("cancel-shipment")
    def cancel_shipment(obligation: Obligation) -> CompensationResult:
        calls[obligation.effect_key] += 1
        raise RuntimeError("carrier API down")

    ob.submit_many([transfer("pay", run_id="r"), transfer("ship", run_id="r")])
    ob.dispatch_once()
    ob.register_compensation("pay", "refund", {"cents": 1250})
    ob.register_compensation("ship", "cancel-shipment", {})
    ob.compensate_run("r")
    statuses = []
    for _ in range(4):
        statuses += [o.status for o in ob.compensate_once()]
        clock.advance(100)
    assert statuses == [ObligationStatus.PENDING, ObligationStatus.PENDING, ObligationStatus.STUCK]
    [stuck] = ob.obligations(status="STUCK")
    assert stuck.effect_key == "ship" and "carrier API down" in (stuck.error or "") and calls["ship"] == 3
    assert ob.obligations(effect_key="pay")[0].status is ObligationStatus.PENDING  # waits behind the stuck one
    assert bank.reversed == [] and ob.stats()["obligations"]["STUCK"] == 1
    ob._compensators.pop("cancel-shipment")
    ob.compensator("cancel-shipment")(lambda o: CompensationOutcome.COMPENSATED)
    assert ob.redrive_obligation(stuck.id).status is ObligationStatus.PENDING
    assert [o.effect_key for o in ob.compensate_once()] == ["ship"]
    assert [o.effect_key for o in ob.compensate_once()] == ["pay"] and bank.reversed == ["pay"]


def test_no_compensator_is_stuck_at_once(store: Any, clock: FakeClock) -> None:
    class Mailer:
        name = "mail"

        def dispatch(self, effect: Effect) -> DispatchResult:
            return DispatchResult(outcome=DispatchOutcome.CONFIRMED)

    ob = worker(store, {"mail": Mailer()}, "w1")
    ob.submit(Effect(key="m", connector="mail", payload={}))
    ob.dispatch_once()
    ob.register_compensation("m", "unsend", None, due=True)
    [out] = ob.compensate_once()
    assert out.status is ObligationStatus.STUCK and "no compensator for kind 'unsend'" in (out.error or "")


def test_register_compensation_validates(store: Any, bank: Bank) -> None:
    ob = worker(store, {"bank": bank}, "w1")
    with pytest.raises(NotFoundError):
        ob.register_compensation("missing", "refund", {})
    ob.submit(transfer("x"))
    first = ob.register_compensation("x", "refund", {"cents": 1})
    assert ob.register_compensation("x", "refund", {"cents": 1}).id == first.id
    with pytest.raises(EffectConflictError):
        ob.register_compensation("x", "refund", {"cents": 2})
    assert len(ob.obligations()) == 1


def test_transactional_submit_with_the_callers_connection(store: Any, bank: Bank) -> None:
    ob = worker(store, {"bank": bank}, "w1")
    conn = store.connect()
    try:
        ob.submit(transfer("tx-rolled-back"), conn=conn)
        conn.rollback()
        ob.submit_many([transfer("tx-a"), transfer("tx-b")], conn=conn)
        ob.register_compensation("tx-a", "refund", {"cents": 1}, conn=conn)
        conn.commit()
    finally:
        conn.close()
    assert sorted(r.key for r in ob.list()) == ["tx-a", "tx-b"]
    assert [o.effect_key for o in ob.obligations()] == ["tx-a"]
    ob.dispatch_once()
    assert sorted(bank.received) == ["tx-a", "tx-b"]


def test_two_workers_never_dispatch_one_lease_twice(store: Any, bank: Bank) -> None:
    seen: Counter[tuple[str, int]] = Counter()
    lock = threading.Lock()

    class Recording:
        name = "bank"

        def dispatch(self, effect: Effect) -> DispatchResult:
            with lock:
                seen[(effect.key, effect.metadata["errands.lease_token"])] += 1
            return bank.dispatch(effect)

    conns = {"bank": Recording()}
    a, b = worker(store, conns, "a", batch_size=7), worker(store, conns, "b", batch_size=7)
    a.submit_many([transfer(f"k{i}") for i in range(120)])

    def run(ob: Outbox) -> None:
        while ob.dispatch_once():
            pass

    threads = [threading.Thread(target=run, args=(ob,)) for ob in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(seen.values()) == 1 and len(seen) == 120
    assert a.stats()["effects"]["CONFIRMED"] == 120 and sorted(set(bank.received)) == sorted(f"k{i}" for i in
                                                                                                range(120))
