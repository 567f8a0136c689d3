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

from errands.core import DEFAULT_LEASE_FOR, Clock, ConfigError, Worker, open_store
from errands.core.runtime import drain, error_text, is_infrastructure_error, notify_work
from errands.core.store import SQLStore, dumps

from . import _callbacks as callbacks
from . import _executions as executions
from . import _management as management
from . import _schema as schema
from . import _signals as signals
from ._invocations import Invocations
from ._registry import DurableFunction, Registry
from ._values import ErrorObject, ExecutionInfo, ExecutionStatus, Operation, to_seconds

log = logging.getLogger("errands.durable")

#: How often ``work_once`` applies the retention (seconds of the store's clock).
RETENTION_EVERY = 60.0


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
                 always_replay: bool = False) -> None:
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
        self._stop = threading.Event()

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

    def start(self, function: str, input: Any = None, *, execution_id: str | None = None, conn: Any = None) -> str:
        """Start ``function`` on ``input`` (JSON); a worker (or ``wait``) runs it.

        Idempotent on ``execution_id``: the same id with the same function and input returns the
        existing execution.

        Args:
            conn: the caller's own connection to the store's database: the execution's rows are written in
                the caller's transaction, committed (or rolled back) with the caller's other writes.

        Raises:
            ConfigError: unknown function or bad id. PayloadError: input is not JSON.
            AlreadyExistsError: the id exists with another function or input.
        """
        execution_id, text = self._prepare_start(function, input, execution_id)
        with self.store.transaction(conn) as tx:
            executions.start(self.store, tx, execution_id, function, text, self.clock.now())
            tx.notify("durable")  # a worker of another process (PostgreSQL), at commit
        notify_work(self.store, "durable")  # a worker of this process
        return execution_id

    async def start_async(self, function: str, input: Any = None, *, execution_id: str | None = None,
                          conn: Any = None) -> str:
        """``start`` for coroutines, without blocking the event loop (``conn`` as there)."""
        started: str = await self.store.run_async(self.start, function, input, execution_id=execution_id, conn=conn)
        return started

    def run(self, function: str, input: Any = None, *, execution_id: str | None = None) -> ExecutionInfo:
        """Start ``function`` and run its first invocation in this thread.

        Returns when the execution finishes or suspends (``PENDING``: a worker resumes it later). The
        invocation holds a lease like a worker's: if the process dies meanwhile, a worker takes the execution
        over within ``lease_for`` seconds. An existing ``execution_id`` is run here only if it is due and no
        worker holds it.
        """
        execution_id, text = self._prepare_start(function, input, execution_id)
        with self.store.transaction() as tx:
            created = executions.start(self.store, tx, execution_id, function, text, self.clock.now(), run_token=1)
            leases = self._invocations.claim_keys([execution_id], tx=tx)
        if created and leases:
            self._invocations.run_first(leases[0], function, text)
        else:
            for lease in leases:
                self._invocations.run(lease)
        return self.get(execution_id)

    # -- workers ---------------------------------------------------------------------------------
    def work_once(self, limit: int = 16) -> int:
        """Claim up to ``limit`` due executions and run one invocation of each. Returns how many were claimed.

        An execution whose invocation meets a store fault is given back and retried shortly; it never stops
        the others. A fault while claiming claims nothing this round.
        """
        claimed = self._invocations.run_due(limit)
        if self.retention is not None and self.clock.now() - self._last_retention > RETENTION_EVERY:
            try:
                self.apply_retention()
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise
                log.warning("retention failed (%s); trying again later", error_text(exc))
        return claimed

    def next_due(self) -> float | None:
        """When the next execution becomes due (epoch seconds), or None."""
        due: float | None = self.store.next_due(schema.QUEUE)
        return due

    def serve(self, stop: threading.Event | None = None, *, poll_interval: float = 0.1) -> None:
        """Run executions until ``stop`` is set (or ``close()``)."""
        stop = stop or self._stop
        while not stop.is_set() and not self._stop.is_set():
            if self.work_once() == 0:
                stop.wait(poll_interval)

    def worker(self, **options: Any) -> Worker:
        """A core ``Worker`` running this runner's ``work_once`` (with signal handling and draining)."""
        return Worker(self.store, jobs=[self.work_once], **options)

    def attach(self, worker: Worker) -> None:
        """Run this runner's executions in ``worker`` (``errands.App.attach(runner)`` calls this)."""
        worker.add_job("durable.work_once", self.work_once)

    def drain(self, max_rounds: int = 10_000) -> int:
        """Run every due execution until none is due now. Returns how many invocations ran."""
        return drain(self.work_once, max_rounds)

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
        (and those of the executions it invoked) that no worker holds; never other executions' work.

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
            if self._invocations.run_keys(family) == 0:
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
            if await self.store.run_async(self._invocations.run_keys, family) == 0:
                await asyncio.sleep(poll_interval)

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
