"""``AsyncDurableContext``: the context an ``async def`` durable function gets. Every operation returns a
``DurableOperation``, an awaitable whose operation id is fixed when the operation is called, so
``asyncio.gather(ctx.step(a), ctx.step(b))`` gives the same ids on every replay whatever finishes first.

The operations' logic is the sync context's (``OperationLogic``): the parts between user calls, which
write checkpoints, run inline on the invocation's own loop (``_loops``); async user code is awaited there,
sync user code runs inline when nothing else is alive on the loop, else on the loop's bounded pool.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from datetime import timedelta
from typing import Any, Awaitable, Callable, Coroutine, Generator, Generic, TypeVar

from errands.core import Effect, EffectRecord

from . import _effects as effects
from . import _loops
from ._context import (
    _PLAIN,
    LEGACY_CALLBACK_NAMES,
    LEGACY_SUBMITTER_NAMES,
    Batch,
    Callback,
    DurableContext,
    OperationLogic,
    StepContext,
    _Body,
    _Call,
    _callback_config,
    _check_name,
    _ContextCore,
    _name_and_callable,
    _submitter_config,
    _submitter_error,
    is_async_callable,
    wait_for_callback_names,
)
from ._errors import StepError, SuspendExecution
from ._serdes import DEFAULT_SERDES
from ._state import ExecutionState, earliest
from ._values import (
    BatchResult,
    CallbackConfig,
    ChildConfig,
    Duration,
    InvokeConfig,
    MapConfig,
    OperationSubType,
    ParallelConfig,
    StepConfig,
    WaitForCallbackConfig,
    WaitForConditionConfig,
)

T = TypeVar("T")


class DurableOperation(Generic[T]):
    """An operation of an ``AsyncDurableContext``: await it for the operation's value.

    The operation id is assigned when the operation is called, in call order; the operation runs when it
    is first awaited, in the awaiting task (``asyncio.gather`` awaits its arguments at once, each in a task
    of its own, so they run concurrently). Awaiting it again gives the same outcome.

    Attributes:
        operation_id: the operation's id, the same on every replay.
    """

    __slots__ = ("_ctx", "_make", "_outcome", "operation_id")

    def __init__(self, ctx: AsyncDurableContext, op_id: str, make: Callable[[], Coroutine[Any, Any, T]]) -> None:
        self._ctx = ctx
        self._make = make
        self._outcome: asyncio.Future[T] | None = None
        self.operation_id = op_id

    def __await__(self) -> Generator[Any, None, T]:
        outcome = self._outcome
        if outcome is not None:
            return (yield from outcome.__await__())
        ctx = self._ctx
        self._outcome = outcome = ctx._begin()
        try:
            value = yield from self._make().__await__()
        except (asyncio.CancelledError, GeneratorExit):
            outcome.cancel()
            ctx._end(outcome)
            raise
        except BaseException as exc:
            outcome.set_exception(exc)
            ctx._end(outcome)
            raise
        outcome.set_result(value)
        ctx._end(outcome)
        return value

    def __repr__(self) -> str:
        return f"DurableOperation({self.operation_id})"


class AsyncCallback:
    """A callback created by ``await ctx.create_callback(...)`` in an async function: hand out
    ``callback_id``, then ``await callback.result()``."""

    def __init__(self, callback: Callback) -> None:
        self._callback = callback
        self.operation_id = callback.operation_id
        self.callback_id = callback.callback_id

    async def result(self) -> Any:
        """The callback's result; suspends while it has none.

        Raises:
            CallbackError: the callback was failed.
            CallbackTimeoutError: no result or heartbeat came in time.
        """
        return self._callback.result()


async def run_body(ctx: AsyncDurableContext, body: Awaitable[T]) -> T:
    """Await a context function's coroutine, then every operation it started and did not await (or whose
    failure ``asyncio.gather`` left running). A suspension of any of them suspends the body, until the
    earliest time among them: a suspension cannot be swallowed (not by ``return_exceptions=True`` either)."""
    suspended: list[SuspendExecution] = []
    try:
        value = await body
    except SuspendExecution as s:
        suspended.append(s)
    except BaseException:
        await ctx._settle()
        raise
    suspended += await ctx._settle()
    if suspended:
        raise SuspendExecution(suspended[0].args[0] if suspended[0].args else "suspended",
                               until=earliest([s.until for s in suspended]))
    return value


class AsyncDurableContext(_ContextCore):
    """The context of an ``async def`` durable function: every operation is awaitable.

    ``await ctx.step(...)``, ``await ctx.wait(...)``, ``await ctx.map(...)``, ``await ctx.parallel(...)``,
    ``await ctx.wait_for_callback(...)``, ``await ctx.run_in_child_context(...)``, ``await ctx.invoke(...)``,
    ``await ctx.wait_for_condition(...)``, ``await ctx.create_callback(...)``. Each call takes its operation
    id at once, in call order, so ``asyncio.gather`` over operations runs them concurrently with the same
    ids on every replay. Steps, checks, submitters and branch functions may be sync or ``async def``; a
    sync context function gets a sync ``DurableContext`` and runs on a thread.

    Operations gathered from plain coroutines that share one context take their ids in the order those
    coroutines happen to reach them: give each its own child context (``run_in_child_context``) or use
    ``parallel`` instead.
    """

    def __init__(self, state: ExecutionState, parent_id: str | None = None) -> None:
        super().__init__(state, parent_id)
        self._tasks: set[asyncio.Future[Any]] = set()  # operations still running, sync calls left running
        self._suspended: list[SuspendExecution] = []  # how those that suspended did

    # -- plumbing --------------------------------------------------------------------------------
    def _begin(self) -> asyncio.Future[Any]:
        """The outcome of an operation that starts running now, kept until it ends (``_end``)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._tasks.add(future)
        return future

    def _end(self, future: asyncio.Future[Any]) -> None:
        if future not in self._tasks:
            return
        self._tasks.discard(future)
        if not future.cancelled():
            error = future.exception()  # also marks the error retrieved (its awaiter sees it too)
            if isinstance(error, SuspendExecution):
                self._suspended.append(error)

    def _track(self, future: asyncio.Future[Any]) -> None:
        self._tasks.add(future)
        future.add_done_callback(self._end)

    async def _settle(self) -> list[SuspendExecution]:
        """Wait for every operation started in this context; the suspensions among them."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))
            for future in [f for f in self._tasks if f.done()]:
                self._end(future)
        return list(self._suspended)

    def _operation(self, op: tuple[str, OperationLogic]) -> DurableOperation[Any]:
        op_id, logic = op
        return DurableOperation(self, op_id, lambda: self._drive(logic))

    async def _drive(self, logic: OperationLogic) -> Any:
        """Run an operation's logic: its checkpointing parts inline, the user code it asks for as
        ``_perform`` says."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                request = logic.throw(error) if error is not None else logic.send(value)
            except StopIteration as stop:
                return stop.value
            value, error = None, None
            try:
                value = await self._perform(request)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # handed to the logic, which decides what it catches
                error = exc

    async def _perform(self, request: _Call | _Body) -> Any:
        if isinstance(request, _Call):
            if is_async_callable(request.fn):
                return await request.fn(*request.args)
            result = await self._call_sync(True, request.fn, *request.args)
        elif is_async_callable(request.fn):
            child = AsyncDurableContext(self._state, request.parent_id)
            return await run_body(child, request.fn(child, *request.args))
        else:
            result = await self._call_sync(False, request.fn, DurableContext(self._state, request.parent_id),
                                           *request.args)
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            result = await result
        return result

    async def _call_sync(self, leaf: bool, fn: Callable[..., Any], *args: Any) -> Any:
        """Sync user code: a ``leaf`` (a step body, a check: it calls no operations) inline when no other task
        is alive on the invocation's loop, else on the loop's pool. A sync context function always runs on the
        pool: it may await async operations on a loop of its own thread."""
        context = contextvars.copy_context()
        if leaf and _loops.alone():
            return _loops.run_inline(context, fn, *args)
        running = asyncio.get_running_loop().run_in_executor(None, context.run, fn, *args)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            # A thread cannot be stopped: the context waits for it, so that nothing it checkpoints lands after
            # the invocation ended.
            self._track(running)
            raise

    # -- operations ------------------------------------------------------------------------------
    def step(self, name_or_fn: str | Callable[[StepContext], Any], fn: Callable[[StepContext], Any] | None = None,
             config: StepConfig | None = None, *, name: str | None = None) -> DurableOperation[Any]:
        """``await ctx.step(name, fn)``: run ``fn(step_context)`` (sync or ``async def``) once and checkpoint
        its result; on replay, the checkpoint. As ``DurableContext.step``.

        Raises:
            StepError: the function failed and the retry strategy gave up.
        """
        return self._operation(self._step_op(name_or_fn, fn, config, name))

    def wait(self, name_or_duration: str | Duration | timedelta | float,
             duration: Duration | timedelta | float | None = None, *, name: str | None = None
             ) -> DurableOperation[None]:
        """``await ctx.wait(name, duration)``: suspend the execution for ``duration``."""
        return self._operation(self._wait_op(name_or_duration, duration, name))

    def create_callback(self, name: str | None = None, config: CallbackConfig | None = None
                        ) -> DurableOperation[AsyncCallback]:
        """``cb = await ctx.create_callback(name)``: a callback id (committed before it is returned) and
        ``await cb.result()``."""
        return self._callback_operation(self._create_callback_op(name, config))

    def _callback_operation(self, op: tuple[str, OperationLogic]) -> DurableOperation[AsyncCallback]:
        op_id, logic = op

        async def create() -> AsyncCallback:
            return AsyncCallback(await self._drive(logic))

        return DurableOperation(self, op_id, create)

    def wait_for_callback(self, name_or_submitter: str | Callable[[str, Any], Any],
                          submitter: Callable[[str, Any], Any] | None = None,
                          config: WaitForCallbackConfig | None = None, *, name: str | None = None
                          ) -> DurableOperation[Any]:
        """``await ctx.wait_for_callback(name, submitter)``: create a callback, run ``submitter(callback_id,
        step_context)`` (sync or ``async def``) as a step, then wait for the result.

        Raises:
            CallbackError: the callback was failed, or the submitter failed.
            CallbackTimeoutError: no result or heartbeat came in time.
        """
        name, sub = _name_and_callable(name_or_submitter, submitter, name, "submitter")
        cfg = config or WaitForCallbackConfig()
        serdes = cfg.serdes or DEFAULT_SERDES

        callback_name, submitter_name = wait_for_callback_names(name)

        async def body(child: AsyncDurableContext) -> Any:
            cb = await child._callback_operation(child._create_callback_op(
                callback_name, _callback_config(cfg, serdes), LEGACY_CALLBACK_NAMES))

            async def submit_async(sctx: StepContext) -> Any:
                return await sub(cb.callback_id, sctx)

            def submit_sync(sctx: StepContext) -> Any:
                return sub(cb.callback_id, sctx)

            submit: Callable[[StepContext], Any] = submit_async if is_async_callable(sub) else submit_sync
            step = child._operation(child._step_op(submit, None, _submitter_config(cfg), submitter_name,
                                                   LEGACY_SUBMITTER_NAMES))
            try:
                await step
            except StepError as exc:
                raise _submitter_error(exc) from exc
            return await cb.result()

        return self._operation(self._child_op(_check_name(name), body, OperationSubType.WAIT_FOR_CALLBACK, serdes))

    def wait_for_signal(self, name: str, timeout: Duration | timedelta | float | None = None
                        ) -> DurableOperation[Any]:
        """``await ctx.wait_for_signal(name, timeout)``: the payload of the next signal ``name`` sent to this
        execution; suspends until one arrives. As ``DurableContext.wait_for_signal``; the operation id is
        taken at the call.

        Raises:
            SignalTimeoutError: no signal arrived within ``timeout``.
        """
        return self._operation(self._wait_for_signal_op(name, timeout))

    def effect(self, name: str, effect: Effect) -> DurableOperation[EffectRecord]:
        """``await ctx.effect(name, effect)``: as ``DurableContext.effect``; the operation id is taken at the
        call.

        Raises:
            EffectFailedError: the effect ended ``FAILED`` or ``CANCELLED``.
        """
        return self._operation(effects.effect_op(self, name, effect))

    def run_in_child_context(self, name_or_fn: str | Callable[[Any], Any], fn: Callable[[Any], Any] | None = None,
                             config: ChildConfig | None = None, *, name: str | None = None) -> DurableOperation[Any]:
        """``await ctx.run_in_child_context(name, fn)``: ``fn(child_ctx)`` as one operation with its own
        operations inside (an ``async def`` fn gets an ``AsyncDurableContext``).

        Raises:
            ChildContextError: ``fn`` raised.
        """
        return self._operation(self._run_in_child_context_op(name_or_fn, fn, config, name))

    def invoke(self, function_name: str, payload: Any = None, name: str | None = None,
               config: InvokeConfig | None = None) -> DurableOperation[Any]:
        """``await ctx.invoke(function_name, payload)``: run another durable function as a child execution
        and wait for its result.

        Raises:
            InvokeError: the child execution failed.
        """
        return self._operation(self._invoke_op(function_name, payload, name, config))

    def wait_for_condition(self, check: Callable[[Any, StepContext], Any] | str,
                           config: WaitForConditionConfig[Any] | Callable[[Any, StepContext], Any] | None = None,
                           name: str | WaitForConditionConfig[Any] | None = None) -> DurableOperation[Any]:
        """``await ctx.wait_for_condition(check, config, name)``: poll ``check(state, step_context)`` (sync or
        ``async def``) until the wait strategy says stop. Returns the final state.

        Raises:
            WaitForConditionError: ``check`` raised.
        """
        return self._operation(self._wait_for_condition_op(check, config, name))

    def set_event(self, key: str, value: Any) -> DurableOperation[None]:
        """``await ctx.set_event(key, value)``: publish ``value`` under ``key`` for ``DurableRunner.get_event``.
        As ``DurableContext.set_event``."""
        return self._operation(self._set_event_op(key, value))

    def start_child(self, function: str, input: Any = None, *, name: str | None = None) -> DurableOperation[str]:
        """``child_id = await ctx.start_child(function, input)``: start a child execution without waiting for
        it. As ``DurableContext.start_child``."""
        return self._operation(self._start_child_op(function, input, name))

    def map(self, name_or_items: Any, items_or_fn: Any = None, fn: Any = None, config: MapConfig | None = None,
            *, name: str | None = None) -> DurableOperation[BatchResult[Any]]:
        """``await ctx.map(name, items, fn)``: ``fn(child_ctx, item, index, items)`` per item, at most
        ``max_concurrency`` at once (as tasks of this loop when ``fn`` is ``async def``)."""
        return self._batch_operation(self._map_batch(name_or_items, items_or_fn, fn, config, name))

    def parallel(self, name_or_functions: Any, functions: Any = None, config: ParallelConfig | None = None,
                 *, name: str | None = None) -> DurableOperation[BatchResult[Any]]:
        """``await ctx.parallel(name, [fn, ...])``: each ``fn(child_ctx)`` as a branch."""
        return self._batch_operation(self._parallel_batch(name_or_functions, functions, config, name))

    def execute_concurrently(self, functions_or_name: Any, name: Any = None, config: Any = None,
                             *args: Any) -> DurableOperation[BatchResult[Any]]:
        """``await ctx.execute_concurrently([fn, ...], name, config)`` or, the reference's form,
        ``execute_concurrently(name, items, fn, config)`` with ``fn(child_ctx, item)`` per ``ConcurrentItem``."""
        return self._batch_operation(self._concurrently(functions_or_name, name, config, *args))

    def _batch_operation(self, batch: Batch) -> DurableOperation[BatchResult[Any]]:
        return DurableOperation(self, batch.op_id, lambda: self._run_batch(batch))

    async def _run_batch(self, batch: Batch) -> BatchResult[Any]:
        replayed = batch.open()
        if replayed is not None:
            return replayed
        if batch.queue and not batch.stop:
            workers = batch.workers()
            running: dict[asyncio.Task[tuple[str, Any]], int] = {}
            while batch.queue or running:
                while (i := batch.next_branch(len(running), workers)) is not None:
                    running[asyncio.ensure_future(self._drive(batch.branch(i)))] = i
                if not running:
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    batch.finished(running.pop(task), task.result)
        return batch.close()
