"""Callbacks answered from outside an execution: a result or a failure settles the waiting operation and
wakes the execution in one transaction; a heartbeat keeps a callback's heartbeat timeout from firing.
A callback that has settled, or whose execution has ended, takes nothing more."""

from __future__ import annotations

from typing import Any, Mapping

from errands.core import ConfigError, NotFoundError
from errands.core.store import SQLStore, Tx, dumps

from . import _executions as executions
from . import _schema as schema
from ._transitions import can_settle_callback
from ._values import ErrorObject, OperationStatus

#: The prefix of ``ctx.effect``'s effect keys (``_effects.KEY_PREFIX``), which are its operations' callback ids.
EFFECT_KEYS = "durable/"


def _waiting(tx: Tx, callback_id: str) -> tuple[str, str] | None:
    """``(execution_id, operation_id)`` of the callback if it can still be settled, else None.

    Raises:
        ConfigError: ``callback_id`` is not a non-empty string. NotFoundError: no such callback.
    """
    if not isinstance(callback_id, str) or not callback_id:
        raise ConfigError(f"callback_id must be a non-empty string, got {callback_id!r}", field="callback_id",
                          value=callback_id)
    found = schema.find_callback(tx, callback_id)
    if found is None:
        raise NotFoundError(f"no callback {callback_id!r}")
    execution_id, op_id, op_status, execution_status = found
    return (execution_id, op_id) if can_settle_callback(op_status, execution_status) else None


def settle_in(store: SQLStore, tx: Tx, callback_id: str, status: OperationStatus, result: str | None,
              error: ErrorObject | None) -> bool:
    """Settle the callback and wake its execution in ``tx``. False if it can take no answer any more.

    Raises:
        NotFoundError: no such callback.
    """
    waiting = _waiting(tx, callback_id)
    if waiting is None:
        return False
    now = store.clock.now()
    schema.settle_operation(tx, *waiting, status, result, error, now)
    executions.signal(store, tx, waiting[0], now)
    return True


def _not_an_effect(callback_id: str) -> None:
    """Refuse answers from outside to a ``ctx.effect`` operation (whose callback id is its effect's key)."""
    if isinstance(callback_id, str) and callback_id.startswith(EFFECT_KEYS):
        raise ConfigError(f"callback {callback_id!r} is a ctx.effect operation: it ends when its effect does "
                          "(Outbox.resolve, approve, reject, cancel)", field="callback_id", value=callback_id)


def _settle(store: SQLStore, callback_id: str, status: OperationStatus, result: str | None,
            error: ErrorObject | None) -> bool:
    _not_an_effect(callback_id)
    with store.transaction() as tx:
        return settle_in(store, tx, callback_id, status, result, error)


def complete(store: SQLStore, callback_id: str, result: Any) -> bool:
    """Hand ``result`` (JSON) to the execution waiting on ``callback_id`` and wake it. False if the callback
    can take no answer any more.

    Raises:
        NotFoundError: no such callback. PayloadError: ``result`` is not JSON.
    """
    return _settle(store, callback_id, OperationStatus.SUCCEEDED, dumps(result, field="result"), None)


def error_object(error: ErrorObject | BaseException | Mapping[str, Any] | str) -> ErrorObject:
    """The ``ErrorObject`` of a callback failure given as one, an exception, a dict with AWS keys or a
    message."""
    if isinstance(error, ErrorObject):
        return error
    if isinstance(error, BaseException):
        return ErrorObject.from_exception(error, with_trace=False)
    if isinstance(error, Mapping):
        return ErrorObject.from_dict(error)
    if isinstance(error, str):
        return ErrorObject(type="CallbackError", message=error)
    raise ConfigError(f"error must be an ErrorObject, exception, dict or str, got {type(error).__name__}",
                      field="error", value=type(error).__name__)


def fail(store: SQLStore, callback_id: str, error: ErrorObject | BaseException | Mapping[str, Any] | str) -> bool:
    """Fail the callback: the waiting ``result()`` raises ``CallbackError`` with this error."""
    return _settle(store, callback_id, OperationStatus.FAILED, None, error_object(error))


def heartbeat(store: SQLStore, callback_id: str) -> None:
    """Record that the party completing ``callback_id`` is still working (resets its heartbeat timeout)."""
    _not_an_effect(callback_id)
    with store.transaction() as tx:
        waiting = _waiting(tx, callback_id)
        if waiting is not None:
            schema.touch_callback(tx, *waiting, store.clock.now())
