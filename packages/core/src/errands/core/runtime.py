"""The mechanisms every engine shares, one of each: calling user code (``CallRunner``, ``run_sync``),
cron ticks (``check_cron``, ``next_tick``, ``last_tick``), retry delays (``backoff``, ``parse_retry_after``,
``clamp_retry_after``), retrying the store through infrastructure faults (``retry_infrastructure``,
``is_infrastructure_error``), renewing leases while user code runs (``heartbeat``, ``LeaseBatch``), waking the
workers of this process on new work (``notify_work``, after the commit; ``Tx.notify`` in the transaction wakes
those of other processes on PostgreSQL) and recording caught errors (``error_text``).

Engine packages (lro, durable) and plugins use these, not copies of their own.
"""

from __future__ import annotations

from ._backoff import backoff
from ._cron import check_cron, last_tick, next_tick
from ._leases import DEFAULT_LEASE_FOR, Beat, LeaseBatch, heartbeat, is_infrastructure_error
from ._retry_after import MAX_RETRY_AFTER, clamp_retry_after, parse_retry_after
from ._runtime import CallRunner, drain, run_sync
from ._wake import notify as notify_work
from ._worker import RETRY_DELAYS, retry_infrastructure
from .errors import error_text

__all__ = [
    "DEFAULT_LEASE_FOR",
    "MAX_RETRY_AFTER",
    "RETRY_DELAYS",
    "Beat",
    "CallRunner",
    "LeaseBatch",
    "backoff",
    "check_cron",
    "clamp_retry_after",
    "drain",
    "error_text",
    "heartbeat",
    "is_infrastructure_error",
    "last_tick",
    "next_tick",
    "notify_work",
    "parse_retry_after",
    "retry_infrastructure",
    "run_sync",
]
