"""errands-durable: durable functions with steps, waits, callbacks, map and parallel — AWS Durable
Execution in Python, on an errands store.

Example:
    >>> from errands.durable import DurableRunner, durable_function
    >>> @durable_function("checkout")
    ... def checkout(event, ctx):
    ...     paid = ctx.step("charge", lambda _: event["amount"])
    ...     ctx.wait("cool-off", 0)
    ...     return {"paid": paid, "shipped": ctx.step("ship", lambda _: True)}
    >>> with DurableRunner("memory://") as runner:
    ...     runner.run("checkout", {"amount": 5}).result
    {'paid': 5, 'shipped': True}
"""

from __future__ import annotations

from .__about__ import __version__
from ._async_context import AsyncCallback, AsyncDurableContext, DurableOperation
from ._aws import AWSDurableExecutionClient, DurableServiceError
from ._context import Callback, DurableContext, DurableFuture, StepContext, hash_id
from ._errors import (
    BatchItemError,
    CallbackError,
    CallbackTimeoutError,
    CheckpointError,
    ChildContextError,
    DurableError,
    DurableOperationError,
    ExecutionError,
    InvalidCheckpointError,
    InvalidStateError,
    InvocationError,
    InvokeError,
    NonDeterministicExecutionError,
    SerdesError,
    SignalRefusedError,
    SignalTimeoutError,
    StepError,
    StepInterruptedError,
    SuspendExecution,
    UnrecoverableError,
    WaitForConditionError,
)
from ._lambda import (
    CheckpointOutput,
    DurableExecutionConfig,
    InitialExecutionState,
    InMemoryClient,
    InvocationInput,
    InvocationOutput,
    StateOutput,
    with_durable_execution,
)
from ._registry import DuplicateFunctionError, durable_function
from ._retries import (
    JitterStrategy,
    RetryDecision,
    RetryPresets,
    RetryStrategyConfig,
    create_retry_strategy,
)
from ._runner import DurableRunner
from ._serdes import JsonSerdes, PassThroughSerdes, Serdes, SerdesContext
from ._values import (
    BatchItem,
    BatchItemStatus,
    BatchResult,
    CallbackConfig,
    ChildConfig,
    CompletionConfig,
    CompletionReason,
    ConcurrentItem,
    Duration,
    ErrorObject,
    ExecutionInfo,
    ExecutionStatus,
    InvocationStatus,
    InvokeConfig,
    MapConfig,
    NamedBranch,
    Operation,
    OperationAction,
    OperationStatus,
    OperationSubType,
    OperationType,
    OperationUpdate,
    ParallelConfig,
    StepConfig,
    StepSemantics,
    TerminationReason,
    WaitForCallbackConfig,
    WaitForConditionConfig,
    WaitForConditionDecision,
)

__all__ = [
    "AWSDurableExecutionClient",
    "AsyncCallback",
    "AsyncDurableContext",
    "BatchItem",
    "BatchItemError",
    "BatchItemStatus",
    "BatchResult",
    "Callback",
    "CallbackConfig",
    "CallbackError",
    "CallbackTimeoutError",
    "CheckpointError",
    "CheckpointOutput",
    "ChildConfig",
    "ChildContextError",
    "CompletionConfig",
    "CompletionReason",
    "ConcurrentItem",
    "DuplicateFunctionError",
    "DurableContext",
    "DurableError",
    "DurableExecutionConfig",
    "DurableFuture",
    "DurableOperation",
    "DurableOperationError",
    "DurableRunner",
    "DurableServiceError",
    "Duration",
    "ErrorObject",
    "ExecutionError",
    "ExecutionInfo",
    "ExecutionStatus",
    "InMemoryClient",
    "InitialExecutionState",
    "InvalidCheckpointError",
    "InvalidStateError",
    "InvocationError",
    "InvocationInput",
    "InvocationOutput",
    "InvocationStatus",
    "InvokeConfig",
    "InvokeError",
    "JitterStrategy",
    "JsonSerdes",
    "MapConfig",
    "NamedBranch",
    "NonDeterministicExecutionError",
    "Operation",
    "OperationAction",
    "OperationStatus",
    "OperationSubType",
    "OperationType",
    "OperationUpdate",
    "ParallelConfig",
    "PassThroughSerdes",
    "RetryDecision",
    "RetryPresets",
    "RetryStrategyConfig",
    "Serdes",
    "SerdesContext",
    "SerdesError",
    "SignalRefusedError",
    "SignalTimeoutError",
    "StateOutput",
    "StepConfig",
    "StepContext",
    "StepError",
    "StepInterruptedError",
    "StepSemantics",
    "SuspendExecution",
    "TerminationReason",
    "UnrecoverableError",
    "WaitForCallbackConfig",
    "WaitForConditionConfig",
    "WaitForConditionDecision",
    "WaitForConditionError",
    "__version__",
    "create_retry_strategy",
    "durable_function",
    "hash_id",
    "with_durable_execution",
]
