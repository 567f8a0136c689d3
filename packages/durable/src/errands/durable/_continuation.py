"""Executions that go on past their own history: ``ctx.start_child`` (a child execution nothing waits for)
and ``ctx.continue_as_new`` (the same execution id, a fresh history on a new input; Temporal keeps the
workflow id and starts a new run, so does errands: the execution's ``runs`` counts them)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from errands.core import ConfigError
from errands.core.store import SQLStore, Tx, dumps

from . import _executions as executions
from . import _schema as schema
from ._values import OperationAction, OperationSubType, OperationType, OperationUpdate

if TYPE_CHECKING:
    from ._context import OperationLogic, _ContextCore


def start_child_op(ctx: _ContextCore, function: str, input: Any, name: str | None) -> tuple[str, OperationLogic]:
    """The operation of ``ctx.start_child``: a STEP of subtype ``StartChild`` whose START creates the child
    (in the checkpoint's transaction) and whose result is the child's id."""
    from ._context import _check_name, _immediate

    if not isinstance(function, str) or not function:
        raise ConfigError(f"start_child needs a function name, got {function!r}", field="function", value=function)
    text = dumps(input, field="input")
    op_id, op = ctx._next(OperationType.STEP, OperationSubType.START_CHILD, _check_name(name) or function)
    state = ctx._state

    def start() -> str:
        if op is not None and op.result is not None:
            child: str = json.loads(op.result)
            return child
        if not getattr(state.backend, "starts_children", False):
            raise ConfigError("start_child needs a DurableRunner (the Lambda API has no such operation)",
                              field="function", value=function)
        state.backend.check_invoke(function)
        child = f"{state.execution_id}/{op_id}"
        common: dict[str, Any] = {"operation_id": op_id, "operation_type": OperationType.STEP,
                                  "parent_id": ctx._parent_id, "name": _check_name(name) or function,
                                  "sub_type": OperationSubType.START_CHILD}
        if op is None:
            state.checkpoint(OperationUpdate(action=OperationAction.START, payload=text, function_name=function,
                                             child_execution_id=child, **common), sync=False)
        state.checkpoint(OperationUpdate(action=OperationAction.SUCCEED, payload=json.dumps(child), **common),
                         sync=True)
        return child

    return op_id, _immediate(start)


def continue_run(store: SQLStore, tx: Tx, execution_id: str, input_text: str | None, now: float) -> None:
    """Start the execution's next run in the invocation's last transaction: its history cleared, the new
    input in place, a ``durable.execution.continued`` event."""
    run = schema.continue_execution(tx, execution_id, input_text, now)
    executions.journal(store, tx, execution_id, "durable.execution.continued", {"execution_id": execution_id, "run": run})
