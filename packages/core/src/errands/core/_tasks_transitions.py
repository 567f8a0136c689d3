"""What happens to a task when an attempt ends, as pure functions of the attempt, its outcome and the time.

The engine (``_tasks``) runs the handler and writes the transition through ``_tasks_table``; the rules
themselves (succeeded, retried after ``backoff``, parked in the dead-letter list, failed, cancelled, timed
out, released at shutdown, or nothing at all when the lease was lost) live here, with no store, so that each
is tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ._backoff import backoff
from ._values import _StrEnum
from .errors import ConfigError, PermanentError, TransientError, error_text


class TaskStatus(_StrEnum):
    """Where a task is in its life."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    DEAD = "DEAD"
    CANCELLED = "CANCELLED"


FINAL = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.DEAD, TaskStatus.CANCELLED)

#: Why a running handler was asked to stop (``TaskContext.cancel_reason``): ``TaskEngine.cancel``, its type's
#: ``time_limit``, or the engine shutting down (SIGTERM to the worker).
CANCEL, TIME_LIMIT, SHUTDOWN = "cancelled", "time_limit", "shutdown"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one task type retries.

    Args:
        retry_max: retries after a failure (``PermanentError`` and ``ConfigError`` are not retried).
        dlq_after: park the task (``DEAD``) after this many failed attempts, or once its retries run out;
            None ends such tasks ``FAILED``.
        base: the first retry delay in seconds, doubling each attempt (with jitter).
        cap: the longest retry delay.
    """

    retry_max: int
    dlq_after: int | None
    base: float
    cap: float


@dataclass(frozen=True, slots=True)
class Transition:
    """What an ended attempt writes on its task, fenced by the attempt's token.

    ``columns`` are the task's columns that change (``status`` first), with their new values; ``error``
    and ``delay`` (seconds until a retry) say why, for the engine's log.
    """

    status: TaskStatus
    columns: Mapping[str, Any]
    error: str | None = None
    delay: float | None = None


def succeeded(result: str, now: float) -> Transition:
    """The handler returned ``result`` (its JSON text): the task is done, any earlier error cleared."""
    status = TaskStatus.SUCCEEDED
    return Transition(status, {"status": str(status), "result": result, "error": None, "finished_at": now})


def failed(exc: Exception, attempt: int, policy: RetryPolicy, now: float) -> Transition:
    """Attempt ``attempt`` (1 for the first) raised ``exc``.

    A ``PermanentError`` or ``ConfigError``, or a failure with no retries left, ends the task: ``DEAD`` when
    the type parks failures (``dlq_after``), ``FAILED`` otherwise. Any other failure queues the task again
    after ``backoff``; a handler's ``TransientError.retry_after`` is its word, bounded like a ``Retry-After``
    header so that ``inf`` or ``1e12`` cannot park the task for ever.
    """
    error = error_text(exc)
    permanent = isinstance(exc, (PermanentError, ConfigError))
    out_of_tries = attempt > policy.retry_max or (policy.dlq_after is not None and attempt >= policy.dlq_after)
    if permanent or out_of_tries:
        status = TaskStatus.DEAD if policy.dlq_after is not None else TaskStatus.FAILED
        return Transition(status, {"status": str(status), "error": error, "finished_at": now}, error)
    retry_after = exc.retry_after if isinstance(exc, TransientError) else None
    delay = backoff(attempt, base=policy.base, cap=policy.cap, retry_after=retry_after)
    status = TaskStatus.PENDING
    return Transition(status, {"status": str(status), "error": error, "available_at": now + delay}, error, delay)


def cancelled(now: float, result: str | None = None) -> Transition:
    """``TaskEngine.cancel`` asked the task to stop: it ends ``CANCELLED`` (a pending one at once, a running
    one when its handler yields), keeping whatever the handler returned."""
    status = TaskStatus.CANCELLED
    return Transition(status, {"status": str(status), "result": result, "error": "cancelled", "finished_at": now},
                      "cancelled")


def timed_out(time_limit: float, attempt: int, policy: RetryPolicy, now: float) -> Transition:
    """Attempt ``attempt`` ran past its type's ``time_limit`` (seconds): it fails at the limit, retried (or
    ended) by the type's retry policy like any failure."""
    return failed(TimeoutError(f"the task ran past its time limit of {time_limit:g}s"), attempt, policy, now)


def released(attempt: int, now: float) -> Transition:
    """The engine shut down while attempt ``attempt`` ran and the handler stopped (raised): the task is due
    again at once for another worker, the attempt not counted."""
    status = TaskStatus.PENDING
    return Transition(status, {"status": str(status), "attempts": max(0, attempt - 1), "available_at": now},
                      "released at shutdown", 0.0)


def settle(outcome: str | Exception, attempt: int, policy: RetryPolicy, now: float, *,
           lease_lost: bool, stopped: str | None = None) -> Transition | None:
    """The transition of an attempt whose handler returned ``outcome`` (the result's JSON text) or raised it.

    None when the lease was lost while the handler ran: another worker may run the task now, so this run
    writes nothing (its ``LeaseLostError`` included); None too when the handler was stopped by its time limit
    (``stopped == TIME_LIMIT``), whose failed attempt was written at the limit. A cancelled task
    (``stopped == CANCEL``) ends ``CANCELLED`` whatever the handler did; at shutdown (``stopped == SHUTDOWN``)
    a handler that raised is released for another worker, one that returned has succeeded.
    """
    if lease_lost or stopped == TIME_LIMIT:
        return None
    if stopped == CANCEL:
        return cancelled(now, None if isinstance(outcome, Exception) else outcome)
    if isinstance(outcome, Exception):
        if stopped == SHUTDOWN:
            return released(attempt, now)
        return failed(outcome, attempt, policy, now)
    return succeeded(outcome, now)
