"""What a callback's state and outcome mean, decided by pure functions: no store, no clock, no handler."""

from __future__ import annotations

import pytest
from errands.core import InfrastructureError, LeaseLostError, TransientError
from errands.lro import OperationDoneError
from errands.lro._resume import ResumeBusyError
from errands.lro._tokens import ResumeState, claimed, parse_token, scheduled, used
from errands.lro._transitions import End, Start, busy_retry_after, end, pending_resume, start

NOW = 1000.0

SCHEDULED = parse_token("t1")
SCHEDULED_REMOTE = parse_token(scheduled("t1", NOW + 30))
HELD = parse_token(claimed("t1", NOW + 5, "c1"))
LAPSED = parse_token(claimed("t1", NOW - 5, "c1"))
SPENT = parse_token(used("t1"))
NEVER = parse_token(None)


def _start(state: ResumeState, token: str | None = "t1", *, done: bool = False, cancel: bool = False,
           path: str | None = "h", remote: bool = False) -> Start:
    return start(done=done, cancel_requested=cancel, state=state, resume_path=path, token=token, now=NOW,
                 remote=remote)


# -- before the handler ----------------------------------------------------------------------------


@pytest.mark.parametrize("state", [SCHEDULED, HELD, SPENT, NEVER])
@pytest.mark.parametrize("token", ["t1", "t0", None])
def test_a_done_operation_is_already_done_whatever_the_callback(state: ResumeState, token: str | None) -> None:
    assert _start(state, token, done=True, cancel=True) is Start.ALREADY_DONE


@pytest.mark.parametrize("state", [SCHEDULED, SCHEDULED_REMOTE, LAPSED])
def test_the_current_token_runs_the_handler(state: ResumeState) -> None:
    assert _start(state) is Start.RUN
    assert _start(state, None) is Start.RUN  # a direct resume runs whatever is current


def test_a_superseded_or_spent_token_is_stale() -> None:
    assert _start(SCHEDULED, "t0") is Start.STALE
    assert _start(SPENT, "t1") is Start.STALE
    assert _start(HELD, "t0") is Start.STALE  # even while the current resume runs


def test_a_stale_callback_of_a_remote_scheduler_repairs_a_pending_resume() -> None:
    # Its task may be missing (creating it failed, and so did undoing the save): the stale callback makes it.
    assert _start(SCHEDULED_REMOTE, "t0", remote=True) is Start.STALE_REPAIR
    assert _start(SCHEDULED_REMOTE, "t0", remote=False) is Start.STALE  # local timers commit with the save
    assert _start(HELD, "t0", remote=True) is Start.STALE  # running: nothing is missing
    assert _start(SPENT, "t1", remote=True) is Start.STALE  # nothing is pending
    assert _start(SCHEDULED_REMOTE, "t0", remote=True, path=None) is Start.STALE


def test_a_held_resume_is_busy_for_its_own_token_until_the_hold_lapses() -> None:
    assert _start(HELD) is Start.BUSY
    assert _start(HELD, None) is Start.BUSY
    assert _start(LAPSED) is Start.RUN  # its holder died: take over
    assert busy_retry_after(HELD, NOW) == 5.0
    assert busy_retry_after(parse_token(claimed("t1", NOW + 0.2, "c1")), NOW) == 1.0  # at least a second


def test_a_requested_cancellation_ends_the_operation_unless_a_callback_runs_it() -> None:
    assert _start(SCHEDULED, cancel=True) is Start.CANCEL
    assert _start(SCHEDULED, "t0", cancel=True) is Start.CANCEL  # never lost to a stale callback
    assert _start(SPENT, "t1", cancel=True) is Start.CANCEL
    assert _start(HELD, cancel=True) is Start.BUSY  # the running handler sees it and its end cancels
    assert _start(HELD, "t0", cancel=True) is Start.STALE


def test_a_pending_resume_is_a_scheduled_unspent_token() -> None:
    assert pending_resume(SCHEDULED, "h") and pending_resume(HELD, "h") and pending_resume(SCHEDULED_REMOTE, "h")
    assert not pending_resume(SPENT, "h")
    assert not pending_resume(NEVER, None)
    assert not pending_resume(SCHEDULED, None)


# -- after the handler -----------------------------------------------------------------------------


@pytest.mark.parametrize("error", [None, ValueError("late"), LeaseLostError("raced"), TransientError("again")])
def test_a_handler_that_finished_its_operation_completed_it(error: BaseException | None) -> None:
    assert end(done=True, error=error) is End.COMPLETED


def test_a_handler_that_returned_with_the_operation_running_spends_its_token() -> None:
    assert end(done=False, error=None) is End.SPEND


@pytest.mark.parametrize("error", [LeaseLostError("another writer"), OperationDoneError("done meanwhile")])
def test_a_handler_that_lost_a_race_leaves_the_operation_to_the_winner(error: BaseException) -> None:
    assert end(done=False, error=error) is End.LOST


@pytest.mark.parametrize("error", [TransientError("later", retry_after=3), ResumeBusyError("busy"),
                                   InfrastructureError("the store failed")])
def test_a_handler_that_asked_to_come_back_or_met_a_store_fault_is_retried(error: BaseException) -> None:
    assert end(done=False, error=error) is End.RETRY


@pytest.mark.parametrize("error", [ValueError("bad input"), KeyError("missing"), RuntimeError()])
def test_any_other_error_of_a_handler_fails_the_operation(error: BaseException) -> None:
    assert end(done=False, error=error) is End.FAIL
