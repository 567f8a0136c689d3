"""Cron schedules of durable functions: ``DurableRunner.schedule``.

A schedule is a row of ``durable_schedules`` with its next tick. At each due tick one worker moves the
schedule on and starts the tick's execution in the same transaction, under an id derived from the schedule
and the tick (``<name>@<tick in ISO 8601, UTC>``), so a tick runs once however many workers see it due:
the schedule's move is conditional on the tick it saw, and the id is the execution's primary key. Ticks
missed while no worker ran start once, as the latest of them (as the task engine's schedules do). Cron
expressions are parsed by core's one parser (``errands.core.runtime.check_cron``).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, Callable

from errands.core import ConfigError
from errands.core.runtime import check_cron, error_text, is_infrastructure_error, last_tick, next_tick
from errands.core.store import SQLStore, dumps

from . import _executions as executions
from . import _schema as schema
from ._registry import Registry

log = logging.getLogger("errands.durable")

#: Seconds of the store's clock between two looks for due ticks (a schedule's finest grain is a second).
CHECK_EVERY = 1.0


def tick_execution_id(name: str, tick: float) -> str:
    """The id of the execution schedule ``name`` starts at ``tick`` (epoch seconds): the same in every worker.

    >>> tick_execution_id("nightly", 0.0)
    'nightly@1970-01-01T00:00:00+00:00'
    """
    return f"{name}@{datetime.fromtimestamp(tick, tz=timezone.utc).isoformat()}"


def _failure(check: Callable[[], object]) -> ConfigError | None:
    try:
        check()
    except ConfigError as exc:
        return exc
    return None


class Schedules:
    """The schedules of one runner's store, fired by its worker for the functions it has registered."""

    def __init__(self, store: SQLStore, registry: Registry) -> None:
        self.store = store
        self.registry = registry
        self._next_check = float("-inf")

    def put(self, name: Any, function: str, cron: Any, input: Any) -> None:
        """Create or change the schedule ``name`` (an unchanged one keeps its next tick)."""
        bad_name = not isinstance(name, str) or not name.strip() or "/" in name or "@" in name
        problems = [p for p in (
            ConfigError(f"schedule name must be a non-empty string without '/' or '@', got {name!r}", field="name",
                        value=name) if bad_name else None,
            _failure(lambda: self.registry.check(function)), _failure(lambda: check_cron(cron))) if p is not None]
        if problems:
            raise ConfigError.collect(problems, f"schedule {name!r}")
        text = dumps(input, field="input")
        now = self.store.clock.now()
        with self.store.transaction() as tx:
            schema.put_schedule(tx, name, function, cron, text, next_tick(cron, now), now)
        self._next_check = float("-inf")

    def remove(self, name: str) -> bool:
        with self.store.transaction() as tx:
            return schema.remove_schedule(tx, name)

    def fire(self) -> int:
        """Start the execution of every due tick of the schedules whose function this runner has. How many
        were started here (a tick another worker started first is not counted). A store fault starts nothing
        this round."""
        now = self.store.clock.now()
        if now < self._next_check:
            return 0
        self._next_check = now + CHECK_EVERY
        try:
            return self._fire(now)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.warning("firing durable schedules failed (%s); trying again next round", error_text(exc))
            return 0

    def _fire(self, now: float) -> int:
        started = 0
        with self.store.read() as tx:
            due = schema.due_schedules(tx, now)
        for name, function, cron, input_text, was in due:
            try:
                self.registry.check(function)
            except ConfigError:
                continue  # another worker's function
            try:
                tick = max(was, last_tick(cron, now))
                following = next_tick(cron, tick)
            except ConfigError:
                log.error("schedule %r: its cron expression %r is not valid here; it does not run", name, cron)
                continue
            with self.store.transaction() as tx:
                if schema.advance_schedule(tx, name, was, tick, following, now):
                    started += executions.create(self.store, tx, tick_execution_id(name, tick), function,
                                                 input_text, now)
        return started
