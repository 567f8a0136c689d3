"""What a callback's state and outcome mean, as pure functions: no store, no clock, no I/O.

A callback carries the token of the ``resume_via_tasks`` that scheduled it. Before its handler runs,
:func:`start` reads the operation's row (done? cancellation requested? which resume is current, and is it
held?) into what the callback does; after the handler, :func:`end` reads how it ended into what is recorded.
The engine (``_resume``) carries these out against the store.
"""

from __future__ import annotations

import enum

from errands.core.errors import InfrastructureError, LeaseLostError, TransientError

from ._tokens import ResumeState

__all__ = ["End", "ResumeOutcome", "Start", "busy_retry_after", "end", "pending_resume", "start"]


class ResumeOutcome(str, enum.Enum):
    """What one callback did."""

    RAN = "ran"                    # the handler ran; the operation is still running
    COMPLETED = "completed"        # the operation is done (completed or failed by the handler)
    FAILED = "failed"              # the handler raised; the operation failed with INTERNAL
    CANCELLED = "cancelled"        # cancellation was requested; the operation ended CANCELLED
    ALREADY_DONE = "already_done"  # the operation was done before the callback
    STALE = "stale"                # a newer resume_via_tasks superseded this callback
    LOST = "lost"                  # another writer saved first; its run carries on

    def __str__(self) -> str:
        return self.value


class Start(enum.Enum):
    """What a callback does before (or instead of) running its handler."""

    ALREADY_DONE = "already_done"  # the operation is done: settled, nothing runs
    CANCEL = "cancel"              # a cancellation is pending and nobody runs the operation: end it CANCELLED
    STALE = "stale"                # the token was superseded or spent: settled, nothing runs
    STALE_REPAIR = "stale_repair"  # stale, and the pending resume's task may be missing: create it again
    BUSY = "busy"                  # another callback runs this resume now: come back later
    RUN = "run"                    # run the handler


class End(enum.Enum):
    """What is recorded once the handler returned or raised."""

    COMPLETED = "completed"  # the handler finished the operation (an error it raised after is only logged)
    SPEND = "spend"          # it returned, the operation still running: spend the token, honour a cancellation
    LOST = "lost"            # another writer saved first: that writer's run carries on
    RETRY = "retry"          # it asked to come back, or the store failed: give the resume back and retry
    FAIL = "fail"            # it raised anything else: the operation fails with INTERNAL


def pending_resume(state: ResumeState, resume_path: str | None) -> bool:
    """Whether the operation waits for a callback: a resume was scheduled and its token is not spent."""
    return resume_path is not None and state.token is not None and not state.used


def start(
    *, done: bool, cancel_requested: bool, state: ResumeState, resume_path: str | None, token: str | None,
    now: float, remote: bool,
) -> Start:
    """What a callback carrying ``token`` (None: run whatever is current) does to an operation in ``state``.

    Args:
        done: the operation is done.
        cancel_requested: a client asked to cancel it.
        state: its current resume (``parse_token`` of its ``ResumeToken``).
        resume_path: the handler path of its latest ``resume_via_tasks``.
        token: the token the callback carries.
        now: the store's time, to tell whether a hold on the resume has lapsed.
        remote: resumes are scheduled outside the store (Cloud Tasks), so a task can go missing.
    """
    if done:
        return Start.ALREADY_DONE
    held = state.held(now)
    if token is not None and (token != state.token or state.used):
        if cancel_requested and not held:
            return Start.CANCEL  # a cancellation is never lost to a stale callback
        if remote and not held and pending_resume(state, resume_path):
            return Start.STALE_REPAIR
        return Start.STALE
    if held:
        return Start.BUSY
    if cancel_requested:
        return Start.CANCEL
    return Start.RUN


def busy_retry_after(state: ResumeState, now: float) -> float:
    """Seconds a callback that found the resume held waits before trying again: until the hold lapses,
    at least a second."""
    return max(1.0, state.expires - now)


def end(*, done: bool, error: BaseException | None) -> End:
    """What a handler that ended with ``error`` (None: it returned) on an operation now ``done`` means."""
    if done:
        return End.COMPLETED
    if error is None:
        return End.SPEND
    if isinstance(error, LeaseLostError):
        return End.LOST
    if isinstance(error, (TransientError, InfrastructureError)):
        return End.RETRY
    return End.FAIL
