"""Context operations under LocalRunner (in memory, fake clock with time skipping)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from errands.core import ConfigError
from errands.durable import (
    BatchItemError,
    CallbackConfig,
    CallbackError,
    CallbackTimeoutError,
    ChildContextError,
    CompletionConfig,
    CompletionReason,
    DurableContext,
    Duration,
    ErrorObject,
    ExecutionStatus,
    InvokeError,
    JsonSerdes,
    MapConfig,
    OperationStatus,
    OperationSubType,
    OperationType,
    ParallelConfig,
    PassThroughSerdes,
    RetryDecision,
    RetryPresets,
    RetryStrategyConfig,
    SerdesError,
    StepConfig,
    StepError,
    StepSemantics,
    WaitForCallbackConfig,
    WaitForConditionConfig,
    WaitForConditionDecision,
    WaitForConditionError,
    create_retry_strategy,
)
from errands.durable.testing import LocalRunner


def test_one_hour_wait_completes_instantly_with_time_skipping() -> None:
    def slow(event: Any, ctx: DurableContext) -> str:
        ctx.wait("an hour", Duration.from_hours(1))
        return "done"

    local = LocalRunner(slow)
    start, began = local.clock.now(), time.monotonic()
    info = local.run()
    assert info.status is ExecutionStatus.SUCCEEDED and info.result == "done"
    assert local.clock.now() - start == 3600
    assert time.monotonic() - began < 5  # generous: the point is no real hour


def test_step_retries_with_backoff_then_succeeds() -> None:
    attempts: list[int] = []

    def flaky(event: Any, ctx: DurableContext) -> str:
        def work(step: Any) -> str:
            attempts.append(step.attempt)
            if step.attempt < 3:
                raise ValueError(f"boom {step.attempt}")
            return "ok"

        return ctx.step("flaky", work, config=StepConfig(retry_strategy=create_retry_strategy(
            RetryStrategyConfig(max_attempts=5, initial_delay=Duration(seconds=10)))))

    local = LocalRunner(flaky)
    t0 = local.clock.now()
    info = local.run()
    assert info.result == "ok" and attempts == [1, 2, 3]
    assert local.clock.now() - t0 >= 10  # suspended between attempts
    [op] = local.history(info.execution_id)
    assert op.attempt == 3 and op.status is OperationStatus.SUCCEEDED


def test_step_gives_up_with_step_error_carrying_the_error_object() -> None:
    def failing(event: Any, ctx: DurableContext) -> Any:
        try:
            ctx.step("bad", lambda _: int("x"), config=StepConfig(retry_strategy=RetryPresets.immediate(2)))
        except StepError as exc:
            return {"type": exc.error_type, "message": exc.error_message, "obj": exc.to_error_object().to_dict()}
        return None

    info = LocalRunner(failing).run()
    assert info.result["type"] == "ValueError"
    assert "invalid literal" in info.result["message"]
    assert set(info.result["obj"]) >= {"ErrorType", "ErrorMessage", "StackTrace"}


def test_unhandled_step_error_fails_the_execution() -> None:
    info = LocalRunner(lambda e, c: c.step("bad", lambda _: 1 / 0,
                                           config=StepConfig(retry_strategy=RetryPresets.none()))).run()
    assert info.status is ExecutionStatus.FAILED
    assert info.error is not None and info.error.type == "ZeroDivisionError"


def test_retry_strategy_filters_by_type_and_message() -> None:
    strategy = create_retry_strategy(RetryStrategyConfig(retryable_error_types=[KeyError],
                                                         retryable_errors=["transient"]))
    assert strategy(KeyError("k"), 1).should_retry
    assert strategy(RuntimeError("a transient glitch"), 1).should_retry
    assert not strategy(RuntimeError("fatal"), 1).should_retry
    assert not strategy(KeyError("k"), 3).should_retry
    assert RetryDecision.retry(2).delay_seconds == 2


def test_at_least_once_step_reruns_an_interrupted_attempt_at_most_once_does_not() -> None:
    from errands.durable import DurableRunner

    runner = DurableRunner("memory://", lease_for=0.05)
    runs: dict[str, int] = {"least": 0, "most": 0}
    crash = {"on": True}

    class Crash(BaseException):
        pass

    def wf(event: Any, ctx: DurableContext) -> Any:
        def body(kind: str) -> Any:
            def run(step: Any) -> Any:
                runs[kind] += 1
                if crash["on"]:
                    raise Crash()
                return step.attempt
            return run

        sem = StepSemantics.AT_MOST_ONCE_PER_RETRY if event == "most" else StepSemantics.AT_LEAST_ONCE_PER_RETRY
        return ctx.step("s", body(event), config=StepConfig(step_semantics=sem,
                                                            retry_strategy=RetryPresets.immediate(3)))

    runner.register("wf", wf)
    for kind in ("least", "most"):
        eid = runner.start("wf", kind)
        [lease] = runner.store.claim("durable.work", 1, lease_for=0.05)
        with pytest.raises(Crash):  # the process "dies" inside the step
            runner._invocations.load_and_invoke(lease)
        crash["on"] = False
        time.sleep(0.1)  # the dead worker's lease lapses
        info = runner.wait(eid, timeout=10)
        crash["on"] = True
        if kind == "least":
            assert info.result == 1  # the same attempt ran again
        else:
            assert info.result == 2  # attempt 1 counted as interrupted; attempt 2 ran
            [op] = runner.history(eid)
            assert op.attempt == 2
    assert runs == {"least": 2, "most": 2}


def test_callbacks_complete_fail_and_time_out() -> None:
    seen: list[str] = []

    def approval(event: Any, ctx: DurableContext) -> Any:
        try:
            return ctx.wait_for_callback("approve", lambda cid, s: seen.append(cid),
                                         config=WaitForCallbackConfig(timeout_seconds=event.get("timeout", 0)))
        except CallbackTimeoutError as exc:
            return f"timeout: {exc.error_type}"
        except CallbackError as exc:
            return f"failed: {exc.error_type} {exc.error_message}"

    local = LocalRunner(approval)
    info = local.run({})
    assert info.status is ExecutionStatus.PENDING and len(seen) == 1
    assert local.complete_callback(seen[0], {"by": "ada"})
    assert not local.complete_callback(seen[0], {"by": "again"})
    assert local.drive(info.execution_id).result == {"by": "ada"}
    assert seen == [seen[0]]  # the submitter ran once

    info = local.run({})
    local.fail_callback(seen[1], ErrorObject(type="Rejected", message="no"))
    assert local.drive(info.execution_id).result == "failed: Rejected no"

    info = local.run({"timeout": 60})
    assert info.status is ExecutionStatus.SUCCEEDED and info.result == "timeout: CallbackTimeoutError"


def test_callback_heartbeat_timeout_and_heartbeats() -> None:
    def hb(event: Any, ctx: DurableContext) -> Any:
        cb = ctx.create_callback("job", config=CallbackConfig(heartbeat_timeout_seconds=30))
        ctx.step("publish", lambda _: cb.callback_id)
        try:
            return cb.result()
        except CallbackTimeoutError:
            return "no heartbeat"

    local = LocalRunner(hb)
    info = local.run(skip_time=False)
    cid = local.history(info.execution_id)[0].callback_id
    assert cid is not None
    local.advance(20)
    local.heartbeat_callback(cid)
    local.advance(20)
    assert local.drive(info.execution_id, skip_time=False).status is ExecutionStatus.PENDING
    local.advance(15)
    assert local.drive(info.execution_id, skip_time=False).result == "no heartbeat"


def test_wait_for_condition_polls_with_state_until_done() -> None:
    checks: list[int] = []

    def poll(event: Any, ctx: DurableContext) -> Any:
        def check(state: int, step: Any) -> int:
            checks.append(state)
            return state + 1

        return ctx.wait_for_condition(check, WaitForConditionConfig(
            wait_strategy=lambda s, attempt: WaitForConditionDecision.stop_polling() if s >= 3
            else WaitForConditionDecision.continue_waiting(60), initial_state=0), name="poll")

    local = LocalRunner(poll)
    t0 = local.clock.now()
    info = local.run()
    assert info.result == 3 and checks == [0, 1, 2]
    assert local.clock.now() - t0 == 120
    [op] = local.history(info.execution_id)
    assert op.sub_type is OperationSubType.WAIT_FOR_CONDITION and op.attempt == 3


def test_wait_for_condition_check_error() -> None:
    cfg = WaitForConditionConfig(wait_strategy=lambda s, a: WaitForConditionDecision.stop_polling(), initial_state=0)

    def poll(event: Any, ctx: DurableContext) -> Any:
        try:
            return ctx.wait_for_condition("poll", lambda s, _: 1 / 0, cfg)
        except WaitForConditionError as exc:
            return exc.error_type

    assert LocalRunner(poll).run().result == "ZeroDivisionError"


def test_child_context_result_and_error() -> None:
    runs: list[int] = []

    def wf(event: Any, ctx: DurableContext) -> Any:
        total = ctx.run_in_child_context("sum", lambda c: c.step("a", lambda _: runs.append(1) or 2)
                                         + c.step("b", lambda _: 3))
        ctx.wait("w", 1)
        try:
            ctx.run_in_child_context("broken", lambda c: {}["missing"])
        except ChildContextError as exc:
            return [total, exc.error_type]
        return None

    local = LocalRunner(wf)
    info = local.run()
    assert info.result == [5, "KeyError"] and runs == [1]
    ops = local.history(info.execution_id)
    child = next(o for o in ops if o.name == "sum")
    assert {o.name for o in ops if o.parent_id == child.id} == {"a", "b"}


def test_parallel_completion_config_and_batch_result_accessors() -> None:
    def wf(event: Any, ctx: DurableContext) -> Any:
        def fail(c: DurableContext) -> Any:
            raise RuntimeError("branch broke")

        r = ctx.parallel("p", [lambda c: 1, fail, lambda c: 3], ParallelConfig(
            completion_config=CompletionConfig(tolerated_failure_count=1)))
        out = {
            "results": r.results(), "errors": [e.type for e in r.errors()], "status": r.status.value,
            "reason": r.completion_reason.value, "counts": [r.success_count, r.failure_count, r.started_count,
                                                           r.total_count],
            "has_failure": r.has_failure, "succeeded": [i.index for i in r.succeeded()],
            "failed": [i.index for i in r.failed()], "started": len(r.started()),
            "all": [i.status.value for i in r.all],
        }
        try:
            r.throw_if_error()
        except BatchItemError as exc:
            out["thrown"] = exc.error_message
        return out

    info = LocalRunner(wf).run()
    assert info.result == {
        "results": [1, 3], "errors": ["RuntimeError"], "status": "FAILED", "reason": "ALL_COMPLETED",
        "counts": [2, 1, 0, 3], "has_failure": True, "succeeded": [0, 2], "failed": [1], "started": 0,
        "all": ["SUCCEEDED", "FAILED", "SUCCEEDED"], "thrown": "branch broke",
    }


def test_min_successful_stops_early_and_leaves_items_started() -> None:
    def wf(event: Any, ctx: DurableContext) -> Any:
        r = ctx.map("m", list(range(6)), lambda c, item, i, items: item,
                    config=MapConfig(max_concurrency=1, completion_config=CompletionConfig(min_successful=2)))
        return [r.completion_reason.value, r.success_count, r.started_count, r.results()]

    assert LocalRunner(wf).run().result == [CompletionReason.MIN_SUCCESSFUL_REACHED.value, 2, 4, [0, 1]]


def test_map_without_tolerance_stops_after_first_failure() -> None:
    def wf(event: Any, ctx: DurableContext) -> Any:
        def fn(c: DurableContext, item: int, i: int, items: list[int]) -> int:
            if item == 1:
                raise ValueError("one")
            return item

        r = ctx.map("m", [0, 1, 2, 3], fn, config=MapConfig(max_concurrency=1))
        return [r.completion_reason.value, [i.status.value for i in r.all]]

    assert LocalRunner(wf).run().result == ["FAILURE_TOLERANCE_EXCEEDED", ["SUCCEEDED", "FAILED", "STARTED", "STARTED"]]


def test_map_items_wait_independently_and_replay_their_steps() -> None:
    runs: list[int] = []

    def wf(event: Any, ctx: DurableContext) -> Any:
        def item(c: DurableContext, x: int, i: int, items: list[int]) -> int:
            y = c.step("calc", lambda _: runs.append(x) or x * 10)
            c.wait("pause", 10 * (x + 1))
            return int(y) + 1

        return ctx.map("m", [0, 1, 2], item, config=MapConfig(max_concurrency=2)).results()

    local = LocalRunner(wf)
    info = local.run()
    assert info.result == [1, 11, 21]
    assert sorted(runs) == [0, 1, 2]
    iterations = [o for o in local.history(info.execution_id) if o.sub_type is OperationSubType.MAP_ITERATION]
    assert len(iterations) == 3 and all(o.type is OperationType.CONTEXT for o in iterations)


def test_always_replay_replays_after_every_operation_with_same_result() -> None:
    runs: list[str] = []

    def wf(event: Any, ctx: DurableContext) -> Any:
        a = ctx.step("a", lambda _: runs.append("a") or 1)
        b = ctx.step("b", lambda _: runs.append("b") or 2)
        c = ctx.map("m", [1, 2], lambda cc, x, i, xs: cc.step("s", lambda _: runs.append(f"m{x}") or x)).results()
        return [a, b, c]

    plain = LocalRunner(wf)
    assert plain.run().result == [1, 2, [1, 2]]
    assert plain.invocations == 1
    runs.clear()
    replaying = LocalRunner(wf, always_replay=True)
    info = replaying.run()
    assert info.result == [1, 2, [1, 2]]
    assert replaying.invocations > 3
    assert sorted(runs) == ["a", "b", "m1", "m2"]  # every step still ran exactly once


def test_always_replay_catches_non_determinism() -> None:
    import random

    def wf(event: Any, ctx: DurableContext) -> Any:
        for _ in range(3):
            ctx.step(f"s{random.random()}", lambda _: 1)
        return "never"

    info = LocalRunner(wf, always_replay=True).run()
    assert info.status is ExecutionStatus.FAILED
    assert info.error is not None and info.error.type == "NonDeterministicExecutionError"


def test_serdes_pass_through_and_json_errors() -> None:
    def wf(event: Any, ctx: DurableContext) -> Any:
        raw = ctx.step("raw", lambda _: "not json {", config=StepConfig(serdes=PassThroughSerdes()))
        try:
            ctx.step("set", lambda _: {1, 2})
        except SerdesError as exc:
            return [raw, "JSON" in str(exc)]
        return None

    assert LocalRunner(wf).run().result == ["not json {", True]
    # a value that is not text is JSON-encoded, as the reference SDK's pass-through serdes does
    assert PassThroughSerdes().serialize(1, __import__("errands.durable", fromlist=["SerdesContext"]).SerdesContext()) == "1"
    with pytest.raises(SerdesError):
        PassThroughSerdes().serialize({1, 2}, __import__("errands.durable", fromlist=["SerdesContext"]).SerdesContext())
    assert JsonSerdes().serialize({"a": [1]}, __import__("errands.durable", fromlist=["SerdesContext"]).SerdesContext()) == '{"a":[1]}'


def test_invoke_runs_a_child_execution() -> None:
    def child(event: Any, ctx: DurableContext) -> Any:
        ctx.wait("w", 5)
        if event.get("fail"):
            raise RuntimeError("child failed")
        return ctx.step("x", lambda _: event["n"] * 2)

    def parent(event: Any, ctx: DurableContext) -> Any:
        ok = ctx.invoke("child", {"n": 21}, name="good")
        try:
            ctx.invoke("child", {"n": 0, "fail": True}, name="bad")
        except InvokeError as exc:
            return [ok, exc.error_type, exc.error_message]
        return None

    local = LocalRunner(parent, functions={"child": child})
    info = local.run()
    assert info.result == [42, "RuntimeError", "child failed"]
    children = local.runner.list(parent_id=info.execution_id)
    assert len(children) == 2 and all(c.parent_id == info.execution_id for c in children)


def test_bad_input_is_rejected_with_the_field_named() -> None:
    def wf(event: Any, ctx: DurableContext) -> Any:
        errors = []
        for call in (lambda: ctx.wait("w", -1), lambda: ctx.step("s", "not callable"),  # type: ignore[arg-type]
                     lambda: ctx.map("m", [1], lambda *a: 1, config=MapConfig(max_concurrency=0)),
                     lambda: ctx.invoke("nope", {})):
            try:
                call()
            except ConfigError as exc:
                errors.append(exc.field)
        return errors

    assert LocalRunner(wf).run().result == ["duration", "step function", "max_concurrency", "function"]
