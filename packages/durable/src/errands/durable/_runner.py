"""``DurableRunner``: durable functions on an errands store (SQLite or PostgreSQL).

The runner wires the parts together and holds a runner's settings: ``_registry`` (which function runs
under which name), ``_invocations`` (claiming and running invocations), ``_callbacks``, ``_signals`` and
``_management`` (what callers do to executions from outside), over ``_executions`` and ``_schema``
(durable's tables).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Iterable, List, Mapping

from errands.core import DEFAULT_LEASE_FOR, Clock, ConfigError, Lease, Worker, open_store, telemetry
from errands.core.runtime import drain, error_text, is_infrastructure_error, notify_work
from errands.core.store import SQLStore, Tx, dumps

from . import _callbacks as callbacks
from . import _effects as effects
from . import _events as events
from . import _executions as executions
from . import _management as management
from . import _queues as queues
from . import _schema as schema
from . import _signals as signals
from ._invocations import Invocations
from ._parallel import Slots, check_parallelism
from ._queues import QueueConfig, Queues
from ._registry import DurableFunction, Registry
from ._replay import ReplayResult, replay
from ._schedules import Schedules
from ._timeouts import check_timeout, expire_due, expire_keys
from ._values import ErrorObject, ExecutionInfo, ExecutionStatus, Operation, to_seconds

log = logging.getLogger("errands.durable")

#: How often ``work_once`` applies the retention (seconds of the store's clock).
RETENTION_EVERY = 60.0
#: How often ``work_once`` looks for executions past their deadline (seconds of the store's clock): a
#: deadline is enforced this late at most, and an idle worker's polls cost one statement, not two.
DEADLINES_EVERY = 1.0


class DurableRunner:
    """Runs durable functions on a store: starts executions, resumes them when timers fire and callbacks
    arrive, and manages them.

    Args:
        store: a store URL (``sqlite:///durable.db``, ``postgresql://...``, ``memory://``) or an open store.
        functions: name -> ``fn(event, ctx)``, on top of those registered with ``@durable_function``.
        clock: the time source (``FakeClock`` in tests); only used when ``store`` is a URL.
        lease_for: seconds a worker's claim on an execution lasts; a heartbeat renews it every third of that
            while user code runs, so it bounds how long a killed worker's execution waits, not how long a
            step may take.
        retention: how long finished executions are kept (``timedelta`` or seconds; None: forever).
        always_replay: end every invocation after each newly completed operation and replay from the
            start (a determinism check for tests).
        outbox: the core ``Outbox`` on this store that ``ctx.effect`` submits through (``use_outbox``;
            ``errands.App.attach`` gives its own).
        max_parallelism: the most invocations a worker (``work_once``, ``drain``, ``serve``, a core
            ``Worker``) runs at once, each on a thread of its own with its lease renewed; 1 (the default)
            runs them one after another in the worker's thread.

    Example:
        >>> runner = DurableRunner("memory://")
        >>> @runner.durable_function("greet")
        ... def greet(event, ctx):
        ...     return ctx.step("hello", lambda _: f"hello {event['name']}")
        >>> runner.run("greet", {"name": "alice"}).result
        'hello alice'
    """

    def __init__(self, store: str | SQLStore = "sqlite:///durable.db", *,
                 functions: Mapping[str, DurableFunction] | None = None, clock: Clock | None = None,
                 lease_for: float = DEFAULT_LEASE_FOR, retention: timedelta | float | None = None,
                 always_replay: bool = False, outbox: Any = None, max_parallelism: int = 1) -> None:
        if isinstance(store, str):
            self.store: SQLStore = open_store(store, clock=clock)
            self._owns_store = True
        else:
            self.store = store
            self._owns_store = False
        self.store.migrate("durable", schema.MIGRATIONS)
        self.clock: Clock = self.store.clock
        if not isinstance(lease_for, (int, float)) or lease_for <= 0:
            raise ConfigError(f"lease_for must be positive seconds, got {lease_for!r}", field="lease_for",
                              value=lease_for)
        self.lease_for = float(lease_for)
        self.retention = to_seconds(retention, field="retention") if retention is not None else None
        self.always_replay = always_replay
        self._registry = Registry()
        for name, fn in (functions or {}).items():
            self.register(name, fn)
        self._invocations = Invocations(self.store, self._registry, lease_for=self.lease_for,
                                        always_replay=always_replay)
        self._last_retention = 0.0
        self._last_deadlines = float("-inf")
        self._stop = threading.Event()
        self._queues = Queues(self.store, lease_for=self.lease_for)
        self._schedules = Schedules(self.store, self._registry)
        self.max_parallelism = check_parallelism(max_parallelism)
        self._slots = Slots(self.max_parallelism, self._invocations.run) if self.max_parallelism > 1 else None
        self._freed = threading.Event()
        if self._slots is not None:
            self._slots.on_free(self._freed.set)
        self.outbox: Any = None
        self._wakes: Any = None
        self._waking = threading.Lock()
        if outbox is not None:
            self.use_outbox(outbox)

    def use_outbox(self, outbox: Any) -> None:
        """Submit ``ctx.effect``'s effects through ``outbox`` (an ``errands.core.Outbox`` on this runner's
        store; a submit-only one will do when another worker dispatches) and wake executions when they end.

        Raises:
            ConfigError: ``outbox`` is not an ``Outbox`` on this runner's store.
        """
        if not callable(getattr(outbox, "submit_many", None)) or getattr(outbox, "store", None) is not self.store:
            raise ConfigError("outbox must be an errands.core.Outbox on the runner's own store (Outbox(runner.store, "
                              f"...)), got {type(outbox).__name__}", field="outbox", value=type(outbox).__name__)
        if self._wakes is not None:
            self._wakes.close()
        self.outbox = outbox
        self._invocations.outbox = outbox
        self._wakes = effects.wakes(self.store, outbox)

    # -- registration ----------------------------------------------------------------------------
    def register(self, name: str, fn: DurableFunction) -> None:
        """Register ``fn(event, ctx)`` under ``name`` for this runner.

        Raises:
            DuplicateFunctionError: ``name`` is registered to another function already (on this runner or
                with ``@durable_function``). Registering the same function again changes nothing.
        """
        self._registry.register(name, fn)

    def durable_function(self, name: str) -> Callable[[DurableFunction], DurableFunction]:
        """Decorator form of ``register``."""

        def deco(fn: DurableFunction) -> DurableFunction:
            self.register(name, fn)
            return fn

        return deco

    # -- starting --------------------------------------------------------------------------------
    def _prepare_start(self, function: str, input: Any, execution_id: str | None) -> tuple[str, str]:
        """The checked id (or a new one) and the input's JSON text of a start."""
        self._registry.check(function)
        return executions.new_execution_id(execution_id), dumps(input, field="input")

    def start(self, function: str, input: Any = None, *, execution_id: str | None = None, conn: Any = None,
              timeout: timedelta | float | None = None, queue: str | None = None, priority: int = 0,
              dedup_id: str | None = None) -> str:
        """Start ``function`` on ``input`` (JSON); a worker (or ``wait``) runs it.

        Idempotent on ``execution_id``: the same id with the same function and input returns the
        existing execution.

        Args:
            conn: the caller's own connection to the store's database: the execution's rows are written in
                the caller's transaction, committed (or rolled back) with the caller's other writes.
            timeout: seconds (or a ``timedelta``) after which the execution, and every execution it started,
                ends ``TIMED_OUT``, whether or not a worker still runs it (any worker's ``work_once`` ends it;
                an invocation in flight is fenced out at its next checkpoint).
            queue: a queue of this runner (``add_queue``): the execution is ``ENQUEUED`` until a worker
                admits it within the queue's limits.
            priority: the queue admits lower values first (default 0), then the oldest.
            dedup_id: while an execution started on ``queue`` with this id has not finished, another start
                with it raises ``QueueDeduplicatedError``.

        Raises:
            ConfigError: unknown function, bad id or timeout, unknown queue, bad priority or dedup_id.
                PayloadError: input is not JSON. AlreadyExistsError: the id exists with another function
                or input.
            QueueDeduplicatedError: ``dedup_id`` is held on ``queue`` (nothing is started).
        """
        queues.check_start(queue, priority, dedup_id)
        if queue is not None:
            self._queues.get(queue)
        execution_id, text = self._prepare_start(function, input, execution_id)
        seconds = check_timeout(timeout)
        with telemetry.span("errands.durable.start", execution_id=execution_id, function=function), \
                self.store.transaction(conn) as tx:
            if queue is None:
                executions.start(self.store, tx, execution_id, function, text, self.clock.now(),
                                 timeout=seconds)
            else:
                self._queues.start(tx, execution_id, function, text, self.clock.now(), queue=queue,
                                   priority=priority, dedup_id=dedup_id, timeout=seconds)
            tx.notify("durable")  # a worker of another process (PostgreSQL), at commit
        notify_work(self.store, "durable")  # a worker of this process
        return execution_id

    async def start_async(self, function: str, input: Any = None, *, execution_id: str | None = None,
                          conn: Any = None, timeout: timedelta | float | None = None,
                          queue: str | None = None, priority: int = 0, dedup_id: str | None = None) -> str:
        """``start`` for coroutines, without blocking the event loop (``conn``, ``timeout`` and the queue's
        arguments as there)."""
        started: str = await self.store.run_async(self.start, function, input, execution_id=execution_id, conn=conn,
                                                  timeout=timeout, queue=queue, priority=priority, dedup_id=dedup_id)
        return started

    # -- queues and schedules --------------------------------------------------------------------
    def add_queue(self, name: str, *, concurrency: int | None = None, worker_concurrency: int | None = None,
                  rate_limit: tuple[int, float] | None = None) -> QueueConfig:
        """Declare the queue ``name`` for ``start(..., queue=name)`` (every process that starts on it or runs
        its executions declares it, with the same limits).

        Args:
            concurrency: the most executions of the queue admitted and not finished, across every worker on
                the store (held across processes on PostgreSQL by a row lock in each admission).
            worker_concurrency: the same, counting those one worker (this runner) admitted.
            rate_limit: ``(limit, period_seconds)``: at most ``limit`` admissions in any ``period_seconds``.

        Raises:
            ConfigError: a bad name or limit (every problem at once).
        """
        return self._queues.add(name, concurrency=concurrency, worker_concurrency=worker_concurrency,
                                rate_limit=rate_limit)

    def schedule(self, name: str, function: str, cron: str, input: Any = None) -> None:
        """Start ``function`` on ``input`` at each tick of ``cron`` (five fields, or six with seconds; UTC),
        once per tick across every worker, as the execution ``<name>@<tick, ISO 8601>``. Ticks missed while
        no worker ran start once, as the latest. Declaring the same schedule again changes nothing; another
        function, cron or input replaces it, its next tick counted from now.

        Raises:
            ConfigError: a bad name, an unknown function or a bad cron expression. PayloadError: input is
                not JSON.
        """
        self._schedules.put(name, function, cron, input)

    def unschedule(self, name: str) -> bool:
        """Remove the schedule ``name`` (executions it started stay). False if there was none."""
        return self._schedules.remove(name)

    def run(self, function: str, input: Any = None, *, execution_id: str | None = None,
            timeout: timedelta | float | None = None) -> ExecutionInfo:
        """Start ``function`` and run its first invocation in this thread.

        Returns when the execution finishes or suspends (``PENDING``: a worker resumes it later). The
        invocation holds a lease like a worker's: if the process dies meanwhile, a worker takes the execution
        over within ``lease_for`` seconds. An existing ``execution_id`` is run here only if it is due and no
        worker holds it. ``timeout`` as ``start``'s.
        """
        execution_id, text = self._prepare_start(function, input, execution_id)
        seconds = check_timeout(timeout)
        def start(tx: Tx) -> tuple[bool, list[Lease]]:
            # A new execution's queue item is added leased to this thread: no claim to make after it.
            leases: list[Lease] = []
            created = executions.start(self.store, tx, execution_id, function, text, self.clock.now(), run_token=1,
                                       timeout=seconds, leases=leases, lease_for=self.lease_for)
            return created, leases if created else self._invocations.claim_keys([execution_id], tx=tx)

        # Callers starting at once (a service's request threads) share the commit.
        created, leases = self.store.group_commit(start)
        if created and leases:
            ended = self._invocations.run_first(leases[0], function, text)
            if ended is not None:  # this invocation ended it: its last transaction says how
                return ended
        else:
            for lease in leases:
                self._invocations.run(lease)
        return self.get(execution_id)

    # -- workers ---------------------------------------------------------------------------------
    def work_once(self, limit: int = 16) -> int:
        """Start the due ticks of schedules, admit what the queues allow, claim up to ``limit`` due executions
        (no more than ``max_parallelism`` leaves free) and run one invocation of each: here, one after
        another, or with ``max_parallelism`` above 1 on the runner's threads (this returns at once). Returns
        how many were started and claimed.

        An execution whose invocation meets a store fault is given back and retried shortly; it never stops
        the others. A fault while claiming claims nothing this round.
        """
        woken = self._wake_effects()
        claimed = 0
        if self.clock.now() - self._last_deadlines >= DEADLINES_EVERY:  # first: not invoked once more
            self._last_deadlines = self.clock.now()
            claimed = expire_due(self.store, limit, lease_for=self.lease_for)
        claimed += self._schedules.fire()
        room = limit if self._slots is None else min(limit, self._slots.free())
        leases = self._queues.admit(room) if room > 0 else []
        if room > len(leases):
            leases += self._invocations.claim_due(room - len(leases))
        if self._slots is not None:
            self._slots.submit(leases)
        else:
            for lease in leases:
                self._invocations.run(lease)
        claimed += len(leases)
        if self.retention is not None and self.clock.now() - self._last_retention > RETENTION_EVERY:
            try:
                self.apply_retention()
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise
                log.warning("retention failed (%s); trying again later", error_text(exc))
        return claimed + woken

    def _wake_effects(self) -> int:
        """Wake the executions whose effects ended (the ``durable.effects`` route over the journal)."""
        if self._wakes is None or not self._waking.acquire(blocking=False):
            return 0  # (another thread of this runner is reading them now)
        try:
            woken: int = self._wakes.run_once()
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.warning("reading the ends of effects failed (%s); trying again next round", error_text(exc))
            return 0
        finally:
            self._waking.release()
        return woken

    def next_due(self) -> float | None:
        """When the next execution becomes due (epoch seconds), or None."""
        dues = [d for d in (self.store.next_due(schema.QUEUE), self.store.next_due(schema.DEADLINES)) if d is not None]
        return min(dues) if dues else None

    def serve(self, stop: threading.Event | None = None, *, poll_interval: float = 0.1) -> None:
        """Run executions until ``stop`` is set (or ``close()``)."""
        stop = stop or self._stop
        while not stop.is_set() and not self._stop.is_set():
            if self.work_once() == 0:
                (self._freed if self._slots is not None else stop).wait(poll_interval)
                self._freed.clear()

    def worker(self, **options: Any) -> Worker:
        """A core ``Worker`` running this runner's ``work_once`` (with signal handling and draining), and
        dispatching its outbox's effects when it has one with connectors (not a submit-only one)."""
        if self.outbox is not None and not self.outbox.submit_only:
            options.setdefault("outbox", self.outbox)
        worker = Worker(self.store, **options)
        self.attach(worker)
        return worker

    def attach(self, worker: Worker) -> None:
        """Run this runner's executions in ``worker`` (``errands.App.attach(runner)`` calls this); a runner
        without an outbox takes the worker's, if it is on the runner's store. With ``max_parallelism`` above
        1 they run on the runner's threads, the worker woken as each ends."""
        if self.outbox is None and getattr(worker.outbox, "store", None) is self.store:
            self.use_outbox(worker.outbox)
        worker.add_job("durable.work_once", self.work_once)
        if self._slots is not None:
            self._slots.on_free(worker.wake)

    def drain(self, max_rounds: int = 10_000) -> int:
        """Run every due execution until none is due now and none runs. Returns how many invocations ran."""
        slots = self._slots
        return drain(self.work_once, max_rounds, busy=None if slots is None else lambda: slots.wait(0.05))

    # -- reading ---------------------------------------------------------------------------------
    def get(self, execution_id: str) -> ExecutionInfo:
        """The execution's status, result or error.

        Raises:
            NotFoundError: no such execution.
        """
        return management.get(self.store, execution_id)

    async def get_async(self, execution_id: str) -> ExecutionInfo:
        """``get`` for coroutines, without blocking the event loop."""
        info: ExecutionInfo = await self.store.run_async(self.get, execution_id)
        return info

    def wait(self, execution_id: str, timeout: float | None = None, *, poll_interval: float = 0.02) -> ExecutionInfo:
        """Block until the execution finishes. Meanwhile this thread runs the execution's own due invocations
        (and those of the executions it invoked) that no worker holds, and wakes executions whose effects
        ended (``ctx.effect``); never other executions' work.

        Raises:
            TimeoutError: still not finished after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        info: ExecutionInfo | None = None
        while True:
            info, family = self._look(execution_id, info)
            if info is not None and info.status.terminal:
                return info
            _check_deadline(execution_id, info, timeout, deadline)
            if self._wake_effects() + self._run_family(family) == 0:
                time.sleep(poll_interval)

    async def wait_async(self, execution_id: str, timeout: float | None = None, *,
                         poll_interval: float = 0.02) -> ExecutionInfo:
        """``wait`` for coroutines: the reads and the execution's own due invocations run on a thread, the
        pauses between them are ``asyncio.sleep``; the event loop is never blocked.

        Raises:
            TimeoutError: still not finished after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        info: ExecutionInfo | None = None
        while True:
            info, family = await self.store.run_async(self._look, execution_id, info)
            if info is not None and info.status.terminal:
                return info
            _check_deadline(execution_id, info, timeout, deadline)
            woken = await self.store.run_async(self._wake_effects)
            if woken + await self.store.run_async(self._run_family, family) == 0:
                await asyncio.sleep(poll_interval)

    def _run_family(self, family: list[str]) -> int:
        """Run the due invocations and deadlines of ``family`` that no worker holds; how many."""
        return self._invocations.run_keys(family) + expire_keys(self.store, family, lease_for=self.lease_for)

    def _look(self, execution_id: str, last: ExecutionInfo | None) -> tuple[ExecutionInfo | None, list[str]]:
        """The execution (``last`` if the store failed) and, unless it finished, the executions of its family
        that are still active."""
        try:
            info = self.get(execution_id)
            if info.status.terminal:
                return info, []
            return info, management.active_family(self.store, execution_id)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.info("waiting for execution %s: the store failed (%s); asking again", execution_id,
                     error_text(exc))
            return last, []

    def list(self, status: ExecutionStatus | str | Iterable[ExecutionStatus | str] | None = None, *,
             function: str | None = None, parent_id: str | None = None, limit: int = 100,
             offset: int = 0) -> List[ExecutionInfo]:
        """Executions, newest first, filtered by status(es), function and parent."""
        return management.list_executions(self.store, status, function=function, parent_id=parent_id, limit=limit,
                                          offset=offset)

    def history(self, execution_id: str) -> List[Operation]:
        """The execution's checkpointed operations in the order they started."""
        return management.history(self.store, execution_id)

    # -- versioning and events -------------------------------------------------------------------
    def replay(self, execution_id: str, fn: DurableFunction) -> ReplayResult:
        """Replay the execution's stored history against ``fn`` (new code, registered or not) and report
        the first divergence; nothing is written and no step body runs. Check a deploy with it.

        Raises:
            NotFoundError: no such execution.
        """
        info = self.get(execution_id)
        # only an execution its code ended may not go on; one cut off (terminated, timed out) may
        completed = info.status in (ExecutionStatus.SUCCEEDED, ExecutionStatus.FAILED)
        return replay(execution_id, fn, self.history(execution_id), info.input, completed, self.clock.now)

    def get_event(self, execution_id: str, key: str, timeout: float | None = None, *,
                  poll_interval: float = 0.02) -> Any:
        """The latest value the execution set for ``key`` with ``ctx.set_event``, waiting for it to be set:
        at most ``timeout`` seconds, or (None) until the execution ends. None if it is not set by then (as
        DBOS's ``get_event``).

        Raises:
            NotFoundError: no such execution. ConfigError: a bad key or timeout.
        """
        key = events.check_wait(key, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done, value = events.look(self.store, execution_id, key)
            if done:
                return value
            pause = events.pause(deadline, poll_interval)
            if pause is None:
                return None
            time.sleep(pause)

    async def get_event_async(self, execution_id: str, key: str, timeout: float | None = None, *,
                              poll_interval: float = 0.02) -> Any:
        """``get_event`` for coroutines: the reads run through the store's async bridge, the pauses are
        ``asyncio.sleep``; the event loop is never blocked."""
        key = events.check_wait(key, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            done, value = await self.store.run_async(events.look, self.store, execution_id, key)
            if done:
                return value
            pause = events.pause(deadline, poll_interval)
            if pause is None:
                return None
            await asyncio.sleep(pause)

    # -- callbacks -------------------------------------------------------------------------------
    def complete_callback(self, callback_id: str, result: Any = None) -> bool:
        """Hand ``result`` (JSON) to the execution waiting on ``callback_id`` and wake it.

        Returns:
            False if the callback had already completed, failed or timed out, or its execution has finished
            (nothing changes).

        Raises:
            NotFoundError: no such callback. PayloadError: ``result`` is not JSON.
        """
        return callbacks.complete(self.store, callback_id, result)

    def fail_callback(self, callback_id: str, error: ErrorObject | BaseException | Mapping[str, Any] | str) -> bool:
        """Fail the callback: the waiting ``result()`` raises ``CallbackError`` with this error.

        Args:
            error: an ``ErrorObject``, an exception, a dict with AWS keys, or a message.
        """
        return callbacks.fail(self.store, callback_id, error)

    def heartbeat_callback(self, callback_id: str) -> None:
        """Record that the party completing ``callback_id`` is still working (resets its heartbeat timeout)."""
        callbacks.heartbeat(self.store, callback_id)

    async def complete_callback_async(self, callback_id: str, result: Any = None) -> bool:
        """``complete_callback`` for coroutines, without blocking the event loop."""
        done: bool = await self.store.run_async(self.complete_callback, callback_id, result)
        return done

    async def fail_callback_async(self, callback_id: str,
                                  error: ErrorObject | BaseException | Mapping[str, Any] | str) -> bool:
        """``fail_callback`` for coroutines, without blocking the event loop."""
        done: bool = await self.store.run_async(self.fail_callback, callback_id, error)
        return done

    async def heartbeat_callback_async(self, callback_id: str) -> None:
        """``heartbeat_callback`` for coroutines, without blocking the event loop."""
        await self.store.run_async(self.heartbeat_callback, callback_id)

    # -- signals ---------------------------------------------------------------------------------
    def send_signal(self, execution_id: str, name: str, payload: Any = None, *, conn: Any = None) -> bool:
        """Send the signal ``name`` with ``payload`` (JSON) to the execution: the oldest
        ``ctx.wait_for_signal(name)`` waiting takes it and the execution wakes; with none waiting, it is kept,
        after any earlier ones, until a wait takes it.

        Args:
            conn: the caller's own connection to the store's database (as ``start``'s).

        Returns:
            True if a waiting ``wait_for_signal`` took the signal at once, False if it is kept.

        Raises:
            NotFoundError: no such execution. SignalRefusedError: the execution has finished.
            ConfigError: ``name`` is not a non-empty string. PayloadError: ``payload`` is not JSON.
        """
        return signals.send(self.store, execution_id, name, payload, conn=conn)

    async def send_signal_async(self, execution_id: str, name: str, payload: Any = None, *,
                                conn: Any = None) -> bool:
        """``send_signal`` for coroutines, without blocking the event loop (``conn`` as there)."""
        taken: bool = await self.store.run_async(self.send_signal, execution_id, name, payload, conn=conn)
        return taken

    # -- management ------------------------------------------------------------------------------
    def terminate(self, execution_id: str, reason: str | None = None, *, recursive: bool = True) -> ExecutionInfo:
        """Stop the execution now (``TERMINATED``); an invocation in flight is fenced out at its next
        checkpoint. With ``recursive``, executions it invoked are terminated too."""
        return management.terminate(self.store, execution_id, reason, recursive=recursive)

    def suspend(self, execution_id: str) -> ExecutionInfo:
        """Pause the execution: nothing runs until ``resume``. Callbacks still record their results."""
        return management.suspend(self.store, execution_id)

    def resume(self, execution_id: str) -> ExecutionInfo:
        """Continue a suspended execution (it replays and carries on from its checkpoints)."""
        return management.resume(self.store, execution_id)

    def purge(self, execution_id: str) -> int:
        """Delete a finished execution, its operations and every execution it invoked (recursively).

        Returns:
            How many executions were deleted.

        Raises:
            ConfigError: the execution has not finished (terminate it first).
        """
        return management.purge(self.store, execution_id)

    def apply_retention(self, limit: int = 500) -> int:
        """Purge top-level executions that finished more than ``retention`` ago. Returns how many."""
        self._last_retention = self.clock.now()
        if self.retention is None:
            return 0
        return management.apply_retention(self.store, self.retention, limit)

    def rerun_from(self, execution_id: str, operation: str, *, new_execution_id: str | None = None,
                   input: Any = ...) -> str:
        """Start a new execution that keeps the source's checkpoints from before ``operation`` and runs
        again from there.

        Args:
            execution_id: the source execution.
            operation: an operation id or name (the first operation with that name).
            new_execution_id: the new execution's id (default: a new UUID).
            input: a new input (default: the source's input).

        Returns:
            The new execution's id.
        """
        return management.rerun_from(self.store, execution_id, operation, new_execution_id=new_execution_id,
                                     input=input)

    def close(self) -> None:
        """Stop ``serve`` loops and close the store if this runner opened it."""
        self._stop.set()
        if self._wakes is not None:
            self._wakes.close()
        if self._slots is not None:
            self._slots.close()
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> DurableRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_deadline(execution_id: str, info: ExecutionInfo | None, timeout: float | None,
                    deadline: float | None) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        status = info.status.value if info is not None else "unknown"
        raise TimeoutError(f"execution {execution_id} is still {status} after {timeout}s")
