"""The seed's examples through the AWS invocation shapes, replay and non-determinism."""

from __future__ import annotations

import json
from typing import Any

import pytest
from errands.core import ConfigError, FakeClock
from errands.durable import (
    DurableContext,
    DurableExecutionConfig,
    Duration,
    InMemoryClient,
    InvocationInput,
    InvocationStatus,
    MapConfig,
    OperationStatus,
    OperationType,
    with_durable_execution,
)


def test_greeting_step_succeeds_with_hello_alice() -> None:
    client = InMemoryClient()

    def handler(event: Any, ctx: DurableContext) -> str:
        return ctx.step("greet", lambda _: f"hello {event['name']}")

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    out = wrapped(client.start_execution({"name": "alice"}).to_dict())
    assert out.status is InvocationStatus.SUCCEEDED
    assert json.loads(out.result or "") == "hello alice"
    assert out.to_dict() == {"Status": "SUCCEEDED", "Result": '"hello alice"'}


def test_thirty_second_wait_is_pending_then_succeeds() -> None:
    clock = FakeClock()
    client = InMemoryClient(clock=clock)

    def handler(event: Any, ctx: DurableContext) -> str:
        ctx.wait("cooldown", Duration(seconds=30))
        return "waited"

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    first = client.start_execution({})
    out = wrapped(first.to_dict())
    assert out.status is InvocationStatus.PENDING
    assert out.to_dict() == {"Status": "PENDING"}
    arn = first.durable_execution_arn
    [wait_op] = [o for o in client.operations(arn) if o.type is OperationType.WAIT]
    assert wait_op.to_dict()["WaitDetails"]["ScheduledEndTimestamp"] == 1_700_000_030_000  # epoch ms
    clock.advance(10)
    assert wrapped(client.invocation_input(arn)).status is InvocationStatus.PENDING
    clock.advance(20)
    done = wrapped(client.invocation_input(arn).to_dict())
    assert done.status is InvocationStatus.SUCCEEDED and done.result == '"waited"'


def test_map_doubles_with_max_concurrency_two() -> None:
    client = InMemoryClient()

    def handler(event: Any, ctx: DurableContext) -> dict[str, Any]:
        r = ctx.map("double", [1, 2, 3], lambda c, item, i, items: item * 2, config=MapConfig(max_concurrency=2))
        return {"success": r.success_count, "total": r.total_count, "values": r.results()}

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    out = wrapped(client.start_execution({}).to_dict())
    assert out.status is InvocationStatus.SUCCEEDED
    assert out.result == '{"success":3,"total":3,"values":[2,4,6]}'


def test_aws_argument_order_is_accepted_too() -> None:
    clock = FakeClock()
    client = InMemoryClient(clock=clock)

    def handler(event: Any, ctx: DurableContext) -> Any:
        a = ctx.step(lambda _: 1, name="one")
        ctx.wait(Duration.from_seconds(0), name="nap")
        r = ctx.map([1, 2], lambda c, item, i, items: item + a, name="inc")
        return r.results()

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    inp = client.start_execution(None)
    # the Lambda API's waits are whole seconds, at least one: the service ends the wait a second later
    assert wrapped(inp.to_dict()).status is InvocationStatus.PENDING
    clock.advance(1)
    assert wrapped(client.invocation_input(inp.durable_execution_arn)).result == "[2,3]"


def test_completed_steps_never_run_again_on_replay() -> None:
    clock = FakeClock()
    client = InMemoryClient(clock=clock)
    runs: list[str] = []

    def handler(event: Any, ctx: DurableContext) -> list[Any]:
        a = ctx.step("a", lambda _: runs.append("a") or ("a", 1))
        ctx.wait("w", 5)
        b = ctx.step("b", lambda _: runs.append("b") or "b")
        return [a, b]

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    inp = client.start_execution({})
    assert wrapped(inp).status is InvocationStatus.PENDING
    clock.advance(5)
    out = wrapped(client.invocation_input(inp.durable_execution_arn))
    assert runs == ["a", "b"]
    # the tuple went through JSON on the first run as on replay
    assert json.loads(out.result or "") == [["a", 1], "b"]


@pytest.mark.parametrize("second", [("b", "a"), ("a", "renamed")])
def test_changing_order_or_names_between_runs_is_non_deterministic(second: tuple[str, str]) -> None:
    clock = FakeClock()
    client = InMemoryClient(clock=clock)
    names = ["a", "b"]

    def handler(event: Any, ctx: DurableContext) -> str:
        ctx.step(names[0], lambda _: 1)
        ctx.step(names[1], lambda _: 2)
        ctx.wait("w", 5)
        return "ok"

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    inp = client.start_execution({})
    assert wrapped(inp).status is InvocationStatus.PENDING
    names[:] = list(second)
    clock.advance(5)
    out = wrapped(client.invocation_input(inp.durable_execution_arn))
    assert out.status is InvocationStatus.FAILED
    assert out.error is not None and out.error.type == "NonDeterministicExecutionError"
    assert out.to_dict()["Error"]["ErrorType"] == "NonDeterministicExecutionError"


def test_non_determinism_fails_even_if_user_code_swallows_it() -> None:
    clock = FakeClock()
    client = InMemoryClient(clock=clock)
    kind = ["step"]

    def handler(event: Any, ctx: DurableContext) -> str:
        try:
            if kind[0] == "step":
                ctx.step("x", lambda _: 1)
            else:
                ctx.wait("x", 1)
        except Exception:
            return "swallowed"
        ctx.wait("later", 5)
        return "ok"

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    inp = client.start_execution({})
    wrapped(inp)
    kind[0] = "wait"
    clock.advance(5)
    out = wrapped(client.invocation_input(inp.durable_execution_arn))
    assert out.status is InvocationStatus.FAILED
    assert out.error is not None and out.error.type == "NonDeterministicExecutionError"


def test_checkpoints_are_batched_into_few_calls() -> None:
    client = InMemoryClient()

    def handler(event: Any, ctx: DurableContext) -> int:
        total = 0
        for i in range(10):
            total += ctx.run_in_child_context(f"c{i}", lambda c: c.step("s", lambda _: 1))
        return total

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    inp = client.start_execution({})
    assert wrapped(inp).result == "10"
    ops = client.operations(inp.durable_execution_arn)
    assert len([o for o in ops if o.status is OperationStatus.SUCCEEDED]) == 20
    # 20 operations, 40 updates: one call per step (its start rides along) plus one final flush
    assert client.checkpoint_calls == 11


def test_bad_invocation_input_names_the_missing_key() -> None:
    wrapped = with_durable_execution(lambda e, c: None, DurableExecutionConfig(client=InMemoryClient()))
    with pytest.raises(ConfigError, match="DurableExecutionArn"):
        wrapped({"CheckpointToken": "t"})


def test_invocation_input_round_trips_aws_json() -> None:
    client = InMemoryClient()
    inp = client.start_execution({"k": 1})
    data = json.loads(json.dumps(inp.to_dict()))
    assert set(data) == {"DurableExecutionArn", "CheckpointToken", "InitialExecutionState"}
    back = InvocationInput.from_dict(data)
    assert back.initial_execution_state.operations[0].input_payload == '{"k": 1}'


def test_invoke_through_the_in_memory_client() -> None:
    client = InMemoryClient()
    child = with_durable_execution(lambda e, c: c.step("x", lambda _: e["n"] + 1), DurableExecutionConfig(client=client))
    client.register_function("child", child)

    def parent(event: Any, ctx: DurableContext) -> Any:
        return ctx.invoke("child", {"n": 41}, name="call")

    wrapped = with_durable_execution(parent, DurableExecutionConfig(client=client))
    inp = client.start_execution({})
    assert wrapped(inp).status is InvocationStatus.PENDING
    assert wrapped(client.invocation_input(inp.durable_execution_arn)).result == "42"


def test_replay_pages_through_get_execution_state() -> None:
    clock = FakeClock()
    client = InMemoryClient(clock=clock)
    runs: list[int] = []

    def handler(event: Any, ctx: DurableContext) -> int:
        total = sum(ctx.step(f"s{i}", lambda _, i=i: runs.append(i) or i) for i in range(150))
        ctx.wait("w", 1)
        return total

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    inp = client.start_execution({})
    assert wrapped(inp).status is InvocationStatus.PENDING
    clock.advance(1)
    again = client.invocation_input(inp.durable_execution_arn)
    assert again.initial_execution_state.next_marker  # more than one page of operations
    assert wrapped(again).result == str(sum(range(150)))
    assert len(runs) == 150


def test_a_stale_checkpoint_token_is_refused() -> None:
    from errands.durable import CheckpointError

    client = InMemoryClient()
    wrapped = with_durable_execution(lambda e, c: c.step("s", lambda _: 1), DurableExecutionConfig(client=client))
    old = client.start_execution({})
    client.invocation_input(old.durable_execution_arn)  # a newer invocation took over
    with pytest.raises(CheckpointError, match="Invalid checkpoint token"):
        wrapped(old)
