"""Timeouts: a step attempt bounded by ``StepConfig(timeout=...)``, and an execution ended ``TIMED_OUT`` at
the deadline ``start(timeout=...)`` gave it.

A deadline is an item of core's queue (``schema.DEADLINES``) due at the deadline; any worker's
``work_once`` (or a ``wait`` on the execution) claims it and ends the execution and the executions it
started, in one transaction, whether or not a worker still holds the execution: the end bumps the run
token, so an invocation in flight is fenced out at its next checkpoint and writes nothing more.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from datetime import timedelta
from typing import Any, Callable, Sequence

from errands.core import ConfigError, Lease
from errands.core.runtime import error_text, is_infrastructure_error
from errands.core.store import SQLStore

from . import _management as management
from . import _schema as schema
from ._errors import StepTimeoutError
from ._transitions import timed_out_error
from ._values import Duration, ExecutionStatus, to_seconds

log = logging.getLogger("errands.durable")


def check_timeout(timeout: Duration | timedelta | float | None, field: str = "timeout") -> float | None:
    """``timeout`` in seconds (None: none).

    Raises:
        ConfigError: not a positive duration.
    """
    if timeout is None:
        return None
    seconds = to_seconds(timeout, field=field)
    if seconds <= 0:
        raise ConfigError(f"{field} must be a positive duration, got {timeout!r}", field=field, value=timeout)
    return seconds


# -- steps ----------------------------------------------------------------------------------------
def bounded(fn: Callable[[Any], Any], timeout: Duration | timedelta | float, is_async: bool,
            what: str) -> Callable[[Any], Any]:
    """``fn`` failing with ``StepTimeoutError`` once an attempt takes longer than ``timeout``: an ``async``
    one is cancelled; a sync one runs on a daemon thread, which cannot be stopped, and its late result is
    ignored."""
    seconds = check_timeout(timeout)
    assert seconds is not None

    def timed_out() -> StepTimeoutError:
        return StepTimeoutError(f"{what} took longer than its timeout of {seconds:g}s")

    if is_async:
        async def run_async(step: Any) -> Any:
            try:
                return await asyncio.wait_for(fn(step), seconds)
            except asyncio.TimeoutError:
                raise timed_out() from None

        return run_async

    def run(step: Any) -> Any:
        done = threading.Event()
        box: dict[str, Any] = {}

        def attempt() -> None:
            try:
                box["value"] = fn(step)
            except BaseException as exc:  # handed to the step, as if raised in its own thread
                box["error"] = exc
            finally:
                done.set()

        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(attempt,), name=f"errands-durable {what}", daemon=True).start()
        if not done.wait(seconds):
            raise timed_out()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return run


# -- executions -----------------------------------------------------------------------------------
def expire_due(store: SQLStore, limit: int, *, lease_for: float) -> int:
    """End every execution whose deadline has passed (up to ``limit``). How many deadlines were claimed."""
    return _expire(store, lambda: store.claim(schema.DEADLINES, limit, lease_for=lease_for))


def expire_keys(store: SQLStore, keys: Sequence[str], *, lease_for: float) -> int:
    """``expire_due`` for the executions ``keys`` only."""
    if not keys:
        return 0
    return _expire(store, lambda: store.claim_keys(schema.DEADLINES, keys, lease_for=lease_for))


def _expire(store: SQLStore, claim: Callable[[], list[Lease]]) -> int:
    """A store fault leaves the deadline to lapse and be claimed again; it never times nothing out twice."""
    try:
        leases = claim()
    except Exception as exc:
        if not is_infrastructure_error(exc):
            raise
        log.warning("claiming execution deadlines failed (%s); trying again next round", error_text(exc))
        return 0
    for lease in leases:
        try:
            with store.transaction() as tx:
                if schema.execution_status(tx, lease.key) is not None:
                    management.end_tree(store, tx, lease.key, ExecutionStatus.TIMED_OUT, timed_out_error(lease.key))
                store.complete([lease], tx=tx)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.warning("timing out execution %s failed (%s); its deadline is claimed again", lease.key,
                        error_text(exc))
    return len(leases)
