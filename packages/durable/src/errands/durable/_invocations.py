"""Running invocations: claim an execution's queue item, take the execution (a new run token), replay the
function over its checkpoints while a heartbeat renews the lease, then settle the outcome, or abandon the
invocation when the store fails under it (the execution is replayed shortly, never failed for it).

Whatever goes wrong with one execution, its lease is given back and the others of the batch still run.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence, TypeVar

from errands.core import ConfigError, Lease, LeaseLostError, telemetry
from errands.core.runtime import error_text, heartbeat, is_infrastructure_error
from errands.core.store import SQLStore, Tx, loads

from . import _executions as executions
from . import _schema as schema
from ._checkpoints import StoreCheckpoints
from ._context import InvocationOutcome, run_handler
from ._continuation import continue_run
from ._errors import ExecutionFencedOut, InvocationAbandoned
from ._registry import Registry
from ._state import ExecutionState
from ._transitions import abandon_delay, settle
from ._values import ErrorObject, ExecutionInfo, ExecutionStatus, Operation, OperationUpdate
from ._wire import advance_all

log = logging.getLogger("errands.durable")
INVOCATION = "errands.durable.invocation"

_R = TypeVar("_R")

#: Executions whose abandons are counted (for their backoff) before the count starts afresh.
_MAX_COUNTED = 4096


class Invocations:
    """Invocations of the executions of one runner.

    Args:
        store: the runner's store.
        registry: the functions the executions name.
        lease_for: how long a claim on an execution lasts (renewed while the invocation runs).
        always_replay: end every invocation after each newly completed operation.
    """

    def __init__(self, store: SQLStore, registry: Registry, *, lease_for: float, always_replay: bool,
                 outbox: Any = None) -> None:
        self.store = store
        self.clock = store.clock
        self.registry = registry
        self.lease_for = lease_for
        self.always_replay = always_replay
        self.outbox = outbox
        self._abandons: dict[str, int] = {}

    # -- claiming -------------------------------------------------------------------------------
    def claim_keys(self, keys: Sequence[str], *, tx: Tx | None = None) -> list[Lease]:
        """Lease the given executions' queue items that are due and held by no one."""
        return self.store.claim_keys(schema.QUEUE, keys, lease_for=self.lease_for, tx=tx)

    def run_due(self, limit: int) -> int:
        """Claim up to ``limit`` due executions and run one invocation of each. How many were claimed."""
        return self._run_claimed(lambda: self.store.claim(schema.QUEUE, limit, lease_for=self.lease_for),
                                 "durable executions", logging.WARNING)

    def claim_due(self, limit: int) -> list[Lease]:
        """Claim up to ``limit`` due executions (none when the store fails), to be run by the caller."""
        return self._claimed(lambda: self.store.claim(schema.QUEUE, limit, lease_for=self.lease_for),
                             "durable executions", logging.WARNING)

    def run_keys(self, keys: Sequence[str]) -> int:
        """Run one invocation of each of ``keys`` that is due and not held by a worker."""
        if not keys:
            return 0
        return self._run_claimed(lambda: self.claim_keys(keys), f"executions {', '.join(keys)}", logging.INFO)

    def _run_claimed(self, claim: Callable[[], list[Lease]], what: str, level: int) -> int:
        """Run what ``claim()`` leased, one after another."""
        leases = self._claimed(claim, what, level)
        for lease in leases:
            self.run(lease)
        return len(leases)

    def _claimed(self, claim: Callable[[], list[Lease]], what: str, level: int) -> list[Lease]:
        """A store fault while claiming claims nothing this time (logged at ``level``); any other error
        is a bug and propagates."""
        try:
            return claim()
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.log(level, "claiming %s failed (%s); trying again next round", what, error_text(exc))
            return []

    # -- running --------------------------------------------------------------------------------
    def run(self, lease: Lease) -> None:
        """Take the leased execution and run one invocation of it."""
        self._guarded(lease, lambda: self.load_and_invoke(lease))

    def run_first(self, lease: Lease, function: str, input_text: str) -> ExecutionInfo | None:
        """Run the first invocation of an execution created under ``lease`` with run token 1: there is
        nothing to load. The execution as the invocation ended it, or None if it did not end it (it suspended,
        was taken over or abandoned): then only a read says how the execution is."""
        backend = self._checkpoints(lease, 1)
        row = self._guarded(lease, lambda: self._invoke(backend, function, input_text, {}, 0))
        return schema.execution_info(row) if row is not None else None

    def load_and_invoke(self, lease: Lease) -> bool:
        """Take the execution (bumping its run token) and run one invocation. False if not runnable.

        Raises:
            LeaseLostError: the lease is no longer held.
        """
        eid = lease.key

        def take(tx: Tx) -> tuple[tuple[int, str, str | None, int], dict[str, Operation]] | None:
            self.store.extend([lease], lease_for=self.lease_for, tx=tx)
            taken = schema.take_execution(tx, eid, self.clock.now())
            if taken is None:
                self.store.complete([lease], tx=tx)
                return None
            ops = {op.id: op for op in schema.operations(tx, eid)}
            # the service's own moves: due waits succeed, due retries are READY, late callbacks time out
            for op in advance_all(ops, self.clock.now()).values():
                if schema.write_operation(tx, eid, op):
                    ops[op.id] = op
            return taken, ops

        # Invocations starting at once on this runner's threads share the commit.
        got = self.store.group_commit(take)
        if got is None:
            return False
        (run_token, function, input_text, signal_seq), ops = got
        self._invoke(self._checkpoints(lease, run_token), function, input_text, ops, signal_seq)
        return True

    def _checkpoints(self, lease: Lease, run_token: int) -> StoreCheckpoints:
        return StoreCheckpoints(self.store, lease, run_token, lease_for=self.lease_for, registry=self.registry,
                                outbox=self.outbox)

    def _invoke(self, backend: StoreCheckpoints, function: str, input_text: str | None,
                ops: dict[str, Operation], signal_seq: int) -> tuple[Any, ...] | None:
        """Run one invocation and settle its outcome. The execution's row if the invocation's last transaction
        ended it (committed), else None."""
        eid = backend.execution_id
        state = ExecutionState(backend, ops, always_replay=self.always_replay)
        backend.beat = heartbeat(backend.renew, lease_for=self.lease_for, what=f"execution {eid}")
        try:
            try:
                fn = self.registry.get(function)
            except ConfigError as exc:
                outcome = InvocationOutcome("FAILED", error=ErrorObject.from_exception(exc, with_trace=False))
            else:
                event = loads(input_text)
                try:
                    outcome = run_handler(fn, event, state)
                except ExecutionFencedOut:
                    log.info("execution %s was taken over; this invocation stops", eid)
                    return None
        finally:
            backend.end_heartbeat()
        if outcome.abandoned is not None:
            self._abandon(backend, outcome.abandoned)
            return None
        updates, pending = state.take_pending()
        ended: list[tuple[Any, ...] | None] = [None]

        def finish(tx: Tx) -> None:
            # each attempt's own: only the one that committed is returned
            ended[0] = self._finish(tx, backend, updates, pending, outcome, signal_seq)

        try:
            backend.write(finish)
        except (ExecutionFencedOut, LeaseLostError):
            log.info("execution %s was taken over before its invocation ended", eid)
        except InvocationAbandoned as abandoned:
            self._abandon(backend, abandoned)
        else:
            self._abandons.pop(eid, None)
            return ended[0]
        return None

    def _finish(self, tx: Tx, backend: StoreCheckpoints, updates: Sequence[OperationUpdate],
                ops: Sequence[Operation], outcome: InvocationOutcome, signal_seq: int) -> tuple[Any, ...] | None:
        """The invocation's last transaction: its pending checkpoints and what its outcome settles. The
        execution's row when the outcome ended it."""
        now = self.clock.now()
        eid = backend.execution_id
        # Only a PENDING outcome's settlement depends on what the store holds (a signal that came meanwhile).
        settled = None if outcome.status == "PENDING" else settle(outcome, now=now, signalled=False)
        # An end with nothing more to write is the invocation's fence itself; otherwise the first write is.
        end_fences = settled is not None and settled.status.terminal and not ops and not updates
        if not end_fences:
            backend.write_ops(tx, updates, ops, now)  # fenced
        if settled is None:
            seen = schema.signal_seq(tx, eid)
            settled = settle(outcome, now=now, signalled=seen is not None and seen != signal_seq)
        ended = None
        if settled.status.terminal:
            ended = executions.end(self.store, tx, eid, settled.status, outcome.result, outcome.error, now,
                                   run_token=backend.run_token if end_fences else None)
            if ended is None:
                backend.fenced_out()
        elif settled.status is ExecutionStatus.PENDING:
            schema.set_pending(tx, eid, settled.wake_at)
        if settled.release_in is None:
            self.store.complete([backend.lease], tx=tx)
        else:
            self.store.release([backend.lease], delay=settled.release_in, tx=tx)
        if outcome.status == "CONTINUED":
            continue_run(self.store, tx, eid, outcome.result, now)
        return ended

    # -- giving up ------------------------------------------------------------------------------
    def _backoff(self, execution_id: str) -> float:
        """The delay after another abandon of ``execution_id`` here (counted until it succeeds)."""
        if len(self._abandons) > _MAX_COUNTED:
            self._abandons.clear()
        failures = self._abandons.get(execution_id, 0)
        self._abandons[execution_id] = failures + 1
        return abandon_delay(failures, lease_for=self.lease_for)

    def _abandon(self, backend: StoreCheckpoints, abandoned: InvocationAbandoned) -> None:
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

        def undo_starts(tx: Tx) -> None:
            if not abandoned.undo_starts:
                return
            now = self.clock.now()
            backend.fence(tx, now)
            for op_id, attempt in abandoned.undo_starts:
                schema.unstart(tx, eid, op_id, attempt, now)

        self._give_back(backend.lease, delay, undo_starts)

    def _guarded(self, lease: Lease, run: Callable[[], _R]) -> _R | None:
        """Run one claimed execution; whatever goes wrong, the lease is given back and no other execution
        is affected. What ``run`` returned, None if it raised."""
        try:
            with telemetry.span(INVOCATION, telemetry.stored(lease.payload), execution_id=lease.key,
                                lease_owner=lease.owner):
                return run()
        except LeaseLostError:
            telemetry.count("errands.lease.lost", engine="durable")
            log.info("lease on execution %s was lost", lease.key)
        except Exception as exc:
            delay = self._backoff(lease.key)
            if is_infrastructure_error(exc):
                log.warning("execution %s could not be run (%s); retried in %.2fs", lease.key, error_text(exc), delay)
            else:
                log.error("execution %s could not be run; retried in %.2fs", lease.key, delay, exc_info=exc)
            self._give_back(lease, delay)
        return None

    def _give_back(self, lease: Lease, delay: float, before: Callable[[Tx], None] | None = None) -> None:
        """Release the lease, due again after ``delay``, with ``before``'s writes in the same transaction.
        If the store fails, the lease lapses by itself."""
        try:
            with self.store.transaction() as tx:
                if before is not None:
                    before(tx)
                self.store.release([lease], delay=delay, tx=tx)
        except (ExecutionFencedOut, LeaseLostError):
            log.info("execution %s was taken over while its lease was given back", lease.key)
        except Exception as exc:
            log.warning("could not give back the lease on execution %s (%s); it lapses within %ss", lease.key,
                        error_text(exc), self.lease_for)
