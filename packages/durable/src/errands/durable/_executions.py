"""What happens to an execution across durable's tables, core's queue and the journal, inside the caller's
transaction: it is created (a row, a queue item, a ``started`` event), it ends (a terminal status, an
event, its parent's invoke operation settled) and it is signalled (made due when something it waits for
arrives). Starting, invocations, callbacks and management all go through these, so that each rule is
written once."""

from __future__ import annotations

import uuid
from typing import Any

from errands.core import AlreadyExistsError, ConfigError, Lease, telemetry
from errands.core.store import NewEvent, SQLStore, Tx

from . import _schema as schema
from ._transitions import invoke_settlement
from ._values import ErrorObject, ExecutionStatus

#: The longest execution id accepted (ids of invoked executions extend their parent's).
MAX_ID_LENGTH = 256

#: The journal stream of an execution's events is this prefix and its id. The streams are the engine's
#: (``reserve_positioned_prefix``): an event's ``seq`` is its journal position, with no per-stream counter row to
#: write at each start and end; ``append_events`` refuses them.
STREAM_PREFIX = "durable/"
SQLStore.reserve_positioned_prefix(STREAM_PREFIX, "errands-durable")


def new_execution_id(execution_id: str | None) -> str:
    """``execution_id`` checked, or a new one.

    Raises:
        ConfigError: not a non-empty string of at most ``MAX_ID_LENGTH`` characters.
    """
    if execution_id is None:
        return uuid.uuid4().hex
    if not isinstance(execution_id, str) or not execution_id.strip() or len(execution_id) > MAX_ID_LENGTH:
        raise ConfigError(f"execution_id must be a non-empty string of at most {MAX_ID_LENGTH} characters, got "
                          f"{execution_id!r}", field="execution_id", value=execution_id)
    return execution_id


def create(store: SQLStore, tx: Tx, execution_id: str, function: str, input_text: str | None, now: float, *,
           parent: tuple[str, str | None] | None = None, run_token: int = 0, queued: bool = False,
           leases: list[Lease] | None = None, lease_for: float = 30.0) -> bool:
    """A new execution, due now (``queued``: ``ENQUEUED``, until its queue admits it), with its
    ``durable.execution.started`` event. False (nothing changes) if the id exists.

    With ``leases`` (not ``queued``), its queue item is added leased to this thread for ``lease_for`` seconds, the
    lease ``claim_keys`` would give, appended to ``leases``: the caller runs the execution's first invocation."""
    if not schema.insert_execution(tx, execution_id, function, input_text, now, parent=parent, run_token=run_token):
        return False
    if queued:
        schema.hold_execution(tx, execution_id)
    elif leases is not None:
        lease = store.enqueue_claimed(schema.QUEUE, execution_id, telemetry.queued(), lease_for=lease_for, tx=tx)
        # (an item left queued under this id is claimed as it is, if due and held by no one)
        leases += [lease] if lease is not None else store.claim_keys(schema.QUEUE, [execution_id], lease_for=lease_for,
                                                                      tx=tx)
    else:
        store.enqueue(schema.QUEUE, [(execution_id, telemetry.queued(), now)], tx=tx)
    telemetry.count("errands.durable.executions", status="ENQUEUED" if queued else "STARTED")
    journal(store, tx, execution_id, "durable.execution.started",
            {"execution_id": execution_id, "function": function, "parent_id": parent[0] if parent else None})
    return True


def journal(store: SQLStore, tx: Tx, execution_id: str, type: str, data: dict[str, Any]) -> None:
    """Append event ``type`` of the execution to its stream (``STREAM_PREFIX`` + id) in ``tx``, with the current
    trace context (a reaction to it continues the trace)."""
    store.append_engine_events(tx, [NewEvent(STREAM_PREFIX + execution_id, type, data)],
                               trace=telemetry.carrier_text() if telemetry.tracing() else None)


def start(store: SQLStore, tx: Tx, execution_id: str, function: str, input_text: str, now: float, *,
          run_token: int = 0, timeout: float | None = None, queued: bool = False,
          leases: list[Lease] | None = None, lease_for: float = 30.0) -> bool:
    """Create the execution, or find it created already with the same function and input (a start is
    idempotent on its id). Whether it was created. With ``timeout``, its deadline is queued too; ``leases`` and
    ``lease_for`` as ``create``'s (for a new execution only).

    Raises:
        AlreadyExistsError: the id exists with another function or input.
    """
    if create(store, tx, execution_id, function, input_text, now, run_token=run_token, queued=queued, leases=leases,
              lease_for=lease_for):
        if timeout is not None:
            store.enqueue(schema.DEADLINES, [(execution_id, None, now + timeout)], tx=tx)
        return True
    existing = schema.function_and_input(tx, execution_id)
    if existing != (function, input_text):
        found = existing[0] if existing is not None else None
        raise AlreadyExistsError(f"execution {execution_id!r} exists with function {found!r} and another input; "
                                 "use a new execution_id")
    return False


def end(store: SQLStore, tx: Tx, execution_id: str, status: ExecutionStatus, result: str | None,
        error: ErrorObject | None, now: float, *, run_token: int | None = None) -> tuple[Any, ...] | None:
    """Record a terminal status, publish ``durable.execution.<status>`` and hand the outcome to a waiting
    parent. The execution's row as it ended (``schema.execution_info`` reads it).

    With ``run_token`` (an invocation ending its execution), only while the execution is ``RUNNING`` under it
    (the invocation's fence): None, changing nothing, when it is not."""
    ended = schema.end_execution(tx, execution_id, status, result, error, now, run_token=run_token)
    if ended is None:
        return None
    parent_op, queued, row = ended
    parent_id, function = row[6], row[1]  # the columns of ``schema.execution_info``
    if queued:
        schema.end_queue_item(tx, execution_id, now)
    telemetry.count("errands.durable.executions", status=status.value)
    data: dict[str, Any] = {"execution_id": execution_id, "function": function, "status": status.value}
    if error is not None:
        data["error"] = error.to_dict()
    journal(store, tx, execution_id, f"durable.execution.{status.value.lower()}", data)
    if parent_id is None or parent_op is None:
        return row
    op_status, op_result, op_error = invoke_settlement(status, result, error)
    schema.settle_operation(tx, parent_id, parent_op, op_status, op_result, op_error, now)
    signal(store, tx, parent_id, now)
    return row


def signal(store: SQLStore, tx: Tx, execution_id: str, now: float) -> None:
    """Something the execution waits for arrived: make it due now (unless suspended or finished). An
    invocation in flight sees the signal when it ends and runs again at once."""
    status = schema.signal(tx, execution_id)
    if status is None or status.value not in schema.ACTIVE:
        return
    store.bring_forward(schema.QUEUE, execution_id, now, tx=tx)
    # The invocation it makes due continues the trace current here (the waker's: a callback's request, an
    # effect's submit); an item queued already keeps its own.
    store.enqueue(schema.QUEUE, [(execution_id, telemetry.queued(), now)], tx=tx)
