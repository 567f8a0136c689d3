"""Async durable functions (``AsyncDurableContext``) and the runner's coroutine twins."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
from collections import Counter
from typing import Any, Callable

import pytest
from errands.core import FakeClock, NotFoundError
from errands.core.testing import faults
from errands.durable import (
    AsyncDurableContext,
    CallbackError,
    DurableContext,
    DurableExecutionConfig,
    DurableOperation,
    DurableRunner,
    Duration,
    ExecutionStatus,
    InMemoryClient,
    InvocationStatus,
    MapConfig,
    OperationStatus,
    OperationSubType,
    RetryStrategyConfig,
    StepConfig,
    StepError,
    WaitForConditionConfig,
    WaitForConditionDecision,
    create_retry_strategy,
    with_durable_execution,
)
from errands.durable.testing import LocalRunner
from hypothesis import given, settings
from hypothesis import strategies as st


def counted(runs: Counter[str], name: str, value: Any, delay: float = 0.0) -> Callable[[Any], Any]:
    async def body(step: Any) -> Any:
        runs[name] += 1
        await asyncio.sleep(delay)
        return value

    return body


def ids(local: LocalRunner, execution_id: str) -> list[tuple[str, str | None, str]]:
    return sorted((op.id, op.name, op.type.value) for op in local.history(execution_id))


# -- async functions ---------------------------------------------------------------------------------


def test_gather_map_and_wait_replay_deterministically_under_always_replay() -> None:
    runs: Counter[str] = Counter()

    async def wf(event: Any, ctx: AsyncDurableContext) -> Any:
        # b finishes first, a is called first: the ids follow the calls
        a, b = await asyncio.gather(ctx.step("a", counted(runs, "a", 1, 0.03)), ctx.step("b", counted(runs, "b", 2)))
        await ctx.wait("cool-off", 30)

        async def item(c: AsyncDurableContext, x: int, i: int, xs: list[int]) -> int:
            doubled: int = await c.step("double", counted(runs, f"m{x}", x * 2, random.random() / 100))
            return doubled

        mapped = await ctx.map("m", [1, 2, 3], item, config=MapConfig(max_concurrency=2))
        tail = await asyncio.gather(ctx.step("c", counted(runs, "c", 3)), ctx.wait("short", 1))
        return [a, b, mapped.results(), tail[0]]

    plain = LocalRunner(wf)
    first = plain.run()
    assert first.status is ExecutionStatus.SUCCEEDED and first.result == [1, 2, [2, 4, 6], 3]
    assert set(runs.values()) == {1}
    runs.clear()
    replaying = LocalRunner(wf, always_replay=True)
    again = replaying.run()
    assert again.status is ExecutionStatus.SUCCEEDED and again.result == first.result
    assert replaying.invocations > plain.invocations
    assert set(runs) == {"a", "b", "m1", "m2", "m3", "c"} and set(runs.values()) == {1}  # each body ran once
    assert ids(replaying, again.execution_id) == ids(plain, first.execution_id)


def test_operation_ids_are_fixed_at_call_time() -> None:
    seen: list[str] = []

    async def wf(event: Any, ctx: AsyncDurableContext) -> Any:
        ops = [ctx.step(f"s{i}", counted(Counter(), str(i), i)) for i in range(3)]
        assert all(isinstance(op, DurableOperation) for op in ops)
        seen.extend(op.operation_id for op in ops)
        return [await op for op in reversed(ops)]  # awaited in the other order

    local = LocalRunner(wf)
    info = local.run()
    assert info.result == [2, 1, 0]
    by_name = {op.name: op.id for op in local.history(info.execution_id)}
    assert [by_name["s0"], by_name["s1"], by_name["s2"]] == seen
    sync_ids: list[str] = []

    def same(event: Any, ctx: DurableContext) -> Any:
        for i in range(3):
            ctx.step(f"s{i}", lambda _: None)
        return None

    sync_local = LocalRunner(same)
    done = sync_local.run()
    sync_ids = [op.id for op in sync_local.history(done.execution_id)]
    assert sync_ids == seen  # the same ids as the sync function's


def test_async_step_retries_then_succeeds() -> None:
    attempts: list[int] = []

    async def flaky(step: Any) -> str:
        attempts.append(step.attempt)
        await asyncio.sleep(0)
        if step.attempt < 3:
            raise ValueError(f"boom {step.attempt}")
        return "ok"

    async def wf(event: Any, ctx: AsyncDurableContext) -> str:
        value: str = await ctx.step("flaky", flaky, config=StepConfig(retry_strategy=create_retry_strategy(
            RetryStrategyConfig(max_attempts=5, initial_delay=Duration(seconds=10)))))
        return value

    local = LocalRunner(wf)
    t0 = local.clock.now()
    info = local.run()
    assert info.result == "ok" and attempts == [1, 2, 3]
    assert local.clock.now() - t0 >= 10  # suspended between attempts
    [op] = local.history(info.execution_id)
    assert op.attempt == 3 and op.status is OperationStatus.SUCCEEDED


def test_async_step_raising_is_a_step_error_caught_or_failing_the_execution() -> None:
    async def bad(step: Any) -> None:
        raise KeyError("missing")

    async def caught(event: Any, ctx: AsyncDurableContext) -> str:
        try:
            await ctx.step("bad", bad, config=StepConfig(retry_strategy=create_retry_strategy(
                RetryStrategyConfig(max_attempts=1))))
        except StepError as exc:
            return f"caught {exc.error_type}"
        return "no"

    async def uncaught(event: Any, ctx: AsyncDurableContext) -> None:
        await ctx.step("bad", bad, config=StepConfig(retry_strategy=create_retry_strategy(
            RetryStrategyConfig(max_attempts=1))))

    for replay in (False, True):
        assert LocalRunner(caught, always_replay=replay).run().result == "caught KeyError"
        info = LocalRunner(uncaught, always_replay=replay).run()
        assert info.status is ExecutionStatus.FAILED
        assert info.error is not None and info.error.type == "KeyError"  # as in a sync function


def test_gather_where_one_operation_suspends_ends_pending_then_resumes() -> None:
    runs: Counter[str] = Counter()

    async def wf(event: Any, ctx: AsyncDurableContext) -> Any:
        slow, _, quick = await asyncio.gather(ctx.step("slow", counted(runs, "slow", "s", 0.05)),
                                              ctx.wait("long", 60), ctx.wait("short", 10))
        return [slow, quick]

    local = LocalRunner(wf)
    t0 = local.clock.now()
    info = local.run(skip_time=False)
    assert info.status is ExecutionStatus.PENDING
    # the step still ran to its checkpoint, and the invocation wakes at the earliest wait
    assert runs == Counter({"slow": 1})
    assert local.runner.next_due() == pytest.approx(t0 + 10)
    done = local.drive(info.execution_id)
    assert done.status is ExecutionStatus.SUCCEEDED and done.result == ["s", None]
    assert local.clock.now() - t0 == pytest.approx(60)
    assert runs == Counter({"slow": 1})


def test_return_exceptions_cannot_swallow_a_suspension() -> None:
    async def wf(event: Any, ctx: AsyncDurableContext) -> str:
        await asyncio.gather(ctx.wait("w", 5), return_exceptions=True)
        return "after"

    local = LocalRunner(wf)
    info = local.run(skip_time=False)
    assert info.status is ExecutionStatus.PENDING
    assert local.drive(info.execution_id).result == "after"


def test_sync_steps_and_sync_children_mix_with_async_ones() -> None:
    threads: set[str] = set()

    def sync_child(c: DurableContext) -> int:
        threads.add(threading.current_thread().name)
        value: int = c.step("inner", lambda _: 5)
        return value + c.step("inner-async", counted(Counter(), "x", 1))

    async def async_child(c: AsyncDurableContext) -> int:
        value: int = await c.step("inner", lambda _: 7)
        return value

    async def wf(event: Any, ctx: AsyncDurableContext) -> Any:
        a = await ctx.step("sync", lambda _: time.sleep(0.01) or 1)
        b, c = await asyncio.gather(ctx.run_in_child_context("sync-child", sync_child),
                                    ctx.run_in_child_context("async-child", async_child))
        batch = await ctx.parallel("p", [lambda cc: cc.step("x", lambda _: 2), async_child])
        return [a, b, c, batch.results()]

    for replay in (False, True):
        info = LocalRunner(wf, always_replay=replay).run()
        assert info.status is ExecutionStatus.SUCCEEDED, info.error
        assert info.result == [1, 6, 7, [2, 7]]
    assert threads == {"errands-durable-call"}  # the sync child ran off the loop


def test_async_operations_in_a_sync_function() -> None:
    async def child(c: AsyncDurableContext) -> Any:
        return await asyncio.gather(c.step("x", counted(Counter(), "x", 1)), c.step("y", lambda _: 2))

    def wf(event: Any, ctx: DurableContext) -> Any:
        a = ctx.step("async-step", counted(Counter(), "a", "a"))
        return [a, ctx.run_in_child_context("async-child", child),
                ctx.map("m", [1, 2], lambda c, x, i, xs: x).results()]

    for replay in (False, True):
        info = LocalRunner(wf, always_replay=replay).run()
        assert info.status is ExecutionStatus.SUCCEEDED and info.result == ["a", [1, 2], [1, 2]]


def test_async_wait_for_callback_invoke_and_condition() -> None:
    sent: list[str] = []

    async def submit(callback_id: str, step: Any) -> None:
        await asyncio.sleep(0)
        sent.append(callback_id)

    async def check(state: int, step: Any) -> int:
        return state + 1

    async def child_fn(event: Any, ctx: AsyncDurableContext) -> Any:
        value = await ctx.step("c", lambda _: event["n"] * 10)
        return value

    async def wf(event: Any, ctx: AsyncDurableContext) -> Any:
        answer, invoked = await asyncio.gather(ctx.wait_for_callback("approval", submit),
                                               ctx.invoke("child", {"n": 4}, name="call"))
        polled = await ctx.wait_for_condition(check, WaitForConditionConfig(
            wait_strategy=lambda s, attempt: WaitForConditionDecision(should_continue=s < 3, delay_seconds=1),
            initial_state=0), name="poll")
        cb = await ctx.create_callback("second")
        await ctx.step("send", lambda _: sent.append(cb.callback_id))
        try:
            await cb.result()
        except CallbackError as exc:
            return [answer, invoked, polled, exc.error_message]
        return "no"

    local = LocalRunner(functions={"main": wf, "child": child_fn})
    info = local.run()
    assert info.status is ExecutionStatus.PENDING and len(sent) == 1
    assert local.complete_callback(sent[0], "yes")
    info = local.drive(info.execution_id)
    assert info.status is ExecutionStatus.PENDING and len(sent) == 2
    assert local.fail_callback(sent[1], "refused")
    info = local.drive(info.execution_id)
    assert info.status is ExecutionStatus.SUCCEEDED, info.error
    assert info.result == ["yes", 40, 3, "refused"]
    subs = {op.name: op.sub_type for op in local.history(info.execution_id)}
    assert subs["approval"] is OperationSubType.WAIT_FOR_CALLBACK and subs["poll"] is OperationSubType.WAIT_FOR_CONDITION


def test_non_determinism_in_an_async_function_fails_it() -> None:
    async def wf(event: Any, ctx: AsyncDurableContext) -> str:
        for _ in range(2):
            await ctx.step(f"s{random.random()}", lambda _: 1)
        return "never"

    info = LocalRunner(wf, always_replay=True).run()
    assert info.status is ExecutionStatus.FAILED
    assert info.error is not None and info.error.type == "NonDeterministicExecutionError"


def test_cancelled_operation_still_finishes_its_checkpoint_before_the_invocation_ends() -> None:
    async def wf(event: Any, ctx: AsyncDurableContext) -> str:
        try:
            await asyncio.wait_for(ctx.step("slow", lambda _: time.sleep(0.05) or "late"), timeout=0.001)
        except asyncio.TimeoutError:
            pass
        return "done"

    info = LocalRunner(wf).run()
    assert info.status is ExecutionStatus.SUCCEEDED and info.result == "done"


def test_async_handler_with_the_lambda_wrapper() -> None:
    client = InMemoryClient()

    async def handler(event: Any, ctx: AsyncDurableContext) -> str:
        first, second = await asyncio.gather(ctx.step("a", counted(Counter(), "a", "hello")),
                                             ctx.step("b", lambda _: event["name"]))
        return f"{first} {second}"

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    out = wrapped(client.start_execution({"name": "alice"}).to_dict())
    assert out.status is InvocationStatus.SUCCEEDED and out.result == '"hello alice"'


# -- random gather shapes ----------------------------------------------------------------------------

LEAF = st.sampled_from(["step", "wait"])
SHAPE = st.recursive(
    LEAF,
    lambda inner: st.one_of(st.tuples(st.just("gather"), st.lists(inner, min_size=1, max_size=3)),
                            st.tuples(st.just("child"), st.lists(inner, min_size=1, max_size=3))),
    max_leaves=8,
)


def shaped(shape: list[Any], runs: Counter[str]) -> Callable[[Any, AsyncDurableContext], Any]:
    def op(ctx: AsyncDurableContext, node: Any, path: str) -> Any:
        """One operation called at once (a gather's arguments must each be one operation)."""
        if node == "step":
            return ctx.step(path, counted(runs, path, path, random.random() / 200))
        if node == "wait":
            return ctx.wait(path, random.choice([0, 1, 5]))

        async def body(child: AsyncDurableContext) -> Any:
            return await seq(child, node, path)

        return ctx.run_in_child_context(path, body)

    async def seq(ctx: AsyncDurableContext, node: Any, path: str) -> Any:
        kind, children = node
        if kind == "gather":
            return await asyncio.gather(*[op(ctx, c, f"{path}.{i}") for i, c in enumerate(children)])
        return [await op(ctx, c, f"{path}.{i}") for i, c in enumerate(children)]

    async def wf(event: Any, ctx: AsyncDurableContext) -> Any:
        return [await op(ctx, node, str(i)) for i, node in enumerate(shape)]

    return wf


@settings(max_examples=25, deadline=None)
@given(st.lists(SHAPE, min_size=1, max_size=3))
def test_random_gather_shapes_give_the_same_ids_on_every_replay(shape: list[Any]) -> None:
    runs: Counter[str] = Counter()
    plain = LocalRunner(shaped(shape, runs))
    first = plain.run()
    assert first.status is ExecutionStatus.SUCCEEDED, first.error
    once = dict(runs)
    runs.clear()
    replaying = LocalRunner(shaped(shape, runs), always_replay=True)
    again = replaying.run()
    assert again.status is ExecutionStatus.SUCCEEDED, again.error
    assert again.result == first.result
    assert dict(runs) == once and set(runs.values()) <= {1}
    assert ids(replaying, again.execution_id) == ids(plain, first.execution_id)


# -- the runner's coroutine twins --------------------------------------------------------------------


def test_coroutine_twins_never_block_the_loop(tmp_path: Any) -> None:
    sent: list[str] = []

    def wf(event: Any, ctx: DurableContext) -> Any:
        slow = ctx.step("slow", lambda _: time.sleep(0.3) or "slow")
        answer = ctx.wait_for_callback("approval", lambda cid, _: sent.append(cid),
                                       config=None)
        return [slow, answer]

    async def main() -> Any:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        with DurableRunner(f"sqlite:///{tmp_path / 'd.db'}", functions={"wf": wf}) as runner:
            tick_task = asyncio.create_task(ticker())
            eid = await runner.start_async("wf", {"x": 1}, execution_id="e1")
            assert await runner.start_async("wf", {"x": 1}, execution_id="e1") == "e1"  # idempotent
            with pytest.raises(TimeoutError):
                await runner.wait_async(eid, timeout=0.5)  # runs the slow step, then waits for the callback
            assert ticks >= 10  # the loop kept turning while the step slept on another thread
            assert (await runner.get_async(eid)).status is ExecutionStatus.PENDING
            await runner.heartbeat_callback_async(sent[0])
            assert await runner.complete_callback_async(sent[0], "yes")
            assert not await runner.fail_callback_async(sent[0], "late")  # settled already
            info = await runner.wait_async(eid, timeout=10)
            stop.set()
            await tick_task
            return info.result

    assert asyncio.run(main()) == ["slow", "yes"]


def test_async_function_awaited_from_async_code(tmp_path: Any) -> None:
    loops: set[int] = set()

    async def wf(event: Any, ctx: AsyncDurableContext) -> Any:
        loops.add(id(asyncio.get_running_loop()))
        a, b = await asyncio.gather(ctx.step("a", counted(Counter(), "a", 1, 0.01)), ctx.step("b", lambda _: 2))
        await ctx.wait("w", 0)
        return a + b

    async def main() -> Any:
        with DurableRunner(f"sqlite:///{tmp_path / 'd.db'}", functions={"wf": wf}) as runner:
            eid = await runner.start_async("wf")
            info = await runner.wait_async(eid, timeout=10)
            assert id(asyncio.get_running_loop()) not in loops  # the function runs on the runner's own loop
            return info.result

    assert asyncio.run(main()) == 3


def test_start_in_the_callers_transaction(tmp_path: Any) -> None:
    def wf(event: Any, ctx: DurableContext) -> Any:
        return event

    path = tmp_path / "d.db"
    with DurableRunner(f"sqlite:///{path}", functions={"wf": wf}) as runner:
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False)  # start_async uses it on a thread
        try:
            runner.start("wf", 1, execution_id="kept", conn=conn)
            conn.commit()
            runner.start("wf", 2, execution_id="dropped", conn=conn)
            conn.rollback()
            asyncio.run(runner.start_async("wf", 3, execution_id="kept-async", conn=conn))
            conn.commit()
            asyncio.run(runner.start_async("wf", 4, execution_id="dropped-async", conn=conn))
            conn.rollback()
        finally:
            conn.close()
        assert runner.wait("kept", timeout=10).result == 1
        assert runner.wait("kept-async", timeout=10).result == 3
        for gone in ("dropped", "dropped-async"):
            with pytest.raises(NotFoundError):
                runner.get(gone)
        assert runner.drain() == 0  # nothing queued for the rolled-back starts


@pytest.mark.parametrize("kind", ["locked", "dropped"])
@pytest.mark.parametrize("when", ["before", "after_commit"])
def test_a_fault_in_an_async_step_checkpoint_never_fails_the_execution(tmp_path: Any, kind: str, when: str) -> None:
    runs: Counter[str] = Counter()

    async def wf(event: Any, ctx: AsyncDurableContext) -> Any:
        return await asyncio.gather(*[ctx.step(f"s{i}", counted(runs, f"s{i}", i, 0.001 * i)) for i in range(3)])

    clock = FakeClock()
    with DurableRunner(f"sqlite:///{tmp_path / 'd.db'}", clock=clock, functions={"wf": wf}) as runner:
        eid = runner.start("wf")
        plan = faults.FaultPlan(seed=1, rate=1.0, kinds=(kind,), when=(when,),
                                match=r"INSERT INTO durable_operations", limit=3)
        with faults.inject(runner.store, plan):
            for _ in range(50):
                runner.drain()
                if runner.get(eid).status.terminal:
                    break
                clock.advance(1.0)
        assert plan.injected
        info = runner.get(eid)
        assert info.status is ExecutionStatus.SUCCEEDED, info.error
        assert info.result == [0, 1, 2]
