"""errands.durable on AWS's local durable-execution runner, beside AWS's own SDK on the same scenarios.

The runner (``start-server`` of ``aws-durable-execution-sdk-python-testing``) emulates the Lambda
durable-execution API and calls a local Lambda Invoke endpoint (``LambdaEndpoint``) that hosts both
handlers of each scenario: ours, wrapped by ``with_durable_execution`` with ``AWSDurableExecutionClient``,
and AWS's, wrapped by its ``durable_execution``. Each scenario runs on both; the executions must end the
same way and the operation histories the runner records must be equal once ids and times are normalised.

The client's own rules (error classification, paging) are tested without the runner, on a stub.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest

from errands.core.testing import service_missing
from errands.durable import (
    AWSDurableExecutionClient,
    CheckpointError,
    DurableExecutionConfig,
    DurableServiceError,
    ErrorObject,
    OperationAction,
    OperationType,
    OperationUpdate,
    with_durable_execution,
)
from errands.durable import Duration as Dur
from errands.durable import MapConfig as OurMapConfig
from errands.durable import RetryDecision as OurRetryDecision
from errands.durable import StepConfig as OurStepConfig
from errands.durable import WaitForConditionConfig as OurWaitForConditionConfig
from errands.durable import WaitForConditionDecision as OurDecision
from errands.durable._aws import classify_service_error
from errands.durable.testing import AWSLocalRunner, LambdaEndpoint, aws_runner_available, normalise_history

pytestmark = pytest.mark.timeout(120)

# -- the scenarios, written twice: our API and AWS's ----------------------------------------------

_attempts: dict[str, int] = {}


def _flaky(key: str, failures: int) -> Callable[[Any], str]:
    def step(_: Any) -> str:
        _attempts[key] = _attempts.get(key, 0) + 1
        if _attempts[key] <= failures:
            raise RuntimeError(f"attempt {_attempts[key]} failed")
        return f"ok after {_attempts[key]}"

    return step


def ours_steps(event: Any, ctx: Any) -> Any:
    a = ctx.step(lambda _: event["n"] + 1, name="add")
    b = ctx.step(lambda _: a * 2, name="double")
    return ctx.step(lambda _: {"n": b}, name="wrap")


def aws_steps(event: Any, ctx: Any) -> Any:
    a = ctx.step(lambda _: event["n"] + 1, name="add")
    b = ctx.step(lambda _: a * 2, name="double")
    return ctx.step(lambda _: {"n": b}, name="wrap")


async def ours_async_steps(event: Any, ctx: Any) -> Any:
    """The steps scenario as an ``async def`` function with ``async def`` steps (``AsyncDurableContext``)."""
    async def add(_: Any) -> int:
        return int(event["n"]) + 1

    a = await ctx.step(add, name="add")
    b = await ctx.step(lambda _: a * 2, name="double")
    return await ctx.step(lambda _: {"n": b}, name="wrap")


def ours_retries(event: Any, ctx: Any) -> Any:
    strategy = lambda err, n: OurRetryDecision.retry(Dur(seconds=1)) if n < 3 else OurRetryDecision.no_retry()  # noqa: E731
    return ctx.step(_flaky(event["key"], 2), name="flaky", config=OurStepConfig(retry_strategy=strategy))


def aws_retries(event: Any, ctx: Any) -> Any:
    from aws_durable_execution_sdk_python.config import Duration, StepConfig
    from aws_durable_execution_sdk_python.retries import RetryDecision

    strategy = lambda err, n: RetryDecision.retry(Duration.from_seconds(1)) if n < 3 else RetryDecision.no_retry()  # noqa: E731
    return ctx.step(_flaky(event["key"], 2), name="flaky", config=StepConfig(retry_strategy=strategy))


def ours_waits(event: Any, ctx: Any) -> Any:
    first = ctx.step(lambda _: "before", name="before")
    ctx.wait(Dur(seconds=2), name="pause")
    return [first, ctx.step(lambda _: "after", name="after")]


def aws_waits(event: Any, ctx: Any) -> Any:
    from aws_durable_execution_sdk_python.config import Duration

    first = ctx.step(lambda _: "before", name="before")
    ctx.wait(Duration.from_seconds(2), name="pause")
    return [first, ctx.step(lambda _: "after", name="after")]


def ours_map(event: Any, ctx: Any) -> Any:
    out = ctx.map([1, 2, 3], lambda c, item, i, items: c.step(lambda _: item * 10, name="times-ten"), name="tens",
                  config=OurMapConfig(max_concurrency=1))
    return out.results()


def aws_map(event: Any, ctx: Any) -> Any:
    from aws_durable_execution_sdk_python.config import MapConfig

    out = ctx.map([1, 2, 3], lambda c, item, i, items: c.step(lambda _: item * 10, name="times-ten"), name="tens",
                  config=MapConfig(max_concurrency=1))
    return out.get_results()


def _branch(label: str) -> Callable[[Any], Any]:
    return lambda c: c.step(lambda _: label, name=f"branch-{label}")


def ours_parallel(event: Any, ctx: Any) -> Any:
    from errands.durable import ParallelConfig

    return ctx.parallel([_branch("a"), _branch("b")], name="fan", config=ParallelConfig(max_concurrency=1)).results()


def aws_parallel(event: Any, ctx: Any) -> Any:
    from aws_durable_execution_sdk_python.config import ParallelConfig

    return ctx.parallel([_branch("a"), _branch("b")], name="fan", config=ParallelConfig(max_concurrency=1)
                        ).get_results()


def _child_body(c: Any) -> Any:
    x = c.step(lambda _: 20, name="inner-one")
    return c.step(lambda _: x + 1, name="inner-two")


def ours_child(event: Any, ctx: Any) -> Any:
    return [ctx.run_in_child_context(_child_body, name="child"), ctx.step(lambda _: "outer", name="outer")]


def aws_child(event: Any, ctx: Any) -> Any:
    return [ctx.run_in_child_context(_child_body, name="child"), ctx.step(lambda _: "outer", name="outer")]


def ours_condition(event: Any, ctx: Any) -> Any:
    strategy = lambda state, n: OurDecision.stop_polling() if state >= 3 else OurDecision.continue_waiting(1)  # noqa: E731
    return ctx.wait_for_condition(lambda state, _: state + 1, OurWaitForConditionConfig(strategy, 0), name="poll")


def aws_condition(event: Any, ctx: Any) -> Any:
    from aws_durable_execution_sdk_python.config import Duration
    from aws_durable_execution_sdk_python.waits import WaitForConditionConfig, WaitForConditionDecision

    def strategy(state: int, n: int) -> WaitForConditionDecision:
        if state >= 3:
            return WaitForConditionDecision.stop_polling()
        return WaitForConditionDecision.continue_waiting(Duration.from_seconds(1))

    return ctx.wait_for_condition(lambda state, _: state + 1, WaitForConditionConfig(strategy, 0), name="poll")


def ours_callback(event: Any, ctx: Any) -> Any:
    callback = ctx.create_callback(name="approval")
    return {"answer": callback.result()}


def aws_callback(event: Any, ctx: Any) -> Any:
    from aws_durable_execution_sdk_python.config import CallbackConfig
    from aws_durable_execution_sdk_python.serdes import JsonSerDes

    callback = ctx.create_callback(name="approval", config=CallbackConfig(serdes=JsonSerDes()))
    return {"answer": callback.result()}


def _submitter(callback_id: str, _: Any) -> None:
    _submitted.append(callback_id)


_submitted: list[str] = []


def ours_wait_for_callback(event: Any, ctx: Any) -> Any:
    return {"answer": ctx.wait_for_callback(_submitter, name="review")}


def aws_wait_for_callback(event: Any, ctx: Any) -> Any:
    from aws_durable_execution_sdk_python.config import WaitForCallbackConfig
    from aws_durable_execution_sdk_python.serdes import JsonSerDes

    return {"answer": ctx.wait_for_callback(_submitter, name="review", config=WaitForCallbackConfig(serdes=JsonSerDes()))}


def ours_invoke(event: Any, ctx: Any) -> Any:
    return {"child": ctx.invoke("ours-child", {"n": 4}, name="call-child")}


def aws_invoke(event: Any, ctx: Any) -> Any:
    return {"child": ctx.invoke("aws-child", {"n": 4}, name="call-child")}


def ours_child_function(event: Any, ctx: Any) -> Any:
    return ctx.step(lambda _: event["n"] * 100, name="child-step")


def aws_child_function(event: Any, ctx: Any) -> Any:
    return ctx.step(lambda _: event["n"] * 100, name="child-step")


def _boom(_: Any) -> None:
    raise ValueError("no such order")


def ours_failure(event: Any, ctx: Any) -> Any:
    ctx.step(lambda _: "fine", name="first")
    ctx.step(_boom, name="boom", config=OurStepConfig(retry_strategy=lambda e, n: OurRetryDecision.no_retry()))


def aws_failure(event: Any, ctx: Any) -> Any:
    from aws_durable_execution_sdk_python.config import StepConfig
    from aws_durable_execution_sdk_python.retries import RetryDecision

    ctx.step(lambda _: "fine", name="first")
    ctx.step(_boom, name="boom", config=StepConfig(retry_strategy=lambda e, n: RetryDecision.no_retry()))


# -- the harness ----------------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    ours: Callable[[Any, Any], Any]
    aws: Callable[[Any, Any], Any]
    input: Callable[[], Any] = lambda: {}
    status: str = "SUCCEEDED"
    result: Any = None
    #: drives the execution from outside while it runs (callbacks): ``drive(harness, arn)``
    drive: Callable[[Harness, str], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Harness:
    runner: AWSLocalRunner
    endpoint: LambdaEndpoint

    def run(self, function: str, input: Any, drive: Callable[[Harness, str], None] | None = None,
            timeout: float = 30.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        _attempts.clear()
        arn = self.runner.start(function, input)
        if drive is not None:
            drive(self, arn)
        description = self.runner.wait(arn, timeout)
        return description, self.runner.history(arn)

    def callback_id(self, arn: str, timeout: float = 20.0) -> str:
        """The ``CallbackId`` the service issued, from the history once the callback started."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.runner.history(arn):
                details = event.get("CallbackStartedDetails")
                if details and details.get("CallbackId"):
                    return str(details["CallbackId"])
            if time.monotonic() > deadline:
                raise TimeoutError(f"no callback started in {arn}: {self.runner.describe(arn)}; "
                                   f"endpoint errors {self.endpoint.errors}")
            time.sleep(0.02)


def _succeed_callback(h: Harness, arn: str) -> None:
    callback_id = h.callback_id(arn)
    h.runner.client.send_durable_execution_callback_heartbeat(CallbackId=callback_id)
    h.runner.client.send_durable_execution_callback_success(CallbackId=callback_id,
                                                            Result=json.dumps("approved").encode())


def _fail_callback(h: Harness, arn: str) -> None:
    callback_id = h.callback_id(arn)
    h.runner.client.send_durable_execution_callback_failure(
        CallbackId=callback_id, Error={"ErrorType": "Rejected", "ErrorMessage": "not today"})


def _succeed_with_our_client(h: Harness, arn: str) -> None:
    """Settle through our client's own calls, as an application would."""
    client = AWSDurableExecutionClient(h.runner.lambda_client())
    callback_id = h.callback_id(arn)
    client.heartbeat_callback(callback_id)
    assert client.complete_callback(callback_id, json.dumps("looks good")) is True


SCENARIOS = [
    Scenario("steps", ours_steps, aws_steps, lambda: {"n": 1}, result={"n": 4}),
    Scenario("async-steps", ours_async_steps, aws_steps, lambda: {"n": 1}, result={"n": 4}),
    Scenario("retries", ours_retries, aws_retries, lambda: {"key": "flaky"}, result="ok after 3"),
    Scenario("waits", ours_waits, aws_waits, result=["before", "after"]),
    Scenario("map", ours_map, aws_map, result=[10, 20, 30]),
    Scenario("parallel", ours_parallel, aws_parallel, result=["a", "b"]),
    Scenario("child-context", ours_child, aws_child, result=[21, "outer"]),
    Scenario("wait-for-condition", ours_condition, aws_condition, result=3),
    Scenario("callback-success", ours_callback, aws_callback, result={"answer": "approved"}, drive=_succeed_callback),
    Scenario("callback-failure", ours_callback, aws_callback, status="FAILED", drive=_fail_callback),
    Scenario("wait-for-callback", ours_wait_for_callback, aws_wait_for_callback, result={"answer": "looks good"},
             drive=_succeed_with_our_client),
    Scenario("chained-invoke", ours_invoke, aws_invoke, result={"child": 400}),
    Scenario("failure", ours_failure, aws_failure, status="FAILED"),
]

CHILDREN = {"ours-child": ours_child_function, "aws-child": aws_child_function}


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    reason = aws_runner_available()
    if reason is not None:
        service_missing(reason)
    from aws_durable_execution_sdk_python.execution import durable_execution

    with LambdaEndpoint() as endpoint:
        configs = {name: {"DurableConfig": {"ExecutionTimeout": 60, "RetentionPeriodInDays": 1}} for name in CHILDREN}
        try:
            runner = AWSLocalRunner(endpoint.url, function_configs=configs)
        except (RuntimeError, TimeoutError) as exc:
            service_missing(f"AWS's local durable-execution runner did not start: {exc}")
            raise
        with runner:
            ours = AWSDurableExecutionClient(runner.lambda_client())
            theirs = runner.lambda_client()
            for s in SCENARIOS:
                endpoint.register(f"ours-{s.name}", with_durable_execution(s.ours, DurableExecutionConfig(client=ours)))
                endpoint.register(f"aws-{s.name}", durable_execution(s.aws, boto3_client=theirs))
            endpoint.register("ours-child", with_durable_execution(ours_child_function,
                                                                   DurableExecutionConfig(client=ours)))
            endpoint.register("aws-child", durable_execution(aws_child_function, boto3_client=theirs))
            yield Harness(runner, endpoint)


def _outcome(description: dict[str, Any]) -> tuple[str, Any]:
    result = description.get("Result")
    return description["Status"], json.loads(result) if result else None


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_aws_sdk_on_the_runner(harness: Harness, scenario: Scenario) -> None:
    """AWS's SDK on the scenario: the reference the comparison stands on."""
    description, _ = harness.run(f"aws-{scenario.name}", scenario.input(), scenario.drive)
    assert _outcome(description) == (scenario.status, scenario.result), description


# AWS's SDK keeps step and batch results in its extended-type envelope ({"t": tag, "v": value}); the
# comparison is of the values.
_CONTAINERS = {"m", "l", "t", "br"}


def _unwrap(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"t", "v"} and isinstance(value["t"], str):
        inner = value["v"]
        if value["t"] in _CONTAINERS:
            if isinstance(inner, dict):
                return {k: _unwrap(v) for k, v in inner.items()}
            return [_unwrap(v) for v in inner]
        return inner
    return value


def _decode(text: str) -> Any:
    try:
        return _unwrap(json.loads(text))
    except ValueError:
        return text


def _normalised(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    events = normalise_history(history, decode=_decode)
    for event in events:  # each engine's parent invokes its own child function
        details = event.get("ChainedInvokeStartedDetails")
        if details and details.get("FunctionName") in CHILDREN:
            details["FunctionName"] = "child"
    return events


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_errands_on_the_runner_matches_the_aws_sdk(harness: Harness, scenario: Scenario) -> None:
    ours, our_history = harness.run(f"ours-{scenario.name}", scenario.input(), scenario.drive)
    assert _outcome(ours) == (scenario.status, scenario.result), (ours, harness.endpoint.errors,
                                                                  _normalised(our_history))
    theirs, their_history = harness.run(f"aws-{scenario.name}", scenario.input(), scenario.drive)
    assert _normalised(our_history) == _normalised(their_history)
    if scenario.status == "FAILED":
        assert ours["Error"]["ErrorMessage"] == theirs["Error"]["ErrorMessage"]


_LOCAL = [s for s in SCENARIOS if s.drive is None and s.name != "chained-invoke"]


@pytest.mark.parametrize("scenario", _LOCAL, ids=lambda s: s.name)
def test_the_same_handlers_run_on_in_memory_client_and_durable_runner(scenario: Scenario) -> None:
    """The handlers the runner runs are plain errands functions: unchanged on the local backends."""
    from errands.core import FakeClock
    from errands.durable import ExecutionStatus, InMemoryClient
    from errands.durable.testing import LocalRunner

    _attempts.clear()
    clock = FakeClock()
    client = InMemoryClient(clock=clock)
    wrapped = with_durable_execution(scenario.ours, DurableExecutionConfig(client=client))
    inp = client.start_execution(scenario.input())
    for _ in range(50):
        out = wrapped(inp)
        if out.status.value != "PENDING":
            break
        clock.advance(60)
        inp = client.invocation_input(inp.durable_execution_arn)
    assert out.status.value == scenario.status
    if scenario.result is not None:
        assert json.loads(out.result or "null") == scenario.result

    _attempts.clear()
    info = LocalRunner(scenario.ours).run(scenario.input())
    expected = ExecutionStatus.SUCCEEDED if scenario.status == "SUCCEEDED" else ExecutionStatus.FAILED
    assert info.status is expected
    if scenario.result is not None:
        assert info.result == scenario.result


def test_the_lambda_entry_point_form_answers_lambda_json(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """``with_durable_execution(handler)`` with no config: the AWS client from the environment, dict output."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", harness.runner.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    monkeypatch.setattr(AWSDurableExecutionClient, "_shared", None)
    seen: list[Any] = []

    def entry(event: Any, ctx: Any) -> Any:
        out = handler(event, ctx)
        seen.append(out)
        return out

    handler = with_durable_execution(ours_steps)
    harness.endpoint.register("ours-entry-point", entry)
    description, _ = harness.run("ours-entry-point", {"n": 2})
    assert _outcome(description) == ("SUCCEEDED", {"n": 6})
    assert seen and all(isinstance(o, dict) for o in seen)
    assert seen[-1] == {"Status": "SUCCEEDED", "Result": '{"n":6}'}


def test_settling_a_settled_callback_is_refused_for_good(harness: Harness) -> None:
    arn = harness.runner.start("ours-callback-success", {})
    callback_id = harness.callback_id(arn)
    client = AWSDurableExecutionClient(harness.runner.lambda_client())
    assert client.complete_callback(callback_id, json.dumps("approved")) is True
    assert _outcome(harness.runner.wait(arn)) == ("SUCCEEDED", {"answer": "approved"})
    for settle in (lambda: client.complete_callback(callback_id, json.dumps("again")),
                   lambda: client.fail_callback(callback_id, RuntimeError("late")),
                   lambda: client.heartbeat_callback(callback_id)):
        with pytest.raises(DurableServiceError) as info:
            settle()
        assert not info.value.retryable and info.value.status_code == 404


# -- the client without the runner ----------------------------------------------------------------

class _ClientError(Exception):
    """What botocore raises: an exception with a ``response`` dict."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"An error occurred ({code or status}): {message}")
        error = {"Message": message}
        if code is not None:
            error["Code"] = code
        self.response = {"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}


@pytest.mark.parametrize(("status", "code", "message", "kind"), [
    (400, "InvalidParameterValueException", "Invalid checkpoint token", "fenced"),
    (400, None, "Invalid checkpoint token", "fenced"),
    (429, "TooManyRequestsException", "Rate exceeded", "retry"),
    (400, "ThrottlingException", "slow down", "retry"),
    (500, "ServiceException", "internal", "retry"),
    (503, None, "unavailable", "retry"),
    (400, "InvalidParameterValueException", "Invalid action for the given operation type.", "execution"),
    (404, "ResourceNotFoundException", "no such execution", "execution"),
    (502, "KMSAccessDeniedException", "key", "execution"),
])
def test_checkpoint_errors_are_classified(status: int, code: str | None, message: str, kind: str) -> None:
    error = classify_service_error(_ClientError(status, code, message), "CheckpointDurableExecution")
    if kind == "fenced":
        assert isinstance(error, CheckpointError)
    else:
        assert isinstance(error, DurableServiceError)
        assert error.retryable is (kind == "retry")
        assert error.category == ("INVOCATION" if kind == "retry" else "EXECUTION")
        assert error.status_code == status


def test_a_network_error_retries_the_invocation() -> None:
    error = classify_service_error(ConnectionError("connection refused"), "GetDurableExecutionState")
    assert isinstance(error, DurableServiceError) and error.retryable and error.status_code is None


class _StubLambda:
    """A boto3 Lambda client stand-in: records calls, answers from scripted pages or raises."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.checkpoint_answer: dict[str, Any] = {"CheckpointToken": "t2", "NewExecutionState": {"Operations": []}}
        self.state_pages: dict[str, dict[str, Any]] = {}
        self.raise_on_checkpoint: Exception | None = None

    def checkpoint_durable_execution(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("checkpoint", kwargs))
        if self.raise_on_checkpoint is not None:
            raise self.raise_on_checkpoint
        return self.checkpoint_answer

    def get_durable_execution_state(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("state", kwargs))
        return self.state_pages[kwargs.get("Marker", "")]


def _op(i: int, **extra: Any) -> dict[str, Any]:
    from datetime import datetime, timezone

    return {"Id": f"op{i}", "Type": "STEP", "Status": "SUCCEEDED", "Name": f"s{i}",
            "StartTimestamp": datetime(2026, 1, 1, tzinfo=timezone.utc), "StepDetails": {"Attempt": 1,
                                                                                        "Result": str(i)}, **extra}


def test_get_execution_state_pages_through_next_marker() -> None:
    stub = _StubLambda()
    stub.state_pages = {"": {"Operations": [_op(1), _op(2)], "NextMarker": "m2"},
                        "m2": {"Operations": [_op(3)], "NextMarker": ""}}
    client = AWSDurableExecutionClient(stub)
    ops = client.get_all_operations("arn", "tok")
    assert [o.id for o in ops] == ["op1", "op2", "op3"]
    assert [o.result for o in ops] == ["1", "2", "3"]
    assert [c[1].get("Marker") for c in stub.calls] == [None, "m2"]


def test_the_wrapper_pages_the_initial_state_through_the_client() -> None:
    stub = _StubLambda()
    stub.state_pages = {"m1": {"Operations": [_op(2)], "NextMarker": ""}}
    seen: list[Any] = []

    def handler(event: Any, ctx: Any) -> Any:
        seen.append(event)
        return "done"

    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=AWSDurableExecutionClient(stub)))
    execution = {"Id": "exec", "Type": "EXECUTION", "Status": "STARTED", "StartTimestamp": 1767225600000,
                 "ExecutionDetails": {"InputPayload": '{"k": 1}'}}
    out = wrapped({"DurableExecutionArn": "arn", "CheckpointToken": "t1",
                   "InitialExecutionState": {"Operations": [execution], "NextMarker": "m1"}})
    assert out.status.value == "SUCCEEDED" and seen == [{"k": 1}]
    assert stub.calls[0] == ("state", {"DurableExecutionArn": "arn", "CheckpointToken": "t1", "MaxItems": 1000,
                                       "Marker": "m1"})


def test_checkpoint_sends_the_lambda_shapes_and_reads_service_ids() -> None:
    stub = _StubLambda()
    stub.checkpoint_answer = {"CheckpointToken": "t2", "NewExecutionState": {"Operations": [
        {"Id": "cb", "Type": "CALLBACK", "Status": "STARTED", "StartTimestamp": 1767225600000,
         "CallbackDetails": {"CallbackId": "service-issued"}}]}}
    client = AWSDurableExecutionClient(stub)
    out = client.checkpoint("arn", "t1", [
        OperationUpdate("w", OperationType.WAIT, OperationAction.START, name="pause", wait_seconds=1.2),
        OperationUpdate("cb", OperationType.CALLBACK, OperationAction.START, timeout_seconds=30.0),
        OperationUpdate("s", OperationType.STEP, OperationAction.RETRY, next_attempt_delay_seconds=0.5,
                        error=ErrorObject(type="ValueError", message="bad")),
    ])
    assert out.checkpoint_token == "t2"
    assert [(o.id, o.callback_id, o.start_timestamp) for o in out.operations] == [("cb", "service-issued",
                                                                                    1767225600.0)]
    updates = stub.calls[0][1]["Updates"]
    assert updates == [
        {"Id": "w", "Type": "WAIT", "Action": "START", "Name": "pause", "WaitOptions": {"WaitSeconds": 2}},
        {"Id": "cb", "Type": "CALLBACK", "Action": "START",
         "CallbackOptions": {"TimeoutSeconds": 30, "HeartbeatTimeoutSeconds": 0}},
        {"Id": "s", "Type": "STEP", "Action": "RETRY", "Error": {"ErrorType": "ValueError", "ErrorMessage": "bad"},
         "StepOptions": {"NextAttemptDelaySeconds": 1}},
    ]


def test_chained_invoke_and_wait_answers_are_read_in_the_lambda_names() -> None:
    from datetime import datetime, timezone

    stub = _StubLambda()
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    stub.checkpoint_answer = {"CheckpointToken": "t2", "NewExecutionState": {"Operations": [
        {"Id": "i", "Type": "CHAINED_INVOKE", "Status": "SUCCEEDED", "StartTimestamp": when,
         "ChainedInvokeDetails": {"Result": "400"}},
        {"Id": "w", "Type": "WAIT", "Status": "STARTED", "StartTimestamp": when,
         "WaitDetails": {"ScheduledEndTimestamp": datetime(2026, 1, 1, 0, 0, 2, tzinfo=timezone.utc)}}]}}
    out = AWSDurableExecutionClient(stub).checkpoint("arn", "t1", [OperationUpdate(
        "i", OperationType.CHAINED_INVOKE, OperationAction.START, payload='{"n":1}', function_name="child")])
    assert stub.calls[0][1]["Updates"] == [{"Id": "i", "Type": "CHAINED_INVOKE", "Action": "START",
                                            "Payload": '{"n":1}', "ChainedInvokeOptions": {"FunctionName": "child"}}]
    invoke, wait = out.operations
    assert invoke.type is OperationType.CHAINED_INVOKE and invoke.result == "400"
    assert wait.scheduled_timestamp == when.timestamp() + 2


def test_a_rejected_checkpoint_fails_the_execution_and_a_throttled_one_the_invocation() -> None:
    def handler(event: Any, ctx: Any) -> Any:
        return ctx.step(lambda _: 1, name="one")

    inp = {"DurableExecutionArn": "arn", "CheckpointToken": "t1", "InitialExecutionState": {"Operations": [
        {"Id": "exec", "Type": "EXECUTION", "Status": "STARTED", "StartTimestamp": 1767225600000,
         "ExecutionDetails": {"InputPayload": "{}"}}]}}
    stub = _StubLambda()
    wrapped = with_durable_execution(handler, DurableExecutionConfig(client=AWSDurableExecutionClient(stub)))

    stub.raise_on_checkpoint = _ClientError(400, "InvalidParameterValueException", "Invalid action.")
    out = wrapped(inp)
    assert out.status.value == "FAILED" and out.error is not None
    assert out.error.type == "ExecutionError" and "Invalid action." in (out.error.message or "")

    stub.raise_on_checkpoint = _ClientError(429, "TooManyRequestsException", "Rate exceeded")
    with pytest.raises(DurableServiceError) as info:
        wrapped(inp)
    assert info.value.retryable

    stub.raise_on_checkpoint = _ClientError(400, "ThrottlingException", "slow down")  # a 4xx, yet throttling
    with pytest.raises(DurableServiceError):
        wrapped(inp)

    stub.raise_on_checkpoint = ConnectionError("connection reset")
    with pytest.raises(DurableServiceError):
        wrapped(inp)

    stub.raise_on_checkpoint = _ClientError(400, "InvalidParameterValueException", "Invalid checkpoint token")
    with pytest.raises(CheckpointError):
        wrapped(inp)
