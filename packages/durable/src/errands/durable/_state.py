"""The state of one invocation: the operations seen so far and the checkpoint updates not yet flushed."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any, Iterator, Mapping, Protocol, Sequence

from ._errors import ExecutionFencedOut, InvocationAbandoned, NonDeterministicExecutionError, SuspendExecution
from ._values import Operation, OperationUpdate, apply_update
from ._wire import validate_updates


class CheckpointBackend(Protocol):
    """Where an invocation's checkpoints go: the runner's store or an AWS-shaped client."""

    execution_id: str

    def now(self) -> float: ...

    def flush(self, updates: Sequence[OperationUpdate], operations: Sequence[Operation]
              ) -> Sequence[Operation] | None:
        """Persist ``operations`` (the state after ``updates``) in one transaction; return the service's view
        of the operations it changed (with what it issued: a callback's id), or None.

        Raises:
            ExecutionFencedOut: another invocation or an operator owns the execution now.
            InvocationAbandoned: the store failed (after any retries of its own): stop and replay later.
        """

    def check_invoke(self, function_name: str) -> None:
        """Raise ``ConfigError`` if ``function_name`` cannot be invoked from here."""


class ExecutionState:
    """Operations by id, the pending updates, and what the invocation learnt (fatal errors).

    Thread-safe: branches of ``map`` / ``parallel`` checkpoint from worker threads.
    """

    def __init__(self, backend: CheckpointBackend, operations: Mapping[str, Operation] | None = None, *,
                 always_replay: bool = False) -> None:
        self.backend = backend
        self.execution_id = backend.execution_id
        #: The backend speaks the Lambda API: waits and retry delays are whole seconds, at least one.
        self.wire: bool = bool(getattr(backend, "wire", False))
        #: The logger of contexts and steps (None: ``errands.durable``); the chained invokes' ``TenantId``.
        self.logger: Any = None
        self.tenant_id: str | None = None
        self.operations: dict[str, Operation] = dict(operations or {})
        self.always_replay = always_replay
        self.fatal: NonDeterministicExecutionError | None = None
        #: Set once a checkpoint was fenced out or abandoned: every later checkpoint raises it again, so
        #: user code that swallows the signal still writes nothing more.
        self.stopped: ExecutionFencedOut | InvocationAbandoned | None = None
        self.replayed = bool(self.operations)
        self._updates: list[OperationUpdate] = []
        self._dirty: dict[str, None] = {}
        self._before: dict[str, Operation | None] = {}
        self._lock = threading.RLock()
        self._seq = max((op.seq for op in self.operations.values()), default=0)
        self.new_completions = 0

    def now(self) -> float:
        return self.backend.now()

    def get(self, operation_id: str) -> Operation | None:
        # Without the lock (one dict read is atomic): an async function's event loop asks while a checkpoint
        # is being written on a thread, and must not wait for the store.
        return self.operations.get(operation_id)

    def checkpoint(self, update: OperationUpdate, *, sync: bool) -> Operation:
        """Apply ``update`` now; persist it now (``sync``) or with the next synchronous checkpoint."""
        with self._lock:
            if self.stopped is not None:
                raise self.stopped
            existing = self.operations.get(update.operation_id)
            if update.operation_id not in self._before:
                self._before[update.operation_id] = existing
            if existing is None:
                self._seq += 1
            op = apply_update(existing, update, self.now(), self._seq)
            self.operations[op.id] = op
            self._updates.append(update)
            self._dirty[op.id] = None
            if sync:
                self._flush_locked()
            return op

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self.stopped is not None:
            raise self.stopped
        if not self._updates:
            return
        updates, ids = self._updates, list(self._dirty)
        # the service's rules, on every backend alike (InMemoryClient and AWS check again on their side)
        validate_updates(updates, _Before(self.operations, self._before))
        try:
            answered = self.backend.flush(updates, [self.operations[i] for i in ids])
        except (ExecutionFencedOut, InvocationAbandoned) as signal:
            self.stopped = signal
            raise
        self._updates, self._dirty, self._before = [], {}, {}
        self.merge(answered or ())

    def merge(self, answered: Sequence[Operation]) -> None:
        """Take what the service issued for operations it answered with (a callback's id)."""
        for op in answered:
            mine = self.operations.get(op.id)
            if mine is None:
                continue
            if op.callback_id and mine.callback_id != op.callback_id:
                mine = replace(mine, callback_id=op.callback_id)
            if op.done and not mine.done:  # settled by the service meanwhile
                mine = replace(op, seq=mine.seq)
            self.operations[op.id] = mine

    def take_pending(self) -> tuple[list[OperationUpdate], list[Operation]]:
        """The updates not yet flushed and the operations they touched, for the final transaction."""
        with self._lock:
            updates, ids = self._updates, list(self._dirty)
            validate_updates(updates, _Before(self.operations, self._before))
            self._updates, self._dirty, self._before = [], {}, {}
            return updates, [self.operations[i] for i in ids]

    def mark_fatal(self, error: NonDeterministicExecutionError) -> NonDeterministicExecutionError:
        with self._lock:
            if self.fatal is None:
                self.fatal = error
            return error

    def completed_new(self) -> None:
        """Called after an operation ran (not replayed) to completion; ``always_replay`` suspends here
        so that the rest of the execution runs from a fresh replay."""
        with self._lock:
            self.new_completions += 1
        if self.always_replay:
            raise SuspendExecution("always_replay", until=self.now())


def earliest(values: Sequence[Any]) -> float | None:
    times = [float(v) for v in values if v is not None]
    return min(times) if times else None


class _Before(Mapping[str, Operation]):
    """The operations as they were before the pending batch (what the service holds), without a copy."""

    def __init__(self, now: Mapping[str, Operation], before: Mapping[str, Operation | None]) -> None:
        self._now = now
        self._before = before

    def __getitem__(self, key: str) -> Operation:
        if key in self._before:
            op = self._before[key]
            if op is None:
                raise KeyError(key)
            return op
        return self._now[key]

    def get(self, key: str, default: Any = None) -> Any:
        # (``Mapping.get`` goes through ``__getitem__`` and a ``KeyError``: this runs for every update)
        before = self._before
        op = before[key] if key in before else self._now.get(key)
        return default if op is None else op

    def __contains__(self, key: object) -> bool:
        if key in self._before:
            return self._before[key] is not None  # type: ignore[index]
        return key in self._now

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._now if k in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)
