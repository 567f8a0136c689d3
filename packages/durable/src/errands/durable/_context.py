"""``DurableContext``: the operations a durable function calls, replayed from checkpoints."""

from __future__ import annotations

import contextvars
import hashlib
import inspect
import json
import logging
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Awaitable, Callable, Generator, Generic, Mapping, NoReturn, Sequence, TypeVar, Union

from errands.core import ConfigError, Effect, EffectRecord, telemetry
from errands.core.store import dumps

from . import _effects as effects
from . import _loops
from ._errors import (
    CallbackError,
    CallbackTimeoutError,
    CheckpointError,
    ChildContextError,
    ContinueAsNew,
    DurableOperationError,
    ExecutionFencedOut,
    InvalidStateError,
    InvocationAbandoned,
    InvokeError,
    NonDeterministicExecutionError,
    SignalTimeoutError,
    StepError,
    StepInterruptedError,
    SuspendExecution,
    WaitForConditionError,
)
from ._retries import RetryPresets, RetryStrategy
from ._serdes import DEFAULT_SERDES, Serdes, SerdesContext
from ._state import ExecutionState, earliest
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
    WaitForCallbackConfig,
    WaitForConditionConfig,
    to_seconds,
)
from ._wire import callback_deadline, seconds_to_wire

T = TypeVar("T")
U = TypeVar("U")

log = logging.getLogger("errands.durable")
STEP = "errands.durable.step"

#: Results that are never awaitable, answered without asking ``inspect.isawaitable``.
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, dict, list, tuple})


def operation_id(parent_id: str | None, counter: int) -> str:
    """The id of the ``counter``-th operation (1-based) under ``parent_id``: stable across replays."""
    return hash_id(f"{parent_id or ''}-{counter}")


def hash_id(value: str) -> str:
    """The operation id for ``value``: 16 hex digits of its blake2b hash (within the API's 64 characters
    of ``[A-Za-z0-9_-]``). ``hash_id(f"{parent_id or ''}-{n}")`` is the id of the n-th operation (1-based)
    under ``parent_id``, so a test can build a checkpoint for ``set_operation`` by hand."""
    return hashlib.blake2b(value.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a step function receives."""

    execution_id: str
    operation_id: str
    name: str | None
    attempt: int
    logger: logging.Logger


class Callback:
    """A callback created by ``ctx.create_callback``: hand ``callback_id`` to the outside world, then
    ``result()`` suspends until ``DurableRunner.complete_callback`` (or ``fail_callback``) arrives."""

    def __init__(self, state: ExecutionState, op_id: str, callback_id: str, serdes: Serdes) -> None:
        self._state = state
        self.operation_id = op_id
        self.callback_id = callback_id
        self._serdes = serdes

    def result(self) -> Any:
        """The callback's result; suspends while it has none.

        Raises:
            CallbackError: the callback was failed.
            CallbackTimeoutError: no result or heartbeat came in time.
        """
        state = self._state
        op = state.get(self.operation_id)
        assert op is not None
        if op.status is OperationStatus.SUCCEEDED:
            return _decode(self._serdes, op.result, self.operation_id, state.execution_id)
        if op.status is OperationStatus.TIMED_OUT:
            raise CallbackTimeoutError.from_error_object(op.error or ErrorObject(
                type="CallbackTimeoutError", message=f"callback {op.name or self.operation_id} timed out"))
        if op.done:
            raise _callback_error(op.error)
        # The service times a callback out (CALLBACK takes only START): suspend until its deadline at most.
        deadline = callback_deadline(op)
        raise SuspendExecution(f"waiting for callback {op.name or self.operation_id}", until=deadline)


def _callback_error(error: ErrorObject | None) -> CallbackError:
    error = error or ErrorObject(type="CallbackError", message="callback failed")
    if error.type == "CallbackTimeoutError":
        return CallbackTimeoutError.from_error_object(error)
    return CallbackError.from_error_object(error)


def _decode(serdes: Serdes, text: str | None, op_id: str, execution_id: str) -> Any:
    if text is None:
        return None
    return serdes.deserialize(text, SerdesContext(op_id, execution_id))


#: What ``_replay_attempts`` answers for an operation whose next attempt is due now.
_RUN: Any = object()


def _replay_attempts(state: ExecutionState, op: Operation | None, serdes: Serdes,
                     error: type[DurableOperationError], failed: str, what: str) -> Any:
    """Replay an operation that runs in attempts (a step, a condition check) from its checkpoint: its
    result when it succeeded, its ``error`` raised when it failed (``failed`` is the message of a checkpoint
    that kept none), a suspension while its next attempt is not due yet; ``_RUN`` when it has not finished
    and its next attempt is due now."""
    if op is None:
        return _RUN
    if op.status is OperationStatus.SUCCEEDED:
        return _decode(serdes, op.result, op.id, state.execution_id)
    if op.status is OperationStatus.FAILED:
        raise error.from_error_object(op.error or ErrorObject(message=failed))
    if op.status is OperationStatus.PENDING and (op.next_attempt_timestamp or 0) > state.now():
        raise SuspendExecution(f"{what} retries later", until=op.next_attempt_timestamp)
    return _RUN


#: The options of a step given none (``StepConfig`` is frozen: one instance serves every step).
_DEFAULT_STEP = StepConfig()


def _update(op: Operation, action: OperationAction, **kw: Any) -> OperationUpdate:
    return OperationUpdate(operation_id=op.id, operation_type=op.type, action=action, parent_id=op.parent_id,
                           name=op.name, sub_type=op.sub_type, **kw)


def _check_name(name: object) -> str | None:
    if name is None or isinstance(name, str):
        return name
    raise ConfigError(f"operation name must be a string or None, got {name!r}", field="name", value=name)


def _check_callable(fn: Any, what: str) -> None:
    if not callable(fn):
        raise ConfigError(f"{what} must be callable, got {fn!r}", field=what, value=repr(fn))


def _name_and_callable(first: Any, second: Any, name: str | None, what: str) -> tuple[str | None, Any]:
    """Accept both argument orders, ``(name, fn)`` (DESIGN) and ``(fn, name=...)`` (AWS); the callable is
    checked."""
    if isinstance(first, str):
        name, fn = first, second
    else:
        fn = first
    _check_callable(fn, what)
    return name, fn


@dataclass(frozen=True, slots=True)
class _Call:
    """User code an operation calls: ``fn(*args)`` (a step body, a condition check)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Body:
    """A context function an operation runs: ``fn(ctx, *args)`` with a new context under ``parent_id``
    (a child context, a ``map`` item, a ``parallel`` branch)."""

    fn: Callable[..., Any]
    parent_id: str
    args: tuple[Any, ...] = ()


#: An operation's logic, written once for sync and async functions: a generator that yields the user code
#: it needs called (``_Call``, ``_Body``), is sent back the result (or thrown the exception), and returns the
#: operation's value. ``DurableContext`` drives it in the calling thread; ``AsyncDurableContext`` on its event
#: loop, running the parts between the yields (checkpoints) inline and awaiting async user code there.
OperationLogic = Generator[Union[_Call, _Body], Any, Any]


def is_async_callable(fn: Any) -> bool:
    """Whether calling ``fn`` gives a coroutine: an ``async def`` function (or a partial of one, or an
    object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(fn) or (
        not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__))


def _immediate(fn: Callable[[], Any]) -> OperationLogic:
    """The logic of an operation that calls no user code."""
    return fn()
    yield  # a generator, like every operation's logic


class _ContextCore:
    """What the sync and the async context share: identity, operation ids, and the logic of every
    operation (as ``OperationLogic`` generators)."""

    def __init__(self, state: ExecutionState, parent_id: str | None = None) -> None:
        self._state = state
        self._parent_id = parent_id
        self._counter = 0
        self._lock = threading.Lock()
        #: Child contexts of this (sync) context running now: while any runs, this one must not be used.
        self._inside = 0
        self.logger = state.logger or log

    @property
    def execution_id(self) -> str:
        return self._state.execution_id

    @property
    def durable_execution_arn(self) -> str:
        return self._state.execution_id

    @property
    def is_replaying(self) -> bool:
        """True while the next operation has a checkpoint (the function is catching up)."""
        with self._lock:
            nxt = operation_id(self._parent_id, self._counter + 1)
        return self._state.get(nxt) is not None

    def _await_here(self, aw: Awaitable[Any]) -> Any:
        """Wait for ``aw`` from this (sync) thread, on its private event loop."""
        return _loops.run_here(aw)

    # -- plumbing --------------------------------------------------------------------------------
    def _next(self, type_: OperationType, sub_type: OperationSubType | None, name: str | None,
              legacy: tuple[str | None, ...] = ()) -> tuple[str, Operation | None]:
        """The next operation id here and its checkpoint, if any; a checkpoint of another type, subtype or
        name (other than a ``legacy`` one: the name an older errands recorded for it) is non-deterministic."""
        with self._lock:
            if self._inside:
                raise InvalidStateError(
                    f"the context {self._parent_id or '(root)'} was used inside one of its child contexts; "
                    "a child context function must use the context it is given")
            self._counter += 1
            counter = self._counter
            op_id = operation_id(self._parent_id, counter)
        state = self._state
        if state.fatal is not None:
            raise state.fatal
        op = state.get(op_id)
        if op is not None and ((op.type, op.sub_type) != (type_, sub_type) or op.name not in (name, *legacy)):
            raise state.mark_fatal(NonDeterministicExecutionError(
                f"operation #{counter} under {self._parent_id or 'the root'} was "
                f"{op.type.value}/{op.sub_type.value if op.sub_type else '-'} {op.name!r} when checkpointed, "
                f"now {type_.value}/{sub_type.value if sub_type else '-'} {name!r}: the function must call "
                "the same operations in the same order on every replay",
                step_id=op_id, got=(type_, sub_type, name),
            ))
        return op_id, op

    def _start(self, op_id: str, type_: OperationType, sub_type: OperationSubType | None, name: str | None,
               *, sync: bool = False, **kw: Any) -> Operation:
        return self._state.checkpoint(OperationUpdate(
            operation_id=op_id, operation_type=type_, action=OperationAction.START, parent_id=self._parent_id,
            name=name, sub_type=sub_type, **kw), sync=sync)

    # -- step ------------------------------------------------------------------------------------
    def _step_op(self, name_or_fn: Any, fn: Any, config: StepConfig | None, name: str | None,
                 legacy: tuple[str | None, ...] = ()) -> tuple[str, OperationLogic]:
        name, func = _name_and_callable(name_or_fn, fn, name, "step function")
        config = config or _DEFAULT_STEP
        op_id, op = self._next(OperationType.STEP, OperationSubType.STEP, _check_name(name), legacy)
        return op_id, self._step_logic(op_id, op, op.name if op is not None else name, func, config)

    def _step_logic(self, op_id: str, op: Operation | None, name: str | None, func: Callable[[StepContext], Any],
                    config: StepConfig) -> OperationLogic:
        state = self._state
        serdes = config.serdes or DEFAULT_SERDES
        replayed = _replay_attempts(state, op, serdes, StepError, "step failed", f"step {name or op_id}")
        if replayed is not _RUN:
            return replayed
        strategy: RetryStrategy | None = config.retry_strategy  # the default one made at a first failure
        if config.timeout is not None:
            from ._timeouts import bounded

            func = bounded(func, config.timeout, is_async_callable(func), f"step {name or op_id}")
        at_most_once = config.step_semantics is StepSemantics.AT_MOST_ONCE_PER_RETRY
        attempt = op.attempt if op is not None and op.attempt else 1
        started = op is not None and op.status is OperationStatus.STARTED
        pending_error: Exception | None = None
        if started and at_most_once:
            pending_error = StepInterruptedError(
                f"step {name or op_id} attempt {attempt} was interrupted before its outcome was checkpointed")
        while True:
            if pending_error is None:
                if at_most_once:
                    try:
                        self._start(op_id, OperationType.STEP, OperationSubType.STEP, name, sync=True)
                    except InvocationAbandoned as abandoned:
                        # The start may have committed without this worker hearing so; the attempt has not
                        # run, so the runner puts it back rather than let a replay count it interrupted.
                        cur = state.get(op_id)
                        abandoned.undo_starts.append((op_id, cur.attempt if cur is not None else attempt))
                        raise
                elif not started:
                    self._start(op_id, OperationType.STEP, OperationSubType.STEP, name)
                started = False
                sctx = StepContext(execution_id=state.execution_id, operation_id=op_id, name=name, attempt=attempt,
                                   logger=self.logger)
                try:
                    value = yield _Call(telemetry.spanned(func, STEP, execution_id=state.execution_id, step=name or op_id,
                                                          attempt=attempt), (sctx,))
                except Exception as exc:
                    pending_error = exc
                else:
                    text = serdes.serialize(value, SerdesContext(op_id, state.execution_id))
                    cur = state.get(op_id)
                    assert cur is not None
                    state.checkpoint(_update(cur, OperationAction.SUCCEED, payload=text), sync=True)
                    state.completed_new()
                    return serdes.deserialize(text, SerdesContext(op_id, state.execution_id))
            failure: Exception = pending_error
            pending_error = None
            error = ErrorObject.from_exception(failure)
            if strategy is None:
                strategy = RetryPresets.default()
            decision = strategy(failure, attempt)
            cur = state.get(op_id)
            if cur is None:
                cur = self._start(op_id, OperationType.STEP, OperationSubType.STEP, name)
            if not decision.should_retry:
                state.checkpoint(_update(cur, OperationAction.FAIL, error=error), sync=True)
                raise StepError.from_error_object(error) from failure
            delay = decision.delay_seconds
            if state.wire:  # the API takes whole seconds, at least one: the retry always suspends
                delay = seconds_to_wire(delay, minimum=1) or 1
            state.checkpoint(_update(cur, OperationAction.RETRY, error=error, next_attempt_delay_seconds=delay),
                             sync=True)
            attempt += 1
            if delay > 0:
                raise SuspendExecution(f"step {name or op_id} retries in {delay}s", until=state.now() + delay)

    # -- wait ------------------------------------------------------------------------------------
    def _wait_op(self, name_or_duration: str | Duration | timedelta | float,
                 duration: Duration | timedelta | float | None, name: str | None) -> tuple[str, OperationLogic]:
        if isinstance(name_or_duration, str):
            name = name_or_duration
            if duration is None:
                raise ConfigError(f"wait {name!r} needs a duration", field="duration", value=None)
            seconds = to_seconds(duration)
        else:
            seconds = to_seconds(name_or_duration)
        op_id, op = self._next(OperationType.WAIT, OperationSubType.WAIT, _check_name(name))

        def wait() -> None:
            # The service completes a wait (WAIT takes only START and CANCEL): the function suspends until
            # then, and a replay finds the wait SUCCEEDED.
            state = self._state
            current = op
            if current is None:
                wait_seconds = seconds_to_wire(seconds, minimum=1) if state.wire else seconds
                current = self._start(op_id, OperationType.WAIT, OperationSubType.WAIT, name,
                                      wait_seconds=wait_seconds)
            if current.done:
                return
            raise SuspendExecution(f"wait {name or op_id}", until=current.scheduled_timestamp)

        return op_id, _immediate(wait)

    # -- callbacks -------------------------------------------------------------------------------
    def _create_callback_op(self, name: str | None, config: CallbackConfig | None,
                            legacy: tuple[str | None, ...] = ()) -> tuple[str, OperationLogic]:
        config = config or CallbackConfig()
        op_id, op = self._next(OperationType.CALLBACK, OperationSubType.CALLBACK, _check_name(name), legacy)
        name = op.name if op is not None else name

        def create() -> Callback:
            current = op
            if current is None:
                self._start(
                    op_id, OperationType.CALLBACK, OperationSubType.CALLBACK, name, sync=True,
                    timeout_seconds=to_seconds(config.timeout_seconds, field="timeout_seconds") or None,
                    heartbeat_timeout_seconds=to_seconds(config.heartbeat_timeout_seconds,
                                                         field="heartbeat_timeout_seconds") or None,
                )
                current = self._state.get(op_id)  # with the id the service issued
                assert current is not None
            if current.callback_id is None:
                raise CheckpointError(f"the service issued no CallbackId for callback {name or op_id}")
            return Callback(self._state, op_id, current.callback_id, config.serdes or DEFAULT_SERDES)

        return op_id, _immediate(create)

    # -- signals ---------------------------------------------------------------------------------
    def _wait_for_signal_op(self, name: str, timeout: Duration | timedelta | float | None
                            ) -> tuple[str, OperationLogic]:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"wait_for_signal needs a signal name, got {name!r}", field="name", value=name)
        seconds = None if timeout is None else to_seconds(timeout, field="timeout")
        if seconds is not None and seconds <= 0:
            raise ConfigError(f"timeout must be positive, got {timeout!r}", field="timeout", value=timeout)
        op_id, op = self._next(OperationType.CALLBACK, OperationSubType.WAIT_FOR_SIGNAL, name)

        def wait() -> Any:
            # A CALLBACK named after the signal: the store settles it with the oldest signal of the name
            # (kept already, or the next to arrive); the service times it out like any callback.
            state = self._state
            current = op
            if current is None:
                self._start(op_id, OperationType.CALLBACK, OperationSubType.WAIT_FOR_SIGNAL, name, sync=True,
                            timeout_seconds=seconds_to_wire(seconds, minimum=1) if state.wire else seconds)
                current = state.get(op_id)  # settled already if a signal was kept
                assert current is not None
                if current.done:
                    state.completed_new()
            if current.status is OperationStatus.SUCCEEDED:
                return _decode(DEFAULT_SERDES, current.result, op_id, state.execution_id)
            if current.status is OperationStatus.TIMED_OUT:
                within = f" within {seconds:g}s" if seconds is not None else ""
                raise SignalTimeoutError(f"no signal {name!r} arrived{within}", error_type="SignalTimeoutError")
            if current.done:
                raise _callback_error(current.error)
            raise SuspendExecution(f"waiting for signal {name}", until=callback_deadline(current))

        return op_id, _immediate(wait)

    # -- child contexts --------------------------------------------------------------------------
    def _child_op(self, name: str | None, func: Callable[..., Any], sub_type: OperationSubType,
                  serdes: Serdes) -> tuple[str, OperationLogic]:
        op_id, op = self._next(OperationType.CONTEXT, sub_type, name)
        return op_id, self._child_logic(op_id, op, name, func, sub_type, serdes)

    def _child_logic(self, op_id: str, op: Operation | None, name: str | None, func: Callable[..., Any],
                     sub_type: OperationSubType, serdes: Serdes) -> OperationLogic:
        state = self._state
        error_cls: type[DurableOperationError] = ChildContextError
        if op is not None:
            if op.status is OperationStatus.SUCCEEDED:
                return _decode(serdes, op.result, op_id, state.execution_id)
            if op.status is OperationStatus.FAILED:
                if sub_type is OperationSubType.WAIT_FOR_CALLBACK:
                    raise _callback_error(op.error)
                raise error_cls.from_error_object(op.error or ErrorObject(message="child context failed"))
        else:
            op = self._start(op_id, OperationType.CONTEXT, sub_type, name)
        try:
            value = yield _Body(func, op_id)
        except (NonDeterministicExecutionError, SuspendExecution, ExecutionFencedOut):
            raise
        except Exception as exc:
            error = ErrorObject.from_exception(exc)
            state.checkpoint(_update(op, OperationAction.FAIL, error=error), sync=True)
            if sub_type is OperationSubType.WAIT_FOR_CALLBACK:
                raise _callback_error(error) from exc
            raise error_cls.from_error_object(error) from exc
        text = serdes.serialize(value, SerdesContext(op_id, state.execution_id))
        state.checkpoint(_update(op, OperationAction.SUCCEED, payload=text), sync=False)
        return serdes.deserialize(text, SerdesContext(op_id, state.execution_id))

    def _run_in_child_context_op(self, name_or_fn: Any, fn: Any, config: ChildConfig | None, name: str | None
                                 ) -> tuple[str, OperationLogic]:
        name, func = _name_and_callable(name_or_fn, fn, name, "child context function")
        config = config or ChildConfig()
        return self._child_op(_check_name(name), func, config.sub_type or OperationSubType.RUN_IN_CHILD_CONTEXT,
                              config.serdes or DEFAULT_SERDES)

    # -- invoke ----------------------------------------------------------------------------------
    def _invoke_op(self, function_name: str, payload: Any, name: str | None, config: InvokeConfig | None
                   ) -> tuple[str, OperationLogic]:
        if not isinstance(function_name, str) or not function_name:
            raise ConfigError(f"invoke needs a function name, got {function_name!r}", field="function_name",
                              value=function_name)
        cfg = config or InvokeConfig()
        op_id, op = self._next(OperationType.CHAINED_INVOKE, OperationSubType.CHAINED_INVOKE, _check_name(name))

        def invoke() -> Any:
            state = self._state
            current = op
            if current is None:
                state.backend.check_invoke(function_name)
                text = (cfg.serdes_payload or DEFAULT_SERDES).serialize(payload,
                                                                        SerdesContext(op_id, state.execution_id))
                current = self._start(op_id, OperationType.CHAINED_INVOKE, OperationSubType.CHAINED_INVOKE, name, sync=True,
                                      function_name=function_name, payload=text, tenant_id=state.tenant_id,
                                      child_execution_id=f"{state.execution_id}/{op_id}")
            if current.status is OperationStatus.SUCCEEDED:
                return _decode(cfg.serdes_result or DEFAULT_SERDES, current.result, op_id, state.execution_id)
            if current.done:
                raise InvokeError.from_error_object(current.error or ErrorObject(message="invoked function failed"))
            raise SuspendExecution(f"waiting for {function_name}", until=None)

        return op_id, _immediate(invoke)

    # -- wait for condition ----------------------------------------------------------------------
    def _wait_for_condition_op(self, check: Any, config: Any, name: Any) -> tuple[str, OperationLogic]:
        # both orders: (check, config, name) and, name first, (name, check, config)
        given: tuple[object, object, object] = (config, name, check) if isinstance(check, str) else (
            check, config, name)
        fn, cfg, given_name = given
        _check_callable(fn, "check")
        if isinstance(given_name, WaitForConditionConfig):
            raise ConfigError("wait_for_condition takes (check, config, name) or (name, check, config)",
                              field="name", value=repr(given_name))
        if not isinstance(cfg, WaitForConditionConfig):
            raise ConfigError("wait_for_condition needs config=WaitForConditionConfig(wait_strategy=..., "
                              f"initial_state=...), got {cfg!r}", field="config", value=repr(cfg))
        assert callable(fn)
        label = _check_name(given_name)
        op_id, op = self._next(OperationType.STEP, OperationSubType.WAIT_FOR_CONDITION, label)
        return op_id, self._condition_logic(op_id, op, label, fn, cfg)

    def _condition_logic(self, op_id: str, op: Operation | None, label: str | None, fn: Callable[..., Any],
                         cfg: WaitForConditionConfig[Any]) -> OperationLogic:
        state = self._state
        serdes = cfg.serdes or DEFAULT_SERDES
        sc = SerdesContext(op_id, state.execution_id)
        replayed = _replay_attempts(state, op, serdes, WaitForConditionError, "check failed",
                                    f"condition {label or op_id}")
        if replayed is not _RUN:
            return replayed
        current = (serdes.deserialize(op.result, sc) if op is not None and op.result is not None
                   else cfg.initial_state)
        attempt = op.attempt if op is not None and op.attempt else 1
        if op is None or op.status is not OperationStatus.STARTED:
            op = self._start(op_id, OperationType.STEP, OperationSubType.WAIT_FOR_CONDITION, label)
        try:
            new_state = yield _Call(fn, (current, StepContext(execution_id=state.execution_id, operation_id=op_id,
                                                              name=label, attempt=attempt, logger=self.logger)))
        except Exception as exc:
            error = ErrorObject.from_exception(exc)
            state.checkpoint(_update(op, OperationAction.FAIL, error=error), sync=True)
            raise WaitForConditionError.from_error_object(error) from exc
        text = serdes.serialize(new_state, sc)
        new_state = serdes.deserialize(text, sc)
        decision = cfg.wait_strategy(new_state, attempt)
        if not decision.should_continue:
            state.checkpoint(_update(op, OperationAction.SUCCEED, payload=text), sync=True)
            state.completed_new()
            return new_state
        delay = max(float(decision.delay_seconds), 0.0)
        if state.wire:
            delay = seconds_to_wire(delay, minimum=1) or 1
        state.checkpoint(_update(op, OperationAction.RETRY, payload=text, next_attempt_delay_seconds=delay),
                         sync=True)
        raise SuspendExecution(f"condition {label or op_id}", until=state.now() + delay)

    # -- versioning, events, children, continue as new --------------------------------------------
    def patched(self, change_id: str) -> bool:
        """Whether this execution takes the code path of ``change_id`` (Temporal's ``workflow.patched``):
        True for an execution that reaches this point on code that has it (a marker is checkpointed, so its
        replays agree), False for one whose history passed this point before the change was deployed. Not
        awaited, in an ``async def`` function too.

        Raises:
            ConfigError: ``change_id`` is not a non-empty string.
        """
        from ._versioning import patched

        return patched(self, change_id)

    def deprecate_patch(self, change_id: str) -> None:
        """Stand where ``patched(change_id)`` stood once its old branch is gone (Temporal's
        ``workflow.deprecate_patch``): histories with the marker replay, new ones get none."""
        from ._versioning import patched

        patched(self, change_id, record=False)

    def continue_as_new(self, input: Any = None) -> NoReturn:
        """End this run and start the execution again on ``input`` with an empty history (the same
        execution id; ``ExecutionInfo`` keeps it, its run number grows), so a long-lived function's history
        stays bounded. Kept signals and events carry over; operations not checkpointed yet are dropped.

        Raises:
            PayloadError: ``input`` is not JSON.
        """
        raise ContinueAsNew(dumps(input, field="input"))

    def _set_event_op(self, key: str, value: Any) -> tuple[str, OperationLogic]:
        from ._events import set_event_op

        return set_event_op(self, key, value)

    def _start_child_op(self, function: str, input: Any, name: str | None) -> tuple[str, OperationLogic]:
        from ._continuation import start_child_op

        return start_child_op(self, function, input, name)

    # -- map / parallel --------------------------------------------------------------------------
    def _map_batch(self, name_or_items: Any, items_or_fn: Any, fn: Any, config: MapConfig | None,
                   name: str | None) -> Batch:
        if isinstance(name_or_items, str) and fn is not None:
            name, items, func = name_or_items, items_or_fn, fn
        else:
            items, func = name_or_items, items_or_fn
            if isinstance(fn, MapConfig):
                config = fn
        _check_callable(func, "map function")
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
            try:
                items = list(items)
            except TypeError:
                raise ConfigError(f"map items must be a sequence, got {type(items).__name__}", field="items",
                                  value=type(items).__name__) from None
        config = config or MapConfig()
        seq = list(items)
        names = [_check_name(config.item_namer(seq[i], i)) for i in range(len(seq))] if config.item_namer else None
        return self._batch(_check_name(name), [(func, (seq[i], i, seq)) for i in range(len(seq))],
                           config.max_concurrency, config.completion_config,
                           config.item_serdes or config.serdes or DEFAULT_SERDES,
                           OperationSubType.MAP, OperationSubType.MAP_ITERATION, names=names,
                           batch_serdes=config.batch_serdes)

    def _parallel_batch(self, name_or_functions: Any, functions: Any, config: ParallelConfig | None,
                        name: str | None) -> Batch:
        if isinstance(name_or_functions, str):
            name, fns = name_or_functions, functions
        else:
            fns = name_or_functions
            if isinstance(functions, ParallelConfig):
                config = functions
        return self._branches_batch(_check_name(name), list(fns or []), config, "parallel branch")

    def _concurrently(self, first: Any, second: Any, third: Any, *rest: Any) -> Batch:
        if (first is None or isinstance(first, str)) and not callable(second):
            return self._items_batch(_check_name(first), second or [], third, rest[0] if rest else None)
        return self._branches_batch(_check_name(second), list(first or []), third, "branch")

    def _branches_batch(self, name: str | None, fns: list[Any], config: ParallelConfig | None, what: str) -> Batch:
        config = config or ParallelConfig()
        branches = [_branch(f, what) for f in fns]
        names = [n for n, _ in branches]
        return self._batch(name, [(f, ()) for _, f in branches], config.max_concurrency, config.completion_config,
                           config.item_serdes or config.serdes or DEFAULT_SERDES, OperationSubType.PARALLEL,
                           OperationSubType.PARALLEL_BRANCH, names=names, batch_serdes=config.batch_serdes)

    def _items_batch(self, name: str | None, items: Any, fn: Any, config: ParallelConfig | None) -> Batch:
        """``execute_concurrently(name, items, fn)``: ``fn(child_ctx, item)`` per ``ConcurrentItem``."""
        _check_callable(fn, "concurrent function")
        config = config or ParallelConfig()
        seq = [_concurrent_item(item, i) for i, item in enumerate(list(items))]
        names = [item.name for item in seq]
        return self._batch(name, [(fn, (item,)) for item in seq], config.max_concurrency, config.completion_config,
                           config.item_serdes or config.serdes or DEFAULT_SERDES, OperationSubType.PARALLEL,
                           OperationSubType.PARALLEL_BRANCH, names=names, batch_serdes=config.batch_serdes)

    def _batch(self, name: str | None, branches: list[tuple[Callable[..., Any], tuple[Any, ...]]],
               max_concurrency: int | None, completion: CompletionConfig, serdes: Serdes, outer: OperationSubType,
               inner: OperationSubType, *, names: list[str | None] | None = None,
               batch_serdes: Serdes | None = None) -> Batch:
        if max_concurrency is not None and (not isinstance(max_concurrency, int) or max_concurrency < 1):
            raise ConfigError(f"max_concurrency must be a positive integer or None, got {max_concurrency!r}",
                              field="max_concurrency", value=max_concurrency)
        op_id, op = self._next(OperationType.CONTEXT, outer, name)
        batch = Batch(self, op_id, op, name, branches, max_concurrency, completion, serdes, outer, inner)
        batch.names = branch_names(inner, names or [None] * len(branches))
        batch.batch_serdes = batch_serdes
        return batch


def branch_names(inner: OperationSubType, given: Sequence[str | None]) -> list[str | None]:
    """The names of a batch's iterations or branches: as given, else as AWS's SDK names them,
    ``map-item-<i>`` / ``parallel-branch-<i>``. (errands left them unnamed before; their names are not
    checked on replay, so such a history replays.)"""
    prefix = "map-item-" if inner is OperationSubType.MAP_ITERATION else "parallel-branch-"
    return [n if n is not None else f"{prefix}{i}" for i, n in enumerate(given)]


class Batch:
    """One ``map`` / ``parallel`` operation: its branches, their outcomes so far, and when it is complete.
    The sync context runs the branches on threads, the async one as tasks; both through these methods."""

    def __init__(self, ctx: _ContextCore, op_id: str, op: Operation | None, name: str | None,
                 branches: list[tuple[Callable[..., Any], tuple[Any, ...]]], max_concurrency: int | None,
                 completion: CompletionConfig, serdes: Serdes, outer: OperationSubType, inner: OperationSubType
                 ) -> None:
        self.ctx = ctx
        self.state = ctx._state
        self.op_id = op_id
        self.op = op
        self.name = name
        self.branches = branches
        self.max_concurrency = max_concurrency
        self.completion = completion
        self.serdes = serdes
        self.outer = outer
        self.inner = inner
        self.total = len(branches)
        self.branch_ids = [operation_id(op_id, i + 1) for i in range(self.total)]
        self.outcomes: dict[int, tuple[str, Any]] = {}
        self.queue: list[int] = []
        self.stop = False
        self.fatal: BaseException | None = None
        self.names: list[str | None] = []
        self.batch_serdes: Serdes | None = None

    def open(self) -> BatchResult[Any] | None:
        """The checkpointed result on replay; else start the operation and queue the unfinished branches
        (None)."""
        state = self.state
        if self.op is not None and self.op.status is OperationStatus.SUCCEEDED:
            return self.decode(self.op.result)
        if self.op is None:
            self.op = self.ctx._start(self.op_id, OperationType.CONTEXT, self.outer, self.name)
        for i, bid in enumerate(self.branch_ids):
            bop = state.get(bid)
            if bop is not None and bop.status is OperationStatus.SUCCEEDED:
                self.outcomes[i] = ("ok", bop.result)
            elif bop is not None and bop.status is OperationStatus.FAILED:
                self.outcomes[i] = ("err", bop.error)
            else:
                self.queue.append(i)
        self.stop = _should_stop(self.outcomes, self.total, self.completion)
        return None

    def workers(self) -> int:
        return min(self.max_concurrency or len(self.queue), len(self.queue))

    def next_branch(self, running: int, workers: int) -> int | None:
        """The next branch to start while ``running`` run, or None."""
        if self.queue and running < workers and not self.stop and self.fatal is None:
            return self.queue.pop(0)
        return None

    def branch(self, i: int) -> OperationLogic:
        """The logic of branch ``i``: ``("ok", text)``, ``("err", error)`` or ``("suspend", until)``."""
        state = self.state
        bid = self.branch_ids[i]
        bop = state.get(bid)
        if bop is not None and (bop.type, bop.sub_type) != (OperationType.CONTEXT, self.inner):
            raise state.mark_fatal(NonDeterministicExecutionError(
                f"branch {i} of {self.name or self.op_id} was {bop.type.value}/{bop.sub_type}", step_id=bid))
        if bop is None:
            bop = state.checkpoint(OperationUpdate(
                operation_id=bid, operation_type=OperationType.CONTEXT, action=OperationAction.START,
                parent_id=self.op_id, name=self.names[i], sub_type=self.inner), sync=False)
        fn, args = self.branches[i]
        try:
            value = yield _Body(fn, bid, args)
        except SuspendExecution as s:
            return ("suspend", s.until)
        except (NonDeterministicExecutionError, ExecutionFencedOut):
            raise
        except Exception as exc:
            error = ErrorObject.from_exception(exc)
            state.checkpoint(_update(bop, OperationAction.FAIL, error=error), sync=True)
            return ("err", error)
        text = self.serdes.serialize(value, SerdesContext(bid, state.execution_id))
        state.checkpoint(_update(bop, OperationAction.SUCCEED, payload=text), sync=False)
        return ("ok", text)

    def finished(self, i: int, result: Callable[[], tuple[str, Any]]) -> None:
        """Record how branch ``i`` ended (``result()`` gives its outcome or raises its error, which is
        re-raised by ``close`` once every running branch has stopped)."""
        try:
            self.outcomes[i] = result()
        except BaseException as exc:
            self.fatal = self.fatal or exc
        self.stop = self.stop or _should_stop(self.outcomes, self.total, self.completion)

    def close(self) -> BatchResult[Any]:
        """Checkpoint and return the result once complete; else suspend until the earliest branch's time."""
        if self.fatal is not None:
            raise self.fatal
        state, total, completion = self.state, self.total, self.completion
        finished = {i: o for i, o in self.outcomes.items() if o[0] != "suspend"}
        if len(finished) < total and not _should_stop(finished, total, completion):
            until = earliest([o[1] for o in self.outcomes.values() if o[0] == "suspend"])
            raise SuspendExecution(f"{self.outer.value} {self.name or self.op_id} waits for its branches",
                                   until=until)
        items: list[dict[str, Any]] = []
        for i in range(total):
            kind, value = finished.get(i, ("started", None))
            if kind == "ok":
                items.append({"index": i, "status": "SUCCEEDED", "result": self._item_result(i, value),
                              "error": None})
            elif kind == "err":
                items.append({"index": i, "status": "FAILED", "result": None,
                              "error": value.to_dict() if value else None})
            else:
                items.append({"index": i, "status": "STARTED", "result": None, "error": None})
        data = {"all": items, "completionReason": _reason(finished, total, completion).value}
        if self.batch_serdes is not None:
            text = self.batch_serdes.serialize(data, SerdesContext(self.op_id, state.execution_id))
        else:
            text = json.dumps(data, separators=(",", ":"))
        assert self.op is not None
        state.checkpoint(_update(self.op, OperationAction.SUCCEED, payload=text), sync=False)
        return self.decode(text)

    def _item_result(self, i: int, text: str | None) -> Any:
        """What the checkpoint holds for item ``i``'s result: its value, as AWS's SDK's batch results do, when
        that is plain JSON; else the text the item serdes made of it (as the branch's own checkpoint)."""
        value = _decode(self.serdes, text, self.branch_ids[i], self.state.execution_id)
        return value if _plain_json(value) else text

    def decode(self, text: str | None) -> BatchResult[Any]:
        """The ``BatchResult`` of the checkpointed ``text``. An item's result is its branch checkpoint's text
        when it equals that text (so, decoded with the item serdes: a value JSON cannot hold, or a history
        recorded before batch results held values), else the value itself."""
        state, serdes = self.state, self.serdes
        if text is not None and self.batch_serdes is not None:
            data = self.batch_serdes.deserialize(text, SerdesContext(self.op_id, state.execution_id))
        else:
            data = json.loads(text or '{"all":[],"completionReason":"ALL_COMPLETED"}')
        items: list[BatchItem[Any]] = []
        for raw in data["all"]:
            index, status = int(raw["index"]), BatchItemStatus(raw["status"])
            result = raw.get("result")
            if status is not BatchItemStatus.SUCCEEDED:
                result = None
            elif isinstance(result, str) and 0 <= index < self.total:
                bop = state.get(self.branch_ids[index])
                if bop is not None and bop.result == result:
                    result = _decode(serdes, result, bop.id, state.execution_id)
            error = ErrorObject.from_dict(raw["error"]) if raw.get("error") else None
            items.append(BatchItem(index=index, status=status, result=result, error=error))
        return BatchResult(all=items, completion_reason=CompletionReason(data["completionReason"]))


def _plain_json(value: Any) -> bool:
    """Whether ``value`` is made of JSON's own types only (and so comes back from JSON as it went in)."""
    if value is None or type(value) in (str, int, float, bool):
        return True
    if type(value) is list:
        return all(_plain_json(v) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _plain_json(v) for k, v in value.items())
    return False


class DurableFuture(Generic[T]):
    """An operation of a sync function that runs later, at most once: ``ctx.step_future(...)`` takes the
    operation's id at once (in call order, like any call) and ``future.result()`` runs it the first time
    and returns (or raises) the same outcome every time after. The reference SDK's Future / Await; an
    ``async def`` function gets the same from ``asyncio`` (``DurableOperation``)."""

    def __init__(self, ctx: DurableContext, op_id: str, logic: OperationLogic) -> None:
        self._ctx = ctx
        self.operation_id = op_id
        self._logic: OperationLogic | None = logic
        self._lock = threading.Lock()
        self._value: Any = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """Whether the operation has run (to a value or an error)."""
        return self._logic is None

    def result(self) -> T:
        """Run the operation if it has not run yet; its value, or its error raised (a suspension too)."""
        with self._lock:
            if self._logic is not None:
                logic, self._logic = self._logic, None
                try:
                    self._value = self._ctx._drive(logic)
                except BaseException as exc:  # kept and re-raised on every call, a suspension included
                    self._error = exc
        if self._error is not None:
            raise self._error
        value: T = self._value
        return value


class DurableContext(_ContextCore):
    """The handle a durable function uses for every side effect, wait and fan-out.

    Each call is an operation with an id derived from its parent and its call order. On replay, a
    finished operation returns its checkpointed result without running again; one whose type, subtype or
    name differs from the checkpoint raises ``NonDeterministicExecutionError``.

    Both the AWS argument order (``step(fn, name=...)``, ``wait(duration, name=...)``,
    ``map(items, fn, name=...)``) and the name-first order (``step("name", fn)``, ``wait("name",
    duration)``, ``map("name", items, fn)``) are accepted.

    An ``async def`` step, check or submitter is awaited on the calling thread's own event loop; an ``async
    def`` child-context or branch function gets an ``AsyncDurableContext`` there.
    """

    def _drive(self, logic: OperationLogic) -> Any:
        """Run an operation's logic in this thread, calling the user code it yields."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                request = logic.throw(error) if error is not None else logic.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                value = self._perform(request)
            except BaseException as exc:  # handed to the logic, which decides what it catches
                error = exc

    def _perform(self, request: _Call | _Body) -> Any:
        if isinstance(request, _Body):
            with self._lock:
                self._inside += 1
            try:
                return self._perform_body(request)
            finally:
                with self._lock:
                    self._inside -= 1
        return self._perform_call(request)

    def _perform_call(self, request: _Call) -> Any:
        result = request.fn(*request.args)
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            result = self._await_here(result)
        return result

    def _perform_body(self, request: _Body) -> Any:
        if is_async_callable(request.fn):
            from ._async_context import AsyncDurableContext, run_body

            child = AsyncDurableContext(self._state, request.parent_id)
            return self._await_here(run_body(child, request.fn(child, *request.args)))
        else:
            result = request.fn(DurableContext(self._state, parent_id=request.parent_id), *request.args)
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            result = self._await_here(result)
        return result

    # -- step ------------------------------------------------------------------------------------
    def step(self, name_or_fn: str | Callable[[StepContext], T], fn: Callable[[StepContext], T] | None = None,
             config: StepConfig | None = None, *, name: str | None = None) -> T:
        """Run ``fn(step_context)`` once and checkpoint its result; on replay return the checkpoint.

        Args:
            name_or_fn: the step's name (then ``fn``), or the function (AWS order).
            fn: the function, when a name comes first.
            config: retry strategy, semantics and serdes.
            name: the step's name in the AWS order.

        Raises:
            StepError: the function failed and the retry strategy gave up.
        """
        result: T = self._drive(self._step_op(name_or_fn, fn, config, name)[1])  # the checkpoint's value, decoded
        return result

    # -- futures ---------------------------------------------------------------------------------
    def step_future(self, name_or_fn: str | Callable[[StepContext], T], fn: Callable[[StepContext], T] | None = None,
                    config: StepConfig | None = None, *, name: str | None = None) -> DurableFuture[T]:
        """``step`` as a ``DurableFuture``: the id is taken now, the step runs on ``result()``."""
        return DurableFuture(self, *self._step_op(name_or_fn, fn, config, name))

    def wait_future(self, name_or_duration: str | Duration | timedelta | float,
                    duration: Duration | timedelta | float | None = None, *, name: str | None = None
                    ) -> DurableFuture[None]:
        """``wait`` as a ``DurableFuture``."""
        return DurableFuture(self, *self._wait_op(name_or_duration, duration, name))

    def invoke_future(self, function_name: str, payload: Any = None, name: str | None = None,
                      config: InvokeConfig | None = None) -> DurableFuture[Any]:
        """``invoke`` as a ``DurableFuture``."""
        return DurableFuture(self, *self._invoke_op(function_name, payload, name, config))

    def run_in_child_context_future(self, name_or_fn: str | Callable[[DurableContext], T],
                                    fn: Callable[[DurableContext], T] | None = None,
                                    config: ChildConfig | None = None, *, name: str | None = None
                                    ) -> DurableFuture[T]:
        """``run_in_child_context`` as a ``DurableFuture``."""
        return DurableFuture(self, *self._run_in_child_context_op(name_or_fn, fn, config, name))

    # -- wait ------------------------------------------------------------------------------------
    def wait(self, name_or_duration: str | Duration | timedelta | float,
             duration: Duration | timedelta | float | None = None, *, name: str | None = None) -> None:
        """Suspend the execution for ``duration`` (a ``Duration``, ``timedelta`` or seconds).

        The invocation ends here (``PENDING``) and a later one continues after the wait.
        """
        self._drive(self._wait_op(name_or_duration, duration, name)[1])

    # -- callbacks -------------------------------------------------------------------------------
    def create_callback(self, name: str | None = None, config: CallbackConfig | None = None) -> Callback:
        """A callback id to hand out; ``callback.result()`` suspends until it is completed.

        The id is committed before this returns, so it is safe to send anywhere.
        """
        callback: Callback = self._drive(self._create_callback_op(name, config)[1])
        return callback

    def wait_for_callback(self, name_or_submitter: str | Callable[[str, Any], Any],
                          submitter: Callable[[str, Any], Any] | None = None,
                          config: WaitForCallbackConfig | None = None, *, name: str | None = None) -> Any:
        """Create a callback, run ``submitter(callback_id, step_context)`` as a step, then wait for the result.

        Raises:
            CallbackError: the callback was failed, or the submitter failed.
            CallbackTimeoutError: no result or heartbeat came in time.
        """
        name, sub = _name_and_callable(name_or_submitter, submitter, name, "submitter")
        config = config or WaitForCallbackConfig()
        serdes = config.serdes or DEFAULT_SERDES

        callback_name, submitter_name = wait_for_callback_names(name)

        def body(child: DurableContext) -> Any:
            cb: Callback = child._drive(child._create_callback_op(
                callback_name, _callback_config(config, serdes), LEGACY_CALLBACK_NAMES)[1])
            try:
                child._drive(child._step_op(lambda sctx: sub(cb.callback_id, sctx), None, _submitter_config(config),
                                            submitter_name, LEGACY_SUBMITTER_NAMES)[1])
            except StepError as exc:
                raise _submitter_error(exc) from exc
            return cb.result()

        return self._drive(self._child_op(_check_name(name), body, OperationSubType.WAIT_FOR_CALLBACK, serdes)[1])

    # -- signals ---------------------------------------------------------------------------------
    def wait_for_signal(self, name: str, timeout: Duration | timedelta | float | None = None) -> Any:
        """The payload of the next signal ``name`` sent to this execution (``DurableRunner.send_signal``);
        suspends until one arrives. A signal sent before the wait is kept for it; several are taken in the
        order sent, one per wait.

        Args:
            name: the signal's name (also the operation's name).
            timeout: give up after this long (a ``Duration``, ``timedelta`` or seconds; None: wait forever).

        Raises:
            SignalTimeoutError: no signal arrived within ``timeout``.
        """
        return self._drive(self._wait_for_signal_op(name, timeout)[1])

    def effect(self, name: str, effect: Effect) -> EffectRecord:
        """Submit ``effect`` through the runner's outbox, in the transaction of this operation's checkpoint,
        and suspend until it is ``CONFIRMED``; on replay, the recorded record. See ``_effects``.

        Args:
            name: the operation's name.
            effect: the effect; its ``key`` is replaced by ``durable/<execution id>/<operation id>`` and its
                ``run_id`` defaults to the execution id (``Outbox.compensate_run(execution_id)``).

        Raises:
            EffectFailedError: the effect ended ``FAILED`` or ``CANCELLED`` (``.record`` says how).
            ConfigError, PayloadError: a bad effect, or a runner without an outbox; nothing is submitted.
        """
        return self._drive(effects.effect_op(self, name, effect)[1])  # type: ignore[no-any-return]

    # -- child contexts --------------------------------------------------------------------------
    def run_in_child_context(self, name_or_fn: str | Callable[[DurableContext], T],
                             fn: Callable[[DurableContext], T] | None = None, config: ChildConfig | None = None,
                             *, name: str | None = None) -> T:
        """Run ``fn(child_ctx)`` as one operation with its own operations inside.

        Raises:
            ChildContextError: ``fn`` raised.
        """
        value: T = self._drive(self._run_in_child_context_op(name_or_fn, fn, config, name)[1])
        return value

    # -- invoke ----------------------------------------------------------------------------------
    def invoke(self, function_name: str, payload: Any = None, name: str | None = None,
               config: InvokeConfig | None = None) -> Any:
        """Start the durable function ``function_name`` as a child execution and wait for its result.

        Raises:
            InvokeError: the child execution failed.
        """
        return self._drive(self._invoke_op(function_name, payload, name, config)[1])

    # -- events and children ---------------------------------------------------------------------
    def set_event(self, key: str, value: Any) -> None:
        """Publish ``value`` (JSON) under ``key`` for ``DurableRunner.get_event``: a checkpointed operation,
        committed before this returns; the latest value of a key wins.

        Raises:
            ConfigError: ``key`` is not a non-empty string. PayloadError: ``value`` is not JSON.
        """
        self._drive(self._set_event_op(key, value)[1])

    def start_child(self, function: str, input: Any = None, *, name: str | None = None) -> str:
        """Start the durable function ``function`` on ``input`` as a child execution without waiting for it;
        its id (``<this id>/<operation id>``, the same on every replay). The child ends with its parent's
        timeout or recursive termination; ``DurableRunner.get`` / ``wait`` follow it.

        Raises:
            ConfigError: ``function`` is not registered, or the backend is not a ``DurableRunner``'s.
            PayloadError: ``input`` is not JSON.
        """
        child: str = self._drive(self._start_child_op(function, input, name)[1])
        return child

    # -- wait for condition ----------------------------------------------------------------------
    def wait_for_condition(self, check: Callable[[Any, StepContext], Any] | str,
                           config: WaitForConditionConfig[Any] | Callable[[Any, StepContext], Any] | None = None,
                           name: str | WaitForConditionConfig[Any] | None = None) -> Any:
        """Poll ``check(state, step_context) -> new_state`` until ``config.wait_strategy(state, attempt)``
        says stop, suspending between checks. Returns the final state.

        Raises:
            WaitForConditionError: ``check`` raised.
        """
        return self._drive(self._wait_for_condition_op(check, config, name)[1])

    # -- map / parallel --------------------------------------------------------------------------
    def map(self, name_or_items: Any, items_or_fn: Any = None, fn: Any = None,
            config: MapConfig | None = None, *, name: str | None = None) -> BatchResult[Any]:
        """Run ``fn(child_ctx, item, index, items)`` for every item, at most ``max_concurrency`` at once.

        Each item runs in its own child context; the ``BatchResult`` is checkpointed once complete.
        """
        return self._run_batch(self._map_batch(name_or_items, items_or_fn, fn, config, name))

    def parallel(self, name_or_functions: Any, functions: Any = None, config: ParallelConfig | None = None,
                 *, name: str | None = None) -> BatchResult[Any]:
        """Run each ``fn(child_ctx)`` of ``functions`` as a branch, at most ``max_concurrency`` at once."""
        return self._run_batch(self._parallel_batch(name_or_functions, functions, config, name))

    def execute_concurrently(self, functions_or_name: Sequence[Any] | str | None, name: Any = None,
                             config: Any = None, *args: Any) -> BatchResult[Any]:
        """The engine under ``map`` and ``parallel``: run branches with bounded concurrency until the
        completion config is met.

        ``execute_concurrently([fn, ...], name, config)`` runs each ``fn(child_ctx)``;
        ``execute_concurrently(name, items, fn, config)`` (the reference's form) runs ``fn(child_ctx, item)``
        for each ``ConcurrentItem`` (``id``, ``data``, ``index``, ``name``; plain values and mappings with
        those keys are wrapped).
        """
        return self._run_batch(self._concurrently(functions_or_name, name, config, *args))

    def _run_batch(self, batch: Batch) -> BatchResult[Any]:
        replayed = batch.open()
        if replayed is not None:
            return replayed
        if batch.queue and not batch.stop:
            workers = batch.workers()
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="errands-durable") as pool:
                running: dict[Future[tuple[str, Any]], int] = {}
                while batch.queue or running:
                    while (i := batch.next_branch(len(running), workers)) is not None:
                        # In this thread's context: a branch's steps are spans of this invocation's trace.
                        running[pool.submit(contextvars.copy_context().run, self._drive, batch.branch(i))] = i
                    if not running:
                        break
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        batch.finished(running.pop(f), f.result)
        return batch.close()


def _callback_config(config: WaitForCallbackConfig, serdes: Serdes) -> CallbackConfig:
    return CallbackConfig(timeout_seconds=config.timeout_seconds,
                          heartbeat_timeout_seconds=config.heartbeat_timeout_seconds, serdes=serdes)


def wait_for_callback_names(name: str | None) -> tuple[str, str]:
    """The names of ``wait_for_callback``'s callback and submitter step, as AWS's SDK gives them:
    ``"<name> create callback id"`` and ``"<name> submitter"``."""
    prefix = f"{name} " if name else ""
    return f"{prefix}create callback id", f"{prefix}submitter"


#: The names errands gave them before it named them as AWS's SDK does; a history recorded then replays.
LEGACY_CALLBACK_NAMES: tuple[str | None, ...] = (None,)
LEGACY_SUBMITTER_NAMES: tuple[str | None, ...] = ("submitter",)


def _submitter_config(config: WaitForCallbackConfig) -> StepConfig:
    return StepConfig(retry_strategy=config.retry_strategy or RetryPresets.none())


def _submitter_error(exc: StepError) -> CallbackError:
    return CallbackError(exc.error_message, error_type=exc.error_type, error_data=exc.error_data,
                         stack_trace=exc.stack_trace)


def _counts(outcomes: dict[int, tuple[str, Any]]) -> tuple[int, int]:
    ok = sum(1 for k, _ in outcomes.values() if k == "ok")
    err = sum(1 for k, _ in outcomes.values() if k == "err")
    return ok, err


def _should_stop(outcomes: dict[int, tuple[str, Any]], total: int, cc: CompletionConfig) -> bool:
    ok, err = _counts(outcomes)
    if ok + err >= total:
        return True
    if cc.min_successful is not None and ok >= cc.min_successful:
        return True
    if cc.tolerated_failure_count is None and cc.tolerated_failure_percentage is None:
        return err > 0
    if cc.tolerated_failure_count is not None and err > cc.tolerated_failure_count:
        return True
    return bool(cc.tolerated_failure_percentage is not None and total
                and err * 100.0 / total > cc.tolerated_failure_percentage)


def _reason(outcomes: dict[int, tuple[str, Any]], total: int, cc: CompletionConfig) -> CompletionReason:
    ok, err = _counts(outcomes)
    if ok + err >= total:
        return CompletionReason.ALL_COMPLETED
    if cc.min_successful is not None and ok >= cc.min_successful:
        return CompletionReason.MIN_SUCCESSFUL_REACHED
    return CompletionReason.FAILURE_TOLERANCE_EXCEEDED


def _branch(f: Any, what: str) -> tuple[str | None, Any]:
    """A parallel branch as (name, function): a callable, a ``NamedBranch``, a ``(name, fn)`` pair or a
    mapping with ``name`` and ``func``."""
    name: Any
    fn: Any
    if isinstance(f, NamedBranch):
        name, fn = f.name, f.func
    elif isinstance(f, tuple) and len(f) == 2 and (f[0] is None or isinstance(f[0], str)):
        name, fn = f
    elif isinstance(f, Mapping):
        name, fn = f.get("name"), f.get("func")
    else:
        name, fn = None, f
    _check_callable(fn, what)
    return _check_name(name), fn


def _concurrent_item(item: Any, index: int) -> ConcurrentItem[Any]:
    if isinstance(item, ConcurrentItem):
        return item
    if isinstance(item, Mapping) and "data" in item:
        return ConcurrentItem(id=str(item.get("id", index)), data=item["data"], index=int(item.get("index", index)),
                              name=_check_name(item.get("name")))
    return ConcurrentItem(id=str(index), data=item, index=index)


@dataclass(frozen=True, slots=True)
class InvocationOutcome:
    """How one invocation of a durable function ended. ``ABANDONED`` (with ``abandoned``): the store failed
    under it; nothing is recorded and the execution is replayed later."""

    status: str
    result: str | None = None
    error: ErrorObject | None = None
    until: float | None = None
    abandoned: InvocationAbandoned | None = None


def run_handler(fn: Callable[[Any, Any], Any], event: Any, state: ExecutionState) -> InvocationOutcome:
    """Run ``fn(event, ctx)`` over ``state``: SUCCEEDED with the JSON result, FAILED with the error, PENDING
    until a time (None: until a callback or child arrives), or ABANDONED when a checkpoint could not be
    written. ``ExecutionFencedOut`` propagates, even when user code swallowed it.

    An ``async def`` function gets an ``AsyncDurableContext`` and runs on this thread's own event loop (on a
    helper thread's if this thread runs a loop already)."""
    outcome = _run_handler(fn, event, state)
    stopped = state.stopped
    if isinstance(stopped, ExecutionFencedOut):
        raise stopped
    if isinstance(stopped, InvocationAbandoned):
        return InvocationOutcome("ABANDONED", abandoned=stopped)
    return outcome


def _run_handler(fn: Callable[[Any, Any], Any], event: Any, state: ExecutionState) -> InvocationOutcome:
    try:
        if is_async_callable(fn):
            from ._async_context import AsyncDurableContext, run_body

            actx = AsyncDurableContext(state)
            value = _loops.run_here(run_body(actx, fn(event, actx)))
        else:
            value = fn(event, DurableContext(state))
    except InvocationAbandoned as abandoned:
        return InvocationOutcome("ABANDONED", abandoned=abandoned)
    except ContinueAsNew as cont:  # the next run's input travels as the outcome's result
        if state.fatal is not None:
            return InvocationOutcome("FAILED", error=ErrorObject.from_exception(state.fatal))
        return InvocationOutcome("CONTINUED", result=cont.input_text)
    except SuspendExecution as s:
        if state.fatal is not None:
            return InvocationOutcome("FAILED", error=ErrorObject.from_exception(state.fatal))
        return InvocationOutcome("PENDING", until=s.until)
    except Exception as exc:
        return InvocationOutcome("FAILED", error=ErrorObject.from_exception(state.fatal or exc))
    if state.fatal is not None:
        return InvocationOutcome("FAILED", error=ErrorObject.from_exception(state.fatal))
    try:
        text = DEFAULT_SERDES.serialize(value, SerdesContext("", state.execution_id))
    except Exception as exc:
        return InvocationOutcome("FAILED", error=ErrorObject.from_exception(exc))
    return InvocationOutcome("SUCCEEDED", result=text)
