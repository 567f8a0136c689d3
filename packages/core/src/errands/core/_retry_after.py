"""``Retry-After``: one reading of the header (RFC 9110 §10.2.3) for every connector, sink and engine.

The header is either ``delay-seconds`` or an ``HTTP-date``. The rules, everywhere in errands:

- ``delay-seconds`` is digits; a decimal fraction (``1.5``) and a sign are tolerated, nothing else: ``inf``,
  ``nan``, ``1e3`` and ``0x10`` are unreadable and ignored (the caller's own backoff applies).
- An HTTP-date may take any of the three forms RFC 9110 lists (IMF-fixdate, RFC 850, asctime). A date
  without a zone (asctime carries none) or with ``-0000`` is GMT, as the RFC defines every HTTP-date.
- A negative delay or a date in the past means "retry now": 0.
- Anything longer than :data:`MAX_RETRY_AFTER` (an hour) is capped there, so that a server that answers
  ``Retry-After: 99999999999`` (or a plugin that hands over ``float("inf")``) cannot stall a route or an
  effect for ever.
"""

from __future__ import annotations

import math
import re
import time
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Final

__all__ = ["MAX_RETRY_AFTER", "clamp_retry_after", "parse_retry_after"]

MAX_RETRY_AFTER: Final = 3600.0
"""The longest wait a ``Retry-After`` can impose, in seconds: longer ones are cut to this."""

_DELAY_SECONDS = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")


def _check_maximum(maximum: float) -> float:
    if not isinstance(maximum, (int, float)) or isinstance(maximum, bool) or not 0 <= maximum < math.inf:
        raise ValueError(f"maximum must be a finite number of seconds >= 0, got {maximum!r}")
    return float(maximum)


def clamp_retry_after(seconds: object, *, maximum: float = MAX_RETRY_AFTER) -> float | None:
    """Bound a ``retry_after`` a connector or sink handed over to ``[0, maximum]`` seconds.

    Args:
        seconds: the value (``DispatchResult.retry_after``, ``TransientError.retry_after``...).
        maximum: the cap, :data:`MAX_RETRY_AFTER` by default.

    Returns:
        The delay in seconds; None when ``seconds`` is not a number (None, a bool, a string) or is NaN, so
        that the caller falls back to its own backoff. Negative values become 0, ``inf`` becomes ``maximum``.

    Raises:
        ValueError: ``maximum`` is negative, infinite or NaN.

    Example:
        >>> clamp_retry_after(float("inf"))
        3600.0
        >>> clamp_retry_after(-2)
        0.0
    """
    cap = _check_maximum(maximum)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return None
    value = float(seconds)
    if math.isnan(value):
        return None
    return min(max(value, 0.0), cap)


def parse_retry_after(value: str | bytes | None, *, now: float | None = None,
                      maximum: float = MAX_RETRY_AFTER) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value: delay-seconds or an HTTP-date.

    Args:
        value: the header value (``str`` or raw ``bytes``), or None when the header is absent.
        now: the current UNIX time, for dates (``time.time()`` by default).
        maximum: the cap, :data:`MAX_RETRY_AFTER` (an hour) by default.

    Returns:
        Seconds in ``[0, maximum]``, or None when the header is absent or unreadable (``inf``, ``nan``,
        ``soon``, a date that does not exist).

    Raises:
        ValueError: ``maximum`` is negative, infinite or NaN.

    Example:
        >>> parse_retry_after("120")
        120.0
        >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0)
        10.0
        >>> parse_retry_after("inf") is None
        True
    """
    cap = _check_maximum(maximum)
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if not text:
        return None
    if _DELAY_SECONDS.fullmatch(text):
        # A digit string too long for a float reads as inf: still a valid (absurd) delay, so it is capped.
        return clamp_retry_after(float(text), maximum=cap)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = time.time() if now is None else now
    try:
        delay = when.timestamp() - current
    except (OverflowError, OSError, ValueError):
        return None
    return clamp_retry_after(delay, maximum=cap)
