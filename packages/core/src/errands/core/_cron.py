"""Cron expressions (UTC, through ``croniter``): the one parser of periodic work, for the task engine's
schedules and durable's."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .errors import ConfigError


def check_cron(expression: Any) -> Any:
    """``croniter``'s iterator class after checking ``expression`` (five fields, or six with seconds).

    Raises:
        ConfigError: not a cron expression (the field ``cron``).
    """
    from croniter import croniter

    if not isinstance(expression, str) or not croniter.is_valid(expression):
        raise ConfigError(f"cron must be a cron expression such as '*/5 * * * *' (minute hour day month weekday), "
                          f"got {expression!r}", field="cron", value=expression)
    return croniter


def next_tick(expression: str, after: float) -> float:
    """The first tick of ``expression`` (UTC) strictly after ``after`` (epoch seconds)."""
    croniter = check_cron(expression)
    return float(croniter(expression, datetime.fromtimestamp(after, tz=timezone.utc)).get_next(float))


def last_tick(expression: str, at: float) -> float:
    """The latest tick of ``expression`` (UTC) at or before ``at`` (epoch seconds)."""
    croniter = check_cron(expression)
    prev = float(croniter(expression, datetime.fromtimestamp(at, tz=timezone.utc)).get_prev(float))
    nxt = next_tick(expression, prev)
    return nxt if nxt <= at else prev
