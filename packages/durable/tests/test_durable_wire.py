"""The Lambda API wire shapes (2025-12-01) and the service's rules for a checkpoint batch."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from errands.durable import (
    ErrorObject,
    InvalidCheckpointError,
    Operation,
    OperationAction,
    OperationStatus,
    OperationSubType,
    OperationType,
    OperationUpdate,
)
from errands.durable._wire import (
    advance,
    operation_from_wire,
    operation_to_wire,
    seconds_to_wire,
    state_from_wire,
    timestamp_from_wire,
    update_from_wire,
    update_to_wire,
    validate_updates,
)

T = 1_700_000_000.0  # epoch seconds
MS = 1_700_000_000_000


def test_operation_types_are_the_api_names() -> None:
    assert [t.value for t in OperationType] == ["EXECUTION", "CONTEXT", "STEP", "WAIT", "CALLBACK", "CHAINED_INVOKE"]
    assert OperationType.INVOKE is OperationType.CHAINED_INVOKE  # deprecated alias
    assert OperationType("INVOKE") is OperationType.CHAINED_INVOKE  # rows stored under the old name


def test_timestamps_are_epoch_milliseconds_both_ways() -> None:
    op = Operation(id="w1", type=OperationType.WAIT, status=OperationStatus.STARTED, start_timestamp=T,
                   scheduled_timestamp=T + 30)
    wire = op.to_dict()
    assert wire == {"Id": "w1", "Type": "WAIT", "Status": "STARTED", "StartTimestamp": MS,
                    "WaitDetails": {"ScheduledEndTimestamp": MS + 30_000}}
    assert Operation.from_dict(wire) == op
    assert timestamp_from_wire(datetime.fromtimestamp(T, tz=timezone.utc)) == T  # boto3 gives datetimes
    assert timestamp_from_wire("2023-11-14T22:13:20+00:00") == T
    assert timestamp_from_wire(MS) == T


def test_a_pending_wait_in_the_api_shape_replays_pending() -> None:
    op = operation_from_wire({"Id": "w", "Type": "WAIT", "Status": "STARTED", "StartTimestamp": MS,
                              "WaitDetails": {"ScheduledEndTimestamp": MS + 30_000}})
    assert op.status is OperationStatus.STARTED and op.scheduled_end_timestamp == T + 30
    assert advance(op, T + 29).status is OperationStatus.STARTED
    done = advance(op, T + 30)
    assert done.status is OperationStatus.SUCCEEDED and done.end_timestamp == T + 30


def test_unknown_fields_are_tolerated() -> None:
    op = operation_from_wire({
        "Id": "s", "Type": "STEP", "Status": "SUCCEEDED", "SubType": "SomethingNew", "Shiny": 1,
        "StartTimestamp": MS, "StepDetails": {"Attempt": 2, "Result": "1", "Extra": True},
    })
    assert (op.result, op.attempt, op.sub_type) == ("1", 2, None)
    ops, marker = state_from_wire({"Operations": [operation_to_wire(op)], "NextMarker": "m", "More": 1})
    assert ops == [op] and marker == "m"
    u = update_from_wire({"Id": "s", "Type": "STEP", "Action": "SUCCEED", "Payload": "1", "Future": {}})
    assert u.payload == "1"


def test_chained_invoke_uses_the_chained_invoke_names() -> None:
    u = OperationUpdate(operation_id="i", operation_type=OperationType.CHAINED_INVOKE,
                        action=OperationAction.START, sub_type=OperationSubType.CHAINED_INVOKE, payload="{}",
                        function_name="fn", tenant_id="t1", child_execution_id="x/i")
    assert update_to_wire(u) == {"Id": "i", "Type": "CHAINED_INVOKE", "Action": "START", "SubType": "ChainedInvoke",
                                 "Payload": "{}", "ChainedInvokeOptions": {"FunctionName": "fn", "TenantId": "t1"}}
    op = Operation(id="i", type=OperationType.CHAINED_INVOKE, status=OperationStatus.SUCCEEDED, result='"r"')
    assert op.to_dict()["ChainedInvokeDetails"] == {"Result": '"r"'}
    old = {"Id": "i", "Type": "INVOKE", "Status": "SUCCEEDED", "InvokeDetails": {"Result": '"r"'}}
    assert operation_from_wire(old).result == '"r"'


def test_options_are_integer_seconds() -> None:
    wait = OperationUpdate(operation_id="w", operation_type=OperationType.WAIT, action=OperationAction.START,
                           wait_seconds=0.2)
    assert update_to_wire(wait)["WaitOptions"] == {"WaitSeconds": 1}
    retry = OperationUpdate(operation_id="s", operation_type=OperationType.STEP, action=OperationAction.RETRY,
                            next_attempt_delay_seconds=2.5, error=ErrorObject(type="E", message="m"))
    assert update_to_wire(retry)["StepOptions"] == {"NextAttemptDelaySeconds": 3}
    assert update_to_wire(retry)["Error"] == {"ErrorMessage": "m", "ErrorType": "E"}
    cb = OperationUpdate(operation_id="c", operation_type=OperationType.CALLBACK, action=OperationAction.START,
                         timeout_seconds=10.0, heartbeat_timeout_seconds=None, callback_id="never-sent")
    assert update_to_wire(cb) == {"Id": "c", "Type": "CALLBACK", "Action": "START",
                                  "CallbackOptions": {"TimeoutSeconds": 10, "HeartbeatTimeoutSeconds": 0}}
    assert seconds_to_wire(3.0) == 3 and seconds_to_wire(0) == 0


def _u(op_id: str, type_: OperationType, action: OperationAction, **kw: object) -> OperationUpdate:
    return OperationUpdate(operation_id=op_id, operation_type=type_, action=action, **kw)  # type: ignore[arg-type]


S, C, W, CB, X, INV = (OperationType.STEP, OperationType.CONTEXT, OperationType.WAIT, OperationType.CALLBACK,
                       OperationType.EXECUTION, OperationType.CHAINED_INVOKE)
START, SUCCEED, FAIL, RETRY, CANCEL = (OperationAction.START, OperationAction.SUCCEED, OperationAction.FAIL,
                                       OperationAction.RETRY, OperationAction.CANCEL)


@pytest.mark.parametrize("batch", [
    [_u("w", W, SUCCEED)],                                  # the service completes a wait
    [_u("c", CB, SUCCEED, payload="1")],                    # ... and a callback
    [_u("i", INV, START)],                                  # a chained invoke needs its options
    [_u("s", S, START), _u("s", S, START)],                 # one START per operation
    [_u("w", W, START, wait_seconds=1), _u("w", W, CANCEL)],  # START plus one more only for STEP, CONTEXT
    [_u("s", S, START), _u("s", S, SUCCEED), _u("s", S, SUCCEED)],
    [_u("bad id!", S, START)], [_u("x" * 65, S, START)],
    [_u("s", S, START, parent_id="nowhere")],
    [_u("w", W, START, wait_seconds=1), _u("s", S, START, parent_id="w")],  # a parent must be a CONTEXT
    [_u("root", X, SUCCEED, payload="1"), _u("s", S, START)],              # EXECUTION last
    [_u("root", X, SUCCEED), _u("root", X, FAIL)],
    [_u("s", S, FAIL, payload="1")], [_u("s", S, SUCCEED, error=ErrorObject(message="m"))],
])
def test_the_service_refuses_batches_that_break_its_rules(batch: list[OperationUpdate]) -> None:
    with pytest.raises(InvalidCheckpointError):
        validate_updates(batch, {})


def test_the_service_accepts_the_batches_the_sdk_sends() -> None:
    validate_updates([
        _u("c", C, START), _u("s", S, START, parent_id="c"), _u("s", S, SUCCEED, parent_id="c", payload="1"),
        _u("w", W, START, parent_id="c", wait_seconds=5), _u("cb", CB, START), _u("i", INV, START, function_name="f"),
        _u("c2", C, START), _u("c2", C, SUCCEED, payload="2"), _u("root", X, SUCCEED, payload="3"),
    ], {})


def test_transitions_follow_the_current_state() -> None:
    pending = Operation(id="s", type=S, status=OperationStatus.PENDING, attempt=1, next_attempt_timestamp=T + 5)
    with pytest.raises(InvalidCheckpointError):
        validate_updates([_u("s", S, START)], {"s": pending})  # not READY yet
    validate_updates([_u("s", S, START)], {"s": advance(pending, T + 5)})
    done = Operation(id="c", type=C, status=OperationStatus.SUCCEEDED)
    with pytest.raises(InvalidCheckpointError):
        validate_updates([_u("c", C, FAIL)], {"c": done})
    with pytest.raises(InvalidCheckpointError):
        validate_updates([_u("c", S, START)], {"c": done})  # another type under that id
    validate_updates([_u("s", S, START, parent_id="c")], {"c": done})
