"""Events an execution publishes: ``ctx.set_event(key, value)`` (a checkpointed operation whose write
also sets the key's latest value in ``durable_events``, in the checkpoint's transaction) and
``DurableRunner.get_event`` (DBOS's ``set_event`` / ``get_event``)."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from errands.core import ConfigError, NotFoundError
from errands.core.runtime import error_text, is_infrastructure_error
from errands.core.store import SQLStore, dumps

from . import _schema as schema
from ._values import OperationAction, OperationSubType, OperationType, OperationUpdate

if TYPE_CHECKING:
    from ._context import OperationLogic, _ContextCore

log = logging.getLogger("errands.durable")


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"an event key must be a non-empty string, got {key!r}", field="key", value=key)
    return key


def set_event_op(ctx: _ContextCore, key: str, value: Any) -> tuple[str, OperationLogic]:
    """The operation of ``ctx.set_event``: the value is checked before it takes an operation id."""
    from ._context import _immediate

    key = _check_key(key)
    text = dumps(value, field=f"the value of event {key!r}")
    op_id, op = ctx._next(OperationType.STEP, OperationSubType.SET_EVENT, key)

    def set_event() -> None:
        if op is None:  # on replay the value was published already
            ctx._state.checkpoint(OperationUpdate(
                operation_id=op_id, operation_type=OperationType.STEP, action=OperationAction.SUCCEED,
                parent_id=ctx._parent_id, name=key, sub_type=OperationSubType.SET_EVENT, payload=text), sync=True)

    return op_id, _immediate(set_event)


def check_wait(key: object, timeout: float | None) -> str:
    """The key of a ``get_event``, checked with its timeout."""
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
        raise ConfigError(f"timeout must be seconds >= 0 or None, got {timeout!r}", field="timeout", value=timeout)
    return _check_key(key)


def look(store: SQLStore, execution_id: str, key: str) -> tuple[bool, Any]:
    """``(True, value)`` once the key is set, ``(True, None)`` once the execution has ended without it,
    ``(False, None)`` while it may still come (or the store failed: ask again).

    Raises:
        NotFoundError: no such execution.
    """
    try:
        with store.read() as tx:
            found = schema.get_event(tx, execution_id, key)
            status = schema.execution_status(tx, execution_id) if found is None else None
    except Exception as exc:
        if not is_infrastructure_error(exc):
            raise
        log.info("reading event %r of execution %s failed (%s); asking again", key, execution_id, error_text(exc))
        return False, None
    if found is not None:
        return True, json.loads(found[0]) if found[0] is not None else None
    if status is None:
        raise NotFoundError(f"no durable execution {execution_id!r}")
    return status.terminal, None


def pause(deadline: float | None, poll_interval: float) -> float | None:
    """How long to sleep before asking again; None once ``deadline`` (monotonic) has passed."""
    if deadline is None:
        return poll_interval
    left = deadline - time.monotonic()
    return None if left <= 0 else min(poll_interval, left)
