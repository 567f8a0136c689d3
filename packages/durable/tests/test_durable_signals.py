"""Signals by name on SQLite and PostgreSQL: ``DurableRunner.send_signal`` and ``ctx.wait_for_signal``."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Iterator

import pytest
from errands.core import ConfigError, FakeClock, NotFoundError, PayloadError
from errands.durable import (
    AsyncDurableContext,
    CallbackTimeoutError,
    DurableContext,
    DurableExecutionConfig,
    DurableRunner,
    ExecutionStatus,
    InMemoryClient,
    InvocationStatus,
    OperationStatus,
    OperationSubType,
    OperationType,
    SignalRefusedError,
    SignalTimeoutError,
    with_durable_execution,
)
from errands.durable._wire import operation_from_wire, operation_to_wire
from errands.durable.testing import LocalRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def approve(event: Any, ctx: DurableContext) -> Any:
    first = ctx.wait_for_signal("approve")
    second = ctx.wait_for_signal("approve")
    return [first, second]


def with_timeout(event: Any, ctx: DurableContext) -> Any:
    try:
        got = ctx.wait_for_signal("late", timeout=10)
    except SignalTimeoutError as exc:
        got = f"timed out: {exc}"
    again = ctx.wait_for_signal("late")
    return [got, again]


def two_names(event: Any, ctx: DurableContext) -> Any:
    return [ctx.wait_for_signal("b"), ctx.wait_for_signal("a")]


async def gathered(event: Any, ctx: AsyncDurableContext) -> Any:
    a, b = await asyncio.gather(ctx.wait_for_signal("a"), ctx.wait_for_signal("b"))
    return {"a": a, "b": b, "after": await ctx.step("after", lambda _: 1)}


FUNCTIONS = {"approve": approve, "with_timeout": with_timeout, "two_names": two_names, "gathered": gathered}


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'durable.db'}"
    return str(request.getfixturevalue("postgres_url"))


#: Every test on both stores; on SQLite once plainly and once replaying after every operation.
@pytest.fixture(params=[("sqlite", False), ("sqlite", True), ("postgres", True)],
                ids=["sqlite", "sqlite-always_replay", "postgres-always_replay"])
def runner(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[DurableRunner]:
    store, always_replay = request.param
    url = f"sqlite:///{tmp_path / 'durable.db'}" if store == "sqlite" else str(request.getfixturevalue("postgres_url"))
    r = DurableRunner(url, clock=FakeClock(), functions=FUNCTIONS, always_replay=always_replay)
    try:
        yield r
    finally:
        r.close()


def _waits(runner: DurableRunner, eid: str) -> list[tuple[str | None, OperationStatus, str | None]]:
    return [(o.name, o.status, o.result) for o in runner.history(eid)
            if o.sub_type is OperationSubType.WAIT_FOR_SIGNAL]


def test_a_signal_sent_before_the_wait_is_received(runner: DurableRunner) -> None:
    eid = runner.start("approve", {}, execution_id="order-1")
    assert runner.send_signal(eid, "approve", {"by": "ada"}) is False  # no wait yet: kept
    assert runner.send_signal(eid, "approve", "second") is False
    info = runner.wait(eid, timeout=30)
    assert info.status is ExecutionStatus.SUCCEEDED and info.result == [{"by": "ada"}, "second"]
    ops = runner.history(eid)
    assert [(o.type, o.sub_type, o.name) for o in ops] == [
        (OperationType.CALLBACK, OperationSubType.WAIT_FOR_SIGNAL, "approve")] * 2


def test_a_wait_suspends_until_a_signal_wakes_the_execution(runner: DurableRunner) -> None:
    eid = runner.start("approve", {})
    runner.drain()
    assert runner.get(eid).status is ExecutionStatus.PENDING and runner.next_due() is None
    assert runner.send_signal(eid, "approve", 1) is True  # a wait took it: the execution is due
    runner.drain()
    assert runner.get(eid).status is ExecutionStatus.PENDING
    assert _waits(runner, eid) == [("approve", OperationStatus.SUCCEEDED, "1"),
                                   ("approve", OperationStatus.STARTED, None)]
    assert runner.send_signal(eid, "approve", 2) is True
    assert runner.wait(eid, timeout=30).result == [1, 2]


def test_signals_are_kept_per_name_in_the_order_sent(runner: DurableRunner) -> None:
    eid = runner.start("two_names", {})
    runner.send_signal(eid, "a", "a1")
    runner.send_signal(eid, "a", "a2")  # never waited for: stays kept
    runner.drain()
    assert runner.get(eid).status is ExecutionStatus.PENDING  # waits for "b", "a" does not wake it
    assert runner.send_signal(eid, "b", "b1") is True
    assert runner.wait(eid, timeout=30).result == ["b1", "a1"]


def test_a_wait_times_out_with_an_error_the_function_catches(runner: DurableRunner) -> None:
    clock: FakeClock = runner.clock  # type: ignore[assignment]
    eid = runner.start("with_timeout", {})
    runner.drain()
    assert runner.get(eid).status is ExecutionStatus.PENDING and runner.next_due() is not None
    clock.advance(11)
    runner.drain()
    assert _waits(runner, eid)[0][:2] == ("late", OperationStatus.TIMED_OUT)
    assert runner.get(eid).status is ExecutionStatus.PENDING  # the second wait has no timeout
    assert runner.send_signal(eid, "late", "now") is True
    info = runner.wait(eid, timeout=30)
    assert info.result == ["timed out: no signal 'late' arrived within 10s", "now"]
    assert issubclass(SignalTimeoutError, CallbackTimeoutError)


def test_async_functions_await_signals_with_ids_fixed_at_call_time(runner: DurableRunner) -> None:
    async def main() -> Any:
        eid = await runner.start_async("gathered", {})
        assert await runner.send_signal_async(eid, "b", "B") is False
        await asyncio.to_thread(runner.drain)
        assert runner.get(eid).status is ExecutionStatus.PENDING
        assert await runner.send_signal_async(eid, "a", "A") is True
        return (await runner.wait_async(eid, timeout=30)).result

    assert asyncio.run(main()) == {"a": "A", "b": "B", "after": 1}


def test_a_signal_sent_while_the_invocation_runs_is_not_lost(url: str) -> None:
    runner = DurableRunner(url, clock=FakeClock())

    @runner.durable_function("self_signal")
    def self_signal(event: Any, ctx: DurableContext) -> Any:
        ctx.step("send", lambda s: runner.send_signal(s.execution_id, "x", "from a step"))
        return ctx.wait_for_signal("x")

    @runner.durable_function("branches")
    def branches(event: Any, ctx: DurableContext) -> Any:
        def waiter(child: DurableContext) -> Any:
            return child.wait_for_signal("y")

        def sender(child: DurableContext) -> Any:
            return child.step("send", lambda s: runner.send_signal(s.execution_id, "y", "from a branch"))

        return ctx.parallel("p", [waiter, sender]).results()

    try:
        assert runner.run("self_signal", {}).result == "from a step"
        eid = runner.start("branches", {})
        info = runner.wait(eid, timeout=30)
        assert info.status is ExecutionStatus.SUCCEEDED and info.result[0] == "from a branch"
    finally:
        runner.close()


def test_send_signal_refuses_what_it_cannot_deliver(runner: DurableRunner) -> None:
    with pytest.raises(NotFoundError):
        runner.send_signal("no-such-execution", "approve", 1)
    eid = runner.start("approve", {})
    with pytest.raises(PayloadError) as bad:
        runner.send_signal(eid, "approve", object())
    assert bad.value.field == "payload"
    with pytest.raises(ConfigError) as unnamed:
        runner.send_signal(eid, "", 1)
    assert unnamed.value.field == "name"
    runner.terminate(eid, "done")
    with pytest.raises(SignalRefusedError) as refused:
        runner.send_signal(eid, "approve", 1)
    assert refused.value.status == "TERMINATED" and "TERMINATED" in str(refused.value)
    assert isinstance(refused.value, ConfigError) and refused.value.field == "execution_id"


def test_a_suspended_execution_keeps_its_signals_and_purge_drops_them(runner: DurableRunner) -> None:
    eid = runner.start("approve", {})
    runner.drain()
    runner.suspend(eid)
    assert runner.send_signal(eid, "approve", 1) is True  # the open wait takes it; nothing runs yet
    runner.send_signal(eid, "approve", 2)
    assert runner.drain() == 0
    runner.resume(eid)
    assert runner.wait(eid, timeout=30).result == [1, 2]
    assert runner.purge(eid) == 1
    with pytest.raises(NotFoundError):
        runner.send_signal(eid, "approve", 3)


def test_the_wait_checkpoint_round_trips_the_lambda_wire(runner: DurableRunner) -> None:
    eid = runner.start("approve", {})
    runner.send_signal(eid, "approve", {"k": [1, 2]})
    runner.send_signal(eid, "approve", None)
    runner.wait(eid, timeout=30)
    for op in runner.history(eid):
        wire = operation_to_wire(op)
        assert wire["Type"] == "CALLBACK" and wire["SubType"] == "WaitForSignal" and wire["Name"] == "approve"
        assert "CallbackId" in wire["CallbackDetails"]
        back = operation_from_wire(wire)
        assert (back.type, back.sub_type, back.name, back.status, back.result) == (
            op.type, op.sub_type, op.name, op.status, op.result)


def test_on_the_lambda_shape_a_signal_wait_is_a_callback() -> None:
    client = InMemoryClient()

    def handler(event: Any, ctx: DurableContext) -> Any:
        return ctx.wait_for_signal("go", timeout=30)

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    client.register_function("signalled", wrapped)
    started = client.start_execution({}, function="signalled")
    arn = started.durable_execution_arn
    assert client.invoke(arn).status is InvocationStatus.PENDING
    wait = next(o for o in client.operations(arn) if o.sub_type is OperationSubType.WAIT_FOR_SIGNAL)
    assert wait.type is OperationType.CALLBACK and wait.callback_id and wait.name == "go"
    assert client.complete_callback(wait.callback_id, '"went"')
    out = client.invoke(arn)
    assert out.status is InvocationStatus.SUCCEEDED and out.result == '"went"'


def test_local_runner_sends_signals_and_skips_to_a_waits_timeout() -> None:
    local = LocalRunner(approve, always_replay=True)
    info = local.run({})
    assert info.status is ExecutionStatus.PENDING  # a wait without a timeout: nothing to skip to
    local.send_signal(info.execution_id, "approve", "x")
    local.send_signal(info.execution_id, "approve", "y")
    assert local.drive(info.execution_id).result == ["x", "y"]
    timed = LocalRunner(with_timeout)
    info = timed.run({})  # the clock jumps to the first wait's timeout
    assert info.status is ExecutionStatus.PENDING
    timed.send_signal(info.execution_id, "late", 3)
    assert timed.drive(info.execution_id).result == ["timed out: no signal 'late' arrived within 10s", 3]


def collect(event: Any, ctx: DurableContext) -> Any:
    return [ctx.wait_for_signal("n") for _ in range(event["count"])]


def test_concurrent_senders_lose_no_signal_and_keep_each_senders_order(url: str) -> None:
    senders, each = 4, 5
    runner = DurableRunner(url, functions={"collect": collect})
    stop = threading.Event()
    try:
        eid = runner.start("collect", {"count": senders * each})

        def send(sender: int) -> None:
            for i in range(each):
                runner.send_signal(eid, "n", [sender, i])

        threads = [threading.Thread(target=send, args=(s,)) for s in range(senders)]
        worker = threading.Thread(target=runner.serve, args=(stop,), kwargs={"poll_interval": 0.01})
        worker.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        info = runner.wait(eid, timeout=60)
    finally:
        stop.set()
        worker.join()
        runner.close()
    assert info.status is ExecutionStatus.SUCCEEDED
    got = [tuple(x) for x in info.result]
    assert sorted(got) == [(s, i) for s in range(senders) for i in range(each)]  # each once
    for s in range(senders):
        assert [i for sender, i in got if sender == s] == list(range(each))  # in the order sent


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.sampled_from(["send", "run"]), min_size=1, max_size=12), replay=st.booleans())
def test_any_interleaving_of_sends_and_invocations_delivers_in_order(plan: list[str], replay: bool) -> None:
    sends = plan.count("send")
    runner = DurableRunner("memory://", clock=FakeClock(), functions={"collect": collect}, always_replay=replay)
    try:
        eid = runner.start("collect", {"count": sends})
        sent = 0
        for step in plan:
            if step == "send":
                runner.send_signal(eid, "n", sent)
                sent += 1
            else:
                runner.drain()
        info = runner.wait(eid, timeout=30)
    finally:
        runner.close()
    assert info.status is ExecutionStatus.SUCCEEDED and info.result == list(range(sends))


def test_send_signal_writes_in_the_callers_transaction(tmp_path: Any) -> None:
    import sqlite3

    path = tmp_path / "durable.db"
    runner = DurableRunner(f"sqlite:///{path}", clock=FakeClock(), functions=FUNCTIONS)
    try:
        eid = runner.start("approve", {})
        conn = sqlite3.connect(path)
        runner.send_signal(eid, "approve", "rolled back", conn=conn)
        conn.rollback()
        runner.send_signal(eid, "approve", "first", conn=conn)
        conn.commit()
        conn.close()
        runner.send_signal(eid, "approve", "second")
        assert runner.wait(eid, timeout=30).result == ["first", "second"]
    finally:
        runner.close()
