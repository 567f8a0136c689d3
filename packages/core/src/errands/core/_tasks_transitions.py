"""What happens to a task when an attempt ends, as pure functions of the attempt, its outcome and the time.

The engine (``_tasks``) runs the handler and writes the transition through ``_tasks_table``; the rules
themselves (succeeded, retried after ``backoff``, parked in the dead-letter list, failed, or nothing at
all when the lease was lost) live here, with no store, so that each is tested on its own.
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


FINAL = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.DEAD)


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


def settle(outcome: str | Exception, attempt: int, policy: RetryPolicy, now: float, *,
           lease_lost: bool) -> Transition | None:
    """The transition of an attempt whose handler returned ``outcome`` (the result's JSON text) or raised it.

    None when the lease was lost while the handler ran: another worker may run the task now, so this run
    writes nothing (its ``LeaseLostError`` included).
    """
    if lease_lost:
        return None
    if isinstance(outcome, Exception):
        return failed(outcome, attempt, policy, now)
    return succeeded(outcome, now)
