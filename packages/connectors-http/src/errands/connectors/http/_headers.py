"""Header rules: which header values are secrets and how to redact them.

``parse_retry_after`` is core's one ``Retry-After`` reading (``errands.core.parse_retry_after``), re-exported
here for connector code.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from errands.core import parse_retry_after

__all__ = ["REDACTED", "is_secret_header", "parse_retry_after", "redact_headers", "scrub", "secret_fragments"]

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
