"""``DurableRunner.replay``: run a stored history against new code, writing nothing, and report the first
place where they part (Temporal's Replayer).

The function runs over the execution's checkpoints as an invocation would, on a state that refuses every
write: a finished operation answers from its checkpoint, and the first operation the code would write
(or whose step would run) ends the replay there, at the end of the history. It diverges when the code calls
another operation where the history holds one (type, subtype or name), when it ends or suspends while the
history holds operations it never reached, or when it asks for more of an execution that had ended.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from ._context import run_handler
from ._errors import ReplayStopped
from ._state import ExecutionState
from ._values import Operation, OperationStatus, OperationSubType, OperationType, OperationUpdate


def _shape(type_: OperationType, sub_type: OperationSubType | None, name: str | None) -> dict[str, Any]:
    return {"type": type_.value, "sub_type": sub_type.value if sub_type else None, "name": name}


@dataclass(frozen=True, slots=True, kw_only=True)
class Divergence:
    """Where new code parts from a stored history.

    Attributes:
        index: the 1-based position of the operation in the history (its start order); the history's length
            plus one when the code asks for an operation past the end of a finished execution.
        operation_id: the operation's id.
        expected: ``{"type", "sub_type", "name"}`` of the stored operation (None: the history had ended).
        got: the same of the operation the code called there (None: the code never called one).
        message: the whole story in one line.
    """

    index: int
    operation_id: str
    expected: dict[str, Any] | None
    got: dict[str, Any] | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "operation_id": self.operation_id, "expected": self.expected, "got": self.got,
                "message": self.message}


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayResult:
    """What ``DurableRunner.replay`` found.

    Attributes:
        execution_id: the execution replayed.
        operations: how many operations its history holds.
        reached: how many of them the code reached (those inside an operation replayed from its checkpoint,
            a finished child context, ``map`` or ``parallel``, count as reached with it).
        outcome: how the replay ended: ``END_OF_HISTORY`` (the code would go on past the history),
            ``SUCCEEDED``, ``FAILED`` or ``PENDING`` (the function returned, raised or suspended).
        divergence: the first divergence, None when the code agrees with the history.
    """

    execution_id: str
    operations: int
    reached: int
    outcome: str
    divergence: Divergence | None

    @property
    def ok(self) -> bool:
        """Whether the code agrees with the history."""
        return self.divergence is None

    def to_dict(self) -> dict[str, Any]:
        return {"execution_id": self.execution_id, "ok": self.ok, "operations": self.operations,
                "reached": self.reached, "outcome": self.outcome,
                "divergence": self.divergence.to_dict() if self.divergence else None}


class _ReadOnlyBackend:
    """A checkpoint backend that is never written to (the state stops before)."""

    starts_children = True

    def __init__(self, execution_id: str, now: Callable[[], float]) -> None:
        self.execution_id = execution_id
        self.now = now

    def flush(self, updates: Sequence[OperationUpdate], operations: Sequence[Operation]) -> None:
        raise ReplayStopped("a replay writes nothing")

    def check_invoke(self, function_name: str) -> None:
        """Any function name: the replay never starts it."""


class _ReplayState(ExecutionState):
    """The state of a replay: which operations the code read, and the write it stopped at."""

    def __init__(self, backend: _ReadOnlyBackend, operations: dict[str, Operation]) -> None:
        super().__init__(backend, operations)
        self.seen: set[str] = set()
        self.stopped_at: OperationUpdate | None = None

    def get(self, operation_id: str) -> Operation | None:
        self.seen.add(operation_id)
        return super().get(operation_id)

    def checkpoint(self, update: OperationUpdate, *, sync: bool) -> Operation:
        with self._lock:
            if self.stopped is None:
                self.stopped_at = update
                self.stopped = ReplayStopped(f"the replay reached the end of the history at {update.operation_id}")
            raise self.stopped


def replay(execution_id: str, fn: Callable[[Any, Any], Any], history: Sequence[Operation], input_value: Any,
           ended: bool, now: Callable[[], float]) -> ReplayResult:
    """Replay ``history`` (ordered by start) of an execution on ``input_value`` through ``fn``; ``ended``:
    the execution's code ended it (it succeeded or failed), so the code may ask for nothing past the
    history."""
    ordered = sorted(history, key=lambda o: o.seq)
    # A step the history holds unfinished would run its body next: make it start (a write) instead.
    ops = {o.id: replace(o, status=OperationStatus.READY)
           if o.type is OperationType.STEP and o.status is OperationStatus.STARTED else o for o in ordered}
    state = _ReplayState(_ReadOnlyBackend(execution_id, now), ops)
    try:
        outcome = run_handler(fn, input_value, state).status
    except ReplayStopped:
        outcome = "END_OF_HISTORY"
    position = {o.id: i + 1 for i, o in enumerate(ordered)}
    reached = sum(1 for o in ordered if o.id in state.seen or _inside_replayed(o, ops, state.seen))
    divergence = _mismatch(state, ops, position) or _past_the_end(state, ended, len(ordered))
    if divergence is None and outcome != "END_OF_HISTORY":
        divergence = _unreached(state, ordered, ops, position)
    return ReplayResult(execution_id=execution_id, operations=len(ordered), reached=reached, outcome=outcome,
                        divergence=divergence)


def _mismatch(state: _ReplayState, ops: dict[str, Operation], position: dict[str, int]) -> Divergence | None:
    fatal = state.fatal
    if fatal is None:
        return None
    op = ops.get(fatal.step_id or "")
    expected = _shape(op.type, op.sub_type, op.name) if op is not None else None
    got = _shape(*fatal.got) if fatal.got is not None else None
    return Divergence(index=position.get(fatal.step_id or "", 0), operation_id=fatal.step_id or "", expected=expected,
                      got=got, message=str(fatal))


def _past_the_end(state: _ReplayState, ended: bool, length: int) -> Divergence | None:
    update = state.stopped_at
    if not ended or update is None or update.operation_id in state.operations:
        return None
    got = _shape(update.operation_type, update.sub_type, update.name)
    return Divergence(index=length + 1, operation_id=update.operation_id, expected=None, got=got,
                      message=f"the execution had ended after {length} operations, the code calls "
                              f"{got['type']}/{got['sub_type'] or '-'} {got['name']!r} next")


def _unreached(state: _ReplayState, ordered: Sequence[Operation], ops: dict[str, Operation],
               position: dict[str, int]) -> Divergence | None:
    """The first operation of the history the code never reached, leaving out those inside an operation it
    replayed from its checkpoint (a finished child context, map or parallel)."""
    for op in ordered:
        if op.id in state.seen or _inside_replayed(op, ops, state.seen):
            continue
        shape = _shape(op.type, op.sub_type, op.name)
        return Divergence(index=position[op.id], operation_id=op.id, expected=shape, got=None,
                          message=f"operation #{position[op.id]} {shape['type']}/{shape['sub_type'] or '-'} "
                                  f"{shape['name']!r} of the history was never called")
    return None


def _inside_replayed(op: Operation, ops: dict[str, Operation], seen: set[str]) -> bool:
    parent = op.parent_id
    while parent is not None:
        holder = ops.get(parent)
        if holder is None:
            return False
        if parent in seen and holder.done:
            return True
        parent = holder.parent_id
    return False
