"""The AWS Lambda durable-execution API as a checkpoint client: ``AWSDurableExecutionClient`` (boto3).

It speaks ``CheckpointDurableExecution`` and ``GetDurableExecutionState`` for ``with_durable_execution``,
sorts the service's errors into what the invocation must do about them, and settles callbacks with the
``SendDurableExecutionCallback*`` calls. boto3 comes with the ``aws`` extra
(``pip install "errands-durable[aws]"``) and is imported only when a client is made.
"""

from __future__ import annotations

import json
import math
import threading
from datetime import datetime
from typing import Any, Mapping, Sequence

from errands.core import Clock, ConfigError, SystemClock

from ._errors import CheckpointError, DurableError
from ._lambda import CheckpointOutput, StateOutput
from ._values import (
    ErrorObject,
    Operation,
    OperationStatus,
    OperationSubType,
    OperationType,
    OperationUpdate,
)

__all__ = ["AWSDurableExecutionClient", "DurableServiceError", "classify_service_error"]

# The service's error codes that no retry can fix (a KMS key the function cannot use), as AWS's SDK treats them.
_EXECUTION_LEVEL_CODES = frozenset({
    "KMSAccessDeniedException", "KMSDisabledException", "KMSInvalidStateException", "KMSNotFoundException",
})
_THROTTLING_CODES = frozenset({
    "TooManyRequestsException", "ThrottlingException", "Throttling", "RequestLimitExceeded",
})
_INVALID_TOKEN_PREFIX = "Invalid checkpoint token"


class DurableServiceError(DurableError):
    """A call to the durable-execution API failed, for a reason other than a stale checkpoint token.

    Attributes:
        operation: the API call (``CheckpointDurableExecution``, ...).
        code: the service's error code (``TooManyRequestsException``, ...), if it sent one.
        status_code: the HTTP status, if a response came back.
        retryable: True for throttling, 5xx and network errors: the invocation fails and Lambda retries it
            (AWS's invocation-level error). False for validation and KMS errors, which no retry can fix:
            ``with_durable_execution`` fails the execution with this error instead (execution-level).
    """

    def __init__(self, message: str, *, operation: str, code: str | None = None, status_code: int | None = None,
                 retryable: bool = True, response: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.operation = operation
        self.code = code
        self.status_code = status_code
        self.retryable = retryable
        #: botocore's parsed error response (``Error``, ``ResponseMetadata``), when there was one.
        self.response = response

    @property
    def category(self) -> str:
        """``INVOCATION`` (retry the invocation) or ``EXECUTION`` (fail the execution)."""
        return "INVOCATION" if self.retryable else "EXECUTION"

    def to_error_object(self) -> ErrorObject:
        return ErrorObject(type=type(self).__name__, message=str(self),
                           data=json.dumps({"Operation": self.operation, "Code": self.code,
                                            "StatusCode": self.status_code}))


def classify_service_error(exc: BaseException, operation: str) -> CheckpointError | DurableServiceError:
    """What an error of a durable-execution API call means for the invocation.

    - an invalid (stale or superseded) checkpoint token: ``CheckpointError`` — the invocation is fenced out;
      the next invocation gets a fresh token;
    - throttling (429), 5xx and network errors: ``DurableServiceError(retryable=True)`` — retry the invocation;
    - other 4xx (validation) and KMS errors: ``DurableServiceError(retryable=False)`` — execution-level.
    """
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error") or {}
        meta = response.get("ResponseMetadata") or {}
        status = meta.get("HTTPStatusCode")
        status = int(status) if status else None
        code = str(error.get("Code") or "") or None
        message = str(error.get("Message") or error.get("message") or exc)
        if code is not None and code.isdigit():
            # A body without a type header: botocore reports the status as the code.
            code = None
        if message.startswith(_INVALID_TOKEN_PREFIX) and (status is None or 400 <= status < 500):
            return CheckpointError(f"{operation}: {message}")
        if code in _EXECUTION_LEVEL_CODES:
            retryable = False
        elif status == 429 or code in _THROTTLING_CODES:
            retryable = True
        elif status is not None and 400 <= status < 500:
            retryable = False
        else:
            retryable = True
        return DurableServiceError(f"{operation} failed ({code or status}): {message}", operation=operation,
                                   code=code, status_code=status, retryable=retryable, response=response)
    # No response: the connection failed or timed out (botocore's ConnectionError, ReadTimeoutError, ...).
    return DurableServiceError(f"{operation} failed: {type(exc).__name__}: {exc}", operation=operation,
                               retryable=True)


# -- the Lambda API's shapes --------------------------------------------------------------------------

def _seconds(value: float | None) -> int:
    """The API's integer seconds: a fraction rounds up, so a wait never ends early."""
    return max(0, math.ceil(value or 0))


def _wire_type(t: OperationType) -> str:
    return "CHAINED_INVOKE" if t.value in ("INVOKE", "CHAINED_INVOKE") else t.value


def _error_to_service(error: ErrorObject) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if error.type is not None:
        out["ErrorType"] = error.type
    if error.message is not None:
        out["ErrorMessage"] = error.message
    if error.data is not None:
        out["ErrorData"] = error.data
    if error.stack_trace:
        out["StackTrace"] = [str(line) for line in error.stack_trace]
    return out


def update_to_service(u: OperationUpdate) -> dict[str, Any]:
    """An ``OperationUpdate`` as the ``Updates`` member of ``CheckpointDurableExecution`` takes it."""
    out: dict[str, Any] = {"Id": u.operation_id, "Type": _wire_type(u.operation_type), "Action": u.action.value}
    if u.parent_id:
        out["ParentId"] = u.parent_id
    if u.name:
        out["Name"] = u.name
    if u.sub_type:
        out["SubType"] = u.sub_type.value
    if u.payload is not None:
        out["Payload"] = u.payload
    if u.error is not None:
        out["Error"] = _error_to_service(u.error)
    if u.wait_seconds is not None:
        out["WaitOptions"] = {"WaitSeconds": _seconds(u.wait_seconds)}
    if u.next_attempt_delay_seconds is not None:
        out["StepOptions"] = {"NextAttemptDelaySeconds": _seconds(u.next_attempt_delay_seconds)}
    if u.timeout_seconds is not None or u.heartbeat_timeout_seconds is not None:
        options: dict[str, int] = {}
        if u.timeout_seconds:
            options["TimeoutSeconds"] = _seconds(u.timeout_seconds)
        if u.heartbeat_timeout_seconds:
            options["HeartbeatTimeoutSeconds"] = _seconds(u.heartbeat_timeout_seconds)
        out["CallbackOptions"] = options
    if u.function_name is not None:
        out["ChainedInvokeOptions"] = {"FunctionName": u.function_name}
    return out


def _timestamp(value: Any) -> float | None:
    """boto3 gives ``datetime``s; the invocation JSON gives epoch milliseconds."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value) / 1000.0
    return datetime.fromisoformat(str(value)).timestamp()


def _operation_type(value: str) -> OperationType:
    try:
        return OperationType(value)
    except ValueError:
        if value == "CHAINED_INVOKE":
            return OperationType("INVOKE")
        raise


def _sub_type(value: Any) -> OperationSubType | None:
    if not value:
        return None
    try:
        return OperationSubType(value)
    except ValueError:
        return None


def operation_from_service(data: Mapping[str, Any]) -> Operation:
    """An ``Operation`` of a ``GetDurableExecutionState`` or ``CheckpointDurableExecution`` answer."""
    type_ = _operation_type(str(data["Type"]))
    kw: dict[str, Any] = {}
    details: Mapping[str, Any] = {}
    for key in ("ExecutionDetails", "ContextDetails", "StepDetails", "WaitDetails", "CallbackDetails",
                "ChainedInvokeDetails"):
        if data.get(key):
            details = data[key]
            break
    if details.get("Error"):
        kw["error"] = ErrorObject.from_dict(details["Error"])
    if details.get("Result") is not None:
        kw["result"] = details["Result"]
    if "InputPayload" in details:
        kw["input_payload"] = details.get("InputPayload")
    if "Attempt" in details:
        kw["attempt"] = int(details.get("Attempt") or 0)
    if details.get("NextAttemptTimestamp") is not None:
        kw["next_attempt_timestamp"] = _timestamp(details["NextAttemptTimestamp"])
    if details.get("ScheduledEndTimestamp") is not None:
        kw["scheduled_timestamp"] = _timestamp(details["ScheduledEndTimestamp"])
    if details.get("CallbackId") is not None:
        kw["callback_id"] = details["CallbackId"]
    return Operation(
        id=str(data["Id"]), type=type_, status=OperationStatus(data["Status"]), parent_id=data.get("ParentId"),
        name=data.get("Name"), sub_type=_sub_type(data.get("SubType")),
        start_timestamp=_timestamp(data.get("StartTimestamp")), end_timestamp=_timestamp(data.get("EndTimestamp")),
        **kw,
    )


# -- the client ---------------------------------------------------------------------------------------

class AWSDurableExecutionClient:
    """The Lambda durable-execution API through boto3: the checkpoint client ``with_durable_execution``
    uses on AWS.

    Args:
        lambda_client: a boto3 Lambda client; default ``boto3.client("lambda")`` made on first use (region,
            credentials and endpoint from the environment — ``AWS_ENDPOINT_URL_LAMBDA`` points it at a
            local runner), shared by the process's warm invocations.
        clock: the time source the invocation reads (default: the wall clock).

    Example:
        >>> from errands.durable import AWSDurableExecutionClient, DurableExecutionConfig, with_durable_execution
        >>> handler = with_durable_execution(my_function)          # on Lambda: picks this client
        >>> handler = with_durable_execution(my_function, DurableExecutionConfig(
        ...     client=AWSDurableExecutionClient(boto3.client("lambda", endpoint_url=url))))  # doctest: +SKIP

    Errors of every call are classified by ``classify_service_error``: a stale token raises
    ``CheckpointError`` (the invocation is fenced out), anything else ``DurableServiceError`` with
    ``retryable`` set for throttling, 5xx and network errors (Lambda retries the invocation) and clear for
    validation errors (the execution fails).
    """

    _shared: Any = None
    _shared_lock = threading.Lock()

    def __init__(self, lambda_client: Any = None, *, clock: Clock | None = None) -> None:
        self._lambda = lambda_client
        self.clock: Clock = clock or SystemClock()
        self.checkpoint_calls = 0

    @property
    def lambda_client(self) -> Any:
        """The boto3 Lambda client (made on first use when none was given)."""
        if self._lambda is None:
            with AWSDurableExecutionClient._shared_lock:
                if AWSDurableExecutionClient._shared is None:
                    AWSDurableExecutionClient._shared = _default_lambda_client()
                self._lambda = AWSDurableExecutionClient._shared
        return self._lambda

    # -- the checkpoint API ----------------------------------------------------------------------
    def checkpoint(self, durable_execution_arn: str, checkpoint_token: str, updates: Sequence[OperationUpdate],
                   client_token: str | None = None) -> CheckpointOutput:
        """``CheckpointDurableExecution``: send ``updates`` in order; the answer has the next token and the
        operations the service changed (with the ``CallbackId``s it issued), every page of them.

        Raises:
            CheckpointError: the token is stale (another invocation owns the execution).
            DurableServiceError: any other failure (``retryable`` says whether retrying can help).
        """
        kwargs: dict[str, Any] = {"DurableExecutionArn": durable_execution_arn, "CheckpointToken": checkpoint_token,
                                  "Updates": [update_to_service(u) for u in updates]}
        if client_token is not None:
            kwargs["ClientToken"] = client_token
        try:
            answer = self.lambda_client.checkpoint_durable_execution(**kwargs)
        except Exception as exc:
            raise classify_service_error(exc, "CheckpointDurableExecution") from exc
        self.checkpoint_calls += 1
        token = answer.get("CheckpointToken") or ""
        state = answer.get("NewExecutionState") or {}
        operations = [operation_from_service(o) for o in state.get("Operations") or []]
        marker = state.get("NextMarker") or ""
        while marker and token:
            page = self.get_execution_state(durable_execution_arn, token, marker)
            operations.extend(page.operations)
            marker = page.next_marker
        return CheckpointOutput(token, operations)

    def get_execution_state(self, durable_execution_arn: str, checkpoint_token: str, next_marker: str = "",
                            max_items: int = 1000) -> StateOutput:
        """``GetDurableExecutionState``: one page of the execution's operations after ``next_marker``.

        Raises:
            CheckpointError: the token is stale.
            DurableServiceError: any other failure.
        """
        kwargs: dict[str, Any] = {"DurableExecutionArn": durable_execution_arn, "CheckpointToken": checkpoint_token,
                                  "MaxItems": max_items}
        if next_marker:
            kwargs["Marker"] = next_marker
        try:
            answer = self.lambda_client.get_durable_execution_state(**kwargs)
        except Exception as exc:
            raise classify_service_error(exc, "GetDurableExecutionState") from exc
        return StateOutput([operation_from_service(o) for o in answer.get("Operations") or []],
                           answer.get("NextMarker") or "")

    def get_all_operations(self, durable_execution_arn: str, checkpoint_token: str, next_marker: str = ""
                           ) -> list[Operation]:
        """Every page of ``GetDurableExecutionState`` from ``next_marker`` on."""
        out: list[Operation] = []
        marker = next_marker
        while True:
            page = self.get_execution_state(durable_execution_arn, checkpoint_token, marker)
            out.extend(page.operations)
            marker = page.next_marker
            if not marker:
                return out

    def check_invoke(self, function_name: str) -> None:
        """Any function name may be invoked: the service resolves it (and fails the operation if it cannot)."""

    # -- callbacks (what the outside world calls) ------------------------------------------------
    def complete_callback(self, callback_id: str, payload: str | bytes | None = None) -> bool:
        """``SendDurableExecutionCallbackSuccess``: ``payload`` is the serialized result, sent as given
        (``'"approved"'`` is the JSON text of ``"approved"``), as with ``InMemoryClient``.

        Raises:
            DurableServiceError: the service refused it (an unknown, settled or timed-out callback is not
                ``retryable``).
        """
        if isinstance(payload, str):
            payload = payload.encode()
        elif payload is not None and not isinstance(payload, (bytes, bytearray)):
            raise ConfigError(f"complete_callback takes the serialized result (str), got {type(payload).__name__}; "
                              "pass json.dumps(value)", field="payload", value=type(payload).__name__)
        kwargs: dict[str, Any] = {"CallbackId": callback_id}
        if payload is not None:
            kwargs["Result"] = bytes(payload)
        self._call("SendDurableExecutionCallbackSuccess", self.lambda_client.send_durable_execution_callback_success,
                   **kwargs)
        return True

    def fail_callback(self, callback_id: str, error: ErrorObject | BaseException | Mapping[str, Any] | str) -> bool:
        """``SendDurableExecutionCallbackFailure`` with an ``ErrorObject`` (or one made from an exception, the
        API's ``ErrorObject`` shape or a message)."""
        if isinstance(error, ErrorObject):
            obj = error
        elif isinstance(error, BaseException):
            obj = ErrorObject.from_exception(error, with_trace=False)
        elif isinstance(error, Mapping):
            obj = ErrorObject.from_dict(error)
        else:
            obj = ErrorObject(type="CallbackError", message=str(error))
        self._call("SendDurableExecutionCallbackFailure", self.lambda_client.send_durable_execution_callback_failure,
                   CallbackId=callback_id, Error=_error_to_service(obj))
        return True

    def heartbeat_callback(self, callback_id: str) -> None:
        """``SendDurableExecutionCallbackHeartbeat``."""
        self._call("SendDurableExecutionCallbackHeartbeat",
                   self.lambda_client.send_durable_execution_callback_heartbeat, CallbackId=callback_id)

    @staticmethod
    def _call(operation: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:
            raise classify_service_error(exc, operation) from exc


def _default_lambda_client() -> Any:
    try:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('AWSDurableExecutionClient needs boto3: pip install "errands-durable[aws]"') from exc
    return boto3.client("lambda", config=Config(connect_timeout=5, read_timeout=50,
                                                retries={"max_attempts": 3, "mode": "standard"}))
