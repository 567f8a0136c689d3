"""Effects from workflows: ``ctx.effect(name, effect)`` hands an effect to the core outbox and waits for
its end.

The path of one effect:

1. ``ctx.effect`` checks the effect (``Outbox.check``: bad input fails the call, nothing is stored), gives it
   the key ``durable/<execution id>/<operation id>`` (and the execution id as its ``run_id``, unless it has
   one) and checkpoints a CALLBACK operation of subtype ``Effect`` whose callback id is that key; the
   function suspends.
2. The transaction that writes the operation's start also submits the effect (``Outbox.submit`` on that
   transaction's connection): a crash cannot record one without the other.
3. The outbox dispatches, observes, retries and compensates as for any effect; each end of an effect
   (``effect.confirmed``, ``effect.failed``, ``effect.cancelled``) is a journal event.
4. The runner follows the journal with a fan-out route (``durable.effects``, its cursor in the store): an
   ended effect whose key is a durable one settles its operation with the effect's record and wakes the
   execution, in one transaction, as a callback's answer does.
5. The replay returns the recorded ``EffectRecord`` (or raises ``EffectFailedError`` carrying it) without
   submitting again.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from datetime import datetime
from typing import Any, Generator, Sequence

from errands.core import (
    ConfigError,
    Effect,
    EffectRecord,
    EffectStatus,
    FanOut,
    NotFoundError,
    Outbox,
    Route,
    Semantics,
    TransientError,
)
from errands.core.runtime import error_text, is_infrastructure_error
from errands.core.store import SQLStore, Tx, dumps

from . import _callbacks as callbacks
from ._errors import DurableOperationError, SuspendExecution
from ._values import OperationAction, OperationStatus, OperationSubType, OperationType, OperationUpdate

#: The prefix of the keys of effects submitted by ``ctx.effect``.
KEY_PREFIX = callbacks.EFFECT_KEYS
#: The fan-out route that wakes executions when their effects end.
ROUTE = "durable.effects"
#: The outbox's journal subjects of an effect's end.
ENDED_SUBJECTS = ("effect.confirmed.**", "effect.failed.**", "effect.cancelled.**")
_ENDED = frozenset({EffectStatus.CONFIRMED, EffectStatus.FAILED, EffectStatus.CANCELLED})
_TIMES = ("next_attempt_at", "created_at", "updated_at")


class EffectFailedError(DurableOperationError):
    """``ctx.effect``'s effect ended ``FAILED`` (its attempts ran out, or the connector refused it for good)
    or ``CANCELLED`` (rejected at a human gate, cancelled by an operator). ``record`` is the effect's
    ``EffectRecord`` as it ended; a replay raises the same error with the same record."""

    def __init__(self, record: EffectRecord) -> None:
        super().__init__(f"effect {record.key} ended {record.status.value}: {record.error or 'no error recorded'}",
                         error_type="EffectFailedError")
        self.record = record


def effect_key(execution_id: str, operation_id: str) -> str:
    """The idempotency key of the effect of operation ``operation_id`` of ``execution_id``."""
    return f"{KEY_PREFIX}{execution_id}/{operation_id}"


def _effect_json(effect: Effect) -> str:
    data = {f.name: getattr(effect, f.name) for f in fields(effect)}
    data["semantics"] = effect.semantics.value
    data["metadata"] = dict(effect.metadata)
    if isinstance(effect.dispatch_at, datetime):
        data["dispatch_at"] = effect.dispatch_at.timestamp()
    return dumps(data, field="effect")


def _effect_from_json(text: str) -> Effect:
    data = json.loads(text)
    data["semantics"] = Semantics(data["semantics"])
    return Effect(**data)


def record_json(record: EffectRecord) -> str:
    """``record`` as the JSON an effect operation's result holds."""
    return dumps(record.to_dict(), field="record")


def record_from_json(text: str | None) -> EffectRecord:
    """The ``EffectRecord`` an effect operation's result holds."""
    data = json.loads(text or "null")
    if not isinstance(data, dict):
        raise ConfigError(f"an effect operation holds no effect record: {text!r}", field="result", value=text)
    data["status"] = EffectStatus(data["status"])
    data["semantics"] = Semantics(data["semantics"])
    for name in _TIMES:
        if data.get(name) is not None:
            data[name] = datetime.fromisoformat(data[name])
    return EffectRecord(**data)


def effect_op(ctx: Any, name: str, effect: Effect) -> tuple[str, Generator[Any, Any, EffectRecord]]:
    """The operation id and logic of ``ctx.effect(name, effect)`` on a sync or async context core."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"ctx.effect needs a name, got {name!r}", field="name", value=name)
    if not isinstance(effect, Effect):
        raise ConfigError(f"ctx.effect takes an errands.core.Effect, got {type(effect).__name__}", field="effect",
                          value=type(effect).__name__)
    op_id, op = ctx._next(OperationType.CALLBACK, OperationSubType.EFFECT, name)

    def logic() -> Generator[Any, Any, EffectRecord]:
        state = ctx._state
        if op is None:
            outbox = getattr(state.backend, "outbox", None)
            if outbox is None:
                raise ConfigError(
                    f"ctx.effect({name!r}) needs an outbox on the runner's store: DurableRunner(store, outbox="
                    "Outbox(store, ...)), or attach the runner to an errands.App", field="outbox", value=None)
            key = effect_key(state.execution_id, op_id)
            submitted = replace(effect, key=key, run_id=effect.run_id or state.execution_id)
            outbox.check(submitted)
            # Submitted by the transaction that checkpoints this start (``submit_started``).
            ctx._start(op_id, OperationType.CALLBACK, OperationSubType.EFFECT, name, payload=_effect_json(submitted),
                       callback_id=key)
            raise SuspendExecution(f"effect {name}")
        if not op.done:
            raise SuspendExecution(f"effect {name}")
        record = record_from_json(op.result)
        if record.status is not EffectStatus.CONFIRMED:
            raise EffectFailedError(record)
        return record
        yield  # a generator, like every operation's logic

    return op_id, logic()


def submit_started(outbox: Outbox | None, tx: Tx, updates: Sequence[OperationUpdate]) -> None:
    """Submit the effects whose operations ``updates`` start, in ``tx`` (the checkpoint's transaction)."""
    started = [u for u in updates if u.sub_type is OperationSubType.EFFECT and u.action is OperationAction.START]
    if not started:
        return
    if outbox is None:  # ctx.effect checked; only a runner that lost its outbox gets here
        raise ConfigError("an effect operation was checkpointed on a runner without an outbox", field="outbox")
    outbox.submit_many([_effect_from_json(u.payload or "{}") for u in started], conn=tx.raw)


class EffectWakes:
    """The sink of the ``durable.effects`` route: each ended effect of a ``ctx.effect`` settles its operation
    with the effect's record and wakes the execution (one transaction per batch; at least once, and a
    settled operation takes nothing more)."""

    name = "durable.effects"

    def __init__(self, store: SQLStore, outbox: Outbox) -> None:
        self.store = store
        self.outbox = outbox

    def publish(self, events: Sequence[Any]) -> None:
        keys = list(dict.fromkeys(
            key for e in events if isinstance(key := (e.data or {}).get("key"), str) and key.startswith(KEY_PREFIX)))
        if not keys:
            return
        try:
            with self.store.transaction() as tx:
                for key in keys:
                    try:
                        record = self.outbox.get(key, conn=tx.raw)
                    except NotFoundError:
                        continue
                    if record.status not in _ENDED:  # redriven since: a later event ends it
                        continue
                    try:
                        callbacks.settle_in(self.store, tx, key, OperationStatus.SUCCEEDED, record_json(record), None)
                    except NotFoundError:  # the execution was purged
                        continue
        except Exception as exc:
            if is_infrastructure_error(exc):
                raise TransientError(f"waking executions after their effects: {error_text(exc)}") from exc
            raise


def wakes(store: SQLStore, outbox: Outbox) -> FanOut:
    """The fan-out that wakes executions when their effects end."""
    return FanOut(store, [Route(ROUTE, EffectWakes(store, outbox), subjects=list(ENDED_SUBJECTS), batch_size=500)])
