"""Header rules: which header values are secrets, how to redact them, and ``Retry-After`` parsing."""

from __future__ import annotations

import re
import time
from email.utils import parsedate_to_datetime
from typing import Iterable, Mapping

REDACTED = "***"

# Headers the connector sets itself; their values identify an effect and are never secrets, even
# though ``Idempotency-Key`` ends in ``-Key``.
PROTOCOL_HEADERS = ("Idempotency-Key", "Errands-Business-Key", "Errands-Run-Id", "Errands-Attempt")
_PROTOCOL_LOWER = frozenset(h.lower() for h in PROTOCOL_HEADERS)

_SECRET_NAMES = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "apikey", "api-key"})
_SECRET_SUFFIXES = ("-token", "-key", "-secret", "-signature", "-password", "-auth", "-credentials")
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/=\-]{6,}")


def is_secret_header(name: str) -> bool:
    """Whether a header named ``name`` carries a secret (``Authorization``, cookies, ``*-Token``, ``*-Key``).

    The connector's own protocol headers (``Idempotency-Key``, ``Errands-Business-Key``) are not secrets.
    """
    lower = name.strip().lower()
    if lower in _PROTOCOL_LOWER:
        return False
    return lower in _SECRET_NAMES or lower.endswith(_SECRET_SUFFIXES)


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``headers`` with every secret value replaced by ``***``."""
    return {k: (REDACTED if is_secret_header(k) else v) for k, v in headers.items()}


def secret_fragments(headers: Mapping[str, str]) -> tuple[str, ...]:
    """The strings that must never appear in a log line or error: each secret value and its token parts.

    ``Authorization: Bearer abc123`` yields both ``Bearer abc123`` and ``abc123``, so a server that echoes
    only the token is scrubbed too. Longest first, so a value is replaced before its parts.
    """
    found: set[str] = set()
    for name, value in headers.items():
        if not is_secret_header(name) or not value:
            continue
        found.add(value)
        found.update(m.group(0) for m in _TOKEN_RE.finditer(value) if m.group(0).lower() not in ("bearer", "basic"))
    return tuple(sorted((f for f in found if len(f) >= 4), key=len, reverse=True))


def scrub(text: str, fragments: Iterable[str]) -> str:
    """``text`` with every secret fragment replaced by ``***``."""
    for fragment in fragments:
        if fragment in text:
            text = text.replace(fragment, REDACTED)
    return text


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP-date.

    Args:
        value: the header value, or None.
        now: the current UNIX time (``time.time()`` by default).

    Returns:
        Seconds (never negative), or None when the header is absent or unreadable.

    Example:
        >>> parse_retry_after("120")
        120.0
        >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0)
        10.0
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds != seconds or seconds in (float("inf"), float("-inf")):
            return None
        return max(0.0, seconds)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
