"""``ctx.effect``: effects from workflows through the core outbox, on SQLite and PostgreSQL.

The effect is submitted in the transaction of the checkpoint that starts its operation, the execution
suspends, and the outbox's journal event of the effect's end wakes it (the ``durable.effects`` route).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable, Iterator

import pytest
from errands.core import (
    App,
    ConfigError,
    DispatchOutcome,
    Effect,
    EffectStatus,
    Outbox,
    Semantics,
    TransientError,
    Worker,
    open_store,
)
from errands.core.outbox import EffectRecord, ObligationStatus
from errands.core.store import SQLStore
from errands.core.testing import ChaosConnector, FakeConnector
from errands.durable import (
    AsyncDurableContext,
    DurableContext,
    DurableRunner,
    EffectFailedError,
    ExecutionStatus,
    OperationSubType,
    OperationType,
)

#: Backoffs short enough that the real clock runs the retries at once.
FAST = {"backoff_base": 0.001, "backoff_cap": 0.005}


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'durable.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def store(url: str) -> Iterator[SQLStore]:
    s = open_store(url)
    try:
        yield s
    finally:
        s.close()


def pay(event: Any, ctx: DurableContext) -> Any:
    first = ctx.effect("charge", Effect(key="-", connector="bank", payload={"cents": event["cents"]}))
    second = ctx.effect("receipt", Effect(key="-", connector="bank", payload={"to": event["to"]}, tool="mail"))
    return {"charge": first.status.value, "receipt": second.external_ref, "attempts": first.attempts}


def pay_once(event: Any, ctx: DurableContext) -> Any:
    """``pay`` with effects that must never be resent blind: an unknown outcome is observed first."""
    once = Semantics.NON_IDEMPOTENT
    first = ctx.effect("charge", Effect(key="-", connector="bank", payload=event, semantics=once))
    second = ctx.effect("receipt", Effect(key="-", connector="bank", payload=event, tool="mail", semantics=once))
    return [first.status.value, second.status.value]


def until_done(runner: DurableRunner, outbox: Outbox, ids: list[str], rounds: int = 500) -> None:
    for _ in range(rounds):
        runner.work_once()
        outbox.drain()
        if all(runner.get(i).status.terminal for i in ids):
            return
    raise AssertionError([runner.get(i) for i in ids if not runner.get(i).status.terminal])


def test_effect_round_trip_returns_the_confirmed_record(store: SQLStore) -> None:
    bank = FakeConnector("bank")
    outbox = Outbox(store, connectors={"bank": bank})
    runner = DurableRunner(store, outbox=outbox, functions={"pay": pay})
    eid = runner.start("pay", {"cents": 500, "to": "ada"})
    runner.work_once()
    # suspended, the first effect submitted with the checkpoint that started its operation
    assert runner.get(eid).status is ExecutionStatus.PENDING
    [op] = runner.history(eid)
    assert (op.type, op.sub_type, op.name) == (OperationType.CALLBACK, OperationSubType.EFFECT, "charge")
    key = f"durable/{eid}/{op.id}"
    assert op.callback_id == key
    record = outbox.get(key)
    assert record.status is EffectStatus.PENDING and record.payload == {"cents": 500} and record.run_id == eid
    assert runner.work_once() == 0  # nothing wakes it before the effect ends
    until_done(runner, outbox, [eid])
    info = runner.get(eid)
    assert info.status is ExecutionStatus.SUCCEEDED, info.error
    assert info.result["charge"] == "CONFIRMED" and info.result["attempts"] == 1
    assert info.result["receipt"].startswith(f"fake-durable/{eid}/")
    assert [e.key for e in bank.dispatched] == [o.callback_id for o in runner.history(eid)]
    runner.close()


def test_chaos_connector_confirms_each_effect_exactly_once_across_restarts(url: str) -> None:
    """40 workflows of two non-idempotent effects each, through lost acks, failed requests and delays (with
    attempts enough that none runs out), on two workers at a time that are stopped and replaced (new
    runners, outboxes, connections) again and again."""
    bank = FakeConnector("bank")
    chaos = ChaosConnector(bank, seed=5, fail=0.25, lose_ack=0.3, delay=0.2, max_delay=0.003)
    with DurableRunner(url, functions={"pay": pay}) as starter:
        ids = [starter.start("pay", {"cents": i, "to": f"p{i}"}, execution_id=f"pay-{i:02d}") for i in range(40)]

    deadline = time.monotonic() + 120
    restarts = 0
    while time.monotonic() < deadline:
        stores = [open_store(url) for _ in range(2)]
        runners = [DurableRunner(s, outbox=Outbox(s, connectors={"bank": chaos}, max_attempts=50, **FAST),
                                 functions={"pay": pay_once}, lease_for=2.0) for s in stores]
        stop = threading.Event()
        workers = [r.worker(poll_interval=0.005) for r in runners]
        threads = [threading.Thread(target=w.run, args=(stop,)) for w in workers]
        for t in threads:
            t.start()
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        for r, s in zip(runners, stores):
            r.close()
            s.close()
        restarts += 1
        with DurableRunner(url) as look:
            if all(look.get(i).status.terminal for i in ids):
                break
    with DurableRunner(url) as look:
        infos = [look.get(i) for i in ids]
        keys = [op.callback_id for i in ids for op in look.history(i)]
    assert [i.status for i in infos] == [ExecutionStatus.SUCCEEDED] * 40, [i.error for i in infos if i.error]
    assert len(keys) == len(set(keys)) == 80
    # every effect reached the counterparty exactly once, lost acks resolved by observing
    assert {k: bank.deliveries(k) for k in keys} == {k: 1 for k in keys}
    assert chaos.faults["fail"] > 0 and chaos.faults["lose_ack"] > 0, chaos.faults
    assert restarts >= 1
    s = open_store(url)
    outbox = Outbox(s, connectors=["bank"])
    assert {outbox.get(k).status for k in keys} == {EffectStatus.CONFIRMED}
    assert len(outbox.list(connector="bank", limit=1000)) == 80
    s.close()


def test_non_idempotent_counterparty_is_observed_then_compensated(store: SQLStore) -> None:
    """A lost ack is observed (not blindly resent), a double delivery is confirmed and compensated, and an
    effect refused for good raises ``EffectFailedError``, which the workflow answers with a compensating
    effect of its own (a saga)."""
    bank = FakeConnector("bank", outcomes=[("deliver", DispatchOutcome.UNKNOWN)])
    twice = ChaosConnector(FakeConnector("ledger"), duplicate=1.0, lose_ack=1.0)
    refusing = FakeConnector("shop", outcomes=[DispatchOutcome.FAILED])
    outbox = Outbox(store, connectors={"bank": bank, "ledger": twice, "shop": refusing}, **FAST)

    def order(event: Any, ctx: DurableContext) -> Any:
        nonidem = Semantics.NON_IDEMPOTENT
        paid = ctx.effect("pay", Effect(key="-", connector="bank", payload={"cents": 100}, semantics=nonidem))
        booked = ctx.effect("book", Effect(key="-", connector="ledger", payload={"cents": 100}, semantics=nonidem))
        try:
            ctx.effect("ship", Effect(key="-", connector="shop", payload={"sku": "x"}))
        except EffectFailedError as exc:
            refund = ctx.effect("refund", Effect(key="-", connector="bank", payload={"refund": 100},
                                                 semantics=nonidem))
            return {"paid": paid.status.value, "booked": booked.status.value, "shipped": exc.record.status.value,
                    "error": exc.record.error, "refund": refund.status.value}
        return "shipped"

    runner = DurableRunner(store, outbox=outbox, functions={"order": order})
    eid = runner.start("order")
    until_done(runner, outbox, [eid])
    info = runner.get(eid)
    assert info.status is ExecutionStatus.SUCCEEDED, info.error
    assert info.result["paid"] == info.result["booked"] == info.result["refund"] == "CONFIRMED"
    assert info.result["shipped"] == "FAILED"
    keys = {op.name: op.callback_id for op in runner.history(eid)}
    assert bank.deliveries(keys["pay"]) == 1 and bank.observed.count(keys["pay"]) == 1  # observed, never resent
    assert twice.inner.deliveries(keys["book"]) == 2
    [owed] = outbox.obligations(run_id=eid)
    assert (owed.effect_key, owed.kind, owed.status) == (keys["book"], "duplicate", ObligationStatus.COMPENSATED)
    assert [o.effect_key for o in twice.inner.compensated] == [keys["book"]]
    assert refusing.deliveries(keys["ship"]) == 0 and bank.deliveries(keys["refund"]) == 1
    runner.close()


@pytest.mark.parametrize("always_replay", [True, False])
def test_always_replay_calls_the_connector_once(store: SQLStore, always_replay: bool) -> None:
    bank = FakeConnector("bank")
    outbox = Outbox(store, connectors={"bank": bank})
    calls: list[str] = []

    def flow(event: Any, ctx: DurableContext) -> Any:
        a = ctx.step("before", lambda _: calls.append("before") or 1)
        rec = ctx.effect("pay", Effect(key="-", connector="bank", payload={"a": a}))
        b = ctx.step("after", lambda _: calls.append("after") or 2)
        again = ctx.effect("pay-again", Effect(key="-", connector="bank", payload={"b": b}))
        return [rec.status.value, again.status.value, rec.key != again.key]

    runner = DurableRunner(store, outbox=outbox, functions={"flow": flow}, always_replay=always_replay)
    eid = runner.start("flow")
    until_done(runner, outbox, [eid])
    info = runner.get(eid)
    assert info.result == ["CONFIRMED", "CONFIRMED", True], info.error
    assert len(bank.dispatched) == 2 and calls == ["before", "after"]
    assert info.invocations >= (5 if always_replay else 3)
    runner.close()


def test_async_functions_gather_effects(store: SQLStore) -> None:
    bank = FakeConnector("bank")
    outbox = Outbox(store, connectors={"bank": bank})

    async def fanout(event: Any, ctx: AsyncDurableContext) -> Any:
        records = await asyncio.gather(*(ctx.effect(f"e{i}", Effect(key="-", connector="bank", payload=i))
                                         for i in range(3)))
        return sorted(r.payload for r in records)

    runner = DurableRunner(store, outbox=outbox, functions={"fanout": fanout})
    eid = runner.start("fanout")
    until_done(runner, outbox, [eid])
    assert runner.get(eid).result == [0, 1, 2]
    assert len(bank.dispatched) == 3
    runner.close()


def test_without_an_outbox_ctx_effect_is_a_config_error(store: SQLStore) -> None:
    caught: list[ConfigError] = []

    def flow(event: Any, ctx: DurableContext) -> Any:
        try:
            ctx.effect("pay", Effect(key="-", connector="bank", payload={}))
        except ConfigError as exc:
            caught.append(exc)
            raise

    runner = DurableRunner(store, functions={"flow": flow})
    info = runner.run("flow")
    assert info.status is ExecutionStatus.FAILED and caught and caught[0].field == "outbox"
    assert "DurableRunner(store, outbox=" in str(caught[0])
    assert runner.history(info.execution_id) == []
    with pytest.raises(ConfigError, match="runner's own store"):
        runner.use_outbox(Outbox(open_store("memory://"), connectors=["bank"]))
    runner.close()


@pytest.mark.parametrize("effect, field", [
    (Effect(key="-", connector="nope", payload={}), "connector"),
    (Effect(key="-", connector="bank", payload={"x": object()}), "payload"),
    (Effect(key="-", connector="bank", payload={}, semantics=Semantics.NON_IDEMPOTENT), "semantics"),
])
def test_a_bad_effect_fails_the_call_and_stores_nothing(store: SQLStore, effect: Effect, field: str) -> None:
    outbox = Outbox(store, connectors={"bank": FakeConnector("bank", can_observe=False, can_compensate=False)})
    errors: list[Exception] = []

    def flow(event: Any, ctx: DurableContext) -> Any:
        try:
            ctx.effect("pay", effect)
        except ConfigError as exc:  # PayloadError is a ConfigError too
            errors.append(exc)
        return "handled"

    runner = DurableRunner(store, outbox=outbox, functions={"flow": flow})
    assert runner.run("flow").result == "handled"
    assert len(errors) == 1 and field in str(errors[0].field), errors
    assert outbox.list(limit=10) == [] and runner.list()[0].status is ExecutionStatus.SUCCEEDED
    runner.close()


def test_app_wires_its_outbox_into_an_attached_runner(store: SQLStore) -> None:
    bank = FakeConnector("bank")
    app = App(store, connectors={"bank": bank}, poll_interval=0.01)
    runner = app.attach(DurableRunner(app.store, functions={"pay": pay}))
    assert runner.outbox is app.outbox  # the API side submits through the app's submit-only outbox
    eid = runner.start("pay", {"cents": 1, "to": "x"})
    runner.run("pay", {"cents": 2, "to": "y"}, execution_id="inline")  # runs the first invocation here
    own = runner.worker()
    assert own.outbox is None  # a submit-only outbox dispatches nothing: the app's worker does
    own.close()
    worker = app.worker()
    for _ in range(200):
        worker.drain()
        if runner.get(eid).status.terminal and runner.get("inline").status.terminal:
            break
    assert runner.get(eid).status is runner.get("inline").status is ExecutionStatus.SUCCEEDED
    assert len(bank.dispatched) == 4
    worker.close()
    runner.close()
    app.close()


def test_an_ended_effect_wakes_its_execution_once_even_when_delivered_twice(store: SQLStore) -> None:
    """Two runners follow the journal at once: each end is delivered at least once, settled once."""
    bank = FakeConnector("bank")
    outbox = Outbox(store, connectors={"bank": bank})
    seen: list[int] = []

    def flow(event: Any, ctx: DurableContext) -> Any:
        rec = ctx.effect("pay", Effect(key="-", connector="bank", payload=1))
        seen.append(rec.attempts)
        return rec.to_dict()["status"]

    a = DurableRunner(store, outbox=outbox, functions={"flow": flow})
    b = DurableRunner(store, outbox=outbox, functions={"flow": flow})
    ids = [a.start("flow") for _ in range(5)]
    a.work_once()
    outbox.drain()
    barrier: list[Callable[[], int]] = [b.work_once, a.work_once]
    for _ in range(20):
        for step in barrier:
            step()
    assert [a.get(i).result for i in ids] == ["CONFIRMED"] * 5
    assert seen == [1] * 5
    a.close()
    b.close()


def test_an_effect_operation_takes_no_callback_answer(store: SQLStore) -> None:
    outbox = Outbox(store, connectors={"bank": FakeConnector("bank")})
    runner = DurableRunner(store, outbox=outbox, functions={"pay": pay})
    eid = runner.start("pay", {"cents": 1, "to": "x"})
    runner.work_once()
    [op] = runner.history(eid)
    assert op.callback_id is not None
    for answer in (lambda: runner.complete_callback(op.callback_id, {}), lambda: runner.fail_callback(op.callback_id, "no"),
                   lambda: runner.heartbeat_callback(op.callback_id)):
        with pytest.raises(ConfigError, match="ends when its effect does"):
            answer()
    assert runner.history(eid)[0].status is op.status
    outbox.cancel(op.callback_id, reason="changed our mind")
    runner.work_once()
    info = runner.get(eid)
    assert info.status is ExecutionStatus.FAILED and info.error is not None
    assert info.error.type == "EffectFailedError" and "CANCELLED" in (info.error.message or "")
    runner.close()


def test_wait_and_wait_async_see_effects_end_while_a_worker_dispatches(store: SQLStore) -> None:
    """No durable worker runs: ``wait`` (and ``wait_async``, through ``SQLStore.run_async``) wake the
    execution themselves once the outbox's worker has confirmed the effect."""
    bank = FakeConnector("bank")
    outbox = Outbox(store, connectors={"bank": bank})
    runner = DurableRunner(store, outbox=outbox, functions={"pay": pay})
    stop = threading.Event()
    dispatcher = Worker(store, outbox=outbox, poll_interval=0.01)
    thread = threading.Thread(target=dispatcher.run, args=(stop,))
    thread.start()
    try:
        first = runner.start("pay", {"cents": 1, "to": "a"})
        assert runner.wait(first, timeout=60).status is ExecutionStatus.SUCCEEDED
        second = runner.start("pay", {"cents": 2, "to": "b"})
        assert asyncio.run(runner.wait_async(second, timeout=60)).status is ExecutionStatus.SUCCEEDED
    finally:
        stop.set()
        thread.join()
    assert len(bank.dispatched) == 4
    runner.close()


def test_local_runner_drives_effects_and_skips_their_retry_delays() -> None:
    from errands.durable.testing import LocalRunner

    bank = FakeConnector("bank", outcomes=[TransientError("503", retry_after=3600), ("deliver", DispatchOutcome.UNKNOWN)])

    def flow(event: Any, ctx: DurableContext) -> Any:
        rec = ctx.effect("pay", Effect(key="-", connector="bank", payload=event, semantics=Semantics.NON_IDEMPOTENT))
        ctx.wait("cool-off", 60)
        return [rec.status.value, rec.attempts]

    with LocalRunner(flow, connectors={"bank": bank}, always_replay=True) as local:
        started = local.clock.now()
        info = local.run({"cents": 5})
        assert info.status is ExecutionStatus.SUCCEEDED, info.error
        assert info.result == ["CONFIRMED", 2]
        assert local.clock.now() - started >= 3600  # the Retry-After was skipped, not slept
        [key] = [op.callback_id for op in local.history(info.execution_id) if op.callback_id]
        assert bank.deliveries(key) == 1 and key in bank.observed  # resent only once observed ABSENT
