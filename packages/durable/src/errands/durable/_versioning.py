"""``ctx.patched(change_id)``: deploying a change to a durable function's operations without breaking the
executions in flight (Temporal's ``workflow.patched``).

An execution that reaches ``patched`` on new code checkpoints a marker (a STEP operation of subtype
``Patch`` named after the change) where it calls it and takes the new path; its replays find the marker and
agree. An execution whose history passed that point before the deploy holds another operation there: it
takes the old path, and the marker's slot is not used, so its history still lines up.

Once no execution on the old path remains, the old branch goes and ``ctx.deprecate_patch(change_id)``
stands where ``patched`` was: it steps over the marker in histories that have one and writes none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from errands.core import ConfigError

from ._errors import InvalidStateError
from ._values import OperationAction, OperationSubType, OperationType, OperationUpdate

if TYPE_CHECKING:
    from ._context import _ContextCore


def is_marker(type_: OperationType, sub_type: OperationSubType | None, name: str | None, change_id: str) -> bool:
    """Whether an operation is the marker of ``change_id``."""
    return type_ is OperationType.STEP and sub_type is OperationSubType.PATCH and name == change_id


def patched(ctx: _ContextCore, change_id: str, *, record: bool = True) -> bool:
    """See ``DurableContext.patched``; without ``record`` (``deprecate_patch``), a marker found is stepped
    over and none is written."""
    from ._context import operation_id

    if not isinstance(change_id, str) or not change_id:
        raise ConfigError(f"patched needs a change id, got {change_id!r}", field="change_id", value=change_id)
    state = ctx._state
    with ctx._lock:
        if ctx._inside:
            raise InvalidStateError(f"the context {ctx._parent_id or '(root)'} was used inside one of its child "
                                    "contexts; a child context function must use the context it is given")
        op_id = operation_id(ctx._parent_id, ctx._counter + 1)
        op = state.get(op_id)
        if op is not None and not is_marker(op.type, op.sub_type, op.name, change_id):
            return False  # the history went on without the change here: the old path
        if op is None and not record:
            return True
        ctx._counter += 1
    if op is None:
        state.checkpoint(OperationUpdate(operation_id=op_id, operation_type=OperationType.STEP,
                                         action=OperationAction.SUCCEED, parent_id=ctx._parent_id, name=change_id,
                                         sub_type=OperationSubType.PATCH), sync=False)
    return True
