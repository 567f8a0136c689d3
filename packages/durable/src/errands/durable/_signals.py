"""Signals sent to an execution by name: each is kept, in the order sent, until a ``ctx.wait_for_signal`` of
its name takes it. A signal that finds a wait open settles it and wakes the execution in one transaction; a
wait that starts while signals of its name are kept takes the oldest in the transaction that checkpoints its
start. Both sides pair waits with signals through ``deliver``, under the execution row's lock, so a signal
is taken once and none is lost between "the wait starts" and "the signal arrives"."""

from __future__ import annotations

from typing import Any

from errands.core import ConfigError, NotFoundError
from errands.core.store import SQLStore, Tx, dumps

from . import _executions as executions
from . import _schema as schema
from ._errors import SignalRefusedError
from ._transitions import deliveries, takes_signals
from ._values import OperationStatus


def check_name(name: object) -> str:
    """``name`` as a signal's name.

    Raises:
        ConfigError: not a non-empty string.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a signal name must be a non-empty string, got {name!r}", field="name", value=name)
    return name


def deliver(tx: Tx, execution_id: str, name: str, now: float) -> list[tuple[str, str | None]]:
    """Hand the kept signals named ``name`` to the open waits for it, oldest to oldest, settling each wait
    that gets one. ``(operation_id, payload)`` of each wait settled. Callers hold the execution's lock."""
    waits = schema.signal_waits(tx, execution_id, name)
    if not waits:
        return []
    settled = []
    for op_id, seq, payload in deliveries(waits, schema.kept_signals(tx, execution_id, name)):
        schema.take_signal(tx, execution_id, seq, op_id, now)
        schema.settle_operation(tx, execution_id, op_id, OperationStatus.SUCCEEDED, payload, None, now)
        settled.append((op_id, payload))
    return settled


def send(store: SQLStore, execution_id: str, name: str, payload: Any, *, conn: Any = None) -> bool:
    """Send the signal ``name`` with ``payload`` (JSON) to the execution. True if a waiting
    ``wait_for_signal`` took it at once (the execution is woken), False if it is kept for a later wait.

    Raises:
        ConfigError: ``name`` is not a non-empty string. PayloadError: ``payload`` is not JSON.
        NotFoundError: no such execution. SignalRefusedError: the execution has finished.
    """
    name = check_name(name)
    text = dumps(payload, field="payload")
    with store.transaction(conn) as tx:
        status = schema.lock_execution(tx, execution_id)
        if status is None:
            raise NotFoundError(f"no execution {execution_id!r}")
        if not takes_signals(status):
            raise SignalRefusedError(execution_id, status.value)
        now = store.clock.now()
        schema.insert_signal(tx, execution_id, name, text, now)
        taken = bool(deliver(tx, execution_id, name, now))
        if taken:
            executions.signal(store, tx, execution_id, now)
    return taken
