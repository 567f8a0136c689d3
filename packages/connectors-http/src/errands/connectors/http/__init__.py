"""errands-connectors-http: effects delivered as idempotent JSON POSTs, observed and compensated over HTTP.

Example:
    >>> from errands.connectors.http import HttpConnector
    >>> with HttpConnector(url="https://bank.example/wires") as connector:
    ...     connector.capabilities.can_observe
    False
"""

from __future__ import annotations

from .__about__ import __version__
from ._auth import GoogleIdToken, TokenError
from ._connector import NEVER_SENT, AsyncHttpConnector, HttpConnector
from ._headers import is_secret_header, parse_retry_after, redact_headers

__all__ = [
    "NEVER_SENT",
    "AsyncHttpConnector",
    "GoogleIdToken",
    "HttpConnector",
    "TokenError",
    "__version__",
    "is_secret_header",
    "parse_retry_after",
    "redact_headers",
]
