"""The one retry delay every engine uses: exponential, capped, with equal jitter; a ``Retry-After`` the
other side gave is its word and wins (bounded by ``clamp_retry_after``)."""

from __future__ import annotations

import random
from typing import Protocol

from ._retry_after import clamp_retry_after


class _Random(Protocol):
    def random(self) -> float: ...


def backoff(attempt: int, *, base: float, cap: float, retry_after: float | None = None,
            rng: _Random | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` >= 1 failures so far).

    ``base * 2 ** (attempt - 1)`` capped at ``cap``, then drawn uniformly from its upper half (so
    retries of a burst spread out but never come sooner than half the delay). A ``retry_after`` the
    remote gave (0 included: "now") is the delay, bounded like a header so ``inf`` cannot park work for
    ever; NaN or a negative number counts as none.
    """
    bounded = clamp_retry_after(retry_after)
    if bounded is not None:
        return float(bounded)
    delay = min(cap, base * (2.0 ** min(max(0, attempt - 1), 62)))
    return float(delay * (0.5 + 0.5 * (rng or random).random()))
