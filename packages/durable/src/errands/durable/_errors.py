"""Errors of the durable engine.

The tree::

    ErrandsError (errands.core)
    └── DurableError
        ├── DurableOperationError         an operation failed; carries the AWS ErrorObject fields
        │   ├── StepError                 a step failed after its retries
        │   ├── CallbackError             a callback was failed by the caller
        │   │   └── CallbackTimeoutError  ... or timed out (result or heartbeat)
        │   │       └── SignalTimeoutError  no signal came within ``wait_for_signal``'s timeout
        │   ├── InvokeError               an invoked durable function failed
        │   ├── ChildContextError         a child context raised
        │   ├── WaitForConditionError     a condition check raised
        │   └── BatchItemError            ``BatchResult.throw_if_error``
        ├── NonDeterministicExecutionError  replay met a different operation than the checkpoint
        ├── SerdesError                   a value could not be serialised or deserialised
        ├── CheckpointError               the checkpoint service refused an update (stale token)
        ├── StepInterruptedError          an at-most-once step was cut off mid-attempt
        ├── StepTimeoutError              a step attempt ran past ``StepConfig(timeout=...)``
        ├── SignalRefusedError            a signal sent to a finished execution (also a ConfigError)
        ├── QueueDeduplicatedError        a start on a queue whose dedup_id an unfinished execution holds
        └── DuplicateFunctionError        a function name is taken by another function (also a ConfigError;
                                          defined with the registry, in ``_registry``)

    BaseException
    ├── SuspendExecution                  control signal: the invocation stops here, PENDING
    ├── ExecutionFencedOut                control signal: another invocation owns the execution now
    │   └── ReplayStopped                 ... or ``DurableRunner.replay`` reached the end of the history
    ├── ContinueAsNew                     control signal: ``ctx.continue_as_new`` ends this run
    └── InvocationAbandoned               control signal: the store failed under the invocation; it is
                                          retried soon and never recorded as the execution's failure

Errors an operation raises are built from the checkpointed ``ErrorObject`` on the first run and on
replay alike, so ``except StepError`` sees the same type, message and data both times.
"""

from __future__ import annotations

from typing import Any, TypeVar

from errands.core import ConfigError, ErrandsError

from ._values import ErrorObject

_E = TypeVar("_E", bound="DurableOperationError")


class DurableError(ErrandsError):
    """Root of the durable engine's errors."""


class DurableOperationError(DurableError):
    """A durable operation failed. Carries the ``ErrorObject`` fields.

    Attributes:
        error_type: the original exception's type name.
        error_message: its message.
        error_data: extra data (text), if any.
        stack_trace: the original stack trace lines, if kept.
    """

    def __init__(self, message: str | None = None, *, error_type: str | None = None,
                 error_data: str | None = None, stack_trace: list[str] | None = None) -> None:
        super().__init__(message or "")
        self.error_message = message
        self.error_type = error_type or type(self).__name__
        self.error_data = error_data
        self.stack_trace = stack_trace

    @classmethod
    def from_error_object(cls: type[_E], error: ErrorObject) -> _E:
        return cls(error.message, error_type=error.type, error_data=error.data, stack_trace=error.stack_trace)

    def to_error_object(self) -> ErrorObject:
        return ErrorObject(type=self.error_type, message=self.error_message, data=self.error_data,
                           stack_trace=self.stack_trace)


class StepError(DurableOperationError):
    """A step failed and its retry strategy gave up."""


class CallbackError(DurableOperationError):
    """A callback was failed through ``fail_callback``."""


class CallbackTimeoutError(CallbackError):
    """A callback got no result, or no heartbeat, within its timeout."""


class SignalTimeoutError(CallbackTimeoutError):
    """No signal of the awaited name arrived within ``ctx.wait_for_signal``'s timeout. A
    ``CallbackTimeoutError``, as the wait is checkpointed as a CALLBACK."""


class InvokeError(DurableOperationError):
    """A durable function started with ``ctx.invoke`` failed."""


class ChildContextError(DurableOperationError):
    """The function of ``run_in_child_context`` raised."""


class WaitForConditionError(DurableOperationError):
    """The check of ``wait_for_condition`` raised."""


class BatchItemError(DurableOperationError):
    """A failed item of a ``BatchResult``, raised by ``throw_if_error``."""


class NonDeterministicExecutionError(DurableError):
    """Replay met an operation whose type, subtype or name differs from the checkpoint.

    The invocation fails even if user code catches this error.
    """

    def __init__(self, message: str, *, step_id: str | None = None, got: tuple[Any, ...] | None = None) -> None:
        super().__init__(message)
        self.step_id = step_id
        #: ``(type, sub_type, name)`` of the operation the code called instead, when known.
        self.got = got


class SerdesError(DurableError):
    """A value could not pass through its serdes."""


class CheckpointError(DurableError):
    """The checkpoint service refused the invocation's updates (for example a stale ``CheckpointToken``)."""


class InvalidCheckpointError(CheckpointError):
    """The service refused a checkpoint batch that breaks its rules (an action a type does not take, two
    updates of one operation, a bad id or parent): a bug in the SDK side, never retried."""


class InvalidStateError(DurableError):
    """An operation was called where it cannot be: on a parent context from inside one of its child
    contexts (a child context function, a ``map`` item, a ``parallel`` branch)."""


class UnrecoverableError(DurableError):
    """An error that ends the invocation whatever user code does, with a ``termination_reason``
    (``TerminationReason``): ``InvocationError`` (the handler raises, so Lambda retries the invocation) or
    ``ExecutionError`` (the execution ends ``FAILED``)."""

    def __init__(self, message: str, termination_reason: Any = None) -> None:
        from ._values import TerminationReason

        super().__init__(message)
        self.message = message
        self.termination_reason = termination_reason or TerminationReason.UNHANDLED_ERROR


class InvocationError(UnrecoverableError):
    """The invocation fails and is retried (a transient checkpoint error, throttling, a stale token)."""


class ExecutionError(UnrecoverableError):
    """The execution fails, without retry (a checkpoint the service refuses for good)."""


class StepInterruptedError(DurableError):
    """An ``AT_MOST_ONCE_PER_RETRY`` attempt was cut off before its outcome was checkpointed."""


class StepTimeoutError(DurableError):
    """A step attempt ran longer than its ``StepConfig(timeout=...)``; it counts as a failed attempt."""


class SignalRefusedError(DurableError, ConfigError):
    """``send_signal`` to an execution that has finished: nothing can receive the signal any more, so it is
    not kept.

    Attributes:
        execution_id: the execution.
        status: its terminal status (``SUCCEEDED``, ``FAILED`` or ``TERMINATED``).
    """

    def __init__(self, execution_id: str, status: str) -> None:
        super().__init__(f"execution {execution_id!r} is {status}: it takes no more signals", field="execution_id",
                         value=execution_id)
        self.execution_id = execution_id
        self.status = status


class QueueDeduplicatedError(DurableError):
    """``start(..., queue=q, dedup_id=d)`` while another execution started on ``q`` with ``d`` has not
    finished: nothing is started (DBOS's ``DBOSQueueDeduplicatedError``).

    Attributes:
        queue: the queue.
        dedup_id: the deduplication id.
        execution_id: the unfinished execution that holds it.
    """

    def __init__(self, queue: str, dedup_id: str, execution_id: str) -> None:
        super().__init__(f"queue {queue!r} already has execution {execution_id!r} with dedup_id {dedup_id!r}, not "
                         "finished; wait for it (or pass another dedup_id)")
        self.queue = queue
        self.dedup_id = dedup_id
        self.execution_id = execution_id


class SuspendExecution(BaseException):
    """Control signal: the invocation stops and the execution is ``PENDING`` until ``until``
    (epoch seconds) or a callback or child arrives.

    It derives from ``BaseException`` so that ``except Exception`` in user code does not swallow it.
    """

    def __init__(self, message: str = "suspended", until: float | None = None) -> None:
        super().__init__(message)
        self.until = until


class ExecutionFencedOut(BaseException):
    """Control signal: another invocation (or an operator) took this execution over; stop now."""


class ReplayStopped(ExecutionFencedOut):
    """Control signal of ``DurableRunner.replay``: the function would write (or run a step) past what the
    history holds; the replay ends there, having written nothing."""


class ContinueAsNew(BaseException):
    """Control signal: ``ctx.continue_as_new(input)`` ends this run; the execution starts afresh on
    ``input_text`` with an empty history."""

    def __init__(self, input_text: str) -> None:
        super().__init__("continue as new")
        self.input_text = input_text


class InvocationAbandoned(BaseException):
    """Control signal: the invocation stops and writes nothing more, because the store failed under it (a
    locked database, a dropped connection, a serialization failure) or because an operation it was writing
    was settled meanwhile (a callback answered). The lease is given back and the execution is replayed soon;
    the execution never fails because of it.

    Attributes:
        cause: the store's error, or None when the invocation only has to replay (``retry_now``).
        retry_now: replay at once rather than after a backoff.
        undo_starts: ``(operation_id, attempt)`` of at-most-once starts whose commit was not confirmed; the
            attempt never ran, so the runner puts it back as not started.
    """

    def __init__(self, reason: str, cause: BaseException | None = None, *, retry_now: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause
        self.retry_now = retry_now
        self.undo_starts: list[tuple[str, int]] = []
