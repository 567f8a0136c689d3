"""The durable engine's decisions on their own, with no store: what an invocation's outcome does to its
execution and queue item, how a child's end settles its parent's operation, when a callback still takes an
answer, which waits take which signals, how soon an abandoned invocation comes back, what a list filter and a
rerun select."""

from __future__ import annotations

import pytest
from errands.core import ConfigError
from errands.durable import ErrorObject, ExecutionStatus, Operation, OperationStatus, OperationType
from errands.durable._context import InvocationOutcome
from errands.durable._errors import InvocationAbandoned
from errands.durable._transitions import (
    ABANDON_BACKOFF,
    Settlement,
    abandon_delay,
    can_settle_callback,
    deliveries,
    find_operation,
    invoke_settlement,
    kept_for_rerun,
    settle,
    statuses,
    takes_signals,
    terminated_error,
    timed_out_error,
)

NOW = 1_700_000_000.0
ERROR = ErrorObject(type="UserError", message="no")


@pytest.mark.parametrize(("outcome", "signalled", "expected"), [
    (InvocationOutcome("SUCCEEDED", result='"ok"'), False, Settlement(ExecutionStatus.SUCCEEDED)),
    (InvocationOutcome("FAILED", error=ERROR), True, Settlement(ExecutionStatus.FAILED)),
    # a timer: due again when it fires
    (InvocationOutcome("PENDING", until=NOW + 30), False, Settlement(ExecutionStatus.PENDING, NOW + 30, 30.0)),
    # a timer already past (the clock moved while the invocation ran): due at once, never in the past
    (InvocationOutcome("PENDING", until=NOW - 5), False, Settlement(ExecutionStatus.PENDING, NOW - 5, 0.0)),
    # waits for a callback or a child: the queue item goes; the signal enqueues it again
    (InvocationOutcome("PENDING"), False, Settlement(ExecutionStatus.PENDING, None, None)),
    # the signal came while the invocation ran: due now, whatever it waited for
    (InvocationOutcome("PENDING"), True, Settlement(ExecutionStatus.PENDING, NOW, 0.0)),
    (InvocationOutcome("PENDING", until=NOW + 30), True, Settlement(ExecutionStatus.PENDING, NOW, 0.0)),
], ids=["succeeded", "failed", "timer", "timer-past", "callback", "signalled", "signalled-timer"])
def test_an_outcome_settles_the_execution_and_its_queue_item(outcome: InvocationOutcome, signalled: bool,
                                                             expected: Settlement) -> None:
    assert settle(outcome, now=NOW, signalled=signalled) == expected


def test_an_abandoned_invocation_settles_nothing() -> None:
    with pytest.raises(ValueError, match="ABANDONED"):
        settle(InvocationOutcome("ABANDONED", abandoned=InvocationAbandoned("locked")), now=NOW, signalled=False)


def test_a_childs_end_settles_its_parents_invoke_operation() -> None:
    assert invoke_settlement(ExecutionStatus.SUCCEEDED, "2", None) == (OperationStatus.SUCCEEDED, "2", None)
    assert invoke_settlement(ExecutionStatus.FAILED, None, ERROR) == (OperationStatus.FAILED, None, ERROR)
    stopped = terminated_error("operator said so")
    assert invoke_settlement(ExecutionStatus.TERMINATED, None, stopped) == (OperationStatus.FAILED, None, stopped)
    status, result, error = invoke_settlement(ExecutionStatus.TERMINATED, "ignored", None)
    assert (status, result) == (OperationStatus.FAILED, None)
    assert error == ErrorObject(type="ExecutionTerminated", message="the invoked execution was terminated")


def test_a_termination_names_its_reason_or_the_operator() -> None:
    assert terminated_error("cleanup") == ErrorObject(type="ExecutionTerminated", message="cleanup")
    assert terminated_error(None).message == "terminated by an operator"


@pytest.mark.parametrize("execution", list(ExecutionStatus))
@pytest.mark.parametrize("operation", list(OperationStatus))
def test_a_callback_takes_answers_only_while_it_waits_in_a_live_execution(operation: OperationStatus,
                                                                          execution: ExecutionStatus) -> None:
    expected = operation is OperationStatus.STARTED and execution in (
        ExecutionStatus.ENQUEUED, ExecutionStatus.RUNNING, ExecutionStatus.PENDING, ExecutionStatus.SUSPENDED)
    assert can_settle_callback(operation, execution) is expected


def test_an_abandoned_invocation_comes_back_soon_then_later_never_beyond_a_lease() -> None:
    for failures in range(12):
        ceiling = min(ABANDON_BACKOFF * 2 ** failures, 10.0)
        for _ in range(20):
            assert ceiling / 2 <= abandon_delay(failures, lease_for=10.0) <= ceiling
    assert abandon_delay(10_000, lease_for=0.5) <= 0.5


def test_the_list_filter_takes_statuses_by_name_in_any_case() -> None:
    assert statuses(None) is None
    assert statuses("pending") == ["PENDING"]
    assert statuses(ExecutionStatus.FAILED) == ["FAILED"]
    assert statuses(["running", ExecutionStatus.SUCCEEDED]) == ["RUNNING", "SUCCEEDED"]
    with pytest.raises(ConfigError, match="unknown execution status 'DONE'") as err:
        statuses(["RUNNING", "DONE"])
    assert err.value.field == "status"


def _op(id_: str, seq: int, status: OperationStatus = OperationStatus.SUCCEEDED, *, name: str | None = None,
        parent: str | None = None, type_: OperationType = OperationType.STEP) -> Operation:
    return Operation(id=id_, type=type_, status=status, parent_id=parent, name=name or id_, seq=seq)


def test_a_rerun_keeps_what_finished_before_its_operation_except_what_encloses_it() -> None:
    ops = [
        _op("a", 1),
        _op("ctx", 2, type_=OperationType.CONTEXT),  # finished, but the target runs inside it
        _op("in-ctx", 3, parent="ctx"),
        _op("b", 4, name="same"),
        _op("waiting", 5, OperationStatus.STARTED),
        _op("c", 6, name="same"),
        _op("after", 7),
    ]
    target = find_operation(ops, "c")
    assert target is not None and target.id == "c"
    assert find_operation(ops, "same") == ops[3]  # by name, the first one
    assert find_operation(ops, "nothing") is None
    assert [o.id for o in kept_for_rerun(ops, target)] == ["a", "ctx", "in-ctx", "b"]
    deep = _op("deep", 4, OperationStatus.STARTED, parent="inner")
    nested = [ops[0], ops[1], _op("inner", 3, parent="ctx", type_=OperationType.CONTEXT), deep]
    assert [o.id for o in kept_for_rerun(nested, deep)] == ["a"]  # both enclosing contexts run again


def test_waits_take_kept_signals_oldest_first_and_the_rest_is_left() -> None:
    assert deliveries(["w1", "w2"], [(3, "a"), (5, "b"), (9, "c")]) == [("w1", 3, "a"), ("w2", 5, "b")]
    assert deliveries(["w1", "w2"], [(4, None)]) == [("w1", 4, None)]
    assert deliveries([], [(1, "a")]) == [] and deliveries(["w1"], []) == []


@pytest.mark.parametrize("status", list(ExecutionStatus))
def test_only_an_execution_that_may_still_run_takes_signals(status: ExecutionStatus) -> None:
    assert takes_signals(status) is (not status.terminal)


def test_continue_as_new_keeps_the_execution_running_and_due_at_once() -> None:
    settled = settle(InvocationOutcome("CONTINUED", result='{"n":2}'), now=NOW, signalled=False)
    assert settled == Settlement(ExecutionStatus.RUNNING, wake_at=None, release_in=0.0)
    assert not settled.status.terminal


def test_a_timed_out_child_fails_its_parents_invoke_with_the_deadline_error() -> None:
    error = timed_out_error("parent-1")
    assert error.type == "ExecutionTimedOut" and "parent-1" in (error.message or "")
    assert ExecutionStatus.TIMED_OUT.terminal
    assert invoke_settlement(ExecutionStatus.TIMED_OUT, None, error) == (OperationStatus.FAILED, None, error)
    assert statuses("timed_out") == ["TIMED_OUT"]
