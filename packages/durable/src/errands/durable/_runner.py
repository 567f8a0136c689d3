"""``DurableRunner``: durable functions on an errands store (SQLite or PostgreSQL)."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any, Callable, Iterable, List, Mapping, Sequence

from errands.core import (
    DEFAULT_LEASE_FOR,
    AlreadyExistsError,
    Beat,
    Clock,
    ConfigError,
    Lease,
    LeaseLostError,
    Migration,
    NewEvent,
    NotFoundError,
    SQLStore,
    Tx,
    Worker,
    heartbeat,
    is_infrastructure_error,
    open_store,
)
from errands.core.runtime import drain
from errands.core.store import default_owner, dumps, in_clause

from ._context import InvocationOutcome, run_handler
from ._errors import DuplicateFunctionError, ExecutionFencedOut, InvocationAbandoned
from ._state import ExecutionState
from ._values import (
    TERMINAL_OP,
    ErrorObject,
    ExecutionInfo,
    ExecutionStatus,
    Operation,
    OperationAction,
    OperationStatus,
    OperationSubType,
    OperationType,
    OperationUpdate,
    to_seconds,
)

log = logging.getLogger("errands.durable")

QUEUE = "durable.work"
DurableFunction = Callable[[Any, Any], Any]

MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE IF NOT EXISTS durable_executions (
            id TEXT PRIMARY KEY,
            function TEXT NOT NULL,
            status TEXT NOT NULL,
            input TEXT,
            result TEXT,
            error TEXT,
            parent_id TEXT,
            parent_op TEXT,
            run_token {bigint} NOT NULL DEFAULT 0,
            signal_seq {bigint} NOT NULL DEFAULT 0,
            invocations {bigint} NOT NULL DEFAULT 0,
            wake_at {double},
            created_at {double} NOT NULL,
            updated_at {double} NOT NULL,
            ended_at {double}
        );
        CREATE INDEX IF NOT EXISTS durable_executions_status ON durable_executions (status, created_at);
        CREATE INDEX IF NOT EXISTS durable_executions_parent ON durable_executions (parent_id);
        CREATE INDEX IF NOT EXISTS durable_executions_ended ON durable_executions (ended_at);
        CREATE TABLE IF NOT EXISTS durable_operations (
            execution_id TEXT NOT NULL,
            id TEXT NOT NULL,
            seq {bigint} NOT NULL,
            parent_id TEXT,
            name TEXT,
            type TEXT NOT NULL,
            sub_type TEXT,
            status TEXT NOT NULL,
            attempt INTEGER NOT NULL DEFAULT 0,
            result TEXT,
            error TEXT,
            callback_id TEXT,
            start_ts {double},
            end_ts {double},
            next_attempt_ts {double},
            scheduled_ts {double},
            timeout_ts {double},
            heartbeat_timeout {double},
            heartbeat_ts {double},
            child_execution_id TEXT,
            PRIMARY KEY (execution_id, id)
        );
        CREATE UNIQUE INDEX IF NOT EXISTS durable_operations_callback ON durable_operations (callback_id)
        """,
    ),
]

_OP_COLS = ("execution_id, id, seq, parent_id, name, type, sub_type, status, attempt, result, error, callback_id, "
            "start_ts, end_ts, next_attempt_ts, scheduled_ts, timeout_ts, heartbeat_timeout, heartbeat_ts, "
            "child_execution_id")
_TERMINAL_SQL = "(" + ",".join(f"'{s.value}'" for s in TERMINAL_OP) + ")"
_UPSERT_OP = (
    f"INSERT INTO durable_operations ({_OP_COLS}) VALUES ({','.join('?' * 20)}) "
    "ON CONFLICT (execution_id, id) DO UPDATE SET status = excluded.status, attempt = excluded.attempt, "
    "result = excluded.result, error = excluded.error, callback_id = excluded.callback_id, "
    "end_ts = excluded.end_ts, next_attempt_ts = excluded.next_attempt_ts, scheduled_ts = excluded.scheduled_ts, "
    "timeout_ts = excluded.timeout_ts, heartbeat_timeout = excluded.heartbeat_timeout, "
    "heartbeat_ts = excluded.heartbeat_ts, child_execution_id = excluded.child_execution_id "
    f"WHERE durable_operations.status NOT IN {_TERMINAL_SQL}"
)
_EXEC_COLS = ("id, function, status, input, result, error, parent_id, created_at, updated_at, ended_at, "
              "invocations")
_ACTIVE = ("RUNNING", "PENDING")
#: A checkpoint that meets an infrastructure error is tried this many times in all (briefly apart) before
#: the invocation is abandoned.
_WRITE_TRIES = 3

_REGISTRY: dict[str, DurableFunction] = {}


def durable_function(name: str) -> Callable[[DurableFunction], DurableFunction]:
    """Register ``fn(event, ctx)`` under ``name`` for every ``DurableRunner`` in this process.

    Example:
        >>> @durable_function("greet")
        ... def greet(event, ctx):
        ...     return ctx.step("hello", lambda _: f"hello {event['name']}")
    """
    _check_function_name(name)

    def register(fn: DurableFunction) -> DurableFunction:
        if not callable(fn):
            raise ConfigError(f"durable function {name!r} must be callable", field="fn", value=repr(fn))
        _check_free(name, fn, _REGISTRY, " (with @durable_function)")
        _REGISTRY[name] = fn
        return fn

    return register


def _check_function_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"durable function name must be a non-empty string, got {name!r}", field="name",
                          value=name)


def _check_free(name: str, fn: DurableFunction, taken: Mapping[str, DurableFunction], where: str) -> None:
    """Refuse a second function under a taken name; the same function again is fine."""
    existing = taken.get(name)
    if existing is not None and existing is not fn:
        raise DuplicateFunctionError(name, existing, fn, where=where)


def _op_row(execution_id: str, op: Operation) -> tuple[Any, ...]:
    return (execution_id, op.id, op.seq, op.parent_id, op.name, op.type.value,
            op.sub_type.value if op.sub_type else None, op.status.value, op.attempt, op.result,
            json.dumps(op.error.to_dict()) if op.error else None, op.callback_id, op.start_timestamp,
            op.end_timestamp, op.next_attempt_timestamp, op.scheduled_timestamp, op.timeout_timestamp,
            op.heartbeat_timeout, op.heartbeat_timestamp, op.child_execution_id)


def _op_from_row(row: Sequence[Any]) -> Operation:
    (_e, id_, seq, parent, name, type_, sub, status, attempt, result, error, cb, start, end, nxt, sched, tmo,
     hbt, hbts, child) = row
    return Operation(
        id=id_, type=OperationType(type_), status=OperationStatus(status), parent_id=parent, name=name,
        sub_type=OperationSubType(sub) if sub else None, start_timestamp=start, end_timestamp=end,
        attempt=int(attempt), result=result, error=ErrorObject.from_dict(json.loads(error)) if error else None,
        next_attempt_timestamp=nxt, scheduled_timestamp=sched, callback_id=cb, timeout_timestamp=tmo,
        heartbeat_timeout=hbt, heartbeat_timestamp=hbts, child_execution_id=child, seq=int(seq),
    )


def _info(row: Sequence[Any]) -> ExecutionInfo:
    id_, function, status, input_, result, error, parent, created, updated, ended, invocations = row
    return ExecutionInfo(
        execution_id=id_, function=function, status=ExecutionStatus(status),
        input=json.loads(input_) if input_ is not None else None,
        result=json.loads(result) if result is not None else None, result_text=result,
        error=ErrorObject.from_dict(json.loads(error)) if error else None, parent_id=parent,
        created_at=float(created), updated_at=float(updated), ended_at=float(ended) if ended is not None else None,
        invocations=int(invocations),
    )


class _StoreBackend:
    """Checkpoints of one invocation into the runner's store, fenced by the execution's run token and by
    the worker's lease on its queue item, which a heartbeat renews while user code runs."""

    def __init__(self, runner: DurableRunner, execution_id: str, run_token: int, lease: Lease) -> None:
        self.runner = runner
        self.execution_id = execution_id
        self.run_token = run_token
        self.lease = lease
        self._kept_alive = runner.clock.now()
        self.beat: Beat | None = None
        self._renewing = threading.Lock()
        self._ending = False

    def renew(self) -> bool:
        """Heartbeat: push the lease out by ``lease_for``. False once the execution is no longer this
        invocation's (taken over, terminated, suspended) or the lease moved on."""
        with self._renewing:
            if self._ending:  # the invocation gives its lease back itself
                return True
            runner = self.runner
            with runner.store.transaction() as tx:
                row = tx.one("SELECT run_token, status FROM durable_executions WHERE id = ?", (self.execution_id,))
                if row is None or int(row[0]) != self.run_token or row[1] != "RUNNING":
                    return False
                return tx.rowcount(
                    "UPDATE em_queue SET lease_expires = ? WHERE queue = ? AND key = ? AND lease_token = ?",
                    (runner.clock.now() + runner.lease_for, QUEUE, self.execution_id, self.lease.token),
                ) == 1

    def end_heartbeat(self) -> None:
        """Stop renewing before the invocation's last transaction completes or releases the lease, so that a
        renewal in flight cannot lease the item again after it was given back."""
        with self._renewing:
            self._ending = True
        if self.beat is not None:
            self.beat.stop()

    def now(self) -> float:
        return self.runner.clock.now()

    def new_callback_id(self, operation_id: str) -> str:
        return uuid.uuid4().hex

    def check_invoke(self, function_name: str) -> None:
        self.runner._function(function_name)

    def fence(self, tx: Tx, now: float, sets: str = "", params: Sequence[Any] = ()) -> None:
        n = tx.rowcount(
            f"UPDATE durable_executions SET updated_at = ?{sets} WHERE id = ? AND run_token = ? AND status = 'RUNNING'",
            (now, *params, self.execution_id, self.run_token),
        )
        if n != 1:
            raise ExecutionFencedOut(f"execution {self.execution_id} was taken over")

    def write_ops(self, tx: Tx, updates: Sequence[OperationUpdate], ops: Sequence[Operation], now: float) -> None:
        for op in ops:
            row = _op_row(self.execution_id, op)
            if tx.rowcount(_UPSERT_OP, row) == 1:
                continue
            # The stored operation is finished already: written by this invocation's own earlier attempt
            # (its commit was not acknowledged), or settled meanwhile (a callback answered, a child ended).
            stored = tx.one("SELECT status, result, error FROM durable_operations WHERE execution_id = ? AND id = ?",
                            (self.execution_id, op.id))
            if stored is not None and tuple(stored) == (row[7], row[9], row[10]):
                continue
            raise InvocationAbandoned(f"operation {op.name or op.id} was settled while this invocation wrote it",
                                      retry_now=True)
        for u in updates:
            if u.operation_type is OperationType.INVOKE and u.action is OperationAction.START:
                assert u.function_name is not None and u.child_execution_id is not None
                self.runner._insert(tx, u.child_execution_id, u.function_name, u.payload, now,
                                    parent=(self.execution_id, u.operation_id))

    def keepalive(self, tx: Tx, now: float) -> None:
        """Extend the lease along with a checkpoint when the store's clock says it is due (the heartbeat
        renews by the wall clock; this covers clocks that jump, as in tests)."""
        if now - self._kept_alive < self.runner.lease_for / 3:
            return
        n = tx.rowcount("UPDATE em_queue SET lease_expires = ? WHERE queue = ? AND key = ? AND lease_token = ?",
                        (now + self.runner.lease_for, QUEUE, self.execution_id, self.lease.token))
        if n != 1:
            raise ExecutionFencedOut(f"lease on {self.execution_id} lapsed")
        self._kept_alive = now

    def flush(self, updates: Sequence[OperationUpdate], operations: Sequence[Operation]) -> None:
        def write(tx: Tx) -> None:
            now = self.now()
            self.fence(tx, now)
            self.write_ops(tx, updates, operations, now)
            self.keepalive(tx, now)

        self.runner._write(self, write)


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
        self.store.migrate("durable", MIGRATIONS)
        self.clock: Clock = self.store.clock
        if not isinstance(lease_for, (int, float)) or lease_for <= 0:
            raise ConfigError(f"lease_for must be positive seconds, got {lease_for!r}", field="lease_for",
                              value=lease_for)
        self.lease_for = float(lease_for)
        self.retention = to_seconds(retention, field="retention") if retention is not None else None
        self.always_replay = always_replay
        self._functions: dict[str, DurableFunction] = {}
        for name, fn in (functions or {}).items():
            self.register(name, fn)
        self._last_retention = 0.0
        self._stop = threading.Event()
        self._abandons: dict[str, int] = {}

    # -- registration ----------------------------------------------------------------------------
    def register(self, name: str, fn: DurableFunction) -> None:
        """Register ``fn(event, ctx)`` under ``name`` for this runner.

        Raises:
            DuplicateFunctionError: ``name`` is registered to another function already (on this runner or
                with ``@durable_function``). Registering the same function again changes nothing.
        """
        _check_function_name(name)
        if not callable(fn):
            raise ConfigError(f"durable function {name!r} must be callable", field=f"functions.{name}",
                              value=repr(fn))
        _check_free(name, fn, self._functions, " on this runner")
        _check_free(name, fn, _REGISTRY, " (with @durable_function)")
        self._functions[name] = fn

    def durable_function(self, name: str) -> Callable[[DurableFunction], DurableFunction]:
        """Decorator form of ``register``."""

        def deco(fn: DurableFunction) -> DurableFunction:
            self.register(name, fn)
            return fn

        return deco

    def _function(self, name: str) -> DurableFunction:
        fn = self._functions.get(name) or _REGISTRY.get(name)
        if fn is None:
            known = sorted(set(self._functions) | set(_REGISTRY))
            raise ConfigError(
                f"no durable function named {name!r}; registered: {', '.join(known) or 'none'} "
                "(decorate it with @durable_function(name) or pass functions= to DurableRunner)",
                field="function", value=name)
        return fn

    # -- starting --------------------------------------------------------------------------------
    def _insert(self, tx: Tx, execution_id: str, function: str, input_text: str | None, now: float, *,
                parent: tuple[str, str] | None = None, run_token: int = 0, due: float | None = None) -> bool:
        n = tx.rowcount(
            "INSERT INTO durable_executions (id, function, status, input, parent_id, parent_op, run_token, "
            "invocations, created_at, updated_at) VALUES (?, ?, 'RUNNING', ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO NOTHING",
            (execution_id, function, input_text, parent[0] if parent else None, parent[1] if parent else None,
             run_token, 1 if run_token else 0, now, now),
        )
        if n == 0:
            return False
        self.store.enqueue(QUEUE, [(execution_id, None, now if due is None else due)], tx=tx)
        self.store.append_events([NewEvent(f"durable/{execution_id}", "durable.execution.started",
                                           {"execution_id": execution_id, "function": function,
                                            "parent_id": parent[0] if parent else None})], tx=tx)
        return True

    def _prepare_start(self, function: str, input: Any, execution_id: str | None, *, check: bool = True
                       ) -> tuple[str, str]:
        if check:
            self._function(function)
        if execution_id is None:
            execution_id = uuid.uuid4().hex
        elif not isinstance(execution_id, str) or not execution_id.strip() or len(execution_id) > 256:
            raise ConfigError(f"execution_id must be a non-empty string of at most 256 characters, got "
                              f"{execution_id!r}", field="execution_id", value=execution_id)
        return execution_id, dumps(input, field="input")

    def _check_same(self, tx: Tx, execution_id: str, function: str, text: str) -> None:
        row = tx.one("SELECT function, input FROM durable_executions WHERE id = ?", (execution_id,))
        assert row is not None
        if row[0] != function or row[1] != text:
            raise AlreadyExistsError(
                f"execution {execution_id!r} exists with function {row[0]!r} and another input; "
                "use a new execution_id")

    def start(self, function: str, input: Any = None, *, execution_id: str | None = None) -> str:
        """Start ``function`` on ``input`` (JSON); a worker (or ``wait``) runs it.

        Idempotent on ``execution_id``: the same id with the same function and input returns the
        existing execution.

        Raises:
            ConfigError: unknown function or bad id. PayloadError: input is not JSON.
            AlreadyExistsError: the id exists with another function or input.
        """
        execution_id, text = self._prepare_start(function, input, execution_id)
        with self.store.transaction() as tx:
            if not self._insert(tx, execution_id, function, text, self.clock.now()):
                self._check_same(tx, execution_id, function, text)
        return execution_id

    def run(self, function: str, input: Any = None, *, execution_id: str | None = None) -> ExecutionInfo:
        """Start ``function`` and run its first invocation in this thread.

        Returns when the execution finishes or suspends (``PENDING``: a worker resumes it later). The
        invocation holds a lease like a worker's: if the process dies meanwhile, a worker takes the execution
        over within ``lease_for`` seconds. An existing ``execution_id`` is run here only if it is due and no
        worker holds it.
        """
        execution_id, text = self._prepare_start(function, input, execution_id)
        now = self.clock.now()
        with self.store.transaction() as tx:
            created = self._insert(tx, execution_id, function, text, now, run_token=1)
            if not created:
                self._check_same(tx, execution_id, function, text)
            leases = self._claim_keys(tx, [execution_id], now)
        if created and leases:
            backend = _StoreBackend(self, execution_id, 1, leases[0])
            self._guarded(leases[0], lambda: self._invoke(backend, function, text, {}, 0))
        else:
            for lease in leases:
                self._run_lease(lease)
        return self.get(execution_id)

    # -- invocations -----------------------------------------------------------------------------
    def _load_and_invoke(self, execution_id: str, lease: Lease) -> bool:
        """Take the execution (bumping its run token) and run one invocation. False if not runnable."""
        now = self.clock.now()
        with self.store.transaction() as tx:
            if tx.rowcount(
                "UPDATE em_queue SET lease_expires = ? WHERE queue = ? AND key = ? AND lease_token = ?",
                (now + self.lease_for, QUEUE, execution_id, lease.token),
            ) != 1:
                raise LeaseLostError(f"lease on execution {execution_id} (token {lease.token}) is no longer held")
            row = tx.one(
                "UPDATE durable_executions SET run_token = run_token + 1, invocations = invocations + 1, "
                "status = 'RUNNING', updated_at = ? WHERE id = ? AND status IN ('RUNNING', 'PENDING') "
                "RETURNING run_token, function, input, signal_seq",
                (now, execution_id),
            )
            if row is None:
                self.store.complete([lease], tx=tx)
                return False
            ops = {op.id: op for op in (
                _op_from_row(r) for r in tx.query(
                    f"SELECT {_OP_COLS} FROM durable_operations WHERE execution_id = ?", (execution_id,)))}
        backend = _StoreBackend(self, execution_id, int(row[0]), lease)
        self._invoke(backend, row[1], row[2], ops, int(row[3]))
        return True

    def _invoke(self, backend: _StoreBackend, function: str, input_text: str | None,
                ops: dict[str, Operation], signal_seq: int) -> None:
        eid = backend.execution_id
        state = ExecutionState(backend, ops, always_replay=self.always_replay)
        backend.beat = heartbeat(backend.renew, lease_for=self.lease_for, what=f"execution {eid}")
        try:
            try:
                fn = self._function(function)
            except ConfigError as exc:
                outcome = InvocationOutcome("FAILED", error=ErrorObject.from_exception(exc, with_trace=False))
            else:
                event = json.loads(input_text) if input_text is not None else None
                try:
                    outcome = run_handler(fn, event, state)
                except ExecutionFencedOut:
                    log.info("execution %s was taken over; this invocation stops", eid)
                    return
        finally:
            backend.end_heartbeat()
        if outcome.abandoned is not None:
            self._abandon(backend, outcome.abandoned)
            return
        updates, pending = state.take_pending()
        try:
            self._write(backend, lambda tx: self._finish(tx, backend, updates, pending, outcome, signal_seq))
        except (ExecutionFencedOut, LeaseLostError):
            log.info("execution %s was taken over before its invocation ended", eid)
        except InvocationAbandoned as abandoned:
            self._abandon(backend, abandoned)
        else:
            self._abandons.pop(eid, None)

    def _write(self, backend: _StoreBackend, body: Callable[[Tx], None]) -> None:
        """Run ``body`` in one transaction of the invocation; after an infrastructure error try again a couple
        of times, briefly apart, then abandon the invocation.

        Raises:
            ExecutionFencedOut: the lease was lost (the heartbeat said so, or the fence did).
            InvocationAbandoned: the store kept failing, or failed in a way that is not the infrastructure's.
        """
        for attempt in range(1, _WRITE_TRIES + 1):
            if backend.beat is not None and backend.beat.lost:
                raise ExecutionFencedOut(f"the lease on execution {backend.execution_id} was lost")
            try:
                with self.store.transaction() as tx:
                    body(tx)
                return
            except (LeaseLostError, InvocationAbandoned):
                raise
            except Exception as exc:
                if attempt == _WRITE_TRIES or not is_infrastructure_error(exc):
                    raise InvocationAbandoned(f"{type(exc).__name__}: {exc}", exc) from exc
                log.debug("checkpoint of execution %s failed (%s: %s); trying again", backend.execution_id,
                          type(exc).__name__, exc)
                time.sleep(0.02 * 4 ** (attempt - 1))

    def _backoff(self, execution_id: str) -> float:
        """Seconds until an abandoned execution is tried again: short, doubling while it keeps failing here."""
        if len(self._abandons) > 4096:
            self._abandons.clear()
        n = self._abandons.get(execution_id, 0)
        self._abandons[execution_id] = n + 1
        base: float = 0.05 * 2.0 ** min(n, 20)
        return min(base, self.lease_for) * random.uniform(0.5, 1.0)

    def _abandon(self, backend: _StoreBackend, abandoned: InvocationAbandoned) -> None:
        """Give the lease back (after a short backoff, or at once to replay a settled operation), putting
        back any at-most-once start whose commit was not confirmed; never record a failure."""
        eid = backend.execution_id
        cause = abandoned.cause
        delay = 0.0 if abandoned.retry_now else self._backoff(eid)
        if abandoned.retry_now:
            log.info("execution %s replays at once: %s", eid, abandoned.reason)
        elif cause is not None and is_infrastructure_error(cause):
            log.warning("invocation of execution %s abandoned after an infrastructure error (%s); "
                        "retried in %.2fs", eid, abandoned.reason, delay)
        else:
            log.error("invocation of execution %s abandoned after an unexpected store error (%s); retried in "
                      "%.2fs", eid, abandoned.reason, delay, exc_info=cause)
        try:
            with self.store.transaction() as tx:
                now = self.clock.now()
                if abandoned.undo_starts:
                    backend.fence(tx, now)
                    for op_id, attempt in abandoned.undo_starts:
                        tx.execute("UPDATE durable_operations SET status = 'PENDING', next_attempt_ts = ? "
                                   "WHERE execution_id = ? AND id = ? AND status = 'STARTED' AND attempt = ?",
                                   (now, eid, op_id, attempt))
                self.store.release([backend.lease], delay=delay, tx=tx)
        except (ExecutionFencedOut, LeaseLostError):
            log.info("execution %s was taken over while its invocation was abandoned", eid)
        except Exception as exc:
            log.warning("could not give back the lease on execution %s (%s: %s); it lapses within %ss", eid,
                        type(exc).__name__, exc, self.lease_for)

    def _guarded(self, lease: Lease, run: Callable[[], Any]) -> None:
        """Run one claimed execution; whatever goes wrong, the lease is given back and no other execution
        is affected."""
        try:
            run()
        except LeaseLostError:
            log.info("lease on execution %s was lost", lease.key)
        except Exception as exc:
            delay = self._backoff(lease.key)
            if is_infrastructure_error(exc):
                log.warning("execution %s could not be run (%s: %s); retried in %.2fs", lease.key,
                            type(exc).__name__, exc, delay)
            else:
                log.error("execution %s could not be run; retried in %.2fs", lease.key, delay, exc_info=exc)
            try:
                self.store.release([lease], delay=delay)
            except LeaseLostError:
                pass
            except Exception as again:
                log.warning("could not give back the lease on execution %s (%s: %s); it lapses within %ss",
                            lease.key, type(again).__name__, again, self.lease_for)

    def _run_lease(self, lease: Lease) -> None:
        self._guarded(lease, lambda: self._load_and_invoke(lease.key, lease))

    def _claim_keys(self, tx: Tx, keys: Sequence[str], now: float) -> list[Lease]:
        """Lease the given executions' queue items that are due and not held by anyone."""
        if not keys:
            return []
        owner = default_owner()
        expires = now + self.lease_for
        rows = tx.query(
            "UPDATE em_queue SET lease_owner = ?, lease_token = lease_token + 1, lease_expires = ?, "
            f"attempts = attempts + 1 WHERE queue = ? AND key IN {in_clause(len(keys))} AND available_at <= ? "
            "AND (lease_expires IS NULL OR lease_expires <= ?) RETURNING key, lease_token, attempts",
            (owner, expires, QUEUE, *keys, now, now),
        )
        return [Lease(queue=QUEUE, key=k, token=int(t), owner=owner, expires_at=expires, attempts=int(a))
                for k, t, a in rows]

    def _finish(self, tx: Tx, backend: _StoreBackend, updates: Sequence[OperationUpdate],
                ops: Sequence[Operation], outcome: InvocationOutcome, signal_seq: int) -> None:
        now = self.clock.now()
        eid = backend.execution_id
        backend.fence(tx, now)
        backend.write_ops(tx, updates, ops, now)
        if outcome.status == "PENDING":
            row = tx.one("SELECT signal_seq FROM durable_executions WHERE id = ?", (eid,))
            until = outcome.until
            if row is not None and int(row[0]) != signal_seq:
                until = now
            tx.execute("UPDATE durable_executions SET status = 'PENDING', wake_at = ? WHERE id = ?", (until, eid))
            if until is None:
                self.store.complete([backend.lease], tx=tx)
            else:
                self.store.release([backend.lease], delay=max(until - now, 0.0), tx=tx)
            return
        self.store.complete([backend.lease], tx=tx)
        status = ExecutionStatus.SUCCEEDED if outcome.status == "SUCCEEDED" else ExecutionStatus.FAILED
        self._end(tx, eid, status, outcome.result, outcome.error, now)

    def _end(self, tx: Tx, execution_id: str, status: ExecutionStatus, result: str | None,
             error: ErrorObject | None, now: float) -> None:
        """Record a terminal status, publish the event and hand the outcome to a waiting parent."""
        row = tx.one(
            "UPDATE durable_executions SET status = ?, result = ?, error = ?, ended_at = ?, updated_at = ?, "
            "wake_at = NULL, run_token = run_token + 1 WHERE id = ? RETURNING parent_id, parent_op, function",
            (status.value, result, json.dumps(error.to_dict()) if error else None, now, now, execution_id),
        )
        assert row is not None
        parent_id, parent_op, function = row
        data: dict[str, Any] = {"execution_id": execution_id, "function": function, "status": status.value}
        if error is not None:
            data["error"] = error.to_dict()
        self.store.append_events([NewEvent(f"durable/{execution_id}", f"durable.execution.{status.value.lower()}",
                                           data)], tx=tx)
        if parent_id is None:
            return
        op_status = OperationStatus.SUCCEEDED if status is ExecutionStatus.SUCCEEDED else OperationStatus.FAILED
        if status is ExecutionStatus.TERMINATED:
            error = error or ErrorObject(type="ExecutionTerminated", message="the invoked execution was terminated")
        tx.execute(
            "UPDATE durable_operations SET status = ?, result = ?, error = ?, end_ts = ? "
            "WHERE execution_id = ? AND id = ? AND status = 'STARTED'",
            (op_status.value, result if op_status is OperationStatus.SUCCEEDED else None,
             json.dumps(error.to_dict()) if error and op_status is OperationStatus.FAILED else None, now,
             parent_id, parent_op),
        )
        self._signal(tx, parent_id, now)

    def _signal(self, tx: Tx, execution_id: str, now: float) -> None:
        """Something the execution waits for arrived: make it due now (unless suspended or finished)."""
        row = tx.one("UPDATE durable_executions SET signal_seq = signal_seq + 1 WHERE id = ? RETURNING status",
                     (execution_id,))
        if row is None or row[0] not in _ACTIVE:
            return
        tx.execute("UPDATE em_queue SET available_at = ? WHERE queue = ? AND key = ? AND lease_expires IS NULL "
                   "AND available_at > ?", (now, QUEUE, execution_id, now))
        self.store.enqueue(QUEUE, [(execution_id, None, now)], tx=tx)

    # -- workers ---------------------------------------------------------------------------------
    def work_once(self, limit: int = 16) -> int:
        """Claim up to ``limit`` due executions and run one invocation of each. Returns how many were claimed.

        An execution whose invocation meets a store fault is given back and retried shortly; it never stops
        the others. A fault while claiming claims nothing this round.
        """
        try:
            leases = self.store.claim(QUEUE, limit, lease_for=self.lease_for)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.warning("claiming durable executions failed (%s: %s); trying again next round",
                        type(exc).__name__, exc)
            return 0
        for lease in leases:
            self._run_lease(lease)
        if self.retention is not None and self.clock.now() - self._last_retention > 60:
            try:
                self.apply_retention()
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise
                log.warning("retention failed (%s: %s); trying again later", type(exc).__name__, exc)
        return len(leases)

    def _work_keys(self, keys: Sequence[str]) -> int:
        """Run one invocation of each of ``keys`` that is due and not held by a worker."""
        if not keys:
            return 0
        try:
            with self.store.transaction() as tx:
                leases = self._claim_keys(tx, keys, self.clock.now())
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.info("claiming executions %s failed (%s: %s)", ", ".join(keys), type(exc).__name__, exc)
            return 0
        for lease in leases:
            self._run_lease(lease)
        return len(leases)

    def _family(self, execution_id: str) -> list[str]:
        """The execution and every active execution it invoked (their ids extend its own)."""
        prefix = execution_id + "/"
        with self.store.read() as tx:
            rows = tx.query("SELECT id FROM durable_executions WHERE (id = ? OR substr(id, 1, ?) = ?) "
                            f"AND status IN {in_clause(len(_ACTIVE))}", (execution_id, len(prefix), prefix, *_ACTIVE))
        return [r[0] for r in rows]

    def next_due(self) -> float | None:
        """When the next execution becomes due (epoch seconds), or None."""
        due: float | None = self.store.next_due(QUEUE)
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

    def drain(self, max_rounds: int = 10_000) -> int:
        """Run every due execution until none is due now. Returns how many invocations ran."""
        return drain(self.work_once, max_rounds)

    # -- reading ---------------------------------------------------------------------------------
    def get(self, execution_id: str) -> ExecutionInfo:
        """The execution's status, result or error.

        Raises:
            NotFoundError: no such execution.
        """
        with self.store.read() as tx:
            row = tx.one(f"SELECT {_EXEC_COLS} FROM durable_executions WHERE id = ?", (execution_id,))
        if row is None:
            raise NotFoundError(f"no durable execution {execution_id!r}")
        return _info(row)

    def wait(self, execution_id: str, timeout: float | None = None, *, poll_interval: float = 0.02) -> ExecutionInfo:
        """Block until the execution finishes. Meanwhile this thread runs the execution's own due invocations
        (and those of the executions it invoked) that no worker holds; never other executions' work.

        Raises:
            TimeoutError: still not finished after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        info: ExecutionInfo | None = None
        while True:
            try:
                info = self.get(execution_id)
                if info.status.terminal:
                    return info
                family = self._family(execution_id)
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise
                log.info("waiting for execution %s: the store failed (%s: %s); asking again", execution_id,
                         type(exc).__name__, exc)
                family = []
            if deadline is not None and time.monotonic() >= deadline:
                status = info.status.value if info is not None else "unknown"
                raise TimeoutError(f"execution {execution_id} is still {status} after {timeout}s")
            if self._work_keys(family) == 0:
                time.sleep(poll_interval)

    def list(self, status: ExecutionStatus | str | Iterable[ExecutionStatus | str] | None = None, *,
             function: str | None = None, parent_id: str | None = None, limit: int = 100,
             offset: int = 0) -> List[ExecutionInfo]:
        """Executions, newest first, filtered by status(es), function and parent."""
        where, params = [], []  # type: ignore[var-annotated]
        if status is not None:
            wanted = [status] if isinstance(status, (str, ExecutionStatus)) else list(status)
            values = []
            for s in wanted:
                try:
                    values.append(ExecutionStatus(str(s).upper()).value)
                except ValueError:
                    raise ConfigError(f"unknown execution status {s!r}; one of "
                                      f"{', '.join(x.value for x in ExecutionStatus)}", field="status",
                                      value=s) from None
            where.append(f"status IN {in_clause(len(values))}")
            params.extend(values)
        if function is not None:
            where.append("function = ?")
            params.append(function)
        if parent_id is not None:
            where.append("parent_id = ?")
            params.append(parent_id)
        sql = f"SELECT {_EXEC_COLS} FROM durable_executions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
        with self.store.read() as tx:
            rows = tx.query(sql, (*params, int(limit), int(offset)))
        return [_info(r) for r in rows]

    def history(self, execution_id: str) -> List[Operation]:
        """The execution's checkpointed operations in the order they started."""
        self.get(execution_id)
        with self.store.read() as tx:
            rows = tx.query(f"SELECT {_OP_COLS} FROM durable_operations WHERE execution_id = ? ORDER BY seq",
                            (execution_id,))
        return [_op_from_row(r) for r in rows]

    # -- callbacks -------------------------------------------------------------------------------
    def _callback_row(self, tx: Tx, callback_id: str) -> tuple[Any, ...]:
        if not isinstance(callback_id, str) or not callback_id:
            raise ConfigError(f"callback_id must be a non-empty string, got {callback_id!r}", field="callback_id",
                              value=callback_id)
        row = tx.one("SELECT o.execution_id, o.id, o.status, e.status FROM durable_operations o "
                     "JOIN durable_executions e ON e.id = o.execution_id WHERE o.callback_id = ?", (callback_id,))
        if row is None:
            raise NotFoundError(f"no callback {callback_id!r}")
        return row

    def complete_callback(self, callback_id: str, result: Any = None) -> bool:
        """Hand ``result`` (JSON) to the execution waiting on ``callback_id`` and wake it.

        Returns:
            False if the callback had already completed, failed or timed out, or its execution has finished
            (nothing changes).

        Raises:
            NotFoundError: no such callback. PayloadError: ``result`` is not JSON.
        """
        text = dumps(result, field="result")
        return self._settle(callback_id, OperationStatus.SUCCEEDED, text, None)

    def fail_callback(self, callback_id: str, error: ErrorObject | BaseException | Mapping[str, Any] | str) -> bool:
        """Fail the callback: the waiting ``result()`` raises ``CallbackError`` with this error.

        Args:
            error: an ``ErrorObject``, an exception, a dict with AWS keys, or a message.
        """
        if isinstance(error, ErrorObject):
            obj = error
        elif isinstance(error, BaseException):
            obj = ErrorObject.from_exception(error, with_trace=False)
        elif isinstance(error, Mapping):
            obj = ErrorObject.from_dict(error)
        elif isinstance(error, str):
            obj = ErrorObject(type="CallbackError", message=error)
        else:
            raise ConfigError(f"error must be an ErrorObject, exception, dict or str, got {type(error).__name__}",
                              field="error", value=type(error).__name__)
        return self._settle(callback_id, OperationStatus.FAILED, None, obj)

    def _settle(self, callback_id: str, status: OperationStatus, result: str | None,
                error: ErrorObject | None) -> bool:
        with self.store.transaction() as tx:
            execution_id, op_id, current, execution_status = self._callback_row(tx, callback_id)
            if current != OperationStatus.STARTED.value or ExecutionStatus(execution_status).terminal:
                return False
            now = self.clock.now()
            tx.execute("UPDATE durable_operations SET status = ?, result = ?, error = ?, end_ts = ? "
                       "WHERE execution_id = ? AND id = ?",
                       (status.value, result, json.dumps(error.to_dict()) if error else None, now, execution_id,
                        op_id))
            self._signal(tx, execution_id, now)
        return True

    def heartbeat_callback(self, callback_id: str) -> None:
        """Record that the party completing ``callback_id`` is still working (resets its heartbeat timeout)."""
        with self.store.transaction() as tx:
            execution_id, op_id, current, execution_status = self._callback_row(tx, callback_id)
            if current == OperationStatus.STARTED.value and not ExecutionStatus(execution_status).terminal:
                tx.execute("UPDATE durable_operations SET heartbeat_ts = ? WHERE execution_id = ? AND id = ?",
                           (self.clock.now(), execution_id, op_id))

    # -- management ------------------------------------------------------------------------------
    def terminate(self, execution_id: str, reason: str | None = None, *, recursive: bool = True) -> ExecutionInfo:
        """Stop the execution now (``TERMINATED``); an invocation in flight is fenced out at its next
        checkpoint. With ``recursive``, executions it invoked are terminated too."""
        info = self.get(execution_id)
        if info.status.terminal:
            return info
        error = ErrorObject(type="ExecutionTerminated", message=reason or "terminated by an operator")
        with self.store.transaction() as tx:
            self._terminate(tx, execution_id, error, recursive)
        return self.get(execution_id)

    def _terminate(self, tx: Tx, execution_id: str, error: ErrorObject, recursive: bool) -> None:
        row = tx.one("SELECT status FROM durable_executions WHERE id = ?", (execution_id,))
        if row is None or ExecutionStatus(row[0]).terminal:
            return
        self.store.dequeue(QUEUE, execution_id, tx=tx)
        self._end(tx, execution_id, ExecutionStatus.TERMINATED, None, error, self.clock.now())
        if recursive:
            for (child,) in tx.query("SELECT id FROM durable_executions WHERE parent_id = ?", (execution_id,)):
                self._terminate(tx, child, error, recursive)

    def suspend(self, execution_id: str) -> ExecutionInfo:
        """Pause the execution: nothing runs until ``resume``. Callbacks still record their results."""
        with self.store.transaction() as tx:
            n = tx.rowcount("UPDATE durable_executions SET status = 'SUSPENDED', run_token = run_token + 1, "
                            "updated_at = ? WHERE id = ? AND status IN ('RUNNING', 'PENDING')",
                            (self.clock.now(), execution_id))
            if n:
                self.store.dequeue(QUEUE, execution_id, tx=tx)
        if not n:
            self._not_in(execution_id, "RUNNING or PENDING", "suspend")
        return self.get(execution_id)

    def resume(self, execution_id: str) -> ExecutionInfo:
        """Continue a suspended execution (it replays and carries on from its checkpoints)."""
        with self.store.transaction() as tx:
            now = self.clock.now()
            n = tx.rowcount("UPDATE durable_executions SET status = 'RUNNING', updated_at = ? "
                            "WHERE id = ? AND status = 'SUSPENDED'", (now, execution_id))
            if n:
                self.store.enqueue(QUEUE, [(execution_id, None, now)], tx=tx)
        if not n:
            self._not_in(execution_id, "SUSPENDED", "resume")
        return self.get(execution_id)

    def _not_in(self, execution_id: str, wanted: str, verb: str) -> None:
        info = self.get(execution_id)
        raise ConfigError(f"cannot {verb} execution {execution_id!r}: it is {info.status.value}, not {wanted}",
                          field="execution_id", value=execution_id)

    def purge(self, execution_id: str) -> int:
        """Delete a finished execution, its operations and every execution it invoked (recursively).

        Returns:
            How many executions were deleted.

        Raises:
            ConfigError: the execution has not finished (terminate it first).
        """
        info = self.get(execution_id)
        if not info.status.terminal:
            raise ConfigError(f"execution {execution_id!r} is {info.status.value}; terminate it before purging",
                              field="execution_id", value=execution_id)
        with self.store.transaction() as tx:
            return self._purge(tx, execution_id)

    def _purge(self, tx: Tx, execution_id: str) -> int:
        n = 0
        for (child,) in tx.query("SELECT id FROM durable_executions WHERE parent_id = ?", (execution_id,)):
            n += self._purge(tx, child)
        tx.execute("DELETE FROM durable_operations WHERE execution_id = ?", (execution_id,))
        self.store.dequeue(QUEUE, execution_id, tx=tx)
        n += tx.rowcount("DELETE FROM durable_executions WHERE id = ?", (execution_id,))
        return n

    def apply_retention(self, limit: int = 500) -> int:
        """Purge top-level executions that finished more than ``retention`` ago. Returns how many."""
        self._last_retention = self.clock.now()
        if self.retention is None:
            return 0
        cutoff = self.clock.now() - self.retention
        with self.store.read() as tx:
            ids = [r[0] for r in tx.query(
                "SELECT id FROM durable_executions WHERE parent_id IS NULL AND ended_at IS NOT NULL AND ended_at < ? "
                "ORDER BY ended_at LIMIT ?", (cutoff, limit))]
        n = 0
        for eid in ids:
            with self.store.transaction() as tx:
                n += self._purge(tx, eid)
        return n

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
        info = self.get(execution_id)
        ops = self.history(execution_id)
        target = next((o for o in ops if o.id == operation), None) or next(
            (o for o in ops if o.name == operation), None)
        if target is None:
            raise NotFoundError(f"execution {execution_id!r} has no operation with id or name {operation!r}")
        by_id = {o.id: o for o in ops}
        ancestors: set[str] = set()
        parent = target.parent_id
        while parent is not None and parent in by_id:
            ancestors.add(parent)
            parent = by_id[parent].parent_id
        keep = [o for o in ops if o.seq < target.seq and o.done and o.id not in ancestors]
        text = dumps(info.input if input is ... else input, field="input")
        new_id, _ = self._prepare_start(info.function, None, new_execution_id, check=False)
        now = self.clock.now()
        with self.store.transaction() as tx:
            if not self._insert(tx, new_id, info.function, text, now):
                raise AlreadyExistsError(f"execution {new_id!r} exists already; pick another new_execution_id")
            for o in keep:
                copy = replace(o, callback_id=uuid.uuid4().hex) if o.callback_id else o
                tx.execute(f"INSERT INTO durable_operations ({_OP_COLS}) VALUES ({','.join('?' * 20)})",
                           _op_row(new_id, copy))
        return new_id

    def close(self) -> None:
        """Stop ``serve`` loops and close the store if this runner opened it."""
        self._stop.set()
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> DurableRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

