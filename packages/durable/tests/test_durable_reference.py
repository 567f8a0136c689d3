"""The reference SDK's surface: its three examples as documented on a fresh InMemoryClient, hand-built
invocation inputs, serialized callback payloads, set_operation, and checkpoint errors by level."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import pytest

from errands.core import FakeClock
from errands.durable import (
    CallbackConfig,
    CheckpointOutput,
    DurableContext,
    DurableExecutionConfig,
    ErrorObject,
    InMemoryClient,
    InvocationStatus,
    JsonSerdes,
    Operation,
    OperationStatus,
    OperationSubType,
    OperationType,
    PassThroughSerdes,
    SerdesContext,
    hash_id,
    with_durable_execution,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(("script", "printed"), [
    ("hello_step.py", 'SUCCEEDED "hello alice"'),
    ("wait_thirty_seconds.py", "PENDING"),
    ("map_double.py", 'SUCCEEDED {"success":3,"total":3,"values":[2,4,6]}'),
])
def test_the_reference_examples_print_the_reference_outputs(script: str, printed: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    assert capsys.readouterr().out.strip() == printed


def _input(arn: str, payload: str = "{}", *extra: dict[str, Any]) -> dict[str, Any]:
    root = {"Id": "execution-root", "Type": "EXECUTION", "Status": "STARTED",
            "ExecutionDetails": {"InputPayload": payload}}
    return {"DurableExecutionArn": arn, "CheckpointToken": "tok",
            "InitialExecutionState": {"Operations": [root, *extra]}}


def test_a_hand_built_execution_is_adopted_and_resumed() -> None:
    clock = FakeClock()
    client = InMemoryClient(clock=clock)

    def handler(event: Any, ctx: DurableContext) -> str:
        ctx.wait("cooldown", 30)
        return "done"

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    assert wrapped(_input("arn:test:wait")).status is InvocationStatus.PENDING
    [wait] = [o for o in client.operations("arn:test:wait") if o.type is OperationType.WAIT]
    assert wait.status is OperationStatus.STARTED  # the service ends the wait, not the function
    clock.advance(30)
    assert client.operations("arn:test:wait")[1].status is OperationStatus.SUCCEEDED
    assert wrapped(client.invocation_input("arn:test:wait")).result == '"done"'


def test_a_pending_wait_in_the_api_shape_stays_pending() -> None:
    clock = FakeClock()
    client = InMemoryClient(clock=clock)
    now_ms = int(clock.now() * 1000)
    wait = {"Id": hash_id("-1"), "Type": "WAIT", "SubType": "Wait", "Name": "w", "Status": "STARTED",
            "StartTimestamp": now_ms, "WaitDetails": {"ScheduledEndTimestamp": now_ms + 30_000}}
    wrapped = with_durable_execution(lambda e, ctx: ctx.wait("w", 30) or "after",
                                     DurableExecutionConfig(client=client))
    assert wrapped(_input("arn:test:pending", "{}", wait)).status is InvocationStatus.PENDING


def test_callbacks_take_the_serialized_payload_as_given() -> None:
    client = InMemoryClient()

    def handler(event: Any, ctx: DurableContext) -> Any:
        return {"approval": ctx.wait_for_callback("approval", lambda cid, step: client.complete_callback(
            cid, '"approved"'))}

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    out = wrapped(_input("arn:test:callback", '{"kind":"approval"}'))
    assert out.status is InvocationStatus.SUCCEEDED and json.loads(out.result or "") == {"approval": "approved"}
    with pytest.raises(Exception, match="serialized"):
        client.complete_callback("x", {"not": "text"})  # type: ignore[arg-type]


def test_callback_ids_are_issued_by_the_service() -> None:
    client = InMemoryClient()
    seen: list[str] = []

    def handler(event: Any, ctx: DurableContext) -> Any:
        cb = ctx.create_callback("cb", CallbackConfig(timeout_seconds=60))
        seen.append(cb.callback_id)
        return cb.result()

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    assert wrapped(_input("arn:test:issued")).status is InvocationStatus.PENDING
    [op] = [o for o in client.operations("arn:test:issued") if o.type is OperationType.CALLBACK]
    assert seen == [op.callback_id] and op.callback_id
    assert client.fail_callback(op.callback_id, ErrorObject(type="Late", message="too late"), timed_out=True)
    out = wrapped(client.invocation_input("arn:test:issued"))
    assert out.status is InvocationStatus.FAILED and out.error is not None
    assert client.operations("arn:test:issued")[1].status is OperationStatus.TIMED_OUT


def test_set_operation_replays_a_checkpoint_built_by_hand() -> None:
    client = InMemoryClient()
    runs: list[int] = []
    wrapped = with_durable_execution(lambda e, ctx: ctx.step("check", lambda s: runs.append(1) or "live"),
                                     DurableExecutionConfig(client=client))
    from errands.durable import InvocationInput

    client.adopt(InvocationInput.from_dict(_input("arn:test:set")))
    client.set_operation(Operation(id=hash_id("-1"), type=OperationType.STEP, status=OperationStatus.SUCCEEDED,
                                   name="check", sub_type=OperationSubType.STEP, result='"cached"'))
    out = wrapped(client.invocation_input("arn:test:set"))
    assert out.result == '"cached"' and runs == []


def test_json_serdes_sorts_keys_and_pass_through_encodes_non_strings() -> None:
    ctx = SerdesContext()
    assert JsonSerdes().serialize({"b": 1, "a": 2}, ctx) == '{"a":2,"b":1}'
    assert PassThroughSerdes().serialize("as is", ctx) == "as is"
    assert PassThroughSerdes().serialize({"b": [1]}, ctx) == '{"b":[1]}'


class _ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}


class _Failing(InMemoryClient):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def checkpoint(self, *args: Any, **kwargs: Any) -> CheckpointOutput:
        raise self.error


def test_a_transient_checkpoint_error_fails_the_invocation_not_the_execution() -> None:
    error = _ServiceError(503, "ServiceException", "try again")
    wrapped = with_durable_execution(lambda e, ctx: ctx.step("s", lambda s: 1),
                                     DurableExecutionConfig(client=_Failing(error)))
    with pytest.raises(_ServiceError):
        wrapped(_input("arn:test:transient"))


def test_a_refused_checkpoint_fails_the_execution() -> None:
    error = _ServiceError(400, "InvalidParameterValueException", "Invalid action for the given operation type.")
    wrapped = with_durable_execution(lambda e, ctx: ctx.step("s", lambda s: 1),
                                     DurableExecutionConfig(client=_Failing(error)))
    out = wrapped(_input("arn:test:refused"))
    assert out.status is InvocationStatus.FAILED and out.error is not None
    assert out.error.type == "ExecutionError"


def test_sync_futures_start_at_most_once() -> None:
    from errands.durable.testing import LocalRunner

    runs: list[str] = []

    def wf(event: Any, ctx: DurableContext) -> Any:
        a = ctx.step_future("a", lambda s: runs.append("a") or 1)
        b = ctx.step_future("b", lambda s: runs.append("b") or 2)
        first = b.result()  # b runs first; a keeps the id it took first
        return [a.result(), first, b.result(), a.done()]

    assert LocalRunner(wf).run().result == [1, 2, 2, True]
    assert runs == ["b", "a"]
    assert LocalRunner(wf, always_replay=True).run().result == [1, 2, 2, True]


def test_parallel_takes_named_branches_and_map_names_its_items() -> None:
    from errands.durable import MapConfig, NamedBranch
    from errands.durable.testing import LocalRunner

    def wf(event: Any, ctx: DurableContext) -> Any:
        p = ctx.parallel("checks", [NamedBranch("payment", lambda c: "paid"), ("fraud", lambda c: "clean"),
                                    {"name": "stock", "func": lambda c: 3}])
        m = ctx.map("double", [1, 2], lambda c, item, i, items: item * 2,
                    config=MapConfig(item_namer=lambda item, i: f"item-{item}"))
        return [p.results(), m.results()]

    local = LocalRunner(wf)
    info = local.run()
    assert info.result == [["paid", "clean", 3], [2, 4]]
    names = {o.name for o in local.runner.history(info.execution_id) if o.parent_id}
    assert {"payment", "fraud", "stock", "item-1", "item-2"} <= names


def test_execute_concurrently_takes_the_reference_items() -> None:
    from errands.durable import ConcurrentItem
    from errands.durable.testing import LocalRunner

    def wf(event: Any, ctx: DurableContext) -> Any:
        items = [ConcurrentItem(id="x", data=10, index=0, name="ten"), {"id": "y", "data": 20, "index": 1}, 30]
        r = ctx.execute_concurrently("fan", items, lambda c, item: [item.id, item.data, item.index, item.name])
        return r.results()

    assert LocalRunner(wf).run().result == [["x", 10, 0, "ten"], ["y", 20, 1, None], ["2", 30, 2, None]]


def test_item_and_batch_serdes() -> None:
    from errands.durable import MapConfig
    from errands.durable.testing import LocalRunner

    class Upper:
        def serialize(self, value: Any, context: SerdesContext) -> str:
            return str(value).upper()

        def deserialize(self, data: str, context: SerdesContext) -> Any:
            return data

    class Tagged(JsonSerdes):
        def serialize(self, value: Any, context: SerdesContext) -> str:
            return "batch:" + super().serialize(value, context)

        def deserialize(self, data: str, context: SerdesContext) -> Any:
            return super().deserialize(data.removeprefix("batch:"), context)

    def wf(event: Any, ctx: DurableContext) -> Any:
        return ctx.map("m", ["a", "b"], lambda c, item, i, items: item,
                       config=MapConfig(item_serdes=Upper(), batch_serdes=Tagged())).results()

    local = LocalRunner(wf)
    info = local.run()
    assert info.result == ["A", "B"]
    [batch] = [o for o in local.runner.history(info.execution_id) if o.sub_type is OperationSubType.MAP]
    assert (batch.result or "").startswith("batch:")
    assert LocalRunner(wf, always_replay=True).run().result == ["A", "B"]


def test_a_batch_result_holds_item_values_as_aws_does_and_text_where_json_cannot() -> None:
    import datetime as dt

    from errands.durable import MapConfig
    from errands.durable.testing import LocalRunner

    class Dates:
        def serialize(self, value: Any, context: SerdesContext) -> str:
            return str(value.isoformat())

        def deserialize(self, data: str, context: SerdesContext) -> Any:
            return dt.date.fromisoformat(data)

    def wf(event: Any, ctx: DurableContext) -> Any:
        plain = ctx.parallel("plain", [lambda c: "a", lambda c: {"n": [1, None]}, lambda c: '"quoted"'])
        days = ctx.map("days", [1, 2], lambda c, item, i, items: dt.date(2026, 1, item),
                       config=MapConfig(item_serdes=Dates()))
        assert all(type(d) is dt.date for d in days.results())
        return [plain.results(), [d.isoformat() for d in days.results()]]

    expected = [["a", {"n": [1, None]}, '"quoted"'], ["2026-01-01", "2026-01-02"]]
    local = LocalRunner(wf)
    info = local.run()
    assert info.result == expected
    ops = local.runner.history(info.execution_id)
    [plain] = [o for o in ops if o.sub_type is OperationSubType.PARALLEL]
    [days] = [o for o in ops if o.sub_type is OperationSubType.MAP]
    assert [i["result"] for i in json.loads(plain.result or "")["all"]] == ["a", {"n": [1, None]}, '"quoted"']
    assert [i["result"] for i in json.loads(days.result or "")["all"]] == ["2026-01-01", "2026-01-02"]
    assert LocalRunner(wf, always_replay=True).run().result == expected


def test_using_a_parent_context_inside_a_child_raises() -> None:
    from errands.durable import InvalidStateError
    from errands.durable.testing import LocalRunner

    def wf(event: Any, ctx: DurableContext) -> Any:
        def child(c: DurableContext) -> str:
            try:
                ctx.step("wrong", lambda s: 1)
            except InvalidStateError:
                return "refused"
            return "allowed"

        return ctx.run_in_child_context("child", child)

    assert LocalRunner(wf).run().result == "refused"


def test_the_same_handler_behaves_alike_on_the_client_and_the_runner() -> None:
    from errands.durable import StepConfig, WaitForConditionConfig, WaitForConditionDecision
    from errands.durable import RetryDecision
    from errands.durable.testing import LocalRunner

    attempts: list[int] = []

    def flaky(step: Any) -> str:
        attempts.append(step.attempt)
        if step.attempt < 2:
            raise RuntimeError("once")
        return "ok"

    def handler(event: Any, ctx: DurableContext) -> Any:
        a = ctx.step("flaky", flaky, config=StepConfig(retry_strategy=lambda e, n: RetryDecision.retry(2)))
        ctx.wait("nap", 5)
        cb = ctx.create_callback("approval")
        polled = ctx.wait_for_condition(lambda s, step: s + 1, WaitForConditionConfig(
            wait_strategy=lambda s, n: WaitForConditionDecision(s < 2, 3), initial_state=0), "poll")
        return [a, polled, cb.result(), event]

    def shape(ops: list[Operation]) -> list[tuple[Any, ...]]:
        return [(o.type, o.sub_type, o.name, o.status, o.attempt) for o in ops if o.type is not OperationType.EXECUTION]

    clock = FakeClock()
    client = InMemoryClient(clock=clock)
    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=client))
    inp = client.start_execution({"n": 1})
    arn = inp.durable_execution_arn
    out = wrapped(inp)
    for _ in range(20):
        if out.status is not InvocationStatus.PENDING:
            break
        for cb in client.operations(arn):
            if cb.type is OperationType.CALLBACK and cb.callback_id and cb.status is OperationStatus.STARTED:
                client.complete_callback(cb.callback_id, '"yes"')
        clock.advance(5)
        out = wrapped(client.invocation_input(arn))
    assert out.status is InvocationStatus.SUCCEEDED and json.loads(out.result or "") == ["ok", 2, "yes", {"n": 1}]
    on_client = shape(client.operations(arn))

    attempts.clear()
    local = LocalRunner(handler)
    info = local.run({"n": 1})
    [cb_op] = [o for o in local.runner.history(info.execution_id) if o.type is OperationType.CALLBACK]
    assert cb_op.callback_id
    local.runner.complete_callback(cb_op.callback_id, "yes")
    info = local.drive(info.execution_id)
    assert info.result == ["ok", 2, "yes", {"n": 1}]
    assert shape(local.runner.history(info.execution_id)) == on_client
    assert on_client[1][:4] == (OperationType.WAIT, OperationSubType.WAIT, "nap", OperationStatus.SUCCEEDED)
