"""Outbox and timer leases under slow counterparties and a faulty database: a heartbeat keeps the leases of a
claimed batch while connector calls run (one renewal statement for the whole batch), a worker never calls
a connector for a lease it no longer holds, and a locked database or a dropped connection while results are
recorded is retried rather than losing the result or recording it as the effect's failure."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from errands.core import (
    DEFAULT_LEASE_FOR,
    CompensationOutcome,
    CompensationResult,
    DispatchOutcome,
    DispatchResult,
    Effect,
    EffectStatus,
    FakeClock,
    Obligation,
    ObligationStatus,
    Observation,
    ObservationOutcome,
    Outbox,
    Semantics,
    is_infrastructure_error,
    open_store,
)
from errands.core.testing import faults

LEASE = 0.9  # short enough that a test outlives a few leases; the heartbeat renews every LEASE / 3


class Counterparty:
    """Records every delivery, observation and compensation; a call can be held until ``release()``."""

    name: ClassVar[str] = "cp"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[tuple[str, int]] = []
        self.observed: list[str] = []
        self.compensated: list[str] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.during: Any = None  # called once inside the first call (another worker's turn)
        self.lose_ack: set[str] = set()  # delivered, but the answer is lost (UNKNOWN)

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def _wait(self) -> None:
        self.entered.set()
        during, self.during = self.during, None
        if during is not None:
            during()
        assert self.gate.wait(30)

    def dispatch(self, effect: Effect) -> DispatchResult:
        self._wait()
        with self.lock:
            self.received.append((effect.key, int(effect.metadata["errands.lease_token"])))
        if effect.key in self.lose_ack:
            return DispatchResult(outcome=DispatchOutcome.UNKNOWN, error="timed out")
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED, external_ref=f"cp-{effect.key}")

    def observe(self, effect: Effect) -> Observation:
        self._wait()
        with self.lock:
            self.observed.append(effect.key)
            n = sum(1 for k, _ in self.received if k == effect.key)
        if n == 0:
            return Observation(outcome=ObservationOutcome.ABSENT)
        return Observation(outcome=ObservationOutcome.CONFIRMED if n == 1 else ObservationOutcome.DUPLICATE)

    def compensate(self, obligation: Obligation) -> CompensationResult:
        self._wait()
        with self.lock:
            self.compensated.append(obligation.effect_key)
        return CompensationResult(outcome=CompensationOutcome.COMPENSATED)

    def deliveries(self, key: str) -> int:
        with self.lock:
            return sum(1 for k, _ in self.received if k == key)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'leases.db'}"
    return str(request.getfixturevalue("postgres_url"))


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def _outlive_leases(n: float = 3.0) -> None:
    """Let ``n`` leases' worth of wall time pass while a call is held (the heartbeat must carry it)."""
    time.sleep(n * LEASE)


def test_the_default_lease_is_the_shared_one() -> None:
    store = open_store("memory://")
    assert Outbox(store, connectors={}).lease_for == DEFAULT_LEASE_FOR == 10.0
    store.close()


@pytest.mark.parametrize("semantics", [Semantics.IDEMPOTENT, Semantics.NON_IDEMPOTENT])
def test_a_slow_dispatch_keeps_its_lease_and_is_delivered_once(url: str, semantics: Semantics) -> None:
    store, other_store = open_store(url), open_store(url)
    cp = Counterparty()
    first = Outbox(store, connectors={"cp": cp}, lease_for=LEASE)
    second = Outbox(other_store, connectors={"cp": cp}, lease_for=LEASE)
    first.submit(Effect(key="slow", connector="cp", payload={}, semantics=semantics))
    cp.hold()
    thread, out = _in_thread(first.dispatch_once)
    assert cp.entered.wait(10)
    _outlive_leases()
    # Another worker finds nothing to take: the lease was renewed while the call ran.
    assert second.dispatch_once() == []
    assert second.reconcile_once() == []
    assert store and first.get("slow").status is EffectStatus.DISPATCHING
    cp.release()
    thread.join(10)
    assert [o.status for o in out[0]] == [EffectStatus.CONFIRMED]
    assert not out[0][0].lease_lost
    assert cp.deliveries("slow") == 1
    assert first.get("slow").attempts == 1
    store.close()
    other_store.close()


def test_a_slow_observation_keeps_its_lease(url: str) -> None:
    store, other_store = open_store(url), open_store(url)
    cp = Counterparty()
    first = Outbox(store, connectors={"cp": cp}, lease_for=LEASE)
    second = Outbox(other_store, connectors={"cp": cp}, lease_for=LEASE)
    first.submit(Effect(key="obs", connector="cp", payload={}, semantics=Semantics.OBSERVE_ONLY))
    cp.hold()
    thread, out = _in_thread(first.reconcile_once)
    assert cp.entered.wait(10)
    _outlive_leases()
    assert second.reconcile_once() == []
    cp.release()
    thread.join(10)
    assert len(out[0]) == 1 and not out[0][0].lease_lost
    assert cp.observed == ["obs"]
    store.close()
    other_store.close()


def test_a_slow_compensation_keeps_its_lease(url: str) -> None:
    store, other_store = open_store(url), open_store(url)
    cp = Counterparty()
    first = Outbox(store, connectors={"cp": cp}, lease_for=LEASE)
    second = Outbox(other_store, connectors={"cp": cp}, lease_for=LEASE)
    first.submit(Effect(key="pay", connector="cp", payload={}))
    first.dispatch_once()
    first.register_compensation("pay", "refund", {"cents": 5}, due=True)
    cp.hold()
    cp.entered.clear()
    thread, out = _in_thread(first.compensate_once)
    assert cp.entered.wait(10)
    _outlive_leases()
    assert second.compensate_once() == []
    cp.release()
    thread.join(10)
    assert [o.status for o in out[0]] == [ObligationStatus.COMPENSATED]
    assert cp.compensated == ["pay"]
    store.close()
    other_store.close()


def test_a_batch_is_renewed_by_one_statement_per_beat(tmp_path: Path) -> None:
    path = tmp_path / "batch.db"
    store = open_store(f"sqlite:///{path}")
    cp = Counterparty()
    outbox = Outbox(store, connectors={"cp": cp}, lease_for=LEASE, max_in_flight=4)
    outbox.submit_many([Effect(key=f"e{i}", connector="cp", payload={"i": i}) for i in range(40)])
    renewals: list[str] = []
    store._conn.set_trace_callback(
        lambda sql: renewals.append(sql) if "lease_token) IN" in sql and "next_attempt_at" in sql else None)
    cp.hold()
    thread, out = _in_thread(outbox.dispatch_once)
    assert cp.entered.wait(10)
    _outlive_leases()
    cp.release()
    thread.join(10)
    store._conn.set_trace_callback(None)
    assert len(out[0]) == 40 and all(o.status is EffectStatus.CONFIRMED for o in out[0])
    # Renewed while the calls were held, and each renewal one statement for the 40 leases (a heartbeat per
    # effect would have written 40 per beat).
    assert 1 <= len(renewals) < 40
    store.close()


def test_a_worker_never_calls_the_connector_for_a_lease_that_lapsed(tmp_path: Path) -> None:
    clock = faults.JumpClock()
    url = f"sqlite:///{tmp_path / 'lapse.db'}"
    store, other_store = open_store(url, clock=clock), open_store(url, clock=clock)
    cp = Counterparty()
    first = Outbox(store, connectors={"cp": cp}, max_in_flight=1)
    second = Outbox(other_store, connectors={"cp": cp}, max_in_flight=1)
    first.submit_many([Effect(key=f"k{i}", connector="cp", payload={}) for i in range(3)])
    took: list[Any] = []

    def meanwhile() -> None:
        # The first worker stalls past its lease (no heartbeat can help a clock that jumped): another
        # worker takes the batch over and delivers it.
        clock.jump(first.lease_for * 2)
        took.extend(second.dispatch_once())

    cp.during = meanwhile
    outcomes = first.dispatch_once()
    assert {o.key for o in took} == {"k0", "k1", "k2"}
    # The first worker's call in flight went out; the calls it had not started yet did not.
    assert [cp.deliveries(f"k{i}") for i in range(3)] == [2, 1, 1]
    assert all(o.lease_lost for o in outcomes)
    assert all(first.get(f"k{i}").status is EffectStatus.CONFIRMED for i in range(3))
    store.close()
    other_store.close()


COMPLETIONS = {
    "dispatch": r"UPDATE em_effects SET status = .*WHERE key = \? AND lease_token|WITH v \(status",
    "reconcile": r"UPDATE em_effects SET status = .*WHERE key = \? AND lease_token|WITH v \(status",
    "compensate": r"UPDATE em_obligations SET status = (\?|%s), next_attempt_at",
}


def _prepare(outbox: Outbox, cp: Counterparty, clock: FakeClock, step: str) -> None:
    if step == "dispatch":
        outbox.submit(Effect(key="k", connector="cp", payload={}, semantics=Semantics.NON_IDEMPOTENT))
    elif step == "reconcile":
        cp.lose_ack.add("k")
        outbox.submit(Effect(key="k", connector="cp", payload={}, semantics=Semantics.NON_IDEMPOTENT))
        assert [o.status for o in outbox.dispatch_once()] == [EffectStatus.UNKNOWN]
        clock.advance(outbox.backoff_cap)
    else:
        outbox.submit(Effect(key="k", connector="cp", payload={}))
        outbox.dispatch_once()
        outbox.register_compensation("k", "refund", {}, due=True)


@pytest.mark.parametrize("step", ["dispatch", "reconcile", "compensate"])
@pytest.mark.parametrize("fault", [faults.Fault(kind="locked"), faults.Fault(kind="dropped", when="commit"),
                                   faults.Fault(kind="serialization", when="after_commit")],
                         ids=["locked", "dropped-at-commit", "ack-lost"])
def test_a_fault_while_recording_results_is_retried_not_recorded(url: str, step: str,
                                                                  fault: faults.Fault) -> None:
    clock = FakeClock()
    store = open_store(url, clock=clock)
    cp = Counterparty()
    plan = faults.FaultPlan(match=COMPLETIONS[step], rate=1.0, kinds=(fault.kind,), when=(fault.when,), limit=1)
    with faults.inject(store, plan):
        outbox = Outbox(store, connectors={"cp": cp})
        with plan.paused():
            _prepare(outbox, cp, clock, step)
        run = {"dispatch": outbox.dispatch_once, "reconcile": outbox.reconcile_once,
               "compensate": outbox.compensate_once}[step]
        outcomes = run()
    assert len(plan.injected) == 1
    assert len(outcomes) == 1 and not outcomes[0].lease_lost and outcomes[0].error is None
    if step == "compensate":
        assert outbox.obligations()[0].status is ObligationStatus.COMPENSATED
        assert cp.compensated == ["k"]
    else:
        rec = outbox.get("k")
        assert rec.status is EffectStatus.CONFIRMED and rec.error is None
        assert cp.deliveries("k") == 1
    store.close()


def test_a_second_writer_holding_the_lock_while_results_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = open_store(f"sqlite:///{path}?busy_timeout=50")
    holding = threading.Event()
    done = threading.Event()

    def hold_lock() -> None:
        with faults.sqlite_write_lock(path):
            holding.set()
            time.sleep(0.5)  # longer than busy_timeout: the outbox's first try to record fails
        done.set()

    class LockingCounterparty(Counterparty):
        def dispatch(self, effect: Effect) -> DispatchResult:
            threading.Thread(target=hold_lock, daemon=True).start()
            assert holding.wait(10)
            return super().dispatch(effect)

    cp = LockingCounterparty()
    outbox = Outbox(store, connectors={"cp": cp})
    outbox.submit(Effect(key="k", connector="cp", payload={}, semantics=Semantics.NON_IDEMPOTENT))
    outcomes = outbox.dispatch_once()
    assert done.wait(10)
    assert [o.status for o in outcomes] == [EffectStatus.CONFIRMED]
    assert outbox.get("k").status is EffectStatus.CONFIRMED
    assert cp.deliveries("k") == 1
    store.close()


def test_run_inline_retries_recording_its_result(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'inline.db'}")
    plan = faults.FaultPlan(match=r"UPDATE em_effects SET status = \?, response", rate=1.0, limit=1)
    calls: list[str] = []
    with faults.inject(store, plan):
        outbox = Outbox(store, connectors={})
        rec = outbox.run_inline(Effect(key="inline", connector="local", payload={}),
                                lambda e: calls.append(e.key) or {"ok": True})
    assert len(plan.injected) == 1
    assert rec.status is EffectStatus.CONFIRMED and rec.response == {"ok": True}
    assert calls == ["inline"]
    store.close()


CLAIMS = {
    "dispatch": r"UPDATE em_effects SET status = 'DISPATCHING'",
    "reconcile": r"observations = observations \+ 1",
    "compensate": r"UPDATE em_obligations SET status = 'COMPENSATING'",
}


@pytest.mark.parametrize("step", ["dispatch", "reconcile", "compensate"])
def test_a_claim_whose_commit_was_lost_is_released_at_once(url: str, step: str) -> None:
    # Found by the model test: the claim commits but the worker hears a store fault, so it never calls the
    # connector; the effect must be due again at once, without the attempt the claim charged.
    clock = FakeClock()
    store = open_store(url, clock=clock)
    cp = Counterparty()
    plan = faults.FaultPlan(match=CLAIMS[step], rate=1.0, kinds=("dropped",), when=("after_commit",), limit=1)
    with faults.inject(store, plan):
        outbox = Outbox(store, connectors={"cp": cp})
        with plan.paused():
            _prepare(outbox, cp, clock, step)
            before = outbox.get("k") if step != "compensate" else outbox.obligations()[0]
        run = {"dispatch": outbox.dispatch_once, "reconcile": outbox.reconcile_once,
               "compensate": outbox.compensate_once}[step]
        with pytest.raises(Exception) as info:
            run()
        assert is_infrastructure_error(info.value)
        assert len(plan.injected) == 1
        # The same worker's next pass (no time passes) takes it again and completes it in one more attempt.
        outcomes = run()
    assert len(outcomes) == 1 and not outcomes[0].lease_lost
    if step == "compensate":
        rec = outbox.obligations()[0]
        assert rec.status is ObligationStatus.COMPENSATED and rec.attempts == before.attempts + 1
    else:
        rec = outbox.get("k")
        assert rec.status is EffectStatus.CONFIRMED
        assert (rec.attempts, rec.observations) == (
            (1, 0) if step == "dispatch" else (before.attempts, before.observations + 1))
    store.close()
