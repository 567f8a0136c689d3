"""Values of the durable engine: operations in the AWS Durable Execution shapes, configs, batch results."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Generic, Mapping, TypeVar, cast

if TYPE_CHECKING:
    from ._retries import RetryDecision
    from ._serdes import Serdes

T = TypeVar("T")
R = TypeVar("R")


class _StrEnum(str, Enum):
    def __str__(self) -> str:
        return str(self.value)


class OperationType(_StrEnum):
    """The kind of a checkpointed operation (AWS ``OperationType``)."""

    EXECUTION = "EXECUTION"
    CONTEXT = "CONTEXT"
    STEP = "STEP"
    WAIT = "WAIT"
    CALLBACK = "CALLBACK"
    CHAINED_INVOKE = "CHAINED_INVOKE"
    #: Deprecated alias of ``CHAINED_INVOKE`` (the name before the 2025-12-01 API).
    INVOKE = "CHAINED_INVOKE"

    @classmethod
    def _missing_(cls, value: object) -> OperationType | None:
        return cls.CHAINED_INVOKE if value == "INVOKE" else None  # rows stored before the rename


class OperationSubType(_StrEnum):
    """The context operation that produced an operation (AWS ``OperationSubType``)."""

    STEP = "Step"
    WAIT = "Wait"
    CALLBACK = "Callback"
    RUN_IN_CHILD_CONTEXT = "RunInChildContext"
    MAP = "Map"
    MAP_ITERATION = "MapIteration"
    PARALLEL = "Parallel"
    PARALLEL_BRANCH = "ParallelBranch"
    WAIT_FOR_CALLBACK = "WaitForCallback"
    WAIT_FOR_CONDITION = "WaitForCondition"
    CHAINED_INVOKE = "ChainedInvoke"
    #: ``ctx.wait_for_signal``: a CALLBACK named after the signal (errands' own subtype)
    WAIT_FOR_SIGNAL = "WaitForSignal"
    #: errands' own: a ``ctx.patched`` marker, a ``ctx.set_event``, a ``ctx.start_child`` (STEP operations).
    PATCH = "Patch"
    SET_EVENT = "SetEvent"
    START_CHILD = "StartChild"
    #: ``ctx.effect``: a CALLBACK whose id is the effect's key, settled by the outbox's journal event
    EFFECT = "Effect"


class OperationStatus(_StrEnum):
    """Where an operation stands (AWS ``OperationStatus``)."""

    STARTED = "STARTED"
    PENDING = "PENDING"
    READY = "READY"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"
    STOPPED = "STOPPED"


class OperationAction(_StrEnum):
    """What a checkpoint update does to an operation (AWS ``OperationAction``)."""

    START = "START"
    SUCCEED = "SUCCEED"
    FAIL = "FAIL"
    RETRY = "RETRY"
    CANCEL = "CANCEL"


class TerminationReason(_StrEnum):
    """Why an invocation ended without its function returning (the reference SDK's reasons)."""

    UNHANDLED_ERROR = "UNHANDLED_ERROR"
    INVOCATION_ERROR = "INVOCATION_ERROR"
    EXECUTION_ERROR = "EXECUTION_ERROR"
    CHECKPOINT_FAILED = "CHECKPOINT_FAILED"
    NON_DETERMINISTIC_EXECUTION = "NON_DETERMINISTIC_EXECUTION"
    STEP_INTERRUPTED = "STEP_INTERRUPTED"
    SERIALIZATION_ERROR = "SERIALIZATION_ERROR"


class InvocationStatus(_StrEnum):
    """The outcome of one invocation: done, failed, or suspended until a timer or callback."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    PENDING = "PENDING"


class ExecutionStatus(_StrEnum):
    """The state of an execution kept by ``DurableRunner``.

    ``ENQUEUED``: started on a queue (``start(..., queue=...)``), waiting for the queue to admit it;
    ``RUNNING``: due to run or running; ``PENDING``: waiting for a timer, callback or child;
    ``SUSPENDED``: paused by an operator; the rest are terminal (``TIMED_OUT``: its ``start(timeout=...)``
    deadline passed, the Lambda API's name).
    """

    ENQUEUED = "ENQUEUED"
    RUNNING = "RUNNING"
    PENDING = "PENDING"
    SUSPENDED = "SUSPENDED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TERMINATED = "TERMINATED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def terminal(self) -> bool:
        return self in (ExecutionStatus.SUCCEEDED, ExecutionStatus.FAILED, ExecutionStatus.TERMINATED,
                        ExecutionStatus.TIMED_OUT)


TERMINAL_OP = (OperationStatus.SUCCEEDED, OperationStatus.FAILED, OperationStatus.CANCELLED,
               OperationStatus.TIMED_OUT, OperationStatus.STOPPED)


class StepSemantics(_StrEnum):
    """How often a step may run per retry attempt.

    ``AT_LEAST_ONCE_PER_RETRY`` (default): the start is checkpointed lazily; a crash mid-step runs the
    attempt again. ``AT_MOST_ONCE_PER_RETRY``: the start is committed before the step runs; a crash
    mid-step counts the attempt as failed (``StepInterruptedError``) and the retry strategy decides.
    """

    AT_MOST_ONCE_PER_RETRY = "AT_MOST_ONCE_PER_RETRY"
    AT_LEAST_ONCE_PER_RETRY = "AT_LEAST_ONCE_PER_RETRY"


class BatchItemStatus(_StrEnum):
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STARTED = "STARTED"


class CompletionReason(_StrEnum):
    ALL_COMPLETED = "ALL_COMPLETED"
    MIN_SUCCESSFUL_REACHED = "MIN_SUCCESSFUL_REACHED"
    FAILURE_TOLERANCE_EXCEEDED = "FAILURE_TOLERANCE_EXCEEDED"


@dataclass(frozen=True, slots=True)
class Duration:
    """A span of time, as in the AWS SDK: ``Duration(seconds=30)``, ``Duration.from_hours(1)``."""

    days: int = 0
    hours: int = 0
    minutes: int = 0
    seconds: float = 0

    @classmethod
    def from_seconds(cls, value: float) -> Duration:
        return cls(seconds=value)

    @classmethod
    def from_minutes(cls, value: int) -> Duration:
        return cls(minutes=value)

    @classmethod
    def from_hours(cls, value: int) -> Duration:
        return cls(hours=value)

    @classmethod
    def from_days(cls, value: int) -> Duration:
        return cls(days=value)

    def to_seconds(self) -> float:
        return self.days * 86400 + self.hours * 3600 + self.minutes * 60 + self.seconds


def to_seconds(value: Duration | timedelta | float | int, *, field: str = "duration") -> float:
    """Seconds in ``value``; ``ConfigError`` naming ``field`` for anything else or a negative span."""
    from errands.core import ConfigError

    if isinstance(value, Duration):
        seconds = value.to_seconds()
    elif isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigError(
            f"{field} must be a Duration, a timedelta or seconds, got {value!r}", field=field, value=value
        )
    if seconds < 0:
        raise ConfigError(f"{field} must not be negative, got {seconds}s", field=field, value=seconds)
    return float(seconds)


@dataclass(frozen=True, slots=True)
class ErrorObject:
    """An error as AWS Durable Execution carries it: ``ErrorType``, ``ErrorMessage``, ``ErrorData``,
    ``StackTrace``."""

    type: str | None = None
    message: str | None = None
    data: str | None = None
    stack_trace: list[str] | None = None

    @classmethod
    def from_exception(cls, exc: BaseException, *, with_trace: bool = True) -> ErrorObject:
        to_error_object = getattr(exc, "to_error_object", None)
        if callable(to_error_object):
            obj = to_error_object()
            if isinstance(obj, ErrorObject):
                return obj
        trace = None
        if with_trace and exc.__traceback__ is not None:
            trace = [line.rstrip("\n") for line in traceback.format_tb(exc.__traceback__)][-10:]
        return cls(type=type(exc).__name__, message=str(exc), data=None, stack_trace=trace)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorObject:
        trace = data.get("StackTrace")
        return cls(
            type=data.get("ErrorType"), message=data.get("ErrorMessage"), data=data.get("ErrorData"),
            stack_trace=list(trace) if trace is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.type is not None:
            out["ErrorType"] = self.type
        if self.message is not None:
            out["ErrorMessage"] = self.message
        if self.data is not None:
            out["ErrorData"] = self.data
        if self.stack_trace is not None:
            out["StackTrace"] = list(self.stack_trace)
        return out


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()


@dataclass(frozen=True, slots=True)
class Operation:
    """One checkpointed operation of an execution, convertible to the AWS ``Operation`` shape.

    Times are epoch seconds. ``result`` is serialised text (the serdes' output); for a retrying
    ``wait_for_condition`` it holds the state carried to the next check.
    """

    id: str
    type: OperationType
    status: OperationStatus
    parent_id: str | None = None
    name: str | None = None
    sub_type: OperationSubType | None = None
    start_timestamp: float | None = None
    end_timestamp: float | None = None
    attempt: int = 0
    result: str | None = None
    error: ErrorObject | None = None
    next_attempt_timestamp: float | None = None
    scheduled_timestamp: float | None = None
    callback_id: str | None = None
    timeout_timestamp: float | None = None
    heartbeat_timeout: float | None = None
    heartbeat_timestamp: float | None = None
    child_execution_id: str | None = None
    input_payload: str | None = None
    seq: int = 0

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_OP

    def details(self) -> dict[str, Any]:
        """The mutable part, stored as JSON next to the columns."""
        out: dict[str, Any] = {}
        for key in ("next_attempt_timestamp", "scheduled_timestamp", "timeout_timestamp", "heartbeat_timeout",
                    "heartbeat_timestamp", "child_execution_id", "input_payload"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @property
    def scheduled_end_timestamp(self) -> float | None:
        """When a wait ends (epoch seconds), the API's ``WaitDetails.ScheduledEndTimestamp``."""
        return self.scheduled_timestamp

    def to_dict(self) -> dict[str, Any]:
        """The Lambda API's ``Operation`` shape (timestamps in epoch milliseconds); see ``_wire``."""
        from ._wire import operation_to_wire

        return operation_to_wire(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Operation:
        """Read the Lambda API's ``Operation`` shape, ignoring fields it does not know."""
        from ._wire import operation_from_wire

        return operation_from_wire(data)


@dataclass(frozen=True, slots=True)
class OperationUpdate:
    """One checkpoint update (AWS ``OperationUpdate``): what happened to an operation.

    ``wait_seconds``, ``next_attempt_delay_seconds``, ``timeout_seconds`` and
    ``heartbeat_timeout_seconds`` are the ``WaitOptions``, ``StepOptions`` and ``CallbackOptions``;
    ``function_name`` and ``tenant_id`` the ``ChainedInvokeOptions``. ``callback_id`` and
    ``child_execution_id`` are the service's (it issues them); they never go on the wire.
    """

    operation_id: str
    operation_type: OperationType
    action: OperationAction
    parent_id: str | None = None
    name: str | None = None
    sub_type: OperationSubType | None = None
    payload: str | None = None
    error: ErrorObject | None = None
    wait_seconds: float | None = None
    next_attempt_delay_seconds: float | None = None
    timeout_seconds: float | None = None
    heartbeat_timeout_seconds: float | None = None
    callback_id: str | None = None
    function_name: str | None = None
    child_execution_id: str | None = None
    tenant_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The Lambda API's ``OperationUpdate`` shape (integer seconds in the options); see ``_wire``."""
        from ._wire import update_to_wire

        return update_to_wire(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OperationUpdate:
        """Read the Lambda API's ``OperationUpdate`` shape, ignoring fields it does not know."""
        from ._wire import update_from_wire

        return update_from_wire(data)


def apply_update(existing: Operation | None, update: OperationUpdate, now: float, seq: int = 0) -> Operation:
    """The operation after ``update``: the state machine every backend applies the same way."""
    action = update.action
    if existing is None:
        if action is OperationAction.START and update.operation_type is not OperationType.CALLBACK:
            # the common start, made at once (the general path below builds it field by field)
            return Operation(
                id=update.operation_id, type=update.operation_type, status=OperationStatus.STARTED,
                parent_id=update.parent_id, name=update.name, sub_type=update.sub_type, start_timestamp=now,
                attempt=1, seq=seq, scheduled_timestamp=None if update.wait_seconds is None else now + update.wait_seconds,
                child_execution_id=update.child_execution_id,
            )
        existing = Operation(
            id=update.operation_id, type=update.operation_type, status=OperationStatus.STARTED,
            parent_id=update.parent_id, name=update.name, sub_type=update.sub_type, start_timestamp=now, seq=seq,
        )
    if action is OperationAction.START:
        op = replace(existing, status=OperationStatus.STARTED, attempt=max(existing.attempt, 1),
                     next_attempt_timestamp=None)
        if update.wait_seconds is not None:
            op = replace(op, scheduled_timestamp=now + update.wait_seconds)
        if update.operation_type is OperationType.CALLBACK:
            # the service issues the callback id (``callback_id`` here is the one it chose)
            op = replace(op, callback_id=update.callback_id or existing.callback_id, heartbeat_timestamp=now)
            if update.timeout_seconds:
                op = replace(op, timeout_timestamp=now + update.timeout_seconds)
            if update.heartbeat_timeout_seconds:
                op = replace(op, heartbeat_timeout=update.heartbeat_timeout_seconds)
        if update.child_execution_id is not None:
            op = replace(op, child_execution_id=update.child_execution_id)
        return op
    if action is OperationAction.SUCCEED:
        return _ended(existing, OperationStatus.SUCCEEDED, update.payload, None, now)
    if action is OperationAction.FAIL:
        return _ended(existing, OperationStatus.FAILED, existing.result, update.error, now)
    if action is OperationAction.RETRY:
        # PENDING until the delay has passed, then READY (the service's move; at once without a delay)
        delay = update.next_attempt_delay_seconds or 0.0
        status = OperationStatus.PENDING if delay > 0 else OperationStatus.READY
        return replace(existing, status=status, error=update.error,
                       result=update.payload if update.payload is not None else existing.result,
                       attempt=max(existing.attempt, 1) + 1, next_attempt_timestamp=now + delay)
    return replace(existing, status=OperationStatus.CANCELLED, end_timestamp=now)


def _ended(op: Operation, status: OperationStatus, result: str | None, error: ErrorObject | None, now: float
           ) -> Operation:
    """``replace(op, status=status, result=result, error=error, end_timestamp=now, next_attempt_timestamp=None)``
    built at once, every field in ``Operation``'s order (every step's end comes here; ``replace`` walks the fields
    and passes them by name, which costs as much again). A test checks this against ``replace`` for every field."""
    return Operation(op.id, op.type, status, op.parent_id, op.name, op.sub_type, op.start_timestamp, now, op.attempt,
                     result, error, None, op.scheduled_timestamp, op.callback_id, op.timeout_timestamp,
                     op.heartbeat_timeout, op.heartbeat_timestamp, op.child_execution_id, op.input_payload, op.seq)


# -- configs ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompletionConfig:
    """When a ``map`` / ``parallel`` is done: at least ``min_successful`` successes, or more failures than
    tolerated (a count or a percentage of all items)."""

    min_successful: int | None = None
    tolerated_failure_count: int | None = None
    tolerated_failure_percentage: float | None = None

    @staticmethod
    def first_successful() -> CompletionConfig:
        return CompletionConfig(min_successful=1)

    @staticmethod
    def all_completed() -> CompletionConfig:
        return CompletionConfig()

    @staticmethod
    def all_successful() -> CompletionConfig:
        return CompletionConfig(tolerated_failure_count=0, tolerated_failure_percentage=0)


@dataclass(frozen=True, slots=True)
class StepConfig:
    """Options of ``ctx.step``.

    Args:
        retry_strategy: ``(error, attempts_made) -> RetryDecision``; default ``RetryPresets.default()``.
        step_semantics: at least or at most once per retry attempt.
        serdes: how the result is stored (JSON by default).
        timeout: seconds (or a ``Duration`` / ``timedelta``) one attempt may take; a longer one fails with
            ``StepTimeoutError`` and the retry strategy decides. An ``async def`` step is cancelled; a sync
            one cannot be stopped: it runs on a thread of its own and its late result is ignored.
    """

    retry_strategy: Callable[[Exception, int], RetryDecision] | None = None
    step_semantics: StepSemantics = StepSemantics.AT_LEAST_ONCE_PER_RETRY
    serdes: Serdes | None = None
    timeout: Duration | timedelta | float | None = None


@dataclass(frozen=True, slots=True)
class ChildConfig:
    """Options of ``ctx.run_in_child_context``."""

    serdes: Serdes | None = None
    sub_type: OperationSubType | None = None


@dataclass(frozen=True, slots=True)
class CallbackConfig:
    """Options of ``ctx.create_callback``: a timeout for the result, and one between heartbeats (0 = none)."""

    timeout_seconds: float = 0
    heartbeat_timeout_seconds: float = 0
    serdes: Serdes | None = None


@dataclass(frozen=True, slots=True)
class WaitForCallbackConfig:
    """Options of ``ctx.wait_for_callback``; ``retry_strategy`` applies to the submitter step."""

    timeout_seconds: float = 0
    heartbeat_timeout_seconds: float = 0
    serdes: Serdes | None = None
    retry_strategy: Callable[[Exception, int], RetryDecision] | None = None


@dataclass(frozen=True, slots=True)
class WaitForConditionDecision:
    """Whether ``wait_for_condition`` checks again, and after how long."""

    should_continue: bool
    delay_seconds: float = 0

    @classmethod
    def continue_waiting(cls, delay_seconds: float) -> WaitForConditionDecision:
        return cls(should_continue=True, delay_seconds=delay_seconds)

    @classmethod
    def stop_polling(cls) -> WaitForConditionDecision:
        return cls(should_continue=False, delay_seconds=0)


@dataclass(frozen=True, slots=True)
class WaitForConditionConfig(Generic[T]):
    """Options of ``ctx.wait_for_condition``: ``wait_strategy(state, attempt) -> WaitForConditionDecision``
    and the state the first check receives."""

    wait_strategy: Callable[[T, int], WaitForConditionDecision]
    initial_state: T
    serdes: Serdes | None = None


@dataclass(frozen=True, slots=True)
class MapConfig:
    """Options of ``ctx.map``: at most ``max_concurrency`` items at once (None: all).

    ``item_namer(item, index) -> str`` names each item's child context; ``item_serdes`` stores each item's
    result (``serdes`` too, for compatibility; ``item_serdes`` wins); ``batch_serdes`` stores the whole
    ``BatchResult`` checkpoint (JSON by default).
    """

    max_concurrency: int | None = None
    completion_config: CompletionConfig = field(default_factory=CompletionConfig)
    serdes: Serdes | None = None
    item_namer: Callable[[Any, int], str] | None = None
    item_serdes: Serdes | None = None
    batch_serdes: Serdes | None = None


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """Options of ``ctx.parallel`` and ``ctx.execute_concurrently``; ``item_serdes`` / ``batch_serdes`` as
    in ``MapConfig``."""

    max_concurrency: int | None = None
    completion_config: CompletionConfig = field(default_factory=CompletionConfig.all_successful)
    serdes: Serdes | None = None
    item_serdes: Serdes | None = None
    batch_serdes: Serdes | None = None


@dataclass(frozen=True, slots=True)
class NamedBranch(Generic[T]):
    """A ``parallel`` branch with a name (its child context's ``Name``): ``NamedBranch("a", fn)``; a
    ``(name, fn)`` pair or ``{"name": ..., "func": ...}`` works too."""

    name: str | None
    func: Callable[[Any], T]


@dataclass(frozen=True, slots=True)
class ConcurrentItem(Generic[T]):
    """One item of ``ctx.execute_concurrently(name, items, fn)``: ``fn(child_ctx, item)`` gets it.

    ``id`` is the caller's key for the item (the operation ids stay derived from ``index``), ``data`` the
    item's value, ``index`` its position, ``name`` its child context's name."""

    id: str
    data: T
    index: int
    name: str | None = None


@dataclass(frozen=True, slots=True)
class InvokeConfig:
    """Options of ``ctx.invoke``: serdes for the payload and for the result."""

    serdes_payload: Serdes | None = None
    serdes_result: Serdes | None = None


# -- batch results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchItem(Generic[R]):
    """One item of a ``map`` / ``parallel``."""

    index: int
    status: BatchItemStatus
    result: R | None = None
    error: ErrorObject | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "status": self.status.value, "result": self.result,
                "error": self.error.to_dict() if self.error else None}


@dataclass(frozen=True, slots=True)
class BatchResult(Generic[R]):
    """What ``map``, ``parallel`` and ``execute_concurrently`` return.

    ``all`` holds every item in input order; items never finished (the batch completed early) are
    ``STARTED``.
    """

    all: list[BatchItem[R]]
    completion_reason: CompletionReason

    def _with(self, status: BatchItemStatus) -> list[BatchItem[R]]:
        return [i for i in self.all if i.status is status]

    def succeeded(self) -> list[BatchItem[R]]:
        return self._with(BatchItemStatus.SUCCEEDED)

    def failed(self) -> list[BatchItem[R]]:
        return self._with(BatchItemStatus.FAILED)

    def started(self) -> list[BatchItem[R]]:
        return self._with(BatchItemStatus.STARTED)

    def results(self) -> list[R]:
        """Results of the succeeded items, in input order."""
        # A succeeded item carries its result: None there only when the branch returned None.
        return [cast(R, i.result) for i in self.succeeded()]

    def errors(self) -> list[ErrorObject]:
        """Errors of the failed items, in input order."""
        return [i.error for i in self.failed() if i.error is not None]

    get_results = results
    get_errors = errors

    def throw_if_error(self) -> None:
        """Raise the first failed item's error as a ``StepError``-like ``BatchItemError``."""
        from ._errors import BatchItemError

        failed = self.failed()
        if failed:
            raise BatchItemError.from_error_object(failed[0].error or ErrorObject(message="failed"))

    @property
    def success_count(self) -> int:
        return len(self.succeeded())

    @property
    def failure_count(self) -> int:
        return len(self.failed())

    @property
    def started_count(self) -> int:
        return len(self.started())

    @property
    def total_count(self) -> int:
        return len(self.all)

    @property
    def has_failure(self) -> bool:
        return any(i.status is BatchItemStatus.FAILED for i in self.all)

    @property
    def status(self) -> BatchItemStatus:
        return BatchItemStatus.FAILED if self.has_failure else BatchItemStatus.SUCCEEDED

    def to_dict(self) -> dict[str, Any]:
        return {"all": [i.to_dict() for i in self.all], "completionReason": self.completion_reason.value}


# -- executions -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionInfo:
    """An execution as ``DurableRunner.get`` and ``list`` report it.

    ``result`` is the deserialised JSON result; ``result_text`` the stored JSON text.
    """

    execution_id: str
    function: str
    status: ExecutionStatus
    input: Any = None
    result: Any = None
    result_text: str | None = None
    error: ErrorObject | None = None
    parent_id: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    ended_at: float | None = None
    invocations: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id, "function": self.function, "status": self.status.value,
            "input": self.input, "result": self.result, "error": self.error.to_dict() if self.error else None,
            "parent_id": self.parent_id, "created_at": _iso(self.created_at), "updated_at": _iso(self.updated_at),
            "ended_at": _iso(self.ended_at), "invocations": self.invocations,
        }
