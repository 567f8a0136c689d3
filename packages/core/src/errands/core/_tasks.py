"""The task engine: durable background tasks run concurrently by handlers registered per type.

Each task is a row in ``em_tasks``; a worker claims due tasks with a lease and a fencing token, runs them
on a thread pool (async handlers on the engine's event loop) and records the result. The shared heartbeat
renews a task's lease while its handler runs; a handler whose lease was lost writes nothing. A task left
``RUNNING`` by a process that died is taken again: at the next start when the dead process ran on this
host, otherwise once its lease lapses. An infrastructure error in the engine's own store calls (a locked
database, a dropped connection) abandons the invocation, which runs again soon; it never fails the task.

A running handler is asked to stop in one way whatever the cause (``TaskEngine.cancel``, its type's
``time_limit``, the engine closing at a worker's shutdown): a sync handler sees ``ctx.cancelled`` turn true,
an async one is cancelled (``CancelledError`` at its next ``await``). Periodic tasks are rows of
``em_task_schedules``: at each cron tick one worker moves the schedule on and queues the tick's task, under an
id derived from the schedule's name and the tick, in one transaction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import inspect
import logging
import os
import socket
import sys
import threading
import time
import typing
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import timedelta
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import _tasks_table as table
from . import _wake, telemetry
from ._cron import check_cron as _cron
from ._cron import last_tick as _last_tick
from ._cron import next_tick as _next_tick
from ._leases import DEFAULT_LEASE_FOR, Beat, heartbeat, is_infrastructure_error
from ._runtime import CallRunner, Latency, drain
from ._tasks_table import ScheduleRecord, TaskRecord
from ._tasks_transitions import (
    CANCEL,
    FINAL,
    SHUTDOWN,
    TIME_LIMIT,
    RetryPolicy,
    TaskStatus,
    Transition,
    cancelled,
    settle,
    timed_out,
)
from ._worker import RETRY_DELAYS, retry_infrastructure
from .errors import ConfigError, InvalidTaskIdError, NotFoundError
from .store import SQLStore, Tx, dumps

__all__ = ["ScheduleRecord", "TaskContext", "TaskEngine", "TaskRecord", "TaskStatus", "typed_handler"]

log = logging.getLogger("errands.tasks")

#: The namespace of the ids of periodic tasks: ``uuid5(_TICKS, f"{schedule}@{tick}")``, the same in every worker.
_TICKS = uuid.UUID("6f1d3c1e-5a0b-4f8e-9b1e-7d2f4c6a8e10")
#: Finished tasks deleted per purge (``retention``); a full batch makes the next pass purge again.
PURGE_BATCH = 500
#: Seconds (of the store's clock) between purges that found less than a batch, and between reads of the schedules.
_PURGE_EVERY = 60.0
_SCHEDULES_EVERY = 1.0
#: Seconds between asks of the store whether a task running here was cancelled from elsewhere.
_CANCEL_POLL = 0.2
#: How long a pass may go on running quick handlers inline, round after round (``TaskEngine._run_inline``),
#: before it returns to its driver.
_INLINE_FOR = 0.05


class _Stop:
    """The request that a run stop: its reason (first one wins) and, for an async handler, the asyncio task to
    cancel. ``finish`` closes it when the handler returned, so a request after that changes nothing."""

    __slots__ = ("_event", "_lock", "_loop", "_task", "done", "reason")

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self.reason: str | None = None
        self.done = False

    def request(self, reason: str) -> bool:
        """Ask the handler to stop; False when it was asked already or has returned."""
        with self._lock:
            if self.done or self.reason is not None:
                return False
            self.reason = reason
            self._event.set()
            loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed: the handler is gone with it
                pass
        return True

    def attach(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any] | None) -> None:
        """The async handler runs as ``task`` on ``loop``: cancel it on a request (at once if one came)."""
        with self._lock:
            self._loop, self._task = loop, task
            asked = self.reason is not None
        if asked and task is not None:
            task.cancel()

    def finish(self) -> str | None:
        """The handler returned: no request counts from now on. Returns the reason it was asked to stop, if any."""
        with self._lock:
            self.done = True
            return self.reason

    def wait(self, timeout: float | None) -> bool:
        return self._event.wait(timeout)

    @property
    def set(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskContext:
    """Given to handlers that take a second argument.

    A long handler can ask whether its lease is still its own (``lease_lost``, ``check_lease()``): once it
    is lost another worker may run the task, and whatever this run returns is dropped.

    A sync handler is stopped cooperatively: ``cancelled`` turns true when the task is cancelled
    (``TaskEngine.cancel``), runs past its type's ``time_limit`` or the engine shuts down (``cancel_reason``
    says which); the handler should then return or raise soon. ``wait_cancelled(seconds)`` sleeps until then.
    An async handler is cancelled instead (``CancelledError``).
    """

    id: str
    type: str
    attempt: int
    _beat: Beat | None = dataclass_field(default=None, repr=False, compare=False)
    _stop: _Stop | None = dataclass_field(default=None, repr=False, compare=False)

    @property
    def cancelled(self) -> bool:
        """True once this run was asked to stop (cancelled, past its time limit, or shutting down)."""
        return self._stop is not None and self._stop.set

    @property
    def cancel_reason(self) -> str | None:
        """Why it was asked to stop: ``"cancelled"``, ``"time_limit"`` or ``"shutdown"`` (None: it was not)."""
        return None if self._stop is None else self._stop.reason

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block until this run is asked to stop or ``timeout`` seconds pass; True if it was asked."""
        return self._stop is not None and self._stop.wait(timeout)

    @property
    def lease_lost(self) -> bool:
        """True once this run's lease is known to be lost."""
        return self._beat is not None and self._beat.lost

    def check_lease(self) -> None:
        """Raise ``LeaseLostError`` if this run's lease is lost (the engine then records nothing)."""
        if self._beat is not None:
            self._beat.check()


@dataclass(frozen=True, slots=True)
class _Run:
    """A task this engine claimed and runs now."""

    id: str
    type: str
    params: Any
    token: int
    attempt: int
    beat: Beat
    started: float = 0.0
    stop: _Stop = dataclass_field(default_factory=_Stop)
    trace: str | None = None


@dataclass(eq=False)
class _Done:
    """A run's outcome waiting to be written (``TaskEngine._record``): whether it was, or is to be written
    alone by the run's own thread."""

    run: _Run
    transition: Transition
    event: threading.Event = dataclass_field(default_factory=threading.Event)
    written: bool = False
    alone: bool = False
    tried: bool = False  # a batch holding it failed: it may have landed unseen


@dataclass
class _TypeSpec:
    fn: Callable[..., Any]
    wants_ctx: bool
    max_concurrency: int | None
    rate_limit_per_s: float | None
    policy: RetryPolicy
    time_limit: float | None = None
    tokens: float = 0.0
    refilled_at: float = 0.0


def _task_id(value: Any) -> str:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise InvalidTaskIdError(
        f"task id must be a UUID such as '{uuid.uuid4()}', got {value!r}; omit id to get a new one",
        field="id", value=value,
    )


def _new_ids(n: int) -> list[str]:
    """``n`` random (version 4) UUIDs as text, from one read of the system's random source."""
    raw = bytearray(os.urandom(16 * n))
    ids = []
    for k in range(0, 16 * n, 16):
        raw[k + 6] = (raw[k + 6] & 0x0F) | 0x40
        raw[k + 8] = (raw[k + 8] & 0x3F) | 0x80
        h = raw[k:k + 16].hex()
        ids.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return ids


def _wants_ctx(fn: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    positional = [p for p in sig.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values())


def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _positive_int(value: Any, field: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{field} must be an integer >= {minimum}, got {value!r}", field=field, value=value)
    return value


def _seconds(value: Any, field: str) -> float | None:
    """A positive duration in seconds (a number or a ``timedelta``), or None."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise ConfigError(f"{field} must be a positive number of seconds or a timedelta, got {value!r}",
                          field=field, value=value)
    return float(value)


def _priority(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"priority must be an integer (higher runs first, default 0), got {value!r}",
                          field="priority", value=value)
    return value


def tick_id(schedule: str, tick: float) -> str:
    """The id of schedule ``schedule``'s task of the tick at ``tick`` (epoch seconds): the same in every worker."""
    return str(uuid.uuid5(_TICKS, f"{schedule}@{tick:.6f}"))


def _until_stopped(fn: Callable[..., Any], stop: _Stop) -> Callable[..., Any]:
    """``fn`` whose awaitable, if it returns one, runs as a task that ``stop`` can cancel."""
    def call(*args: Any) -> Any:
        result = fn(*args)
        if isinstance(result, (str, int, float, bool, dict, list, type(None))) or not inspect.isawaitable(result):
            return result

        async def guarded() -> Any:
            stop.attach(asyncio.get_running_loop(), asyncio.current_task())
            return await result

        return guarded()

    return call


class TaskEngine:
    """Durable tasks: ``submit`` from anywhere, run by whichever worker has the handler.

    Args:
        store: the open store.
        handlers: task type -> ``fn(params)`` or ``fn(params, ctx)``, sync or async. Handlers must be
            idempotent: a task whose process dies mid-run runs again.
        concurrency: the most tasks this engine runs at once.
        lease_for: seconds a running task's lease lasts; the shared heartbeat renews it every third of
            that while the handler runs, so a task of a killed worker runs again within ``lease_for``.
        retry_max: retries after a failure (``PermanentError`` and ``ConfigError`` are not retried).
        retry_base: the first retry delay in seconds, doubling each attempt (with jitter).
        retry_cap: the longest retry delay.
        retention: seconds (or a ``timedelta``) a finished task is kept (succeeded, failed or cancelled; the
            dead-letter list is kept for an operator): the engine deletes older ones as it runs, at most
            ``PURGE_BATCH`` per pass. None keeps them.

    Example:
        >>> engine = TaskEngine(store, handlers={"resize": resize_image})
        >>> task_id = engine.submit("resize", {"path": "a.png", "width": 200})
        >>> engine.run_once(); engine.wait(task_id).status
        <TaskStatus.SUCCEEDED: 'SUCCEEDED'>
    """

    def __init__(
        self, store: SQLStore, handlers: Mapping[str, Callable[..., Any]] | None = None, *, concurrency: int = 8,
        lease_for: float = DEFAULT_LEASE_FOR, retry_max: int = 3, retry_base: float = 1.0, retry_cap: float = 300.0,
        retention: float | timedelta | None = None,
    ) -> None:
        self.store = store
        self.concurrency = _positive_int(concurrency, "concurrency")
        if not isinstance(lease_for, (int, float)) or isinstance(lease_for, bool) or lease_for <= 0:
            raise ConfigError(f"lease_for must be a positive number of seconds, got {lease_for!r}",
                              field="lease_for", value=lease_for)
        self.lease_for = float(lease_for)
        self.retry_max = _positive_int(retry_max, "retry_max", 0)
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.retention = _seconds(retention, "retention")
        self.owner = f"{_host()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._types: dict[str, _TypeSpec] = {}
        for type_, fn in (handlers or {}).items():
            self.register(type_, fn)
        store.migrate("tasks", table.TASK_MIGRATIONS)
        telemetry.backlog("tasks", self, lambda engine, tx, now: table.backlog(tx, now))
        self._own_bridge = CallRunner(name="errands-tasks")
        self._bridge = self._own_bridge
        self._pool: ThreadPoolExecutor | None = None
        self._running: dict[str, _Run] = {}
        # Runs past their time limit whose sync handler has not returned: their attempt is written, their slot
        # still taken (the thread is busy), their task never started here again until they return.
        self._overdue: dict[str, _Run] = {}
        self._next_purge = 0.0
        self._next_schedules = 0.0
        self._next_cancel_poll = 0.0
        self._lock = threading.Lock()
        self._claiming = threading.Lock()
        self._recovered = False
        # Set when a store call failed in a way that may leave one of this engine's tasks RUNNING but not
        # run here (a claim committed but unacknowledged, a result that could not be written): the next
        # claim gives such tasks back at once instead of waiting out their lease.
        self._abandoned = False
        # Outcomes waiting to be written together (``_record``), and whether a thread writes them now.
        self._done_lock = threading.Lock()
        self._done_queue: list[_Done] = []
        self._writing = False
        #: Whether the transaction that writes outcomes also claims tasks for the slots they free: on while a
        #: driver runs the engine continuously (a ``Worker`` lent its runner, ``drain``); off, only ``run_once``
        #: starts tasks, as a caller stepping the engine expects.
        self.claim_ahead = False
        self._ahead = 0  # tasks started so, reported by the next ``run_once``
        #: Set whenever a slot frees (a run ended): ``drain`` waits on it instead of polling.
        self._freed = _wake.Wake()
        #: Each type's handler time: under a driver, types answering in well under a millisecond run inline.
        self._latency = Latency()

    # -- registration --------------------------------------------------------------------------
    def register(
        self, type: str, fn: Callable[..., Any], *, max_concurrency: int | None = None,
        rate_limit_per_s: float | None = None, retry_max: int | None = None, dlq_after: int | None = None,
        retry_base: float | None = None,
        time_limit: float | timedelta | None = None,
    ) -> None:
        """Run tasks of ``type`` with ``fn``.

        Args:
            type: the task type.
            fn: ``fn(params)`` or ``fn(params, ctx: TaskContext)``, sync or async.
            max_concurrency: the most tasks of this type running at once, across every worker.
            rate_limit_per_s: the most tasks of this type started per second by this engine.
            retry_max: retries after a failure (default: the engine's).
            dlq_after: park the task in the dead-letter list (status ``DEAD``) after this many failed
                attempts, or once its retries run out; None ends such tasks ``FAILED``.
            retry_base: the first retry delay in seconds of this type (default: the engine's), doubling
                each attempt up to the engine's ``retry_cap``.
            time_limit: seconds (or a ``timedelta``) an attempt may run. Past it the attempt fails (a
                ``TimeoutError``, retried by the type's policy) and the handler is asked to stop: an async one
                is cancelled; a sync one sees ``ctx.cancelled`` and should return soon. Until a sync handler
                returns it keeps its thread and one of the engine's ``concurrency`` slots (logged as a
                warning), and whatever it returns is dropped. The limit is checked at each pass of the engine.
        """
        problems: list[ConfigError] = []
        if not isinstance(type, str) or not type:
            problems.append(ConfigError(f"task type must be a non-empty string, got {type!r}", field="type",
                                        value=type))
        if not callable(fn):
            problems.append(ConfigError(f"handlers[{type!r}] must be callable, got {fn!r}",
                                        field=f"handlers.{type}", value=fn))
        for field, value, minimum in (("max_concurrency", max_concurrency, 1), ("retry_max", retry_max, 0),
                                      ("dlq_after", dlq_after, 1)):
            if value is not None:
                try:
                    _positive_int(value, field, minimum)
                except ConfigError as exc:
                    problems.append(exc)
        if rate_limit_per_s is not None and (
            not isinstance(rate_limit_per_s, (int, float)) or isinstance(rate_limit_per_s, bool)
            or rate_limit_per_s <= 0
        ):
            problems.append(ConfigError(f"rate_limit_per_s must be a positive number, got {rate_limit_per_s!r}",
                                        field="rate_limit_per_s", value=rate_limit_per_s))
        if retry_base is not None and (
            not isinstance(retry_base, (int, float)) or isinstance(retry_base, bool) or retry_base <= 0
        ):
            problems.append(ConfigError(f"retry_base must be a positive number of seconds, got {retry_base!r}",
                                        field="retry_base", value=retry_base))
        try:
            limit = _seconds(time_limit, "time_limit")
        except ConfigError as exc:
            problems.append(exc)
            limit = None
        if problems:
            raise ConfigError.collect(problems, f"task type {type!r}")
        self._types[type] = _TypeSpec(
            fn=fn, wants_ctx=_wants_ctx(fn), max_concurrency=max_concurrency,
            rate_limit_per_s=float(rate_limit_per_s) if rate_limit_per_s else None,
            policy=RetryPolicy(retry_max=self.retry_max if retry_max is None else retry_max, dlq_after=dlq_after,
                               base=self.retry_base if retry_base is None else float(retry_base),
                               cap=self.retry_cap),
            tokens=max(1.0, float(rate_limit_per_s or 1)), refilled_at=self.store.clock.now(), time_limit=limit,
        )

    @property
    def types(self) -> list[str]:
        return sorted(self._types)

    # -- submit and views ------------------------------------------------------------------------
    def submit(
        self, type: str, params: Any = None, id: str | uuid.UUID | None = None, *, delay: float = 0.0,
        priority: int = 0, conn: Any = None,
    ) -> str:
        """Queue a task. Submitting an id that exists already returns it and changes nothing.

        Args:
            type: the task type; must have a handler here if this engine has any handlers.
            params: JSON-serialisable parameters.
            id: a caller-chosen UUID (same id = same task); a new one if None.
            delay: seconds before the task may start.
            priority: among due tasks, higher ones start first (default 0; negative for background work).
            conn: the caller's connection (any kind ``conn=`` takes): the task commits with the caller's transaction.

        Returns:
            The task id.

        Raises:
            InvalidTaskIdError: ``id`` is not a UUID.
            ConfigError: unknown type; PayloadError: params not JSON.
        """
        task_id = _task_id(id) if id is not None else str(uuid.uuid4())
        self._check_type(type)
        rank = _priority(priority)
        text = dumps(params, field="params")
        now = self.store.clock.now()
        with telemetry.span("errands.tasks.submit", task_type=type, task_id=task_id):
            # Read in the caller's thread: under group commit ``write`` may run in another thread (the leader's).
            trace = telemetry.carrier_text()

            def write(tx: Tx) -> None:
                table.insert(tx, task_id, type, text, now + max(0.0, float(delay)), None, now, priority=rank,
                             trace=trace)
                tx.notify(_wake.TASKS)  # workers of other processes (PostgreSQL), at the commit of the group

            if conn is None:
                self.store.group_commit(write)  # concurrent submits share commits; returns once this one's is done
            else:
                with self.store.transaction(conn) as tx:
                    write(tx)
        _wake.notify(self.store, _wake.TASKS)  # workers of this process, after the commit
        return task_id

    def submit_many(
        self, type: str, params: Iterable[Any], *, ids: Sequence[str | uuid.UUID] | None = None, delay: float = 0.0,
        priority: int = 0, conn: Any = None,
    ) -> list[str]:
        """Queue one task of ``type`` per item of ``params``, in one transaction and one statement (all of them,
        or on an error none). An id that exists already is left as it is, as ``submit`` does.

        Args:
            type: the task type of every task.
            params: the JSON-serialisable parameters of each task.
            ids: a caller-chosen UUID per task (as many as ``params``); new ones if None.
            delay, priority, conn: as for ``submit``, the same for every task.

        Returns:
            The task ids, in the order of ``params``.

        Raises:
            InvalidTaskIdError: an id is not a UUID; ConfigError: unknown type, or not one id per task;
            PayloadError: params not JSON (naming the item's index).
        """
        self._check_type(type)
        rank = _priority(priority)
        texts = [dumps(p, field=f"params[{n}]") for n, p in enumerate(params)]
        if ids is None:
            task_ids = _new_ids(len(texts))
        else:
            task_ids = [_task_id(i) for i in ids]
            if len(task_ids) != len(texts):
                raise ConfigError(f"submit_many takes one id per task: {len(task_ids)} ids for {len(texts)} params",
                                  field="ids", value=len(task_ids))
        if not texts:
            return []
        now = self.store.clock.now()
        at = now + max(0.0, float(delay))
        with telemetry.span("errands.tasks.submit", task_type=type, count=len(task_ids)):
            trace = telemetry.carrier_text()
            with self.store.transaction(conn) as tx:
                table.insert_batch(tx, task_ids, type, texts, at, rank, now, trace)
                tx.notify(_wake.TASKS)
        _wake.notify(self.store, _wake.TASKS)
        return task_ids

    async def submit_async(
        self, type: str, params: Any = None, id: str | uuid.UUID | None = None, *, delay: float = 0.0,
        priority: int = 0, conn: Any = None,
    ) -> str:
        """``submit`` for coroutines, without blocking the event loop (``SQLStore.run_async``); ``conn`` may also
        be an async connection or session."""
        return await self.store.run_async(self.submit, type, params, id, delay=delay, priority=priority, conn=conn)

    async def submit_many_async(
        self, type: str, params: Iterable[Any], *, ids: Sequence[str | uuid.UUID] | None = None, delay: float = 0.0,
        priority: int = 0, conn: Any = None,
    ) -> list[str]:
        """``submit_many`` for coroutines (``SQLStore.run_async``)."""
        return await self.store.run_async(self.submit_many, type, list(params), ids=ids, delay=delay,
                                          priority=priority, conn=conn)

    def _check_type(self, type: Any) -> None:
        if not isinstance(type, str) or not type:
            raise ConfigError(f"task type must be a non-empty string, got {type!r}", field="type", value=type)
        if self._types and type not in self._types:
            raise ConfigError(f"no handler for task type {type!r}; known types: {', '.join(self.types)}",
                              field="type", value=type)

    def get(self, id: str) -> TaskRecord | None:
        """The task, or None if there is no such task (or it was removed)."""
        with self.store.read() as tx:
            return table.get(tx, _task_id(id))

    async def get_async(self, id: str) -> TaskRecord | None:
        """``get`` for coroutines (``SQLStore.run_async``)."""
        return await self.store.run_async(self.get, id)

    def recent(self, limit: int = 20, *, status: TaskStatus | str | None = None,
               type: str | None = None) -> list[TaskRecord]:
        """The newest tasks first, optionally of one status or type."""
        wanted = None if status is None else TaskStatus(status)
        limit = _positive_int(limit, "limit")
        with self.store.read() as tx:
            return table.recent(tx, limit, wanted, type)

    def remove(self, id: str) -> bool:
        """Delete a task whatever its state (a running one finishes, but its outcome is dropped)."""
        with self.store.transaction() as tx:
            return table.remove(tx, _task_id(id))

    def dead(self, type: str | None = None, limit: int = 100) -> list[TaskRecord]:
        """Tasks parked in the dead-letter list, oldest first."""
        with self.store.read() as tx:
            return table.dead(tx, type, limit)

    def redrive(self, ids: Sequence[str] | None = None, *, type: str | None = None) -> int:
        """Queue dead (or failed, when named by id) tasks again with fresh retries. Returns how many."""
        clean = None if ids is None else [_task_id(i) for i in ids]
        if clean is not None and not clean:
            return 0
        now = self.store.clock.now()
        with self.store.transaction() as tx:
            return table.redrive(tx, now, ids=clean, type=type)

    def cancel(self, id: str) -> bool:
        """Cancel a task. A pending one ends ``CANCELLED`` at once; a running one is asked to stop wherever it
        runs (its sync handler sees ``ctx.cancelled``, an async one is cancelled) and ends ``CANCELLED`` when
        its handler returns or raises. Returns False when the task had ended already (nothing changes).

        Raises:
            NotFoundError: there is no such task.
        """
        task_id = _task_id(id)
        with self.store.transaction() as tx:
            was = table.cancel(tx, task_id, self.store.clock.now())
        if was is None:
            raise NotFoundError(f"no task {task_id!r}")
        if was is TaskStatus.RUNNING:
            with self._lock:
                run = self._running.get(task_id)
            if run is not None:  # running here: no need to wait for the next pass to tell it
                run.stop.request(CANCEL)
        return was in (TaskStatus.PENDING, TaskStatus.RUNNING)

    def purge(self, older_than: float | timedelta, *, limit: int = PURGE_BATCH) -> int:
        """Delete up to ``limit`` tasks that finished (succeeded, failed, cancelled) more than ``older_than``
        seconds ago, oldest first. Returns how many. The engine calls it as it runs when given ``retention``."""
        age = _seconds(older_than, "older_than")
        assert age is not None
        limit = _positive_int(limit, "limit")
        with self.store.transaction() as tx:
            return table.purge(tx, self.store.clock.now() - age, limit)

    # -- periodic tasks --------------------------------------------------------------------------
    def schedule(self, name: str, type: str, *, cron: str, params: Any = None, priority: int = 0) -> ScheduleRecord:
        """Queue a task of ``type`` with ``params`` at each tick of ``cron`` (five fields, UTC: ``"*/5 * * * *"``
        every five minutes). Each tick runs once across every worker: the worker that moves the schedule on
        queues the tick's task, under an id derived from ``name`` and the tick. Ticks missed while no worker
        ran are run once, as the latest of them.

        Calling it again with the same arguments changes nothing (every process may declare its schedules at
        start); other arguments replace the schedule, its next tick counted from now.

        Raises:
            ConfigError: a bad name, type, cron expression or priority; PayloadError: params not JSON.
        """
        problems: list[ConfigError] = []
        if not isinstance(name, str) or not name:
            problems.append(ConfigError(f"schedule name must be a non-empty string, got {name!r}", field="name",
                                        value=name))
        for check in (lambda: self._check_type(type), lambda: _cron(cron), lambda: _priority(priority)):
            try:
                check()
            except ConfigError as exc:
                problems.append(exc)
        if problems:
            raise ConfigError.collect(problems, f"schedule {name!r}")
        text = dumps(params, field="params")
        now = self.store.clock.now()
        with self.store.transaction() as tx:
            table.put_schedule(tx, name, type, cron, text, priority, _next_tick(cron, now), now)
            return next(s for s in table.schedules(tx) if s.name == name)

    def schedules(self) -> list[ScheduleRecord]:
        """Every periodic task, by name."""
        with self.store.read() as tx:
            return table.schedules(tx)

    def unschedule(self, name: str) -> bool:
        """Remove the schedule ``name`` (its tasks queued already stay). False if there was none."""
        with self.store.transaction() as tx:
            return table.remove_schedule(tx, name)

    def fire_schedules(self) -> int:
        """Queue the task of every due tick of the schedules of this engine's types. Returns how many were
        queued here (a tick another worker queued first is not counted). Called by ``run_once``."""
        now = self.store.clock.now()
        queued = 0
        with self.store.read() as tx:
            due = table.due_schedules(tx, list(self._types), now)
        for s in due:
            was = s.next_at.timestamp()
            try:
                tick = max(was, _last_tick(s.cron, now))
                following = _next_tick(s.cron, tick)
            except ConfigError:
                log.error("schedule %r: its cron expression %r is not valid here; it does not run", s.name, s.cron)
                continue
            with self.store.transaction() as tx:
                if table.advance_schedule(tx, s.name, was, tick, following, now):
                    queued += table.insert(tx, tick_id(s.name, tick), s.type, dumps(s.params, field="params"),
                                           now, None, now, priority=s.priority)
        return queued

    def _housekeeping(self) -> None:
        """What a pass does besides claiming: stop runs past their time limit or cancelled from elsewhere,
        queue due ticks of periodic tasks, purge old finished tasks (``retention``)."""
        now = self.store.clock.now()
        self._enforce_limits(now)
        if time.monotonic() >= self._next_cancel_poll:
            self._next_cancel_poll = time.monotonic() + _CANCEL_POLL
            with self._lock:
                ids = list(self._running)
            if ids:
                with self.store.read() as tx:
                    asked = table.cancel_requested(tx, ids)
                for task_id in asked:
                    with self._lock:
                        run = self._running.get(task_id)
                    if run is not None and run.stop.request(CANCEL):
                        log.info("task %s (%s): cancelled; its handler is asked to stop", run.id, run.type)
        if self._types and now >= self._next_schedules:
            self._next_schedules = now + _SCHEDULES_EVERY
            self.fire_schedules()
        if self.retention is not None and now >= self._next_purge:
            with self.store.transaction() as tx:
                n = table.purge(tx, now - self.retention, PURGE_BATCH)
            self._next_purge = now if n >= PURGE_BATCH else now + min(_PURGE_EVERY, self.retention)
            if n:
                log.info("tasks: purged %d finished task(s) older than %gs", n, self.retention)

    def _enforce_limits(self, now: float) -> None:
        with self._lock:
            over = [r for r in self._running.values()
                    if (limit := self._types[r.type].time_limit) is not None and now >= r.started + limit]
        for run in over:
            if not run.stop.request(TIME_LIMIT):
                continue
            spec = self._types[run.type]
            assert spec.time_limit is not None
            transition = timed_out(spec.time_limit, run.attempt, spec.policy, now)
            self._log(run, transition)
            with self._lock:
                if self._running.get(run.id) is run:
                    del self._running[run.id]
                    self._overdue[run.id] = run
            abandoned = self._record(run, transition)
            run.beat.stop()
            if abandoned:
                with self._lock:
                    self._abandoned = True
            if not inspect.iscoroutinefunction(spec.fn):
                log.warning("task %s (%s) ran past its time limit of %gs: the attempt failed and its handler is "
                            "asked to stop (ctx.cancelled); until it returns it keeps a thread and one of this "
                            "engine's %d slots", run.id, run.type, spec.time_limit, self.concurrency)

    # -- running -------------------------------------------------------------------------------
    def recover(self) -> int:
        """Queue again the tasks left RUNNING by dead processes of this host and by lapsed leases.
        Called by the first ``run_once``. Returns how many were queued."""
        now = self.store.clock.now()
        host = _host()
        with self.store.transaction() as tx:
            orphans = []
            for task_id, owner, expires in table.running(tx):
                h, _, rest = (owner or "").partition(":")
                pid_text = rest.partition(":")[0]
                dead_here = h == host and pid_text.isdigit() and int(pid_text) != os.getpid() \
                    and not _pid_alive(int(pid_text))
                if dead_here or expires is None or expires <= now:
                    orphans.append(task_id)
            for task_id in orphans:
                table.requeue(tx, task_id, now)
        if orphans:
            log.warning("re-queued %d task(s) left running by a process that stopped: %s", len(orphans),
                        ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else ""))
        self._recovered = True
        return len(orphans)

    def run_once(self) -> int:
        """Start the due tasks this engine has handlers for, up to its free slots. Does not wait for them.

        An infrastructure error from the store (a locked database, a dropped connection) is logged and
        nothing starts: the next call tries again.

        Returns:
            How many tasks were started (with ``claim_ahead``, those started as others ended since the last
            call included).
        """
        started = self._run_once()
        with self._lock:
            started, self._ahead = started + self._ahead, 0
        return started

    def _run_once(self) -> int:
        with self._claiming:
            if self._types:
                try:
                    self._housekeeping()
                except Exception as exc:
                    # Housekeeping is never a reason not to claim: it runs again at the next pass.
                    if is_infrastructure_error(exc):
                        log.info("tasks: housekeeping met a store fault (%s: %s); again at the next pass",
                                 type(exc).__name__, exc)
                    else:
                        log.exception("tasks: housekeeping failed; again at the next pass")
            try:
                if not self._recovered:
                    self.recover()
                if not self._types:
                    return 0
                with self._lock:
                    free = self.concurrency - len(self._running) - len(self._overdue)
                    held = [*self._running, *self._overdue]
                    abandoned, self._abandoned = self._abandoned, False
                if free <= 0:
                    with self._lock:
                        self._abandoned = self._abandoned or abandoned
                    return 0
                claimed = self._claim(free, held, abandoned)
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise
                # The claim may have committed before the error reached us: those tasks are ours but not
                # running, and the next claim gives them back.
                with self._lock:
                    self._abandoned = True
                log.info("tasks: claiming failed (%s: %s); trying again at the next pass", type(exc).__name__, exc)
                return 0
            if not claimed:
                return 0
            self._executor()
            # Under a driver (``claim_ahead``), quick handlers run here, in the claiming thread.
            started, quick = self._start(claimed, inline=self.claim_ahead)
            return started + (self._run_inline(quick) if quick else 0)

    def _start(self, claimed: list[table.Claimed], *, ahead: bool = False,
               inline: bool = False) -> tuple[int, list[_Run]]:
        """Run ``claimed`` on the engine's pool; returns how many started, and, with ``inline``, the runs of
        quick types (``_quick``) left for the caller to run in its own thread. Tasks claimed while the engine
        closed (its pool gone) are given back, their attempt not counted."""
        now = self.store.clock.now()
        quick: list[_Run] = []
        with self._lock:
            pool = self._pool
            if pool is not None:
                for c in claimed:
                    beat = heartbeat(functools.partial(self._renew, c.id, c.token), lease_for=self.lease_for,
                                     what=f"task {c.id}")
                    run = _Run(id=c.id, type=c.type, params=c.params, token=c.token, attempt=c.attempt, beat=beat,
                               started=now, trace=c.trace)
                    self._running[c.id] = run
                    if inline and self._quick(c.type):
                        quick.append(run)
                    else:
                        pool.submit(self._execute, run)  # under the lock: ``close`` takes the pool under it too
                if ahead:
                    self._ahead += len(claimed)
                return len(claimed), quick
        try:
            with self.store.transaction() as tx:
                for c in claimed:
                    table.abandon(tx, c.id, c.token, now)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            with self._lock:
                self._abandoned = True  # the next claim gives them back (or their leases lapse)
        return 0, []

    def _quick(self, type_: str) -> bool:
        """Whether ``type_``'s handler answers so quickly that a thread hand-off would cost more than the call
        (``Latency``); never a type with a time limit, which only a thread of its own can enforce."""
        return self._types[type_].time_limit is None and self._latency.quick([type_])

    def _run_inline(self, runs: list[_Run]) -> int:
        """Run ``runs`` (quick handlers, ``_claiming`` held) one after another in this thread, write their
        outcomes in one transaction that also claims tasks for the slots they free, and go on so, round after
        round, for up to ``_INLINE_FOR`` seconds: a commit per batch of tasks instead of per task or two.
        Claimed tasks of types that are not quick go to the pool. Returns how many tasks started here beyond
        ``runs``."""
        until = time.monotonic() + _INLINE_FOR
        started = 0
        while runs:
            batch: list[_Done] = []
            for n, run in enumerate(runs):
                try:
                    transition = self._attempt(run)
                except BaseException:
                    # Not an error of the handler's (an interrupt): the runs not begun are given back at the
                    # next claim, their outcomes so far dropped with this pass.
                    for left in [*runs[n + 1:], *(d.run for d in batch)]:
                        self._forget(left, abandoned=True)
                    raise
                if transition is None:
                    self._forget(run)  # its outcome is not to be written (``_attempt`` said why)
                else:
                    batch.append(_Done(run, transition))
            claimed = self._write_outcomes(batch, claim=time.monotonic() < until) if batch else []
            for d in batch:
                abandoned = False
                if d.alone:
                    abandoned = self._record_one(d.run, d.transition, landed=d.tried)
                elif not d.written:
                    log.warning("task %s: outcome dropped; it was removed or taken by another worker", d.run.id)
                self._forget(d.run, abandoned=abandoned, tell=False)
            if batch:
                self._freed_up()  # once for the round's runs
            if not claimed:
                break
            n, runs = self._start(claimed, inline=True)
            started += n
        return started

    def _claim(self, free: int, held: list[str], abandoned: bool) -> list[table.Claimed]:
        # The claim of one type with no max_concurrency and nothing to give back is one statement.
        one = not abandoned and self._sole_type() is not None
        with self.store.statement() if one else self.store.transaction() as tx:
            return self._claim_in(tx, free, held, abandoned)

    def _claim_in(self, tx: Any, free: int, held: list[str], abandoned: bool) -> list[table.Claimed]:
        """Claim up to ``free`` due tasks in ``tx`` (``_claiming`` held), giving ``free`` slots to the types by
        priority; with ``abandoned``, first give back this engine's tasks that it does not run."""
        now = self.store.clock.now()
        claimed: list[table.Claimed] = []
        limited = [t for t, s in self._types.items() if s.max_concurrency is not None]
        if abandoned:
            # This engine's RUNNING tasks that it does not run: their invocation was abandoned on an
            # infrastructure error.
            n = table.give_back(tx, self.owner, held, now)
            if n:
                log.info("tasks: %d abandoned invocation(s) queued again", n)
        running = table.admitted(tx, limited, now)
        # Free slots go to the due tasks of highest priority across the types: the first ``free`` of them
        # say how many each type gets (first round); a window that was full may hide more due tasks, which
        # fill what the first round left (second round, in the same order of types).
        order = table.due_order(tx, list(self._types), held, free, now) if len(self._types) > 1 else []
        plan: dict[str, int] = {}
        for type_ in order:
            plan[type_] = plan.get(type_, 0) + 1
        ranked = [*plan, *(t for t in self._types if t not in plan)]
        rounds = [True, False] if len(order) == free else [True]
        taken: dict[str, int] = {}
        for capped in rounds if plan else [False]:
            for type_ in ranked:
                spec = self._types[type_]
                if free <= 0:
                    break
                allowed = free
                if capped:
                    allowed = min(allowed, plan.get(type_, 0) - taken.get(type_, 0))
                if spec.max_concurrency is not None:
                    allowed = min(allowed, spec.max_concurrency - running.get(type_, 0) - taken.get(type_, 0))
                if spec.rate_limit_per_s is not None:
                    self._refill(spec, now)
                    allowed = min(allowed, int(spec.tokens))
                if allowed <= 0:
                    continue
                # A lapsed lease of a task this engine still runs (its renewals could not reach the database)
                # is for other workers to take, never for this one to start twice: ``held`` is left out.
                got = table.claim(tx, type_, self.owner, held, allowed, now + self.lease_for, now)
                if spec.rate_limit_per_s is not None:
                    spec.tokens -= len(got)
                free -= len(got)
                taken[type_] = taken.get(type_, 0) + len(got)
                claimed.extend(got)
        return claimed

    def _renew(self, task_id: str, token: int) -> bool:
        with self.store.transaction() as tx:
            return table.renew(tx, task_id, token, self.store.clock.now() + self.lease_for)

    def _refill(self, spec: _TypeSpec, now: float) -> None:
        assert spec.rate_limit_per_s is not None
        spec.tokens = min(max(1.0, spec.rate_limit_per_s),
                          spec.tokens + (now - spec.refilled_at) * spec.rate_limit_per_s)
        spec.refilled_at = now

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="errands-task")
            return self._pool

    def _execute(self, run: _Run) -> None:
        """Run one task on a thread of the pool and write its outcome."""
        transition = self._attempt(run)
        abandoned = False
        try:
            if transition is not None:
                abandoned = self._record(run, transition)
        finally:
            self._forget(run, abandoned=abandoned)

    def _attempt(self, run: _Run) -> Transition | None:
        """Call the run's handler and say what its outcome leads to; None when nothing is to be written (past
        its time limit, its lease lost). A ``BaseException`` other than a stop forgets the run and goes on."""
        spec = self._types[run.type]
        outcome: str | Exception
        try:
            args: tuple[Any, ...] = (run.params, TaskContext(
                id=run.id, type=run.type, attempt=run.attempt, _beat=run.beat, _stop=run.stop,
            )) if spec.wants_ctx else (run.params,)
            began = time.perf_counter()
            with telemetry.span("errands.tasks.run", telemetry.parsed(run.trace), task_type=run.type, task_id=run.id, attempt=run.attempt,
                                lease_owner=self.owner):
                outcome = dumps(self._bridge.call(_until_stopped(spec.fn, run.stop), *args), field="result")
            self._latency.record(run.type, time.perf_counter() - began)
        except BaseException as exc:
            stopped = run.stop.set and isinstance(exc, (asyncio.CancelledError, concurrent.futures.CancelledError))
            if not isinstance(exc, Exception) and not stopped:
                run.stop.finish()
                self._forget(run)
                raise
            outcome = exc if isinstance(exc, Exception) else RuntimeError(f"stopped ({run.stop.reason})")
        reason = run.stop.finish()
        try:
            if reason == TIME_LIMIT:
                log.info("task %s (%s): its handler returned after its time limit; its outcome is dropped",
                         run.id, run.type)
                return None
            transition = settle(outcome, run.attempt, spec.policy, self.store.clock.now(), lease_lost=run.beat.lost,
                                stopped=reason)
            if transition is None:
                telemetry.count("errands.lease.lost", engine="tasks")
                log.warning("task %s (%s): its lease was lost while it ran; this run records nothing (another "
                            "worker may run it)", run.id, run.type)
                return None
            self._log(run, transition)
            return transition
        except BaseException:
            self._forget(run)
            raise

    @staticmethod
    def _log(run: _Run, transition: Transition) -> None:
        """Say what a failed attempt led to: a retry is a warning, a task that ended failed or dead an error."""
        if transition.status is TaskStatus.PENDING:
            log.warning("task %s (%s) attempt %d failed: %s; retrying in %.2fs", run.id, run.type, run.attempt,
                        transition.error, transition.delay)
        elif transition.status is TaskStatus.CANCELLED:
            log.info("task %s (%s) cancelled", run.id, run.type)
        elif transition.status is not TaskStatus.SUCCEEDED:
            log.error("task %s (%s) %s after %d attempt(s): %s", run.id, run.type, transition.status.value.lower(),
                      run.attempt, transition.error)

    def _record(self, run: _Run, transition: Transition) -> bool:
        """Write a run's outcome, fenced by its token; returns whether the invocation was abandoned.

        Outcomes of runs that end together are written together (group commit): the first thread to arrive
        writes every outcome queued meanwhile in one transaction, round after round while more arrive, and
        each of the others returns when its own outcome is written. A batch that fails sends each of its runs
        to the one-by-one write (``_record_one``), which retries and, at worst, abandons."""
        done = _Done(run, transition)
        with self._done_lock:
            self._done_queue.append(done)
            lead = not self._writing
            self._writing = True
        if lead:
            while True:
                with self._done_lock:
                    batch, self._done_queue = self._done_queue, []
                    if not batch:
                        self._writing = False
                        break
                self._write_batch(batch)
        else:
            done.event.wait()
        if done.alone:
            return self._record_one(run, transition, landed=done.tried)
        if not done.written:
            log.warning("task %s: outcome dropped; it was removed or taken by another worker", run.id)
        return False

    def _write_batch(self, batch: list[_Done]) -> None:
        """Write ``batch``'s outcomes in one transaction and, in the same one, claim due tasks for the slots
        they free (unless ``run_once`` is claiming now): one commit ends runs and starts the next ones."""
        ahead = (self.claim_ahead and self._pool is not None and bool(self._types)
                 and self._claiming.acquire(blocking=False))
        try:
            claimed = self._write_outcomes(batch, claim=ahead)
            if claimed:
                self._start(claimed, ahead=True)
        finally:
            if ahead:
                self._claiming.release()

    def _write_outcomes(self, batch: list[_Done], *, claim: bool) -> list[table.Claimed]:
        """Write ``batch``'s outcomes in one transaction, with ``claim`` (``_claiming`` held) claiming in it
        tasks for the slots they free; returns those. On a fault every run of ``batch`` is marked to be written
        alone (``_Done.alone``); every run's event is set."""
        claimed: list[table.Claimed] = []
        try:
            now = self.store.clock.now()
            # A retry may have been cancelled meanwhile (asked in the transaction); other outcomes are known now.
            known = not any(d.transition.status is TaskStatus.PENDING for d in batch)
            outcomes = [(d.run.id, d.run.token, d.transition.columns) for d in batch]
            single = self._single_claim(batch) if claim and known and table.one_statement(outcomes) else None
            if single is not None:
                # One statement writes the outcomes and takes the next tasks: a round is one round trip.
                type_, free, held = single
                spec = self._types[type_]
                with self.store.statement() as tx:
                    done, claimed = table.finish_and_claim(tx, outcomes, now, type_, self.owner, held, free,
                                                           now + self.lease_for)
                if spec.rate_limit_per_s is not None:
                    spec.tokens -= len(claimed)
                for d, written in zip(batch, done):
                    d.written = written
                return claimed
            with self.store.transaction() as tx:
                now = self.store.clock.now()
                retried = [d.run.id for d in batch if d.transition.status is TaskStatus.PENDING]
                asked = set(table.cancel_requested(tx, retried)) if retried else set()
                outcomes = [(d.run.id, d.run.token,
                             (cancelled(now) if d.run.id in asked else d.transition).columns) for d in batch]
                for d, written in zip(batch, table.finish_many(tx, outcomes, now)):
                    d.written = written
                if claim:
                    claimed = self._claim_freed(tx, batch)
        except Exception as exc:  # each run's own thread writes it alone, and meets the error there
            log.info("tasks: writing %d outcomes together failed (%s: %s); writing them one by one",
                     len(batch), type(exc).__name__, exc)
            for d in batch:
                d.alone = d.tried = True
            if claim:  # a claim may have committed unacknowledged: the next claim gives such tasks back
                with self._lock:
                    self._abandoned = True
            claimed = []
        finally:
            for d in batch:
                d.event.set()
        return claimed

    def _claim_freed(self, tx: Any, batch: list[_Done]) -> list[table.Claimed]:
        """Claim in ``tx`` up to the slots free once ``batch``'s runs leave (a run past its time limit keeps its
        slot until its handler returns)."""
        free, held = self._freed_slots(batch)
        return self._claim_in(tx, free, held, False) if free > 0 else []

    def _freed_slots(self, batch: list[_Done]) -> tuple[int, list[str]]:
        """The slots free once ``batch``'s runs leave (none while abandoned tasks wait to be given back by
        ``run_once``), and the tasks this engine holds."""
        with self._lock:
            if self._abandoned:
                return 0, []
            leaving = sum(1 for d in batch if self._running.get(d.run.id) is d.run)
            free = self.concurrency - len(self._running) - len(self._overdue) + leaving
            return free, [*self._running, *self._overdue]

    def _sole_type(self) -> tuple[str, _TypeSpec] | None:
        """The engine's one task type and its settings when its claim is one ``table.claim`` (one type, no
        ``max_concurrency`` to count first); None otherwise."""
        if len(self._types) != 1:
            return None
        (type_, spec), = self._types.items()
        return None if spec.max_concurrency is not None else (type_, spec)

    def _single_claim(self, batch: list[_Done]) -> tuple[str, int, list[str]] | None:
        """``(type, free slots, held)`` when the claim for the slots ``batch`` frees is one ``table.claim`` of
        the engine's one type (no ``max_concurrency`` to count first), so that it can share a statement with the
        outcomes; None otherwise (``_claim_in`` decides)."""
        sole = self._sole_type()
        if sole is None:
            return None
        type_, spec = sole
        free, held = self._freed_slots(batch)
        if spec.rate_limit_per_s is not None:
            self._refill(spec, self.store.clock.now())
            free = min(free, int(spec.tokens))
        return type_, max(free, 0), held

    def _record_one(self, run: _Run, transition: Transition, *, landed: bool = False) -> bool:
        """Write one run's outcome, fenced by its token. Infrastructure errors are retried (the shared
        ``retry_infrastructure`` policy) while the heartbeat keeps the lease; then the invocation is abandoned
        and runs again soon. Returns whether it was abandoned. ``landed``: a batch holding it failed (it may
        have landed unseen): that was the policy's first attempt."""
        def write(attempt: int) -> bool:
            with self.store.transaction() as tx:
                # A write that met a fault at commit may have landed unseen: a retry asks that first.
                if attempt > 0 and table.finished(tx, run.id, run.token):
                    return True
                now = self.store.clock.now()
                outcome = transition
                # Cancelled from elsewhere while the attempt ended: no retry, the task ends cancelled.
                if outcome.status is TaskStatus.PENDING and table.cancel_requested(tx, [run.id]):
                    outcome = cancelled(now)
                return table.finish(tx, run.id, run.token, outcome.columns, now)

        try:
            # After a batch that failed, that batch was the first attempt of the shared policy.
            written = retry_infrastructure(lambda attempt: write(attempt + landed), clock=self.store.clock,
                                           what=f"task {run.id}: writing its outcome",
                                           keep_going=lambda: not run.beat.lost,
                                           delays=RETRY_DELAYS[1:] if landed else RETRY_DELAYS)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            self._abandon(run, exc)
            return True
        if not written:
            log.warning("task %s: outcome dropped; it was removed or taken by another worker", run.id)
        return False

    def _abandon(self, run: _Run, exc: Exception) -> None:
        """Give a run's task back after an infrastructure error: due now, this invocation not counted."""
        log.warning("task %s (%s): the store failed (%s: %s); the run is abandoned and the task runs again",
                    run.id, run.type, type(exc).__name__, exc)
        try:
            with self.store.transaction() as tx:
                table.abandon(tx, run.id, run.token, self.store.clock.now())
        except Exception as again:
            if not is_infrastructure_error(again):
                raise
            # Still failing: the next claim of this engine gives the task back (or its lease lapses).

    def _forget(self, run: _Run, *, abandoned: bool = False, tell: bool = True) -> None:
        """The run left its slot. ``tell`` (unless the caller tells once for a round of runs: ``_freed_up``):
        say so to the driver."""
        with self._lock:
            if self._running.get(run.id) is run:
                del self._running[run.id]
            if self._overdue.get(run.id) is run:
                del self._overdue[run.id]
            if abandoned:
                self._abandoned = True
        run.beat.stop()
        if tell:
            self._freed_up()

    def _freed_up(self) -> None:
        # A slot is free: the driver (a worker, ``drain``) claims the next task now, not after a poll.
        self._freed.set()
        _wake.notify(self.store, _wake.TASKS)

    @property
    def in_flight(self) -> int:
        """Tasks this engine is running now (handlers past their time limit that have not returned included)."""
        with self._lock:
            return len(self._running) + len(self._overdue)

    def wait(self, id: str, timeout: float = 30.0, *, poll: float = 0.02) -> TaskRecord:
        """Run due tasks until ``id`` is final (or ``timeout`` seconds pass), and return it."""
        deadline = time.monotonic() + timeout
        while True:
            rec = self.get(id)
            if rec is None:
                raise NotFoundError(f"no task {id!r}")
            if rec.status in FINAL or time.monotonic() >= deadline:
                return rec
            self.run_once()
            time.sleep(poll)

    def drain(self, timeout: float = 30.0, *, poll: float = 0.02) -> int:
        """Run tasks until none of this engine's types is due or running here (or ``timeout`` seconds pass).
        A pass follows at once while a pass starts tasks, and as soon as a slot frees otherwise. Returns tasks
        started."""
        deadline = time.monotonic() + timeout

        def step() -> int:
            return self.run_once() if time.monotonic() < deadline else 0

        def busy() -> bool:
            """Tasks still run here or are due: pass again as soon as a slot frees (at most ``poll`` later: a
            retry coming due, a rate limit refilled), until the deadline."""
            if time.monotonic() >= deadline:
                return False
            if self.in_flight == 0:
                with self.store.read() as tx:
                    if table.due_count(tx, list(self._types), self.store.clock.now()) == 0:
                        return False
            self._freed.wait(poll)
            return True

        was, self.claim_ahead = self.claim_ahead, True
        try:
            return drain(step, sys.maxsize, busy=busy)
        finally:
            self.claim_ahead = was

    def use_runner(self, runner: CallRunner | None) -> None:
        """Await async handlers through ``runner`` (a ``Worker`` lends its own while it runs this engine);
        None: through this engine's own again. While a runner is lent the engine claims ahead
        (``claim_ahead``): the worker runs it continuously."""
        self._bridge = runner or self._own_bridge
        self.claim_ahead = runner is not None

    def close(self, wait: bool = True) -> None:
        """Stop taking tasks and ask running handlers to stop (``ctx.cancelled``, or ``CancelledError`` for an
        async one: a worker's shutdown, SIGTERM, reaches them so); with ``wait``, wait until they return. A task
        whose handler raised then is released for another worker (the attempt not counted, never failed); one
        whose handler returned has succeeded."""
        with self._lock:  # from now on nothing starts here (``_start`` needs the pool)
            pool, self._pool = self._pool, None
            runs = list(self._running.values())
        for run in runs:
            run.stop.request(SHUTDOWN)
        if pool is not None:
            pool.shutdown(wait=wait)
        self._own_bridge.close()


# -- typed handlers ------------------------------------------------------------------------------

def typed_handler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn`` so that its first argument arrives as its annotated type, built from the JSON params.

    Supports dataclasses (nested too), ``TypedDict`` (keys checked) and pydantic models (if pydantic
    is installed). Params that do not fit raise ``ConfigError`` naming the field: the task fails
    without retries.

    Example:
        >>> @dataclass
        ... class Resize:
        ...     path: str
        ...     width: int
        >>> @typed_handler
        ... def resize(job: Resize) -> str: ...
        >>> TaskEngine(store, handlers={"resize": resize})
    """
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        raise ConfigError(f"typed_handler: {fn.__qualname__} takes no argument to convert params into",
                          field="handler", value=fn.__qualname__)
    hints = typing.get_type_hints(fn)
    target = hints.get(params[0].name)
    if target is None:
        raise ConfigError(f"typed_handler: annotate the first argument of {fn.__qualname__} with its params type",
                          field="handler", value=fn.__qualname__)
    convert = _converter(target)
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(raw: Any, *rest: Any) -> Any:
            return await fn(convert(raw, "params"), *rest)

        return async_wrapper

    @functools.wraps(fn)
    def wrapper(raw: Any, *rest: Any) -> Any:
        return fn(convert(raw, "params"), *rest)

    return wrapper


def _converter(target: Any) -> Callable[[Any, str], Any]:
    if dataclasses.is_dataclass(target) and isinstance(target, type):
        return lambda raw, path: _to_dataclass(target, raw, path)
    if typing.is_typeddict(target):
        return lambda raw, path: _to_typeddict(target, raw, path)
    validate = getattr(target, "model_validate", None)
    if isinstance(target, type) and callable(validate):
        def pydantic(raw: Any, path: str) -> Any:
            try:
                return validate(raw)
            except Exception as exc:
                if type(exc).__name__ != "ValidationError":
                    raise
                errors = typing.cast(Any, exc).errors()  # pydantic's ValidationError, not imported here
                first = errors[0] if errors else {}
                where = ".".join(str(p) for p in first.get("loc", ()))
                raise ConfigError(f"{path}.{where}: {first.get('msg', exc)}", field=f"{path}.{where}",
                                  value=first.get("input")) from exc

        return pydantic
    return lambda raw, path: raw


def _to_dataclass(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path} must be an object for {cls.__name__}, got {type(raw).__name__}",
                          field=path, value=raw)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]} is not a field of {cls.__name__} (fields: {', '.join(fields)})",
                          field=f"{path}.{unknown[0]}", value=raw[unknown[0]])
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}.{name} is required by {cls.__name__}", field=f"{path}.{name}", value=None)
            continue
        kwargs[name] = _convert_value(hints.get(name), raw[name], f"{path}.{name}")
    return cls(**kwargs)


def _to_typeddict(cls: Any, raw: Any, path: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path} must be an object for {cls.__name__}, got {type(raw).__name__}",
                          field=path, value=raw)
    hints = typing.get_type_hints(cls)
    missing = sorted(set(cls.__required_keys__) - set(raw))
    if missing:
        raise ConfigError(f"{path}.{missing[0]} is required by {cls.__name__}", field=f"{path}.{missing[0]}",
                          value=None)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]} is not a key of {cls.__name__}", field=f"{path}.{unknown[0]}",
                          value=raw[unknown[0]])
    return {k: _convert_value(hints.get(k), v, f"{path}.{k}") for k, v in raw.items()}


_SIMPLE = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


def _convert_value(hint: Any, value: Any, path: str) -> Any:
    if hint is None or hint is Any:
        return value
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _to_dataclass(hint, value, path)
    if typing.is_typeddict(hint):
        return _to_typeddict(hint, value, path)
    origin = typing.get_origin(hint)
    if origin in (list, Sequence, tuple) and isinstance(value, list):
        args = typing.get_args(hint)
        inner = args[0] if args else None
        items = [_convert_value(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint in _SIMPLE:
        if (isinstance(value, bool) and hint is not bool) or not isinstance(value, _SIMPLE[hint]):
            raise ConfigError(f"{path} must be {hint.__name__}, got {value!r}", field=path, value=value)
        return float(value) if hint is float else value
    return value
