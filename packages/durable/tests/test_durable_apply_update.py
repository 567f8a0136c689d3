"""``apply_update``'s ends of an operation keep every other field as ``dataclasses.replace`` would."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from errands.durable._values import (
    ErrorObject,
    Operation,
    OperationAction,
    OperationStatus,
    OperationSubType,
    OperationType,
    OperationUpdate,
    apply_update,
)


def _every_field_set() -> Operation:
    """An operation with a distinct value in every field (a field added to ``Operation`` gets one too)."""
    values: dict[str, Any] = {"id": "op", "type": OperationType.STEP, "status": OperationStatus.STARTED,
                              "sub_type": OperationSubType.STEP, "error": ErrorObject("E", "old")}
    for i, f in enumerate(dataclasses.fields(Operation)):
        if f.name not in values:
            values[f.name] = i + 0.5 if "time" in f.name or f.name == "heartbeat_timeout" else (
                i if f.type in ("int", int) else f"{f.name}-{i}")
    return Operation(**values)


@pytest.mark.parametrize("action", [OperationAction.SUCCEED, OperationAction.FAIL])
def test_an_end_changes_only_what_it_settles(action: OperationAction) -> None:
    op = _every_field_set()
    error = ErrorObject("ValueError", "bad")
    update = OperationUpdate(operation_id="op", operation_type=OperationType.STEP, action=action,
                             payload="7" if action is OperationAction.SUCCEED else None,
                             error=error if action is OperationAction.FAIL else None)
    got = apply_update(op, update, 99.0)
    if action is OperationAction.SUCCEED:
        want = dataclasses.replace(op, status=OperationStatus.SUCCEEDED, result="7", error=None, end_timestamp=99.0,
                                   next_attempt_timestamp=None)
    else:
        want = dataclasses.replace(op, status=OperationStatus.FAILED, error=error, end_timestamp=99.0,
                                   next_attempt_timestamp=None)
    assert got == want
