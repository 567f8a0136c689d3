"""Reading and managing executions from outside them: get, list and history read models; terminate,
suspend and resume; purge and retention; rerun from an operation.

An operator's change fences out an invocation in flight (its next checkpoint finds a new run token or
status) and takes or puts back the execution's queue item in the same transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any, Iterable, List

from errands.core import AlreadyExistsError, ConfigError, NotFoundError
from errands.core.store import SQLStore, Tx, dumps

from . import _executions as executions
from . import _schema as schema
from ._transitions import find_operation, kept_for_rerun, statuses, terminated_error
from ._values import ErrorObject, ExecutionInfo, ExecutionStatus, Operation, OperationSubType


# -- read models ----------------------------------------------------------------------------------
def get(store: SQLStore, execution_id: str) -> ExecutionInfo:
    """The execution's status, result or error.

    Raises:
        NotFoundError: no such execution.
    """
    with store.read() as tx:
        info = schema.get_execution(tx, execution_id)
    if info is None:
        raise NotFoundError(f"no durable execution {execution_id!r}")
    return info


def list_executions(store: SQLStore, status: ExecutionStatus | str | Iterable[ExecutionStatus | str] | None, *,
                    function: str | None, parent_id: str | None, limit: int, offset: int) -> List[ExecutionInfo]:
    """Executions, newest first, filtered by status(es), function and parent."""
    wanted = statuses(status)
    with store.read() as tx:
        return schema.list_executions(tx, statuses=wanted, function=function, parent_id=parent_id,
                                      limit=int(limit), offset=int(offset))


def history(store: SQLStore, execution_id: str) -> List[Operation]:
    """The execution's checkpointed operations in the order they started."""
    get(store, execution_id)
    with store.read() as tx:
        return schema.operations(tx, execution_id)


def active_family(store: SQLStore, execution_id: str) -> list[str]:
    """The execution and every active execution it invoked (their ids extend its own)."""
    with store.read() as tx:
        return schema.active_family(tx, execution_id)


# -- operator changes -----------------------------------------------------------------------------
def terminate(store: SQLStore, execution_id: str, reason: str | None, *, recursive: bool) -> ExecutionInfo:
    """Stop the execution now (``TERMINATED``), and with ``recursive`` those it invoked."""
    info = get(store, execution_id)
    if info.status.terminal:
        return info
    with store.transaction() as tx:
        _terminate(store, tx, execution_id, terminated_error(reason), recursive)
    return get(store, execution_id)


def end_tree(store: SQLStore, tx: Tx, execution_id: str, status: ExecutionStatus, error: ErrorObject) -> None:
    """End the execution and every execution it started, at any depth, that has not ended (under one that
    has, too: a deadline holds for the children an execution left running), with ``status`` and ``error``."""
    _terminate(store, tx, execution_id, error, False, status)
    for child in schema.children(tx, execution_id):
        end_tree(store, tx, child, status, error)


def _terminate(store: SQLStore, tx: Tx, execution_id: str, error: ErrorObject, recursive: bool,
               end_as: ExecutionStatus = ExecutionStatus.TERMINATED) -> None:
    status = schema.execution_status(tx, execution_id)
    if status is None or status.terminal:
        return
    store.dequeue(schema.QUEUE, execution_id, tx=tx)
    executions.end(store, tx, execution_id, end_as, None, error, store.clock.now())
    if recursive:
        for child in schema.children(tx, execution_id):
            _terminate(store, tx, child, error, recursive, end_as)


def suspend(store: SQLStore, execution_id: str) -> ExecutionInfo:
    """Pause the execution: nothing runs until ``resume``. Callbacks still record their results."""
    with store.transaction() as tx:
        done = schema.suspend_execution(tx, execution_id, store.clock.now())
        if done:
            store.dequeue(schema.QUEUE, execution_id, tx=tx)
    if not done:
        _refuse(store, execution_id, "RUNNING or PENDING", "suspend")
    return get(store, execution_id)


def resume(store: SQLStore, execution_id: str) -> ExecutionInfo:
    """Continue a suspended execution (it replays and carries on from its checkpoints)."""
    with store.transaction() as tx:
        now = store.clock.now()
        done = schema.resume_execution(tx, execution_id, now)
        if done:
            store.enqueue(schema.QUEUE, [(execution_id, None, now)], tx=tx)
    if not done:
        _refuse(store, execution_id, "SUSPENDED", "resume")
    return get(store, execution_id)


def _refuse(store: SQLStore, execution_id: str, wanted: str, verb: str) -> None:
    info = get(store, execution_id)
    raise ConfigError(f"cannot {verb} execution {execution_id!r}: it is {info.status.value}, not {wanted}",
                      field="execution_id", value=execution_id)


def purge(store: SQLStore, execution_id: str) -> int:
    """Delete a finished execution, its operations and every execution it invoked (recursively). How many
    executions were deleted.

    Raises:
        ConfigError: the execution has not finished (terminate it first).
    """
    info = get(store, execution_id)
    if not info.status.terminal:
        raise ConfigError(f"execution {execution_id!r} is {info.status.value}; terminate it before purging",
                          field="execution_id", value=execution_id)
    with store.transaction() as tx:
        return _purge(store, tx, execution_id)


def _purge(store: SQLStore, tx: Tx, execution_id: str) -> int:
    n = sum(_purge(store, tx, child) for child in schema.children(tx, execution_id))
    store.dequeue(schema.QUEUE, execution_id, tx=tx)
    store.dequeue(schema.DEADLINES, execution_id, tx=tx)
    return n + schema.delete_execution(tx, execution_id)


def apply_retention(store: SQLStore, retention: float, limit: int) -> int:
    """Purge top-level executions that finished more than ``retention`` seconds ago, each in its own
    transaction. How many were purged."""
    with store.read() as tx:
        ids = schema.ended_before(tx, store.clock.now() - retention, limit)
    n = 0
    for eid in ids:
        with store.transaction() as tx:
            n += _purge(store, tx, eid)
    return n


def rerun_from(store: SQLStore, execution_id: str, operation: str, *, new_execution_id: str | None,
               input: Any) -> str:
    """Start a new execution with the source's checkpoints from before ``operation`` (an id or name),
    on the source's input or ``input`` (``...``: the source's). The new execution's id.

    Raises:
        NotFoundError: no such execution or operation.
        AlreadyExistsError: ``new_execution_id`` is taken.
    """
    info = get(store, execution_id)
    ops = history(store, execution_id)
    target = find_operation(ops, operation)
    if target is None:
        raise NotFoundError(f"execution {execution_id!r} has no operation with id or name {operation!r}")
    text = dumps(info.input if input is ... else input, field="input")
    new_id = executions.new_execution_id(new_execution_id)
    with store.transaction() as tx:
        if not executions.create(store, tx, new_id, info.function, text, store.clock.now()):
            raise AlreadyExistsError(f"execution {new_id!r} exists already; pick another new_execution_id")
        for o in kept_for_rerun(ops, target):
            schema.insert_operation(tx, new_id, replace(o, callback_id=uuid.uuid4().hex) if o.callback_id else o)
            if o.sub_type is OperationSubType.SET_EVENT and o.name:  # the events it had set, set again
                schema.set_event(tx, new_id, o.name, o.result, store.clock.now())
    return new_id
