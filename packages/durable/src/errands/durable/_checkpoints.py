"""The checkpoint writer of one invocation on the runner's store: the ``CheckpointBackend`` that
``ExecutionState`` flushes through, fenced twice over.

Every write first checks the execution's run token (``ExecutionFencedOut`` once another invocation, a
termination or a suspension took the execution; a checkpoint's first operation is written by the same
statement), and the worker's lease on the execution's queue item is renewed by a heartbeat while user code runs
and along with the checkpoints themselves. The heartbeat also moves the execution's ``updated_at``, which the
checkpoints leave alone.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace
from typing import Any, Callable, NoReturn, Sequence

from errands.core import Lease, LeaseLostError
from errands.core.runtime import Beat, error_text, retry_infrastructure
from errands.core.store import SQLStore, Tx

from . import _effects as effects
from . import _executions as executions
from . import _schema as schema
from . import _signals as signals
from ._errors import ExecutionFencedOut, InvocationAbandoned
from ._registry import Registry
from ._values import Operation, OperationAction, OperationStatus, OperationSubType, OperationType, OperationUpdate

#: Waits before the second and third try of a checkpoint that met an infrastructure error; then the
#: invocation is abandoned. Giving up is cheap (the execution replays from its checkpoints soon, maybe on
#: another worker), so a worker never sits on one execution for long.
WRITE_RETRY_DELAYS = (0.02, 0.08)


class StoreCheckpoints:
    """Checkpoints of one invocation into the store, under ``lease`` (the worker's claim on the execution's
    queue item) and ``run_token`` (the execution's, as this invocation took it)."""

    #: ``ctx.start_child`` creates executions through this backend (the Lambda API's cannot).
    starts_children = True

    def __init__(self, store: SQLStore, lease: Lease, run_token: int, *, lease_for: float,
                 registry: Registry, outbox: Any = None) -> None:
        self.store = store
        self.clock = store.clock
        self.execution_id = lease.key
        self.lease = lease
        self.run_token = run_token
        self.lease_for = lease_for
        self.registry = registry
        #: The ``Outbox`` that ``ctx.effect`` submits through (None: ctx.effect is refused).
        self.outbox = outbox
        self.beat: Beat | None = None
        self._kept_alive = self.clock.now()
        self._renewing = threading.Lock()
        self._ending = False

    # -- the lease ------------------------------------------------------------------------------
    def renew(self) -> bool:
        """Heartbeat: push the lease out by ``lease_for``. False once the execution is no longer this
        invocation's (taken over, terminated, suspended) or the lease moved on."""
        with self._renewing:
            if self._ending:  # the invocation gives its lease back itself
                return True
            with self.store.transaction() as tx:
                if not schema.touch_running(tx, self.execution_id, self.run_token, self.clock.now()):
                    return False
                try:
                    self.store.extend([self.lease], lease_for=self.lease_for, tx=tx)
                except LeaseLostError:
                    return False
                return True

    def end_heartbeat(self) -> None:
        """Stop renewing before the invocation's last transaction completes or releases the lease, so that a
        renewal in flight cannot lease the item again after it was given back."""
        with self._renewing:
            self._ending = True
        if self.beat is not None:
            self.beat.stop()

    def keepalive(self, tx: Tx, now: float) -> None:
        """Extend the lease along with a checkpoint when the store's clock says it is due (the heartbeat
        renews by the wall clock; this covers clocks that jump, as in tests)."""
        if now - self._kept_alive < self.lease_for / 3:
            return
        try:
            self.store.extend([self.lease], lease_for=self.lease_for, tx=tx)
        except LeaseLostError:
            raise ExecutionFencedOut(f"lease on {self.execution_id} lapsed") from None
        self._kept_alive = now

    # -- CheckpointBackend ----------------------------------------------------------------------
    def now(self) -> float:
        return self.clock.now()

    def check_invoke(self, function_name: str) -> None:
        self.registry.check(function_name)

    def flush(self, updates: Sequence[OperationUpdate], operations: Sequence[Operation]) -> list[Operation]:
        written: list[Operation] = []

        def write(tx: Tx) -> None:
            now = self.now()
            written[:] = self.write_ops(tx, updates, operations, now)  # fenced
            self.keepalive(tx, now)

        self.write(write)
        return written

    # -- writing --------------------------------------------------------------------------------
    def fence(self, tx: Tx, now: float) -> None:
        """Raise ``ExecutionFencedOut`` unless the execution is still this invocation's."""
        if not schema.touch_running(tx, self.execution_id, self.run_token, now):
            self.fenced_out()

    def fenced_out(self) -> NoReturn:
        """Raise ``ExecutionFencedOut``: the execution is no longer this invocation's."""
        raise ExecutionFencedOut(f"execution {self.execution_id} was taken over")

    def write_ops(self, tx: Tx, updates: Sequence[OperationUpdate], ops: Sequence[Operation], now: float
                  ) -> list[Operation]:
        """The fence (the first operation's write carries it), then store ``ops`` and start the executions that
        ``updates`` invoke, as the service does: the batch is checked against its rules, each new callback gets
        its id here and each new signal wait takes a kept signal of its name. Returns the operations written (a
        wait that took a signal, settled).

        Raises:
            ExecutionFencedOut: the execution is no longer this invocation's (nothing is written).
            InvocationAbandoned: an operation was settled meanwhile (a callback answered, a child ended);
                the invocation replays at once to see it.
        """
        ops = [replace(op, callback_id=uuid.uuid4().hex)
               if op.type is OperationType.CALLBACK and op.callback_id is None else op for op in ops]
        if not ops:
            self.fence(tx, now)
        for i, op in enumerate(ops):
            written = (schema.write_operation_fenced(tx, self.execution_id, op, self.run_token) if i == 0
                       else schema.write_operation(tx, self.execution_id, op))
            if written is None:
                self.fenced_out()
            if not written:
                raise InvocationAbandoned(f"operation {op.name or op.id} was settled while this invocation wrote it",
                                          retry_now=True)
        signal_names: dict[str, None] = {}
        for u in updates:
            if u.operation_type is OperationType.CHAINED_INVOKE and u.action is OperationAction.START:
                assert u.function_name is not None and u.child_execution_id is not None
                executions.create(self.store, tx, u.child_execution_id, u.function_name, u.payload, now,
                                  parent=(self.execution_id, u.operation_id))
            elif u.sub_type is OperationSubType.WAIT_FOR_SIGNAL and u.action is OperationAction.START and u.name:
                signal_names[u.name] = None
            elif u.sub_type is OperationSubType.SET_EVENT and u.name:
                schema.set_event(tx, self.execution_id, u.name, u.payload, now)
            elif u.sub_type is OperationSubType.START_CHILD and u.action is OperationAction.START:
                assert u.function_name is not None and u.child_execution_id is not None
                executions.create(self.store, tx, u.child_execution_id, u.function_name, u.payload, now,
                                  parent=(self.execution_id, None))
        effects.submit_started(self.outbox, tx, updates)
        # a wait that starts takes the oldest signal of its name already kept, in this transaction
        taken = {op_id: payload for name in signal_names
                 for op_id, payload in signals.deliver(tx, self.execution_id, name, now)}
        if taken:
            ops = [replace(op, status=OperationStatus.SUCCEEDED, result=taken[op.id], end_timestamp=now)
                   if op.id in taken else op for op in ops]
        return ops

    def write(self, body: Callable[[Tx], None]) -> None:
        """Run ``body`` in one transaction of the invocation, tried again after an infrastructure error
        (``WRITE_RETRY_DELAYS``), then given up.

        Raises:
            ExecutionFencedOut: the lease was lost (the heartbeat said so, or the fence did).
            LeaseLostError: the store refused to complete or release the lease: it moved on.
            InvocationAbandoned: the store kept failing, or failed in a way that is not the infrastructure's.
        """
        def attempt(_attempt: int) -> None:
            if self.beat is not None and self.beat.lost:
                raise ExecutionFencedOut(f"the lease on execution {self.execution_id} was lost")
            # Concurrent invocations (``max_parallelism``, callers' threads) share commits: each returns once its own
            # checkpoint is committed.
            self.store.group_commit(body)

        try:
            retry_infrastructure(attempt, clock=self.clock, what=f"a checkpoint of execution {self.execution_id}",
                                 delays=WRITE_RETRY_DELAYS)
        except LeaseLostError:
            raise
        except Exception as exc:
            raise InvocationAbandoned(error_text(exc), exc) from exc
