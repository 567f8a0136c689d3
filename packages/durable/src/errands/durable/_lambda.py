"""The AWS Lambda face: ``with_durable_execution`` speaks the AWS durable invocation JSON shapes, and
``InMemoryClient`` plays the checkpoint service for tests and local runs."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable, Mapping, Sequence

from errands.core import Clock, ConfigError, NotFoundError, SystemClock

from ._context import DurableContext, InvocationOutcome, run_handler
from ._errors import CheckpointError, ExecutionError, ExecutionFencedOut, InvocationAbandoned
from ._state import ExecutionState
from ._values import (
    ErrorObject,
    InvocationStatus,
    Operation,
    OperationAction,
    OperationStatus,
    OperationType,
    OperationUpdate,
    TerminationReason,
    apply_update,
)
from ._wire import EXECUTION_OPERATION_ID, advance_all, checkpoint_error_category, validate_updates, wire_update


@dataclass(frozen=True, slots=True)
class InitialExecutionState:
    """``InitialExecutionState``: the operations checkpointed so far (first page) and ``NextMarker``."""

    operations: list[Operation] = field(default_factory=list)
    next_marker: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InitialExecutionState:
        return cls(operations=[Operation.from_dict(o) for o in data.get("Operations") or []],
                   next_marker=data.get("NextMarker") or "")

    def to_dict(self) -> dict[str, Any]:
        return {"Operations": [o.to_dict() for o in self.operations], "NextMarker": self.next_marker}


@dataclass(frozen=True, slots=True)
class InvocationInput:
    """The durable invocation input: ``DurableExecutionArn``, ``CheckpointToken``, ``InitialExecutionState``."""

    durable_execution_arn: str
    checkpoint_token: str
    initial_execution_state: InitialExecutionState = field(default_factory=InitialExecutionState)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InvocationInput:
        """Read the AWS JSON shape.

        Raises:
            ConfigError: a required key is missing (the function is not configured as durable).
        """
        missing = [k for k in ("DurableExecutionArn", "CheckpointToken") if not isinstance(data.get(k), str)]
        if missing:
            raise ConfigError(
                f"durable invocation input lacks {', '.join(missing)}: the function must be invoked as a durable "
                "execution (with DurableExecutionArn, CheckpointToken and InitialExecutionState)",
                field=missing[0], value=None)
        return cls(durable_execution_arn=data["DurableExecutionArn"], checkpoint_token=data["CheckpointToken"],
                   initial_execution_state=InitialExecutionState.from_dict(data.get("InitialExecutionState") or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"DurableExecutionArn": self.durable_execution_arn, "CheckpointToken": self.checkpoint_token,
                "InitialExecutionState": self.initial_execution_state.to_dict()}


@dataclass(frozen=True, slots=True)
class InvocationOutput:
    """The durable invocation output: ``Status``, ``Result`` (JSON text), ``Error``."""

    status: InvocationStatus
    result: str | None = None
    error: ErrorObject | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Status": self.status.value}
        if self.result is not None:
            out["Result"] = self.result
        if self.error is not None:
            out["Error"] = self.error.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InvocationOutput:
        return cls(status=InvocationStatus(data["Status"]), result=data.get("Result"),
                   error=ErrorObject.from_dict(data["Error"]) if data.get("Error") else None)


@dataclass(frozen=True, slots=True)
class CheckpointOutput:
    """What the checkpoint service answers: the next ``CheckpointToken`` and the operations it changed."""

    checkpoint_token: str
    operations: list[Operation] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StateOutput:
    """One page of ``GetDurableExecutionState``."""

    operations: list[Operation]
    next_marker: str = ""


@dataclass
class _ClientExecution:
    arn: str
    operations: dict[str, Operation]
    token: str
    seq: int = 0
    function: str | None = None
    parent: tuple[str, str] | None = None
    output: InvocationOutput | None = None
    #: Operations the service changed since the last checkpoint answer (answered callbacks, ended waits).
    changed: set[str] = field(default_factory=set)


class InMemoryClient:
    """The durable checkpoint service in memory: tokens, operations, callbacks and chained invokes, under
    the service's rules (``_wire.validate_updates``): it completes waits, times callbacks out, makes due
    retries READY and issues callback ids.

    An invocation input for an execution it has never seen (a hand-built one) is adopted: its operations
    and token become the execution's.

    Args:
        clock: the time source (wait and timeout deadlines).

    Example:
        >>> client = InMemoryClient()
        >>> wrapped = with_durable_execution(lambda e, ctx: "hi", DurableExecutionConfig(client=client))
        >>> wrapped(client.start_execution({"name": "alice"}).to_dict()).to_dict()
        {'Status': 'SUCCEEDED', 'Result': '"hi"'}
    """

    page_size = 100

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self._executions: dict[str, _ClientExecution] = {}
        self._callbacks: dict[str, tuple[str, str]] = {}
        self._functions: dict[str, Callable[[Any], InvocationOutput]] = {}
        self._lock = threading.RLock()
        self.checkpoint_calls = 0

    # -- the service API -------------------------------------------------------------------------
    def checkpoint(self, durable_execution_arn: str, checkpoint_token: str, updates: Sequence[OperationUpdate],
                   client_token: str | None = None) -> CheckpointOutput:
        """Apply ``updates`` in order, atomically, as the service receives them (through the wire shapes).

        Raises:
            CheckpointError: the token is not the execution's current one.
            InvalidCheckpointError: the batch breaks one of the service's rules; nothing is applied.
        """
        invokes: list[OperationUpdate] = []
        with self._lock:
            ex = self._execution(durable_execution_arn)
            if checkpoint_token != ex.token:
                raise CheckpointError(f"Invalid checkpoint token for {durable_execution_arn}")
            received = [wire_update(u) for u in updates]
            self._advance(ex)
            validate_updates(received, ex.operations)
            self.checkpoint_calls += 1
            now = self.clock.now()
            touched: dict[str, None] = {}
            for u in received:
                existing = ex.operations.get(u.operation_id)
                if existing is None:
                    ex.seq += 1
                if u.operation_type is OperationType.CALLBACK and u.action is OperationAction.START:
                    u = replace(u, callback_id=uuid.uuid4().hex)
                op = apply_update(existing, u, now, ex.seq)
                ex.operations[op.id] = op
                touched[op.id] = None
                if op.callback_id and u.action is OperationAction.START:
                    self._callbacks[op.callback_id] = (ex.arn, op.id)
                if u.operation_type is OperationType.CHAINED_INVOKE and u.action is OperationAction.START:
                    invokes.append(u)
            ex.token = uuid.uuid4().hex
            # the new execution state: what this batch changed, and what changed meanwhile on the service's
            # side (a callback answered, a wait ended), so the function sees it in this invocation
            changed = {**dict.fromkeys(ex.changed), **touched}
            ex.changed.clear()
            out = CheckpointOutput(ex.token, [ex.operations[i] for i in changed])
        for u in invokes:
            self._start_child(durable_execution_arn, u)
        return out

    def get_execution_state(self, durable_execution_arn: str, checkpoint_token: str, next_marker: str = "",
                            max_items: int = 1000) -> StateOutput:
        """A page of the execution's operations after ``next_marker``."""
        with self._lock:
            ex = self._execution(durable_execution_arn)
            self._advance(ex)
            ops = sorted(ex.operations.values(), key=lambda o: o.seq)
            start = int(next_marker or 0)
            page = ops[start:start + max_items]
            more = start + max_items < len(ops)
            return StateOutput(page, str(start + max_items) if more else "")

    def _advance(self, ex: _ClientExecution) -> None:
        moved = advance_all(ex.operations, self.clock.now())
        ex.operations.update(moved)
        ex.changed.update(moved)

    # -- driving executions ----------------------------------------------------------------------
    def start_execution(self, input: Any = None, *, arn: str | None = None, function: str | None = None
                        ) -> InvocationInput:
        """Create an execution with ``input`` (JSON) and return its first invocation input."""
        arn = arn or f"arn:errands:durable:local:execution/{uuid.uuid4().hex}"
        with self._lock:
            if arn in self._executions:
                raise ConfigError(f"execution {arn!r} exists already", field="arn", value=arn)
            op = Operation(id=EXECUTION_OPERATION_ID, type=OperationType.EXECUTION, status=OperationStatus.STARTED,
                           start_timestamp=self.clock.now(), input_payload=json.dumps(input), seq=0)
            self._executions[arn] = _ClientExecution(arn, {op.id: op}, uuid.uuid4().hex, function=function)
        return self.invocation_input(arn)

    def adopt(self, inp: InvocationInput, operations: Sequence[Operation] | None = None) -> None:
        """Take on an execution first seen in an invocation input (built by hand, or by another service):
        its operations (``operations``, else the input's first page) and its token. Known ARNs are left
        as they are."""
        with self._lock:
            if inp.durable_execution_arn in self._executions:
                return
            ops = list(operations if operations is not None else inp.initial_execution_state.operations)
            self._executions[inp.durable_execution_arn] = _ClientExecution(
                inp.durable_execution_arn, {o.id: replace(o, seq=i) for i, o in enumerate(ops)},
                inp.checkpoint_token, seq=len(ops))

    def set_operation(self, arn_or_operation: str | Operation | Mapping[str, Any],
                      operation: Operation | Mapping[str, Any] | None = None) -> Operation:
        """Put ``operation`` (an ``Operation`` or its API shape) into an execution's state, as the service
        would have it: ``set_operation(arn, op)``, or ``set_operation(op)`` when the client holds one
        execution. A callback's id becomes known to ``complete_callback``.

        Raises:
            ConfigError: no ARN given and the client does not hold exactly one execution.
        """
        if operation is None:
            if isinstance(arn_or_operation, str):
                raise ConfigError("set_operation needs an operation", field="operation")
            operation, arn = arn_or_operation, None
        else:
            arn = arn_or_operation if isinstance(arn_or_operation, str) else None
        op = operation if isinstance(operation, Operation) else Operation.from_dict(operation)
        with self._lock:
            if arn is None:
                if len(self._executions) != 1:
                    raise ConfigError("set_operation(op) needs the execution's ARN when the client holds "
                                      f"{len(self._executions)} executions", field="arn")
                arn = next(iter(self._executions))
            ex = self._execution(arn)
            old = ex.operations.get(op.id)
            if old is None:
                ex.seq += 1
            op = replace(op, seq=old.seq if old is not None else ex.seq)
            ex.operations[op.id] = op
            if op.callback_id:
                self._callbacks[op.callback_id] = (arn, op.id)
            return op

    def invocation_input(self, arn: str) -> InvocationInput:
        """The input of the next invocation of ``arn``: a fresh token and the first page of operations."""
        with self._lock:
            ex = self._execution(arn)
            self._advance(ex)
            ex.token = uuid.uuid4().hex
            ops = sorted(ex.operations.values(), key=lambda o: o.seq)
            first, rest = ops[:self.page_size], ops[self.page_size:]
            return InvocationInput(arn, ex.token, InitialExecutionState(first, str(self.page_size) if rest else ""))

    def record_output(self, arn: str, output: InvocationOutput) -> None:
        """Remember an invocation's output; a finished child completes its parent's invoke operation."""
        with self._lock:
            ex = self._execution(arn)
            ex.output = output
            parent = ex.parent
            if parent is None or output.status is InvocationStatus.PENDING:
                return
            pex = self._execution(parent[0])
            op = pex.operations[parent[1]]
            if op.done:
                return
            status, error = ((OperationStatus.SUCCEEDED, None) if output.status is InvocationStatus.SUCCEEDED
                             else (OperationStatus.FAILED, output.error))
            pex.operations[op.id] = replace(op, status=status, result=output.result if error is None else None,
                                            error=error, end_timestamp=self.clock.now())

    def output(self, arn: str) -> InvocationOutput | None:
        """The last recorded output of ``arn``."""
        with self._lock:
            return self._execution(arn).output

    def operations(self, arn: str) -> list[Operation]:
        with self._lock:
            ex = self._execution(arn)
            self._advance(ex)
            return sorted(ex.operations.values(), key=lambda o: o.seq)

    def register_function(self, name: str, handler: Callable[[Any], InvocationOutput]) -> None:
        """Make ``handler`` (a ``with_durable_execution`` result) invocable with ``ctx.invoke(name, ...)``."""
        self._functions[name] = handler

    def check_invoke(self, function_name: str) -> None:
        if function_name not in self._functions:
            raise ConfigError(f"no function {function_name!r} registered with this client; "
                              "call client.register_function(name, handler)", field="function_name",
                              value=function_name)

    def invoke(self, arn: str) -> InvocationOutput:
        """Invoke the registered function of ``arn`` once more (after a wait or callback)."""
        ex = self._execution(arn)
        if ex.function is None:
            raise ConfigError(f"execution {arn!r} has no registered function", field="arn", value=arn)
        out = self._functions[ex.function](self.invocation_input(arn))
        self.record_output(arn, out)
        return out

    def _start_child(self, parent_arn: str, u: OperationUpdate) -> None:
        assert u.function_name is not None
        child = u.child_execution_id or f"{parent_arn}/{u.operation_id}"
        self.start_execution(json.loads(u.payload) if u.payload is not None else None, arn=child,
                             function=u.function_name)
        with self._lock:
            self._executions[child].parent = (parent_arn, u.operation_id)
        self.invoke(child)

    # -- callbacks -------------------------------------------------------------------------------
    def _settle(self, callback_id: str, status: OperationStatus, payload: str | None,
                error: ErrorObject | None) -> bool:
        with self._lock:
            where = self._callbacks.get(callback_id)
            if where is None:
                raise NotFoundError(f"no callback {callback_id!r}")
            ex = self._execution(where[0])
            self._advance(ex)
            op = ex.operations[where[1]]
            if op.done:
                return False
            ex.operations[op.id] = replace(op, status=status, result=payload, error=error,
                                           end_timestamp=self.clock.now())
            ex.changed.add(op.id)
            return True

    def complete_callback(self, callback_id: str, payload: str | bytes | None = None) -> bool:
        """``SendDurableExecutionCallbackSuccess``: ``payload`` is the serialized result, kept as given
        (``'"approved"'`` is the JSON text of ``"approved"``); bytes are read as UTF-8. False if the callback
        was settled already."""
        if isinstance(payload, (bytes, bytearray)):
            payload = bytes(payload).decode()
        elif payload is not None and not isinstance(payload, str):
            raise ConfigError(f"complete_callback takes the serialized result (str), got {type(payload).__name__}; "
                              "pass json.dumps(value)", field="payload", value=type(payload).__name__)
        return self._settle(callback_id, OperationStatus.SUCCEEDED, payload, None)

    def fail_callback(self, callback_id: str, error: ErrorObject | BaseException | Mapping[str, Any] | str,
                      timed_out: bool = False) -> bool:
        """``SendDurableExecutionCallbackFailure`` (``timed_out``: the callback ends ``TIMED_OUT``, and the
        function sees a ``CallbackTimeoutError``)."""
        from ._callbacks import error_object

        obj = error_object(error)
        status = OperationStatus.TIMED_OUT if timed_out else OperationStatus.FAILED
        return self._settle(callback_id, status, None, obj)

    def heartbeat_callback(self, callback_id: str) -> None:
        """``SendDurableExecutionCallbackHeartbeat``."""
        with self._lock:
            where = self._callbacks.get(callback_id)
            if where is None:
                raise NotFoundError(f"no callback {callback_id!r}")
            ex = self._execution(where[0])
            ex.operations[where[1]] = replace(ex.operations[where[1]], heartbeat_timestamp=self.clock.now())

    def _execution(self, arn: str) -> _ClientExecution:
        ex = self._executions.get(arn)
        if ex is None:
            raise NotFoundError(f"no durable execution {arn!r}")
        return ex


class _ClientBackend:
    #: Speaks the Lambda API: whole seconds, the service issues callback ids.
    wire = True

    def __init__(self, client: Any, arn: str, token: str, clock: Clock) -> None:
        self.client = client
        self.execution_id = arn
        self.token = token
        self.clock = clock

    def now(self) -> float:
        return self.clock.now()

    def flush(self, updates: Sequence[OperationUpdate], operations: Sequence[Operation]) -> list[Operation]:
        try:
            out = self.client.checkpoint(self.execution_id, self.token, list(updates), None)
        except Exception as exc:
            # Never the execution's failure unless no retry can help: AWS's invocation-level and
            # execution-level unrecoverable errors.
            if checkpoint_error_category(exc) == "EXECUTION":
                raise InvocationAbandoned(f"{type(exc).__name__}: {exc}", ExecutionError(
                    f"checkpoint refused: {exc}", TerminationReason.CHECKPOINT_FAILED)) from exc
            if isinstance(exc, CheckpointError):  # a stale token: another invocation owns the execution
                raise ExecutionFencedOut(str(exc)) from exc
            raise InvocationAbandoned(f"{type(exc).__name__}: {exc}", exc) from exc
        self.token = out.checkpoint_token
        return list(out.operations)

    def check_invoke(self, function_name: str) -> None:
        check = getattr(self.client, "check_invoke", None)
        if check is None:
            return  # the service checks the target itself
        check(function_name)


@dataclass(frozen=True, slots=True)
class DurableExecutionConfig:
    """Options of ``with_durable_execution``.

    Args:
        client: the checkpoint service (``InMemoryClient`` locally).
        clock: the time source (default: the client's clock, else the wall clock).
        always_replay: end the invocation after each newly completed operation (a determinism check).
        logger: the logger ``ctx.logger`` and step contexts use (default ``errands.durable``).
        request_id: the invocation's request id for log records (default: the Lambda context's
            ``aws_request_id``).
        tenant_id: the ``TenantId`` of chained invokes started from this function.
    """

    client: Any
    clock: Clock | None = None
    always_replay: bool = False
    logger: logging.Logger | None = None
    request_id: str | None = None
    tenant_id: str | None = None


def with_durable_execution(handler: Callable[[Any, DurableContext], Any] | Callable[[Any, Any], Awaitable[Any]],
                           config: DurableExecutionConfig | None = None) -> Callable[..., Any]:
    """Wrap ``handler(event, ctx)`` as a durable Lambda handler (an ``async def`` handler gets an
    ``AsyncDurableContext`` and runs on the process's shared event-loop thread).

    The wrapper takes the invocation input (a dict with the AWS keys, or ``InvocationInput``) and an
    optional Lambda context, replays the checkpointed operations, runs the handler, flushes its
    checkpoints and returns an ``InvocationOutput`` (``Status`` SUCCEEDED / FAILED / PENDING).

    Without ``config`` it is the Lambda entry point (``lambda_handler = with_durable_execution(fn)``): the
    client is an ``AWSDurableExecutionClient`` (boto3 from the environment, made on the first invocation)
    and the wrapper returns the output as the JSON object Lambda sends back (``{"Status", "Result",
    "Error"}``).

    Raises:
        ConfigError: the input is not a durable invocation.
        CheckpointError: the service refused the checkpoints (stale token): let Lambda retry.
        Exception: the checkpoint service failed in a way a retry may fix (the client's error, re-raised;
            AWS's invocation-level error): the invocation fails, never the execution, and Lambda retries it.
            A checkpoint no retry can fix (a batch the service refuses by its rules, a 4xx other than
            throttling or a stale token) ends the execution instead: ``Status: FAILED``.
    """
    if not callable(handler):
        raise ConfigError(f"handler must be callable, got {handler!r}", field="handler", value=repr(handler))
    as_lambda = config is None
    if config is None:
        from ._aws import AWSDurableExecutionClient

        config = DurableExecutionConfig(client=AWSDurableExecutionClient())
    client = config.client
    clock = config.clock or getattr(client, "clock", None) or SystemClock()

    def entry_point(event: Mapping[str, Any] | InvocationInput, lambda_context: Any = None) -> dict[str, Any]:
        return wrapped(event, lambda_context).to_dict()

    def wrapped(event: Mapping[str, Any] | InvocationInput, lambda_context: Any = None) -> InvocationOutput:
        assert config is not None
        inp = event if isinstance(event, InvocationInput) else InvocationInput.from_dict(event)
        ops = list(inp.initial_execution_state.operations)
        marker = inp.initial_execution_state.next_marker
        while marker:
            page = client.get_execution_state(inp.durable_execution_arn, inp.checkpoint_token, marker)
            ops.extend(page.operations)
            marker = page.next_marker
        payload = next((o.input_payload for o in ops if o.type is OperationType.EXECUTION), None)
        user_event = json.loads(payload) if payload and payload.strip() else {}
        adopt = getattr(client, "adopt", None)
        if callable(adopt):
            adopt(inp, ops)
        backend = _ClientBackend(client, inp.durable_execution_arn, inp.checkpoint_token, clock)
        state = ExecutionState(backend, {o.id: o for o in ops if o.type is not OperationType.EXECUTION},
                               always_replay=config.always_replay)
        request_id = config.request_id or getattr(lambda_context, "aws_request_id", None)
        logger = config.logger or logging.getLogger("errands.durable")
        state.logger = logging.LoggerAdapter(logger, {"durable_execution_arn": inp.durable_execution_arn,
                                                      "request_id": request_id})
        state.tenant_id = config.tenant_id
        try:
            outcome = run_handler(handler, user_event, state)
            updates, touched = state.take_pending()
            if updates:
                backend.flush(updates, touched)
        except ExecutionFencedOut as exc:
            raise CheckpointError(str(exc)) from exc
        except InvocationAbandoned as exc:
            outcome = InvocationOutcome("ABANDONED", abandoned=exc)
        if outcome.abandoned is not None and isinstance(outcome.abandoned.cause, ExecutionError):
            outcome = InvocationOutcome("FAILED", error=ErrorObject.from_exception(outcome.abandoned.cause,
                                                                                   with_trace=False))
        if outcome.status == "CONTINUED":
            outcome = InvocationOutcome("FAILED", error=ErrorObject(
                type="ConfigError", message="continue_as_new needs a DurableRunner (the Lambda API has no such end)"))
        if outcome.abandoned is not None:
            cause = outcome.abandoned.cause
            if cause is None:
                raise CheckpointError(outcome.abandoned.reason)
            raise cause
        out = InvocationOutput(status=InvocationStatus(outcome.status), result=outcome.result, error=outcome.error)
        record = getattr(client, "record_output", None)
        if callable(record):
            record(inp.durable_execution_arn, out)
        return out

    return entry_point if as_lambda else wrapped
