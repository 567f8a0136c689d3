"""The Lambda durable-execution wire shapes (API version 2025-12-01), both directions, and the service's
rules for a checkpoint batch.

This is the one module that knows the JSON the service speaks: ``Operation``, ``OperationUpdate``,
``ErrorObject``, the invocation input and output, and the checkpoint and state answers. Everything else
works on the values of ``_values``. Reading tolerates fields it does not know (a newer service may add
some); writing emits only the model's fields.

Rules of the wire:

- operation types ``EXECUTION, CONTEXT, STEP, WAIT, CALLBACK, CHAINED_INVOKE``; details and options are
  ``ChainedInvokeDetails`` / ``ChainedInvokeOptions`` for a chained invoke;
- timestamps in the invocation input are epoch milliseconds (``datetime`` objects, as boto3 gives them,
  and ISO 8601 text are read too);
- ``WaitSeconds``, ``NextAttemptDelaySeconds``, ``TimeoutSeconds`` and ``HeartbeatTimeoutSeconds`` are
  integers (rounded up; a wait or a retry delay is at least one second);
- ``validate_updates`` checks a batch as the service does: the actions each type takes, one update per
  operation per batch (a START plus one more only for STEP and CONTEXT), ids of at most 64 of
  ``[A-Za-z0-9_-]``, a ``ParentId`` naming a CONTEXT, EXECUTION SUCCEED / FAIL last and alone.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from ._errors import InvalidCheckpointError
from ._values import (
    ErrorObject,
    Operation,
    OperationAction,
    OperationStatus,
    OperationSubType,
    OperationType,
    OperationUpdate,
)

#: The API version whose shapes this module speaks.
API_VERSION = "2025-12-01"

#: The id of the EXECUTION operation in invocation inputs this package builds.
EXECUTION_OPERATION_ID = "execution-root"

OPERATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: The details key of each operation type in ``Operation``.
DETAILS_KEY: Mapping[OperationType, str] = {
    OperationType.EXECUTION: "ExecutionDetails",
    OperationType.CONTEXT: "ContextDetails",
    OperationType.STEP: "StepDetails",
    OperationType.WAIT: "WaitDetails",
    OperationType.CALLBACK: "CallbackDetails",
    OperationType.CHAINED_INVOKE: "ChainedInvokeDetails",
}

#: The actions the service accepts for each operation type (the service completes waits, callbacks and
#: chained invokes itself).
VALID_ACTIONS: Mapping[OperationType, frozenset[OperationAction]] = {
    OperationType.EXECUTION: frozenset({OperationAction.SUCCEED, OperationAction.FAIL}),
    OperationType.CONTEXT: frozenset({OperationAction.START, OperationAction.SUCCEED, OperationAction.FAIL}),
    OperationType.STEP: frozenset({OperationAction.START, OperationAction.SUCCEED, OperationAction.FAIL,
                                   OperationAction.RETRY}),
    OperationType.WAIT: frozenset({OperationAction.START, OperationAction.CANCEL}),
    OperationType.CALLBACK: frozenset({OperationAction.START}),
    OperationType.CHAINED_INVOKE: frozenset({OperationAction.START}),
}


# -- scalars ---------------------------------------------------------------------------------------


def timestamp_to_wire(ts: float | None) -> int | None:
    """Epoch seconds → epoch milliseconds (an int)."""
    return None if ts is None else round(ts * 1000)


def timestamp_from_wire(value: Any) -> float | None:
    """Epoch seconds from the wire: epoch milliseconds (a number), a ``datetime`` or ISO 8601 text."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, (int, float)):
        return float(value) / 1000.0
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    text = str(value)
    try:
        return float(text) / 1000.0
    except ValueError:
        pass
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def seconds_to_wire(seconds: float | None, *, minimum: int = 0) -> int | None:
    """Whole seconds for an integer option: rounded up (never early), at least ``minimum``."""
    if seconds is None:
        return None
    return max(math.ceil(float(seconds) - 1e-9), minimum)


def _sub_type(value: Any) -> OperationSubType | None:
    if not value:
        return None
    try:
        return OperationSubType(value)
    except ValueError:
        return None  # a subtype of another SDK: kept out, the operation still replays by type and name


# -- errors ----------------------------------------------------------------------------------------


def error_to_wire(error: ErrorObject) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if error.message is not None:
        out["ErrorMessage"] = error.message
    if error.type is not None:
        out["ErrorType"] = error.type
    if error.data is not None:
        out["ErrorData"] = error.data
    if error.stack_trace is not None:
        out["StackTrace"] = [str(line) for line in error.stack_trace]
    return out


def error_from_wire(data: Mapping[str, Any] | None) -> ErrorObject | None:
    if not data:
        return None
    trace = data.get("StackTrace")
    return ErrorObject(type=data.get("ErrorType"), message=data.get("ErrorMessage"), data=data.get("ErrorData"),
                       stack_trace=[str(x) for x in trace] if trace is not None else None)


# -- operations ------------------------------------------------------------------------------------


def operation_to_wire(op: Operation) -> dict[str, Any]:
    """The ``Operation`` shape; timestamps in epoch milliseconds."""
    out: dict[str, Any] = {"Id": op.id, "Type": op.type.value, "Status": op.status.value}
    if op.parent_id:
        out["ParentId"] = op.parent_id
    if op.name:
        out["Name"] = op.name
    if op.sub_type:
        out["SubType"] = op.sub_type.value
    if op.start_timestamp is not None:
        out["StartTimestamp"] = timestamp_to_wire(op.start_timestamp)
    if op.end_timestamp is not None:
        out["EndTimestamp"] = timestamp_to_wire(op.end_timestamp)
    details: dict[str, Any] = {}
    if op.type is OperationType.EXECUTION:
        if op.input_payload is not None:
            details["InputPayload"] = op.input_payload
    elif op.type is OperationType.STEP:
        details["Attempt"] = op.attempt
        if op.next_attempt_timestamp is not None:
            details["NextAttemptTimestamp"] = timestamp_to_wire(op.next_attempt_timestamp)
    elif op.type is OperationType.WAIT:
        if op.scheduled_timestamp is not None:
            details["ScheduledEndTimestamp"] = timestamp_to_wire(op.scheduled_timestamp)
    elif op.type is OperationType.CALLBACK:
        if op.callback_id is not None:
            details["CallbackId"] = op.callback_id
    if op.type is not OperationType.EXECUTION and op.type is not OperationType.WAIT:
        if op.result is not None:
            details["Result"] = op.result
        if op.error is not None:
            details["Error"] = error_to_wire(op.error)
    out[DETAILS_KEY[op.type]] = details
    return out


def operation_from_wire(data: Mapping[str, Any]) -> Operation:
    """Read an ``Operation``; unknown fields are ignored.

    Raises:
        ValueError: ``Type`` or ``Status`` is not one the API defines, or ``Id`` is missing.
    """
    type_ = OperationType(data["Type"])
    d: Mapping[str, Any] = data.get(DETAILS_KEY[type_]) or {}
    if type_ is OperationType.CHAINED_INVOKE and not d:
        d = data.get("InvokeDetails") or {}  # written by errands-durable before the 2025-12-01 names
    kw: dict[str, Any] = {}
    if "Result" in d:
        kw["result"] = d["Result"]
    if d.get("Error"):
        kw["error"] = error_from_wire(d["Error"])
    if type_ is OperationType.EXECUTION:
        kw["input_payload"] = d.get("InputPayload")
    elif type_ is OperationType.STEP:
        kw["attempt"] = int(d.get("Attempt") or 0)
        kw["next_attempt_timestamp"] = timestamp_from_wire(d.get("NextAttemptTimestamp"))
    elif type_ is OperationType.WAIT:
        kw["scheduled_timestamp"] = timestamp_from_wire(d.get("ScheduledEndTimestamp"))
    elif type_ is OperationType.CALLBACK:
        kw["callback_id"] = d.get("CallbackId")
    elif type_ is OperationType.CHAINED_INVOKE and d.get("DurableExecutionArn"):
        kw["child_execution_id"] = d["DurableExecutionArn"]
    return Operation(
        id=str(data["Id"]), type=type_, status=OperationStatus(data["Status"]), parent_id=data.get("ParentId"),
        name=data.get("Name"), sub_type=_sub_type(data.get("SubType")),
        start_timestamp=timestamp_from_wire(data.get("StartTimestamp")),
        end_timestamp=timestamp_from_wire(data.get("EndTimestamp")), **kw,
    )


# -- updates ---------------------------------------------------------------------------------------


def update_to_wire(u: OperationUpdate) -> dict[str, Any]:
    """The ``OperationUpdate`` shape: integer seconds in the options; no callback id (the service issues
    it) and no child execution id (the service names the chained execution)."""
    out: dict[str, Any] = {"Id": u.operation_id, "Type": u.operation_type.value, "Action": u.action.value}
    if u.parent_id:
        out["ParentId"] = u.parent_id
    if u.name:
        out["Name"] = u.name
    if u.sub_type:
        out["SubType"] = u.sub_type.value
    if u.payload is not None:
        out["Payload"] = u.payload
    if u.error is not None:
        out["Error"] = error_to_wire(u.error)
    if u.operation_type is OperationType.WAIT and u.action is OperationAction.START:
        out["WaitOptions"] = {"WaitSeconds": seconds_to_wire(u.wait_seconds or 0, minimum=1)}
    if u.operation_type is OperationType.STEP and u.action is OperationAction.RETRY:
        out["StepOptions"] = {"NextAttemptDelaySeconds": seconds_to_wire(u.next_attempt_delay_seconds or 0,
                                                                         minimum=1)}
    if u.operation_type is OperationType.CALLBACK and u.action is OperationAction.START and (
            u.timeout_seconds or u.heartbeat_timeout_seconds):
        out["CallbackOptions"] = {"TimeoutSeconds": seconds_to_wire(u.timeout_seconds or 0),
                                  "HeartbeatTimeoutSeconds": seconds_to_wire(u.heartbeat_timeout_seconds or 0)}
    if u.operation_type is OperationType.CHAINED_INVOKE and u.action is OperationAction.START:
        opts: dict[str, Any] = {"FunctionName": u.function_name}
        if u.tenant_id is not None:
            opts["TenantId"] = u.tenant_id
        out["ChainedInvokeOptions"] = opts
    return out


def update_from_wire(data: Mapping[str, Any]) -> OperationUpdate:
    """Read an ``OperationUpdate``; unknown fields are ignored.

    Raises:
        ValueError: ``Type`` or ``Action`` is not one the API defines.
    """
    type_ = OperationType(data["Type"])
    wait = data.get("WaitOptions") or {}
    step = data.get("StepOptions") or {}
    cb = data.get("CallbackOptions") or {}
    inv = data.get("ChainedInvokeOptions") or data.get("InvokeOptions") or {}
    return OperationUpdate(
        operation_id=str(data["Id"]), operation_type=type_, action=OperationAction(data["Action"]),
        parent_id=data.get("ParentId"), name=data.get("Name"), sub_type=_sub_type(data.get("SubType")),
        payload=data.get("Payload"), error=error_from_wire(data.get("Error")),
        wait_seconds=_num(wait.get("WaitSeconds")), next_attempt_delay_seconds=_num(step.get("NextAttemptDelaySeconds")),
        timeout_seconds=_num(cb.get("TimeoutSeconds")) or None,
        heartbeat_timeout_seconds=_num(cb.get("HeartbeatTimeoutSeconds")) or None,
        function_name=inv.get("FunctionName"), tenant_id=inv.get("TenantId"),
    )


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def wire_update(u: OperationUpdate) -> OperationUpdate:
    """``u`` as the service receives it: through the wire and back (integer seconds, no SDK-side ids)."""
    out = update_from_wire(update_to_wire(u))
    # The chained execution's name is the service's to choose; ours is derived the same way on every path.
    if u.child_execution_id is not None:
        from dataclasses import replace

        out = replace(out, child_execution_id=u.child_execution_id)
    return out


# -- the service's rules for a batch ----------------------------------------------------------------


def validate_updates(updates: Sequence[OperationUpdate], operations: Mapping[str, Operation]) -> None:
    """Check one checkpoint batch against the service's rules, given the execution's ``operations``.

    Raises:
        InvalidCheckpointError: the batch breaks a rule (the message says which); nothing is applied.
    """
    if not updates:
        return
    execution_updates = [i for i, u in enumerate(updates) if u.operation_type is OperationType.EXECUTION]
    if len(execution_updates) > 1:
        raise InvalidCheckpointError("Cannot checkpoint multiple EXECUTION updates.")
    if execution_updates and execution_updates[0] != len(updates) - 1:
        raise InvalidCheckpointError("EXECUTION checkpoint must be the last update.")
    started: dict[str, OperationUpdate] = {}
    last: dict[str, OperationUpdate] = {}
    for u in updates:
        if not OPERATION_ID.fullmatch(u.operation_id):
            raise InvalidCheckpointError(f"Invalid operation id {u.operation_id!r}: at most 64 of [A-Za-z0-9_-].")
        prev = last.get(u.operation_id)
        if prev is not None and not (prev.operation_type in (OperationType.STEP, OperationType.CONTEXT)
                                     and prev.action is OperationAction.START
                                     and u.action is not OperationAction.START):
            raise InvalidCheckpointError("Cannot checkpoint multiple operations with the same ID.")
        if u.parent_id is not None:
            parent = started.get(u.parent_id)
            parent_type = parent.operation_type if parent is not None else (
                operations[u.parent_id].type if u.parent_id in operations else None)
            if parent_type is not OperationType.CONTEXT:
                raise InvalidCheckpointError(f"Invalid parent operation id {u.parent_id!r}: it must name a CONTEXT.")
        if u.action not in VALID_ACTIONS[u.operation_type]:
            raise InvalidCheckpointError(
                f"Invalid action {u.action.value} for a {u.operation_type.value} operation "
                f"(it takes {', '.join(sorted(a.value for a in VALID_ACTIONS[u.operation_type]))}).")
        current = operations.get(u.operation_id)
        if prev is not None and prev.action is OperationAction.START:
            current = None  # started in this batch: the second update closes what the first opened
        _check_transition(u, current)
        if u.action is OperationAction.START:
            started[u.operation_id] = u
        last[u.operation_id] = u


def _check_transition(u: OperationUpdate, current: Operation | None) -> None:
    t, action = u.operation_type, u.action
    if current is not None:
        if current.type is not t:
            raise InvalidCheckpointError("Inconsistent operation type.")
        if u.sub_type is not None and current.sub_type is not None and u.sub_type is not current.sub_type:
            raise InvalidCheckpointError("Inconsistent operation subtype.")
        if u.name is not None and u.name != current.name:
            raise InvalidCheckpointError("Inconsistent operation name.")
        if u.parent_id is not None and u.parent_id != current.parent_id:
            raise InvalidCheckpointError("Inconsistent parent operation id.")
    if action is OperationAction.FAIL and u.payload is not None:
        raise InvalidCheckpointError("Cannot provide a Payload for FAIL action.")
    if action is OperationAction.SUCCEED and u.error is not None:
        raise InvalidCheckpointError("Cannot provide an Error for SUCCEED action.")
    if t is OperationType.STEP:
        if current is None:
            return
        if action is OperationAction.START and current.status is not OperationStatus.READY:
            raise InvalidCheckpointError(f"Invalid current STEP state to start: {current.status.value}.")
        if action in (OperationAction.SUCCEED, OperationAction.FAIL, OperationAction.RETRY) and current.status not in (
                OperationStatus.STARTED, OperationStatus.READY):
            raise InvalidCheckpointError(f"Invalid current STEP state to close: {current.status.value}.")
        if action is OperationAction.RETRY and u.error is not None and u.payload is not None:
            raise InvalidCheckpointError("Cannot provide both error and payload to RETRY a STEP.")
    elif t in (OperationType.CONTEXT, OperationType.WAIT, OperationType.CALLBACK, OperationType.CHAINED_INVOKE):
        if action is OperationAction.START and current is not None:
            raise InvalidCheckpointError(f"Cannot start a {t.value} that already exists.")
        if action is not OperationAction.START:
            # a CONTEXT may be closed without a START checkpointed (the service creates it); a WAIT is
            # cancelled only while it runs
            missing_ok = t is OperationType.CONTEXT and current is None
            if not missing_ok and (current is None or current.status is not OperationStatus.STARTED):
                raise InvalidCheckpointError(f"Invalid current {t.value} state for {action.value}.")
        if t is OperationType.CHAINED_INVOKE and not u.function_name:
            raise InvalidCheckpointError("Update for CHAINED_INVOKE operation requires ChainedInvokeOptions.")


def advance(op: Operation, now: float) -> Operation:
    """What the service does to ``op`` by ``now`` on its own: a due wait SUCCEEDS, a step whose retry
    delay has passed is READY. Other operations are returned as they are."""
    from dataclasses import replace

    if op.type is OperationType.WAIT and op.status is OperationStatus.STARTED and (
            op.scheduled_timestamp or 0.0) <= now:
        return replace(op, status=OperationStatus.SUCCEEDED, end_timestamp=max(now, op.scheduled_timestamp or now))
    if op.type is OperationType.STEP and op.status is OperationStatus.PENDING and (
            op.next_attempt_timestamp or 0.0) <= now:
        return replace(op, status=OperationStatus.READY)
    if op.type is OperationType.CALLBACK and op.status is OperationStatus.STARTED:
        deadline = callback_deadline(op)
        if deadline is not None and deadline <= now:
            error = ErrorObject(type="CallbackTimeoutError", message=f"callback {op.name or op.id} timed out")
            return replace(op, status=OperationStatus.TIMED_OUT, error=error, end_timestamp=now)
    return op


def callback_deadline(op: Operation) -> float | None:
    """When a callback times out: its timeout, or its heartbeat timeout after the last heartbeat."""
    deadlines = [t for t in (op.timeout_timestamp,) if t is not None]
    if op.heartbeat_timeout:
        deadlines.append((op.heartbeat_timestamp or op.start_timestamp or 0.0) + op.heartbeat_timeout)
    return min(deadlines) if deadlines else None


def advance_all(operations: Mapping[str, Operation], now: float) -> dict[str, Operation]:
    """The operations that ``advance`` changes by ``now``, by id."""
    out: dict[str, Operation] = {}
    for op in operations.values():
        moved = advance(op, now)
        if moved is not op:
            out[op.id] = moved
    return out


# -- invocation input and output, service answers ----------------------------------------------------


def state_from_wire(data: Mapping[str, Any] | None) -> tuple[list[Operation], str]:
    """``InitialExecutionState`` / ``NewExecutionState`` / a ``GetDurableExecutionState`` page:
    (operations, next marker)."""
    data = data or {}
    return [operation_from_wire(o) for o in data.get("Operations") or []], str(data.get("NextMarker") or "")


def state_to_wire(operations: Sequence[Operation], next_marker: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"Operations": [operation_to_wire(o) for o in operations]}
    if next_marker:
        out["NextMarker"] = next_marker
    return out


def checkpoint_request_to_wire(durable_execution_arn: str, checkpoint_token: str,
                               updates: Sequence[OperationUpdate], client_token: str | None = None) -> dict[str, Any]:
    """The ``CheckpointDurableExecution`` request (boto3's keyword arguments)."""
    out: dict[str, Any] = {"DurableExecutionArn": durable_execution_arn, "CheckpointToken": checkpoint_token,
                           "Updates": [update_to_wire(u) for u in updates]}
    if client_token is not None:
        out["ClientToken"] = client_token
    return out


def checkpoint_response_from_wire(data: Mapping[str, Any]) -> tuple[str, list[Operation], str]:
    """The ``CheckpointDurableExecution`` answer: (next token, the operations it changed, next marker).
    The changed operations carry what the service issued (a callback's ``CallbackId``)."""
    ops, marker = state_from_wire(data.get("NewExecutionState"))
    return str(data.get("CheckpointToken") or ""), ops, marker


#: Error codes the service answers with that no retry can fix (a KMS key the function cannot use).
NON_RETRYABLE_CODES = frozenset({"KMSAccessDeniedException", "KMSDisabledException", "KMSInvalidStateException",
                                 "KMSNotFoundException"})


def checkpoint_error_category(exc: BaseException) -> str:
    """``"EXECUTION"`` when a failed checkpoint call can never succeed (the execution must fail), else
    ``"INVOCATION"`` (the invocation fails and Lambda retries it).

    A batch the service refuses by its rules (``InvalidCheckpointError``), a non-retryable error code, and
    a 4xx answer are execution-level, except throttling (429) and a stale checkpoint token
    (``InvalidParameterValueException`` "Invalid checkpoint token ..."), as are 5xx answers and network
    errors, which are invocation-level. botocore's ``ClientError`` is read through its ``response``; an
    error with a boolean ``retryable`` (``DurableServiceError``) was classified by its client already.
    """
    if isinstance(exc, InvalidCheckpointError):
        return "EXECUTION"
    retryable = getattr(exc, "retryable", None)
    if isinstance(retryable, bool):  # classified already by the client that raised it
        return "INVOCATION" if retryable else "EXECUTION"
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return "INVOCATION"
    error = response.get("Error") or {}
    code = str(error.get("Code") or "")
    if code in NON_RETRYABLE_CODES:
        return "EXECUTION"
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    if isinstance(status, int) and 400 <= status < 500 and status != 429 and error and not (
            code == "InvalidParameterValueException"
            and str(error.get("Message") or "").startswith("Invalid checkpoint token")):
        return "EXECUTION"
    return "INVOCATION"
