"""The one HTTP client of errands-lro: the local scheduler's callbacks and the fetches of Google's OIDC
signing certificates go through it.

It is the standard library's urllib, so that the package needs no HTTP dependency, kept in this one place:
one way to send a request, one reading of ``Retry-After`` (``errands.core.runtime.parse_retry_after``) and
one mapping of answers to errands' errors (:func:`raise_for_status`).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterable, Mapping

from errands.core.errors import NotFoundError, PermanentError, TransientError
from errands.core.runtime import parse_retry_after

__all__ = ["Response", "raise_for_status", "request"]

# Answers worth trying again: the server timed out, is rate limiting, or failed (RFC 9110).
_RETRYABLE = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class Response:
    """An answer of the server, whatever its status.

    Attributes:
        status: the HTTP status code.
        headers: the response headers, names in lower case.
        data: the body.
    """

    status: int
    headers: Mapping[str, str]
    data: bytes

    @property
    def retry_after(self) -> float | None:
        """The seconds the server asked to wait (``Retry-After``), None without a readable header."""
        return parse_retry_after(self.headers.get("retry-after"))


def request(
    method: str, url: str, *, body: bytes | None = None, headers: Mapping[str, str] | None = None,
    timeout: float,
) -> Response:
    """Send one request and return the server's answer, 4xx and 5xx included.

    Raises:
        TransientError: no answer came (the connection was refused or reset, the name did not resolve, the
            request timed out): trying again later may succeed.
    """
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(resp.status, _lower(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Response(exc.code, _lower(exc.headers.items()), exc.read())
    except OSError as exc:  # URLError, timeouts and connection errors are all OSErrors
        raise TransientError(f"{method} {url.split('?', 1)[0]} got no answer ({type(exc).__name__}: {exc})") from exc


def raise_for_status(response: Response, what: str) -> Response:
    """``response`` if it is a success (2xx), else the error that its status means for ``what``.

    Raises:
        NotFoundError: 404; there is nothing there to call.
        TransientError: 408, 425, 429 or 5xx; try again, after ``retry_after`` when the server said.
        PermanentError: any other status; the request itself is wrong.
    """
    status = response.status
    if 200 <= status < 300:
        return response
    if status == 404:
        raise NotFoundError(f"{what} answered 404")
    if status >= 500 or status in _RETRYABLE:
        raise TransientError(f"{what} answered {status}", retry_after=response.retry_after)
    raise PermanentError(f"{what} answered {status}")


def _lower(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {k.lower(): v for k, v in items}
