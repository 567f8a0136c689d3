"""The AWS Lambda durable-execution API as a checkpoint client: ``AWSDurableExecutionClient`` (boto3).

It speaks ``CheckpointDurableExecution`` and ``GetDurableExecutionState`` for ``with_durable_execution``,
sorts the service's errors into what the invocation must do about them, and settles callbacks with the
``SendDurableExecutionCallback*`` calls. boto3 comes with the ``aws`` extra
(``pip install "errands-durable[aws]"``) and is imported only when a client is made.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Mapping, Sequence

from errands.core import Clock, ConfigError, SystemClock

from ._errors import CheckpointError, InvocationError
from ._lambda import CheckpointOutput, StateOutput
from ._values import ErrorObject, Operation, OperationUpdate, TerminationReason
from ._wire import (
    NON_RETRYABLE_CODES,
    checkpoint_request_to_wire,
    checkpoint_response_from_wire,
    error_to_wire,
    state_from_wire,
)

__all__ = ["AWSDurableExecutionClient", "DurableServiceError", "classify_service_error"]

_THROTTLING_CODES = frozenset({
    "TooManyRequestsException", "ThrottlingException", "Throttling", "RequestLimitExceeded",
})
_INVALID_TOKEN_PREFIX = "Invalid checkpoint token"


class DurableServiceError(InvocationError):
    """A call to the durable-execution API failed, for a reason other than a stale checkpoint token (AWS's
    ``BotoClientError``: an invocation-level error unless no retry can fix it).

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
        super().__init__(message, TerminationReason.CHECKPOINT_FAILED)
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
        if code in NON_RETRYABLE_CODES:
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
        kwargs = checkpoint_request_to_wire(durable_execution_arn, checkpoint_token, updates, client_token)
        try:
            answer = self.lambda_client.checkpoint_durable_execution(**kwargs)
        except Exception as exc:
            raise classify_service_error(exc, "CheckpointDurableExecution") from exc
        self.checkpoint_calls += 1
        token, operations, marker = checkpoint_response_from_wire(answer)
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
        operations, marker = state_from_wire(answer)
        return StateOutput(operations, marker)

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
                   CallbackId=callback_id, Error=error_to_wire(obj))
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
