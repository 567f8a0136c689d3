"""Running a resumed handler: deciding whether it runs (``_transitions.start``), holding the resume while it
runs (renewed by core's heartbeat), calling it, and recording how it ended (``_transitions.end``)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import secrets
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping

from errands.core import telemetry
from errands.core.errors import ConfigError, InfrastructureError, LeaseLostError, NotFoundError, TransientError
from errands.core.runtime import Beat, heartbeat, run_sync
from google.rpc import code_pb2  # type: ignore[import-untyped]

from ._operation import Operation, retoken, store_call
from ._operation_table import OperationRecord
from ._tokens import claimed, parse_token, used
from ._transitions import End, ResumeOutcome, Start, busy_retry_after, end, start

if TYPE_CHECKING:
    from ._client import LroClient

log = logging.getLogger("errands.lro")
RESUME = "errands.lro.resume"

__all__ = ["HANDLER_PATH", "BatchLoops", "ResumableHandler", "ResumeBusyError", "aresume", "call_user",
           "finish_cancelled", "resume"]

HANDLER_PATH = re.compile(r"^[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*$")

HandlerFn = Callable[[Operation], "Awaitable[None] | None"]


@dataclass(frozen=True, slots=True)
class ResumableHandler:
    """A handler that resumes operations, served at ``{prefix}{path}``.

    Args:
        path: the path under the callback prefix, e.g. ``"create-agent"``.
        fn: ``fn(op)``, sync or async. Raise ``TransientError`` to be called again later; any other
            exception fails the operation with ``INTERNAL``.
    """

    path: str
    fn: HandlerFn

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not HANDLER_PATH.match(self.path):
            raise ConfigError(
                f"handler path must be URL path segments of letters, digits and '._~-' without a leading '/', "
                f"got {self.path!r}",
                field="path", value=self.path,
            )
        if not callable(self.fn):
            raise ConfigError(f"handler for {self.path!r} must be callable, got {self.fn!r}", field="fn", value=self.fn)


class ResumeBusyError(TransientError):
    """Another callback runs this resume now (a duplicate delivery, or a retry while the first attempt
    still runs): come back after ``retry_after``. Callbacks answer it with 503 and ``Retry-After``."""


def call_user(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` (a handler, a scheduler), sync or async: an awaitable result is waited for
    with core's ``run_sync``, whether or not an event loop runs on this thread."""
    result = fn(*args, **kwargs)
    if result is None:  # most handlers: answered without asking ``inspect.isawaitable``
        return None
    return run_sync(result) if inspect.isawaitable(result) else result


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw


class _ThreadLoop:
    """The loop of one thread of a ``BatchLoops``: closed when the thread ends (its thread-local value goes)
    or the ``BatchLoops`` does, if ``close`` did not close it first."""

    __slots__ = ("__weakref__", "loop")

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        weakref.finalize(self, _close_idle, self.loop)


def _close_idle(loop: asyncio.AbstractEventLoop) -> None:
    if not loop.is_running() and not loop.is_closed():
        loop.close()


class BatchLoops:
    """The event loops of async handlers called inside a batch transaction: one per thread, kept until the
    thread ends or ``close`` (``LroClient.close``).

    A batch's transaction belongs to the thread that opened it (on SQLite, with the store's lock), so an
    async handler called inside one runs to completion on that thread, on its private loop: its writes,
    plain or through the ``*_async`` twins (which run inline inside a batch), join the batch. Without this,
    the handler ran on core's shared loop thread, whose first write waited for the batch's transaction
    while the batch waited for the handler. The handlers called on one thread share its loop, so an async
    client a handler keeps between calls stays bound to one loop."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._loops: weakref.WeakSet[_ThreadLoop] = weakref.WeakSet()
        self._lock = threading.Lock()

    def run(self, aw: Awaitable[Any]) -> Any:
        """Wait for ``aw`` on this thread's loop (made on first use) and return its result."""
        mine: _ThreadLoop | None = getattr(self._local, "loop", None)
        if mine is None or mine.loop.is_closed():
            mine = self._local.loop = _ThreadLoop()
            with self._lock:
                self._loops.add(mine)
        return mine.loop.run_until_complete(_await(aw))

    def close(self) -> None:
        """Close the loops as ``asyncio.run`` closes its own: tasks still pending are cancelled, async
        generators and the default executor shut down. A loop running now is left alone."""
        with self._lock:
            loops = [mine.loop for mine in self._loops if not mine.loop.is_running()]
        for loop in loops:
            if loop.is_closed():
                continue
            try:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()


def _in_batch(client: LroClient) -> bool:
    """Whether a ``client.batch()`` (or a batch of ``run_due``) is open on this thread and no event loop
    runs here (a coroutine of this thread's cannot start another loop on it)."""
    current = getattr(client.store, "current_tx", None)
    if current is None or current() is None:
        return False
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


def _call_handler(client: LroClient, fn: HandlerFn, op: Operation) -> None:
    """``fn(op)``, sync or async: ``call_user``, except that inside a batch open on this thread a
    coroutine runs here, on the client's ``BatchLoops``."""
    result = fn(op)
    if result is None:
        return
    if inspect.isawaitable(result):
        if _in_batch(client):
            client._batch_loops.run(result)
        else:
            run_sync(result)


class _Renewal:
    """The heartbeat of one running handler that holds its resume: renews the hold until ``stop``."""

    __slots__ = ("beat", "claim", "finished", "lease_for", "op", "token")

    def __init__(self, op: Operation, token: str, claim: str, lease_for: float) -> None:
        self.op, self.token, self.claim, self.lease_for = op, token, claim, lease_for
        self.finished = False
        op._lock = threading.Lock()  # the handler's writes and the renewals take turns
        self.beat: Beat = heartbeat(self.renew, lease_for=lease_for, what=f"the resume of {op.name}")

    def renew(self) -> bool:
        if self.finished:
            return True
        held = self.op._renew_hold(self.token, self.claim, self.lease_for)
        if held is None:  # the operation is done
            self.stop()
            return True
        return held

    def stop(self) -> None:
        self.finished = True
        self.beat.stop()


def _begin(
    client: LroClient, name: str, path: str, token: str | None, record: OperationRecord | None, *, hold: bool,
) -> tuple[ResumeOutcome | None, Operation | None, HandlerFn | None, str]:
    """Decide what a callback does. Returns ``(outcome, None, None, "")`` when it is settled without the
    handler, else ``(None, op, fn, claim)``: ``claim`` is the id of the hold taken on the resume (``""``
    without one).

    Raises:
        NotFoundError: no such operation or handler.
        ResumeBusyError: another callback runs this resume now; come back later.
        InfrastructureError: the store failed; retry.
    """
    handler = client._handlers.get(path)
    if handler is None:
        raise NotFoundError(
            f"no resumable handler at path {path!r}; registered: {', '.join(sorted(client._handlers)) or 'none'}"
        )
    store = client.store
    if record is None:
        record = store_call(f"resuming {name!r}", store.get, name)
    state = parse_token(record.resume_token)
    now = store.now() if state.expires and not record.done else 0.0
    what = start(done=record.done, cancel_requested=record.cancel_requested, state=state,
                 resume_path=record.resume_path, token=token, now=now, remote=not client._scheduling.atomic)
    if what is Start.RUN:
        claim = ""
        if hold and token is not None:
            claim = secrets.token_hex(6)
            raw = claimed(token, store.now() + client.config.lease_for, claim)
            try:
                record = store_call(f"resuming {name!r}", store.save, retoken(record, raw),
                                    expected_version=record.version)
            except LeaseLostError as exc:
                raise ResumeBusyError(
                    f"operation {name!r} changed while its callback started; retry later", retry_after=1.0
                ) from exc
        return None, Operation(client, record), handler.fn, claim
    if what is Start.ALREADY_DONE:
        return ResumeOutcome.ALREADY_DONE, None, None, ""
    if what is Start.CANCEL:
        return cancel_now(Operation(client, record)), None, None, ""
    if what is Start.BUSY:
        raise ResumeBusyError(f"operation {name!r} is being resumed by another callback; retry later",
                              retry_after=busy_retry_after(state, now))
    if what is Start.STALE_REPAIR:
        client._scheduling.ensure_task(record, state)
    return ResumeOutcome.STALE, None, None, ""


def cancel_now(op: Operation) -> ResumeOutcome:
    """End ``op`` CANCELLED; ``LOST`` if another writer saved first."""
    try:
        finish_cancelled(op)
    except LeaseLostError:
        return ResumeOutcome.LOST
    return ResumeOutcome.CANCELLED


def finish_cancelled(op: Operation) -> None:
    op.fail("operation cancelled", code=code_pb2.CANCELLED)


def _end(op: Operation, error: BaseException | None, token: str | None, claim: str) -> ResumeOutcome:
    """Record how the handler of ``op`` ended (``error`` None: it returned).

    Raises:
        TransientError, InfrastructureError: ``error`` itself, once the resume is given back, so that the
            callback is retried.
    """
    what = end(done=op.done, error=error)
    if what is End.COMPLETED:
        if error is not None and not isinstance(error, LeaseLostError):
            log.warning("handler for %s raised after finishing it: %r", op.name, error)
        return ResumeOutcome.COMPLETED
    if what is End.SPEND:
        try:
            if token is not None:
                # The handler ended without scheduling another resume: spend the token, so that a replay of
                # this callback runs nothing.
                spent = op._set_hold(used(token), token=token, claim=claim)
                if spent is not None:
                    return cancel_now(op) if spent.cancel_requested else ResumeOutcome.RAN
            if op.cancel_requested:
                finish_cancelled(op)
                return ResumeOutcome.CANCELLED
        except LeaseLostError:
            return ResumeOutcome.LOST
        return ResumeOutcome.RAN
    if what is End.LOST:
        return ResumeOutcome.LOST
    assert error is not None
    if what is End.RETRY:
        # Asked to come back, or the store failed under the handler: give the resume back at once so that
        # the retry need not wait for the hold to lapse.
        if claim and token is not None:
            try:
                op._set_hold(token, token=token, claim=claim)
            except Exception as release_error:
                log.info("the hold on %s lapses by itself (%s)", op.name, type(release_error).__name__)
        if isinstance(error, InfrastructureError):
            log.warning("resuming %s abandoned: %s; it is retried", op.name, error)
        raise error
    log.error("handler for %s failed; the operation fails with INTERNAL", op.name, exc_info=error)
    try:
        op.fail("%s", str(error) or type(error).__name__, code=code_pb2.INTERNAL)
    except LeaseLostError:
        return ResumeOutcome.LOST
    return ResumeOutcome.FAILED


def _renewal(client: LroClient, op: Operation, token: str | None, claim: str) -> _Renewal | None:
    """The heartbeat of the hold the callback took on its resume, if it took one."""
    if not claim or token is None:
        return None
    return _Renewal(op, token, claim, client.config.lease_for)


def resume(
    client: LroClient, name: str, path: str, token: str | None, record: OperationRecord | None = None, *,
    hold: bool, parent: Mapping[str, str] | None = None,
) -> ResumeOutcome:
    """Run the handler at ``path`` on the operation now, in this thread (see ``LroClient.resume``); an
    async handler inside a batch open on this thread too (see ``BatchLoops``).

    Args:
        record: the operation's row when the caller read it already (a batch of callbacks reads its rows
            in one query).
        hold: take a hold on the resume while the handler runs. Without one, the caller fences the run
            (a timer's lease, or a batch's transaction).
        parent: the trace context the callback carried (its ``traceparent``): the resume continues that trace.
    """
    with telemetry.span(RESUME, parent, operation=name) as span:
        outcome = _resume(client, name, path, token, record, hold=hold)
        telemetry.set_status(span, outcome)
        return outcome


def _resume(client: LroClient, name: str, path: str, token: str | None, record: OperationRecord | None, *,
            hold: bool) -> ResumeOutcome:
    outcome, op, fn, claim = _begin(client, name, path, token, record, hold=hold)
    if outcome is not None:
        return outcome
    assert op is not None and fn is not None
    renewal = _renewal(client, op, token, claim)
    try:
        _call_handler(client, fn, op)
    except Exception as exc:
        if renewal is not None:
            renewal.stop()
        return _end(op, exc, token, claim)
    if renewal is not None:
        renewal.stop()
    return _end(op, None, token, claim)


async def aresume(client: LroClient, name: str, path: str, token: str | None, *,
                  parent: Mapping[str, str] | None = None) -> ResumeOutcome:
    """``resume`` for async code: store calls and sync handlers run in a thread, async handlers on the
    running loop."""
    with telemetry.span(RESUME, parent, operation=name) as span:
        outcome = await _aresume(client, name, path, token)
        telemetry.set_status(span, outcome)
        return outcome


async def _aresume(client: LroClient, name: str, path: str, token: str | None) -> ResumeOutcome:
    outcome, op, fn, claim = await asyncio.to_thread(_begin, client, name, path, token, None,
                                                     hold=token is not None)
    if outcome is not None:
        return outcome
    assert op is not None and fn is not None
    renewal = _renewal(client, op, token, claim)
    try:
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__):
            result = fn(op)  # a coroutine, awaited on this loop
        else:
            result = await asyncio.to_thread(fn, op)  # a sync handler must not block the loop
        if inspect.isawaitable(result):
            await result
    except Exception as exc:
        if renewal is not None:
            renewal.stop()
        return await asyncio.to_thread(_end, op, exc, token, claim)
    if renewal is not None:
        renewal.stop()
    return await asyncio.to_thread(_end, op, None, token, claim)
