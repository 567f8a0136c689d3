"""What an attempt's outcome does to a task, checked on the pure transitions alone: no store, no engine."""

from __future__ import annotations

import math

import pytest
from errands.core import MAX_RETRY_AFTER, ConfigError, LeaseLostError, PermanentError, TransientError
from errands.core._tasks_transitions import RetryPolicy, TaskStatus, Transition, failed, settle, succeeded

NOW = 1_000.0
POLICY = RetryPolicy(retry_max=3, dlq_after=None, base=1.0, cap=300.0)
PARKING = RetryPolicy(retry_max=10, dlq_after=2, base=1.0, cap=300.0)


def test_a_result_ends_the_task_succeeded_and_clears_the_last_error() -> None:
    t = succeeded('{"n":42}', NOW)
    assert t == Transition(TaskStatus.SUCCEEDED, {"status": "SUCCEEDED", "result": '{"n":42}', "error": None,
                                                  "finished_at": NOW})
    assert list(t.columns) == ["status", "result", "error", "finished_at"]  # written in this order


def test_a_failure_with_retries_left_queues_the_task_after_backoff() -> None:
    t = failed(ValueError("boom"), 1, POLICY, NOW)
    assert t.status is TaskStatus.PENDING and t.error == "ValueError: boom"
    assert t.delay is not None and 0.5 <= t.delay <= 1.0  # base 1 s, equal jitter: its upper half
    assert t.columns == {"status": "PENDING", "error": "ValueError: boom", "available_at": NOW + t.delay}
    later = failed(ValueError("boom"), 3, POLICY, NOW)
    assert later.delay is not None and 2.0 <= later.delay <= 4.0  # doubling per attempt


def test_the_retry_delay_is_capped() -> None:
    t = failed(RuntimeError(), 3, RetryPolicy(retry_max=5, dlq_after=None, base=10.0, cap=15.0), NOW)
    assert t.delay is not None and 7.5 <= t.delay <= 15.0 and t.error == "RuntimeError"


def test_a_transient_errors_retry_after_is_the_delay_bounded_like_a_header() -> None:
    assert failed(TransientError("429", retry_after=7), 1, POLICY, NOW).delay == 7.0
    assert failed(TransientError("now", retry_after=0), 1, POLICY, NOW).delay == 0.0
    assert failed(TransientError("inf", retry_after=math.inf), 1, POLICY, NOW).delay == MAX_RETRY_AFTER
    nan = failed(TransientError("nan", retry_after=math.nan), 1, POLICY, NOW).delay
    assert nan is not None and 0.5 <= nan <= 1.0  # no usable number: the backoff


def test_running_out_of_retries_fails_the_task() -> None:
    assert failed(ValueError("x"), 3, POLICY, NOW).status is TaskStatus.PENDING
    t = failed(ValueError("x"), 4, POLICY, NOW)
    assert t == Transition(TaskStatus.FAILED, {"status": "FAILED", "error": "ValueError: x", "finished_at": NOW},
                           "ValueError: x")


@pytest.mark.parametrize("exc", [PermanentError("refused"), ConfigError("bad params")])
def test_permanent_and_config_errors_are_never_retried(exc: Exception) -> None:
    assert failed(exc, 1, POLICY, NOW).status is TaskStatus.FAILED
    assert failed(exc, 1, PARKING, NOW).status is TaskStatus.DEAD


def test_a_type_with_dlq_after_parks_the_task_dead_after_that_many_attempts() -> None:
    assert failed(ValueError(), 1, PARKING, NOW).status is TaskStatus.PENDING
    t = failed(ValueError(), 2, PARKING, NOW)
    assert t.status is TaskStatus.DEAD and t.columns == {"status": "DEAD", "error": "ValueError", "finished_at": NOW}
    # Retries running out first park it too.
    assert failed(ValueError(), 2, RetryPolicy(retry_max=1, dlq_after=5, base=1, cap=1), NOW).status is TaskStatus.DEAD


def test_settle_records_the_outcome_unless_the_lease_was_lost() -> None:
    assert settle('"ok"', 1, POLICY, NOW, lease_lost=False) == succeeded('"ok"', NOW)
    assert settle(PermanentError("no"), 1, POLICY, NOW, lease_lost=False) == failed(PermanentError("no"), 1, POLICY,
                                                                                   NOW)
    assert settle('"ok"', 1, POLICY, NOW, lease_lost=True) is None
    assert settle(LeaseLostError("gone"), 1, POLICY, NOW, lease_lost=True) is None
    # A LeaseLostError the handler raised while its lease is still held is its own failure: retried.
    own = settle(LeaseLostError("gone"), 1, POLICY, NOW, lease_lost=False)
    assert own is not None and own.status is TaskStatus.PENDING
