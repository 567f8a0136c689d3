from __future__ import annotations

import errands.durable as durable
import errands.durable.testing as durable_testing


def test_public_names_are_pinned() -> None:
    assert durable.__all__ == sorted(durable.__all__)
    assert set(durable.__all__) == {
        "AWSDurableExecutionClient", "AsyncCallback", "AsyncDurableContext", "BatchItem", "BatchItemError", "BatchItemStatus", "BatchResult", "Callback", "CallbackConfig",
        "CallbackError", "CallbackTimeoutError", "CheckpointError", "CheckpointOutput", "ChildConfig",
        "ChildContextError", "CompletionConfig", "CompletionReason", "DurableContext", "DurableError",
        "DurableExecutionConfig", "DurableOperation", "DurableOperationError", "DurableRunner", "DurableServiceError",
        "DuplicateFunctionError", "Duration", "EffectFailedError",
        "ErrorObject", "ExecutionError", "DurableFuture", "InvalidStateError", "ConcurrentItem", "NamedBranch", "InvocationError", "UnrecoverableError", "TerminationReason", "hash_id",
        "ExecutionInfo", "ExecutionStatus", "InMemoryClient", "InitialExecutionState", "InvocationInput",
        "InvalidCheckpointError", "InvocationOutput", "InvocationStatus", "InvokeConfig", "InvokeError", "JitterStrategy", "JsonSerdes",
        "MapConfig", "NonDeterministicExecutionError", "Operation", "OperationAction", "OperationStatus",
        "OperationSubType", "OperationType", "OperationUpdate", "ParallelConfig", "PassThroughSerdes",
        "QueueDeduplicatedError", "RetryDecision", "RetryPresets", "RetryStrategyConfig", "Serdes", "SerdesContext",
        "SerdesError",
        "SignalRefusedError", "SignalTimeoutError",
        "ContinueAsNew", "Divergence", "ReplayResult", "StepTimeoutError",
        "StateOutput", "StepConfig", "StepContext", "StepError", "StepInterruptedError", "StepSemantics",
        "SuspendExecution", "WaitForCallbackConfig", "WaitForConditionConfig", "WaitForConditionDecision",
        "WaitForConditionError", "__version__", "create_retry_strategy", "durable_function",
        "with_durable_execution",
    }
    for name in durable.__all__:
        assert getattr(durable, name) is not None
    assert durable_testing.__all__ == ["AWSLocalRunner", "LambdaEndpoint", "LocalRunner", "aws_runner_available",
                                       "normalise_history"]


def test_control_signals_are_not_exceptions() -> None:
    assert issubclass(durable.SuspendExecution, BaseException)
    assert not issubclass(durable.SuspendExecution, Exception)
    assert issubclass(durable.ContinueAsNew, BaseException) and not issubclass(durable.ContinueAsNew, Exception)
    assert issubclass(durable.StepError, durable.DurableError)
    assert issubclass(durable.CallbackTimeoutError, durable.CallbackError)
