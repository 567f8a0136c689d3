"""The decisions of the durable engine, as pure functions: what an invocation's outcome means for its
execution and its queue item, how an invoked execution's end settles its parent's operation, when a
callback may still be settled, which waits take which signals, how soon an abandoned invocation is tried again, what a rerun keeps.

Nothing here touches a store or a clock, so each rule is tested on its own; the modules that write
(``_invocations``, ``_executions``, ``_management``, ``_callbacks``, ``_signals``) apply what these decide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from errands.core import ConfigError
from errands.core.runtime import backoff

from ._context import InvocationOutcome
from ._values import ErrorObject, ExecutionStatus, Operation, OperationStatus

#: The first wait after an abandoned invocation; it doubles while the execution keeps failing here.
ABANDON_BACKOFF = 0.05


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a finished invocation does to its execution and to the execution's queue item.

    Attributes:
        status: ``PENDING`` (waits for a timer, a callback or a child), ``SUCCEEDED`` or ``FAILED``;
            ``RUNNING`` after ``continue_as_new`` (the next run starts at once).
        wake_at: while ``PENDING``, when the execution is due again; None until a signal arrives.
        release_in: seconds after which the queue item is due again; None: the item is completed (the
            execution has ended, or waits for a signal, which enqueues it again).
    """

    status: ExecutionStatus
    wake_at: float | None = None
    release_in: float | None = None


def settle(outcome: InvocationOutcome, *, now: float, signalled: bool) -> Settlement:
    """The settlement of an invocation that ended with ``outcome`` at ``now``. ``signalled``: a callback
    was answered or a child ended while it ran, so a waiting execution is due again at once."""
    if outcome.status == "PENDING":
        wake_at = now if signalled else outcome.until
        return Settlement(ExecutionStatus.PENDING, wake_at=wake_at,
                          release_in=None if wake_at is None else max(wake_at - now, 0.0))
    if outcome.status == "SUCCEEDED":
        return Settlement(ExecutionStatus.SUCCEEDED)
    if outcome.status == "FAILED":
        return Settlement(ExecutionStatus.FAILED)
    if outcome.status == "CONTINUED":  # continue_as_new: the next run is due at once
        return Settlement(ExecutionStatus.RUNNING, release_in=0.0)
    raise ValueError(f"an invocation that ended {outcome.status} settles nothing")


def invoke_settlement(status: ExecutionStatus, result: str | None, error: ErrorObject | None
                      ) -> tuple[OperationStatus, str | None, ErrorObject | None]:
    """How the end of an invoked execution settles the parent's invoke operation: ``(status, result,
    error)``. Only success carries the result; a terminated child fails the operation."""
    if status is ExecutionStatus.SUCCEEDED:
        return OperationStatus.SUCCEEDED, result, None
    if status is ExecutionStatus.TERMINATED:
        error = error or ErrorObject(type="ExecutionTerminated", message="the invoked execution was terminated")
    return OperationStatus.FAILED, None, error


def terminated_error(reason: str | None) -> ErrorObject:
    """The error a terminated execution ends with."""
    return ErrorObject(type="ExecutionTerminated", message=reason or "terminated by an operator")


def timed_out_error(execution_id: str) -> ErrorObject:
    """The error an execution (and each execution it started) ends with at its deadline."""
    return ErrorObject(type="ExecutionTimedOut", message=f"execution {execution_id} passed its deadline")


def can_settle_callback(operation: OperationStatus, execution: ExecutionStatus) -> bool:
    """A callback takes an answer or a heartbeat only while it waits and its execution has not ended."""
    return operation is OperationStatus.STARTED and not execution.terminal


def takes_signals(execution: ExecutionStatus) -> bool:
    """A signal is kept for an execution that may still run (running, waiting, suspended), never for one
    that has ended."""
    return not execution.terminal


def deliveries(waits: Sequence[str], kept: Sequence[tuple[int, str | None]]
               ) -> list[tuple[str, int, str | None]]:
    """Which waiting operation takes which kept signal of one name: the oldest wait the oldest signal, and so
    on, ``(operation_id, seq, payload)``; what is left over keeps waiting, or stays kept.

    Args:
        waits: the ids of the waits for the name that are open, in the order they started.
        kept: ``(seq, payload)`` of the signals of the name not taken yet, in the order they were sent.
    """
    return [(op_id, seq, payload) for op_id, (seq, payload) in zip(waits, kept)]


def abandon_delay(failures: int, *, lease_for: float, retry_now: bool = False) -> float:
    """Seconds until an abandoned invocation is tried again, after ``failures`` earlier abandons of the same
    execution here: none when it only has to replay, else short and doubling, never beyond a lease."""
    if retry_now:
        return 0.0
    return backoff(failures + 1, base=ABANDON_BACKOFF, cap=lease_for)


def statuses(status: ExecutionStatus | str | Iterable[ExecutionStatus | str] | None) -> list[str] | None:
    """The status filter of ``list``: one status or several, by name in any case (None: every status).

    Raises:
        ConfigError: an unknown status.
    """
    if status is None:
        return None
    wanted: Iterable[Any] = [status] if isinstance(status, (str, ExecutionStatus)) else status
    values = []
    for s in wanted:
        try:
            values.append(ExecutionStatus(str(s).upper()).value)
        except ValueError:
            raise ConfigError(f"unknown execution status {s!r}; one of {', '.join(x.value for x in ExecutionStatus)}",
                              field="status", value=s) from None
    return values


def find_operation(ops: Sequence[Operation], operation: str) -> Operation | None:
    """The operation with id ``operation``, else the first one with that name."""
    return next((o for o in ops if o.id == operation), None) or next((o for o in ops if o.name == operation), None)


def kept_for_rerun(ops: Sequence[Operation], target: Operation) -> list[Operation]:
    """The checkpoints a rerun from ``target`` keeps: every operation finished before it, except those that
    contain it (its parent contexts run again, so that ``target`` does)."""
    by_id = {o.id: o for o in ops}
    enclosing: set[str] = set()
    parent = target.parent_id
    while parent is not None and parent in by_id:
        enclosing.add(parent)
        parent = by_id[parent].parent_id
    return [o for o in ops if o.seq < target.seq and o.done and o.id not in enclosing]
