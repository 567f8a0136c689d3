"""Outbox: submit and its validation, lifecycle, retries, human gate, inline runs, views and journal events."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from errands.core import (
    MAX_RETRY_AFTER,
    ConfigError,
    DispatchOutcome,
    DispatchResult,
    Effect,
    EffectConflictError,
    EffectStatus,
    FakeClock,
    NotFoundError,
    Outbox,
    PayloadError,
    PermanentError,
    Semantics,
    TransientError,
    open_store,
)
from errands.core.testing import FakeConnector


@pytest.fixture
def store(clock: FakeClock) -> Any:
    s = open_store("memory://", clock=clock)
    yield s
    s.close()


@pytest.fixture
def bank() -> FakeConnector:
    return FakeConnector("bank")


@pytest.fixture
def outbox(store: Any, bank: FakeConnector) -> Any:
    ob = Outbox(store, connectors={"bank": bank}, seed=1)
    yield ob
    ob.close()


def pay(key: str = "order-42", **kw: Any) -> Effect:
    kw.setdefault("payload", {"cents": 500, "to": "acct-1"})
    kw.setdefault("tool", "transfer")
    return Effect(key=key, connector="bank", **kw)


def types(outbox: Any, key: str) -> list[str]:
    return [e.subject for e in outbox.history(key)]


# -- submit -------------------------------------------------------------------------------------


def test_submit_records_pending_and_dispatch_confirms(outbox: Any, bank: FakeConnector) -> None:
    rec = outbox.submit(pay())
    assert (rec.status, rec.attempts, rec.payload) == (EffectStatus.PENDING, 0, {"cents": 500, "to": "acct-1"})
    assert bank.dispatched == []
    [out] = outbox.dispatch_once()
    assert (out.key, out.outcome, out.status) == ("order-42", DispatchOutcome.CONFIRMED, EffectStatus.CONFIRMED)
    rec = outbox.get("order-42")
    assert (rec.status, rec.attempts, rec.external_ref, rec.response) == (
        EffectStatus.CONFIRMED, 1, "fake-order-42", {"received": "order-42"})
    assert bank.deliveries("order-42") == 1
    assert bank.dispatched[0].metadata["errands.attempt"] == 1
    assert types(outbox, "order-42") == [
        "effect.pending.bank.transfer", "effect.dispatching.bank.transfer", "effect.confirmed.bank.transfer"]


def test_submit_is_idempotent_on_the_key(outbox: Any) -> None:
    first = outbox.submit(pay(payload={"a": 1, "b": 2}))
    again = outbox.submit(pay(payload={"b": 2, "a": 1}))  # same JSON value, other key order
    assert again.key == first.key and again.status is EffectStatus.PENDING
    outbox.dispatch_once()
    assert outbox.submit(pay(payload={"a": 1, "b": 2})).status is EffectStatus.CONFIRMED
    assert len(outbox.list()) == 1
    assert len(outbox.history("order-42")) == 3  # no second "pending" event


def test_same_key_other_payload_conflicts_and_changes_nothing(outbox: Any) -> None:
    outbox.submit(pay(payload={"cents": 1}))
    with pytest.raises(EffectConflictError, match="different payload") as err:
        outbox.submit(pay(payload={"cents": 2}))
    assert err.value.key == "order-42"
    with pytest.raises(EffectConflictError, match="connector/tool"):
        outbox.submit(pay(payload={"cents": 1}, tool="refund"))
    assert outbox.get("order-42").payload == {"cents": 1}


def test_submit_many_is_one_transaction(outbox: Any, store: Any) -> None:
    recs = outbox.submit_many([pay(f"k{i}") for i in range(3)])
    assert [r.key for r in recs] == ["k0", "k1", "k2"]
    before = store.last_position()
    with pytest.raises(EffectConflictError):
        outbox.submit_many([pay("k3"), pay("k0", payload={"other": True})])
    with pytest.raises(PayloadError):
        outbox.submit_many([pay("k4"), pay("k5", payload={"bad": object()})])
    assert [r.key for r in outbox.list()] == ["k0", "k1", "k2"]
    assert store.last_position() == before
    again = outbox.submit_many([pay("k1"), pay("k9"), pay("k9")])
    assert [r.key for r in again] == ["k1", "k9", "k9"]
    assert len(outbox.list()) == 4
    assert outbox.submit_many([]) == []


@pytest.mark.parametrize(
    ("effect", "error", "field"),
    [
        (pay(payload={"x": {1, 2}}), PayloadError, "effect.payload"),
        (pay(payload={"x": float("nan")}), PayloadError, "effect.payload"),
        (pay(payload="x" * 2000), PayloadError, "effect.payload"),
        (Effect(key="k", connector="nope", payload={}), ConfigError, "effect.connector"),
        (pay(""), ConfigError, "effect.key"),
        (pay(42), ConfigError, "effect.key"),  # type: ignore[arg-type]
        (pay("x" * 600), ConfigError, "effect.key"),
        (Effect(key="k", connector="", payload={}), ConfigError, "effect.connector"),
        (pay(tool=None), ConfigError, "effect.tool"),
        (pay(business_key=7), ConfigError, "effect.business_key"),
        (pay(run_id=""), ConfigError, "effect.run_id"),
        (pay(semantics="SOMETIMES"), ConfigError, "effect.semantics"),
        (pay(human_gate="yes"), ConfigError, "effect.human_gate"),
        (pay(max_attempts=0), ConfigError, "effect.max_attempts"),
        (pay(max_attempts=True), ConfigError, "effect.max_attempts"),
        (pay(metadata=["a"]), ConfigError, "effect.metadata"),
        (pay(metadata={"x": object()}), PayloadError, "effect.metadata"),
        (pay(dispatch_at=datetime(2030, 1, 1)), ConfigError, "effect.dispatch_at"),  # naive datetime
        (pay(dispatch_at="tomorrow"), ConfigError, "effect.dispatch_at"),
        ({"key": "k"}, ConfigError, "effect"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_stored(store: Any, bank: FakeConnector, effect: Any,
                                                    error: type[Exception], field: str) -> None:
    outbox = Outbox(store, connectors={"bank": bank}, payload_limit=1024)
    with pytest.raises(error) as err:
        outbox.submit(effect)
    assert err.value.field == field  # type: ignore[attr-defined]
    assert field.split(".")[-1] in str(err.value)
    assert outbox.list() == [] and store.last_position() == 0


def test_payload_limit_defaults_to_one_mebibyte(outbox: Any) -> None:
    outbox.submit(pay("fits", payload="x" * (1024 * 1024 - 2)))  # JSON adds the two quotes
    with pytest.raises(PayloadError, match="over the limit of 1048576 bytes"):
        outbox.submit(pay("too-big", payload="x" * (1024 * 1024)))
    assert [r.key for r in outbox.list()] == ["fits"]


def test_bad_outbox_options(store: Any) -> None:
    with pytest.raises(ConfigError, match="lease_for must be a positive number"):
        Outbox(store, connectors={}, lease_for=0)
    with pytest.raises(ConfigError, match="max_attempts must be an integer"):
        Outbox(store, connectors={}, max_attempts=0)
    with pytest.raises(ConfigError, match="dispatch"):
        Outbox(store, connectors={"x": object()})


def test_connectors_default_to_the_registry(store: Any) -> None:
    from errands.core import Registry, reset_registry

    reg = Registry(autoload=False)
    reset_registry(reg)
    try:
        outbox = Outbox(store)
        with pytest.raises(ConfigError, match="not a known connector"):
            outbox.submit(pay())
        bank = reg.add_connector("bank", FakeConnector("bank"))  # registered after the outbox was built
        outbox.submit(pay())
        outbox.dispatch_once()
        assert bank.deliveries("order-42") == 1
    finally:
        reset_registry(None)


# -- transactional outbox -----------------------------------------------------------------------


def test_submit_joins_the_callers_sqlite_transaction(tmp_path: Path, bank: FakeConnector) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'app.db'}")
    outbox = Outbox(store, connectors={"bank": bank})
    conn = sqlite3.connect(str(tmp_path / "app.db"))
    conn.execute("CREATE TABLE orders (id TEXT PRIMARY KEY)")
    conn.commit()
    conn.execute("INSERT INTO orders VALUES ('o1')")
    outbox.submit(pay("o1-pay"), conn=conn)
    conn.rollback()
    assert outbox.list() == [] and store.last_position() == 0
    conn.execute("INSERT INTO orders VALUES ('o2')")
    outbox.submit_many([pay("o2-pay"), pay("o2-mail")], conn=conn)
    conn.commit()
    assert [r.key for r in outbox.list()] == ["o2-mail", "o2-pay"] or len(outbox.list()) == 2
    assert conn.execute("SELECT COUNT(*) FROM orders").fetchone() == (1,)
    outbox.dispatch_once()
    assert bank.deliveries("o2-pay") == 1
    conn.close()
    store.close()


def test_conn_of_the_wrong_kind(outbox: Any) -> None:
    with pytest.raises(ConfigError, match=r"sqlite3\.Connection") as err:
        outbox.submit(pay(), conn=object())
    assert err.value.field == "conn"


# -- semantics ----------------------------------------------------------------------------------


def test_non_idempotent_needs_a_safety_net(store: Any) -> None:
    blind = FakeConnector("blind", can_observe=False, can_compensate=False)
    outbox = Outbox(store, connectors={"blind": blind, "bank": FakeConnector("bank")})
    effect = Effect(key="n1", connector="blind", payload={}, tool="wire", semantics=Semantics.NON_IDEMPOTENT)
    with pytest.raises(ConfigError, match="no safety net") as err:
        outbox.submit(effect)
    assert err.value.field == "effect.semantics"
    outbox.submit(Effect(key="n2", connector="blind", payload={}, semantics=Semantics.NON_IDEMPOTENT,
                         business_key="invoice-1"))
    outbox.submit(Effect(key="n3", connector="blind", payload={}, semantics=Semantics.NON_IDEMPOTENT,
                         human_gate=True))
    outbox.submit(Effect(key="n4", connector="bank", payload={}, semantics=Semantics.NON_IDEMPOTENT))

    @outbox.compensator("wire")
    def undo_wire(ob: Any) -> None:
        return None

    outbox.submit(effect)
    assert len(outbox.list()) == 4


def test_non_idempotent_is_never_redispatched_blind(store: Any, clock: FakeClock) -> None:
    blind = FakeConnector("blind", can_observe=False, can_compensate=False,
                          outcomes=[("deliver", DispatchOutcome.UNKNOWN)])
    outbox = Outbox(store, connectors={"blind": blind})
    outbox.submit(Effect(key="n", connector="blind", payload={}, semantics=Semantics.NON_IDEMPOTENT,
                         business_key="invoice-9"))
    [out] = outbox.dispatch_once()
    assert out.status is EffectStatus.UNKNOWN and out.flagged
    for _ in range(5):
        clock.advance(3600)
        assert outbox.dispatch_once() == [] and outbox.reconcile_once() == []
    assert blind.deliveries("n") == 1
    rec = outbox.get("n")
    assert rec.flagged and rec.status is EffectStatus.UNKNOWN and "cannot observe" in (rec.error or "")
    assert outbox.stats()["flagged"] == 1
    # A human decides it was not delivered: redrive sends it again, on purpose.
    assert outbox.redrive("n").status is EffectStatus.PENDING
    assert outbox.dispatch_once()[0].status is EffectStatus.CONFIRMED


def test_idempotent_unknown_without_observe_is_redispatched_after_backoff(store: Any, clock: FakeClock) -> None:
    blind = FakeConnector("blind", can_observe=False, outcomes=[DispatchOutcome.UNKNOWN])
    outbox = Outbox(store, connectors={"blind": blind}, backoff_base=10, seed=3)
    outbox.submit(Effect(key="i", connector="blind", payload={}))
    [out] = outbox.dispatch_once()
    assert out.status is EffectStatus.PENDING
    assert outbox.dispatch_once() == []  # backing off
    clock.advance(10)
    assert outbox.dispatch_once()[0].status is EffectStatus.CONFIRMED
    assert outbox.get("i").attempts == 2


def test_observe_only_effects_are_observed_never_dispatched(outbox: Any, bank: FakeConnector, store: Any) -> None:
    blind = FakeConnector("blind", can_observe=False)
    with pytest.raises(ConfigError, match="cannot observe"):
        Outbox(store, connectors={"blind": blind}).submit(
            Effect(key="o", connector="blind", payload={}, semantics=Semantics.OBSERVE_ONLY))
    rec = outbox.submit(pay("watch", semantics=Semantics.OBSERVE_ONLY))
    assert rec.status is EffectStatus.UNKNOWN
    assert outbox.dispatch_once() == []
    bank.dispatch(pay("watch"))  # it happens elsewhere
    [out] = outbox.reconcile_once()
    assert out.status is EffectStatus.CONFIRMED
    assert len(bank.dispatched) == 1


# -- retries ------------------------------------------------------------------------------------


def test_backoff_is_exponential_with_jitter_and_honours_retry_after(store: Any, clock: FakeClock) -> None:
    flaky = FakeConnector("flaky", outcomes=[TransientError("503")] * 3 + [TransientError("429", retry_after=120)])
    outbox = Outbox(store, connectors={"flaky": flaky}, backoff_base=1.0, max_attempts=10, seed=5)
    outbox.submit(Effect(key="r", connector="flaky", payload={}))
    delays = []
    for _ in range(4):
        start = clock.now()
        [out] = outbox.dispatch_once()
        assert out.status is EffectStatus.PENDING and "TransientError" in (out.error or "")
        rec = outbox.get("r")
        assert rec.next_attempt_at is not None
        delays.append(rec.next_attempt_at.timestamp() - start)
        clock.advance(delays[-1])
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 2.0 <= delays[2] <= 4.0
    assert delays[3] == pytest.approx(120)
    assert outbox.dispatch_once()[0].status is EffectStatus.CONFIRMED
    assert outbox.get("r").attempts == 5


@pytest.mark.parametrize("retry_after", [float("inf"), 1e12, float("nan"), -5.0])
def test_a_connectors_absurd_retry_after_never_parks_an_effect(store: Any, clock: FakeClock,
                                                               retry_after: float) -> None:
    flaky = FakeConnector("flaky", outcomes=[TransientError("429", retry_after=retry_after)])
    outbox = Outbox(store, connectors={"flaky": flaky}, backoff_base=1.0, seed=5)
    outbox.submit(Effect(key="r", connector="flaky", payload={}))
    start = clock.now()
    [out] = outbox.dispatch_once()
    assert out.status is EffectStatus.PENDING
    rec = outbox.get("r")
    assert rec.next_attempt_at is not None
    assert 0 <= rec.next_attempt_at.timestamp() - start <= MAX_RETRY_AFTER
    clock.advance(MAX_RETRY_AFTER)
    assert outbox.dispatch_once()[0].status is EffectStatus.CONFIRMED


def test_max_attempts_then_failed_then_redrive(store: Any, clock: FakeClock) -> None:
    flaky = FakeConnector("flaky", outcomes=[TransientError("down")] * 3)
    outbox = Outbox(store, connectors={"flaky": flaky}, backoff_base=1, seed=1)
    outbox.submit(Effect(key="f", connector="flaky", payload={}, max_attempts=3))
    statuses = []
    for _ in range(3):
        statuses.append(outbox.dispatch_once()[0].status)
        clock.advance(10)
    assert statuses == [EffectStatus.PENDING, EffectStatus.PENDING, EffectStatus.FAILED]
    assert [r.key for r in outbox.list(status="FAILED")] == ["f"]  # the dead-letter view
    assert "gave up after 3 attempts" in (outbox.get("f").error or "")
    assert outbox.dispatch_once() == []
    rec = outbox.redrive("f")
    assert (rec.status, rec.attempts) == (EffectStatus.PENDING, 0)
    assert outbox.dispatch_once()[0].status is EffectStatus.CONFIRMED
    assert "effect.failed.flaky" in types(outbox, "f")


def test_permanent_failures_fail_at_once(store: Any) -> None:
    conn = FakeConnector("x", outcomes=[PermanentError("account closed"),
                                        DispatchResult(outcome=DispatchOutcome.FAILED, error="422 invalid")])
    outbox = Outbox(store, connectors={"x": conn})
    outbox.submit_many([Effect(key="p1", connector="x", payload={}), Effect(key="p2", connector="x", payload={})])
    outs = outbox.dispatch_once()
    assert [o.status for o in outs] == [EffectStatus.FAILED, EffectStatus.FAILED]
    assert "account closed" in (outbox.get("p1").error or "") and outbox.get("p2").error == "422 invalid"


def test_redrive_refuses_effects_in_flight(outbox: Any) -> None:
    outbox.submit(pay())
    with pytest.raises(ConfigError, match="only FAILED or CANCELLED or UNKNOWN"):
        outbox.redrive("order-42")
    with pytest.raises(NotFoundError):
        outbox.redrive("missing")


def test_dispatch_at_delays_the_first_dispatch(outbox: Any, clock: FakeClock) -> None:
    outbox.submit(pay(dispatch_at=datetime.fromtimestamp(clock.now(), tz=timezone.utc) + timedelta(minutes=5)))
    outbox.submit(pay("later", dispatch_at=clock.now() + 600))
    assert outbox.dispatch_once() == []
    clock.advance(300)
    assert [o.key for o in outbox.dispatch_once()] == ["order-42"]


# -- human gate ---------------------------------------------------------------------------------


def test_human_gate_approve_and_reject(outbox: Any, bank: FakeConnector) -> None:
    outbox.submit_many([pay("big", human_gate=True), pay("bigger", human_gate=True)])
    assert outbox.get("big").status is EffectStatus.AWAITING_APPROVAL
    assert outbox.dispatch_once() == []
    assert outbox.approve("big", by="ada").status is EffectStatus.PENDING
    rejected = outbox.reject("bigger", reason="over budget", by="grace")
    assert rejected.status is EffectStatus.CANCELLED and "over budget" in (rejected.error or "")
    assert [o.key for o in outbox.dispatch_once()] == ["big"]
    assert bank.deliveries("bigger") == 0
    assert outbox.history("big")[1].data["approved_by"] == "ada"
    assert types(outbox, "bigger")[-1] == "effect.cancelled.bank.transfer"
    with pytest.raises(ConfigError, match="cannot approve"):
        outbox.approve("bigger")
    with pytest.raises(NotFoundError):
        outbox.approve("nope")


def test_cancel_before_dispatch(outbox: Any, bank: FakeConnector) -> None:
    outbox.submit(pay())
    assert outbox.cancel("order-42", reason="customer cancelled").status is EffectStatus.CANCELLED
    assert outbox.dispatch_once() == [] and bank.dispatched == []


# -- inline -------------------------------------------------------------------------------------


def test_run_inline_runs_once_and_replays_the_record(outbox: Any) -> None:
    calls: list[str] = []

    def send(effect: Effect) -> dict[str, Any]:
        calls.append(effect.key)
        return {"sent": effect.payload}

    rec = outbox.run_inline(pay("mail-1"), send)
    assert (rec.status, rec.response, rec.attempts) == (EffectStatus.CONFIRMED, {"sent": pay().payload}, 1)
    again = outbox.run_inline(pay("mail-1"), send)
    assert again.status is EffectStatus.CONFIRMED and calls == ["mail-1"]
    assert outbox.dispatch_once() == []
    assert types(outbox, "mail-1") == ["effect.dispatching.bank.transfer", "effect.confirmed.bank.transfer"]


def test_run_inline_records_failures_and_dispatch_results(outbox: Any) -> None:
    def boom(effect: Effect) -> None:
        raise RuntimeError("smtp down")

    with pytest.raises(RuntimeError, match="smtp down"):
        outbox.run_inline(pay("mail-2"), boom)
    rec = outbox.get("mail-2")
    assert rec.status is EffectStatus.FAILED and "smtp down" in (rec.error or "")
    assert outbox.run_inline(pay("mail-2"), boom).status is EffectStatus.FAILED  # replay: not run again
    rec = outbox.run_inline(pay("mail-3"), lambda e: DispatchResult(outcome=DispatchOutcome.CONFIRMED,
                                                                    external_ref="msg-3"))
    assert rec.external_ref == "msg-3"


def test_run_inline_refuses_non_idempotent(outbox: Any) -> None:
    with pytest.raises(ConfigError, match="cannot run inline") as err:
        outbox.run_inline(pay(semantics=Semantics.NON_IDEMPOTENT, business_key="b"), lambda e: None)
    assert err.value.field == "effect.semantics"
    assert outbox.list() == []


def test_run_inline_after_a_crash_runs_again_once_the_lease_lapsed(outbox: Any, clock: FakeClock) -> None:
    class Crash(BaseException):
        pass

    def dies(effect: Effect) -> None:
        raise Crash

    with pytest.raises(Crash):
        outbox.run_inline(pay("inline-crash"), dies)
    assert outbox.get("inline-crash").status is EffectStatus.DISPATCHING
    assert outbox.run_inline(pay("inline-crash"), lambda e: "x").status is EffectStatus.DISPATCHING  # still leased
    clock.advance(31)
    rec = outbox.run_inline(pay("inline-crash"), lambda e: "done")
    assert (rec.status, rec.response, rec.attempts) == (EffectStatus.CONFIRMED, "done", 2)


# -- leases -------------------------------------------------------------------------------------


def test_a_stale_lease_records_nothing(store: Any, clock: FakeClock) -> None:
    results: list[Any] = []
    stalled: list[bool] = []

    class Slow:
        name = "slow"

        def dispatch(self, effect: Effect) -> DispatchResult:
            if not stalled:
                # This worker stalls past its lease; another takes the effect over and finishes it.
                stalled.append(True)
                clock.advance(31)
                results.append(other.dispatch_once())
            return DispatchResult(outcome=DispatchOutcome.CONFIRMED, response="first worker")

    conns = {"slow": Slow()}
    first = Outbox(store, connectors=conns, owner="w1")
    other = Outbox(store, connectors=conns, owner="w2")
    first.submit(Effect(key="s", connector="slow", payload={}))
    [late] = first.dispatch_once()
    assert late.lease_lost and late.status is EffectStatus.DISPATCHING
    assert results[0][0].status is EffectStatus.CONFIRMED and not results[0][0].lease_lost
    rec = first.get("s")
    assert (rec.status, rec.attempts) == (EffectStatus.CONFIRMED, 2)
    assert sum(1 for e in first.history("s") if e.type == "effect.confirmed") == 1


def test_a_batch_with_some_leases_lost_records_only_the_held_ones(store: Any, clock: FakeClock) -> None:
    results: list[Any] = []
    stalled: list[bool] = []

    class Slow:
        name = "slow"

        def dispatch(self, effect: Effect) -> DispatchResult:
            if not stalled:
                # Both leases lapse; another worker takes over one effect and finishes it first.
                stalled.append(True)
                clock.advance(31)
                results.append(other.dispatch_once(limit=1))
            return DispatchResult(outcome=DispatchOutcome.CONFIRMED, response="first worker")

    conns = {"slow": Slow()}
    first = Outbox(store, connectors=conns, owner="w1", max_in_flight=1)
    other = Outbox(store, connectors=conns, owner="w2")
    first.submit_many([Effect(key=k, connector="slow", payload={}) for k in ("s1", "s2")])
    outcomes = {o.key: o for o in first.dispatch_once()}
    [taken] = results[0]
    kept = "s2" if taken.key == "s1" else "s1"
    assert outcomes[taken.key].lease_lost
    # The call of the other effect had not started when its lease lapsed: the first worker leaves it alone
    # (another worker may hold it by now), and the next claim dispatches it.
    assert outcomes[kept].lease_lost and outcomes[kept].outcome is None
    assert [o.key for o in first.dispatch_once()] == [kept]
    assert (first.get(taken.key).attempts, first.get(kept).attempts) == (2, 2)
    for key in ("s1", "s2"):
        assert first.get(key).status is EffectStatus.CONFIRMED
        assert sum(1 for e in first.history(key) if e.type == "effect.confirmed") == 1


def test_history_survives_a_rolled_back_append(tmp_path: Path, bank: FakeConnector) -> None:
    # A caller's transaction that appended and rolled back frees its journal positions for the next append.
    store = open_store(f"sqlite:///{tmp_path / 'app.db'}")
    outbox = Outbox(store, connectors={"bank": bank})
    outbox.submit(pay("a"))
    conn = sqlite3.connect(str(tmp_path / "app.db"))
    outbox.submit_many([pay("b1"), pay("b2")], conn=conn)
    conn.rollback()
    outbox.submit(pay("c"))
    outbox.submit(pay("d"))
    assert [e.type for e in outbox.history("c")] == ["effect.pending"]
    assert [e.type for e in outbox.history("d")] == ["effect.pending"]
    conn.close()
    outbox.close()
    store.close()


def test_lapsed_dispatch_of_an_idempotent_effect_is_dispatched_again(outbox: Any, bank: FakeConnector,
                                                                      clock: FakeClock) -> None:
    class Crash(BaseException):
        pass

    bank._script = [Crash()]
    outbox.submit(pay())
    with pytest.raises(Crash):
        outbox.dispatch_once()
    assert outbox.get("order-42").status is EffectStatus.DISPATCHING
    assert outbox.dispatch_once() == []  # still leased
    clock.advance(30)
    assert outbox.dispatch_once()[0].status is EffectStatus.CONFIRMED
    assert bank.deliveries("order-42") == 1


# -- views --------------------------------------------------------------------------------------


def test_list_get_and_stats(outbox: Any, store: Any) -> None:
    other = FakeConnector("mail")
    outbox2 = Outbox(store, connectors={"bank": FakeConnector("bank"), "mail": other})
    outbox2.submit_many([pay("a", run_id="r1"), pay("b", human_gate=True),
                         Effect(key="c", connector="mail", payload={})])
    outbox2.dispatch_once()
    assert [r.key for r in outbox.list()] == ["a", "b", "c"]
    assert [r.key for r in outbox.list(status=EffectStatus.CONFIRMED)] == ["a", "c"]
    assert [r.key for r in outbox.list(status="awaiting_approval")] == ["b"]
    assert [r.key for r in outbox.list(connector="mail")] == ["c"]
    assert [r.key for r in outbox.list(run_id="r1")] == ["a"]
    assert [r.key for r in outbox.list(limit=1)] == ["a"]
    stats = outbox.stats()
    assert stats["effects"]["CONFIRMED"] == 2 and stats["effects"]["AWAITING_APPROVAL"] == 1
    assert stats["flagged"] == 0 and stats["obligations"]["STUCK"] == 0
    with pytest.raises(ConfigError, match="status must be one of"):
        outbox.list(status="DONE")
    with pytest.raises(NotFoundError, match="no effect with key 'zz'"):
        outbox.get("zz")
    rec = outbox.get("a")
    assert rec.effect.key == "a" and rec.to_dict()["status"] == "CONFIRMED"


def test_history_matches_the_exact_key(store: Any, clock: FakeClock) -> None:
    bank = FakeConnector("bank")
    outbox = Outbox(store, connectors={"bank": bank})
    keys = ["A_%!x", "a_%!x", "a__%!x", 'q"uote\\', "plain"]
    outbox.submit_many([pay(k) for k in keys])
    outbox.dispatch_once()
    outbox.register_compensation("A_%!x", "refund", {"n": 1}, due=True)
    outbox.compensate_once()
    for key in keys:
        events = outbox.history(key)
        assert {e.data["key"] for e in events} == {key}
    assert [e.type for e in outbox.history("A_%!x")] == [
        "effect.pending", "effect.dispatching", "effect.confirmed", "obligation.pending",
        "obligation.compensating", "obligation.compensated"]
    assert len(outbox.history("plain")) == 3
    with pytest.raises(NotFoundError):
        outbox.history("nope")
