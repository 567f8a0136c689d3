"""The transport google-auth verifies Cloud Tasks' OIDC tokens with: the certificate fetches made by
errands-lro's one HTTP client, and cached. Imported only when a callback carries a token, so that the
``auth`` extra stays optional."""

from __future__ import annotations

import threading
import time
from typing import Any, Mapping

from google.auth import transport

from ._http_client import Response, request

__all__ = ["CertsRequest"]


class CertsRequest(transport.Request):
    """google-auth's transport over errands-lro's HTTP client, caching successful ``GET`` responses (the
    signing certificates) for ``cache_for`` seconds, so that verifying a token costs no round trip once
    the certificates are known. A fetch that gets no answer raises errands' ``TransientError``, which
    google-auth lets through to the caller."""

    def __init__(self, cache_for: float = 300.0) -> None:
        self.cache_for = cache_for
        self._cache: dict[str, tuple[float, Response]] = {}
        self._lock = threading.Lock()

    def __call__(
        self, url: str, method: str = "GET", body: bytes | None = None, headers: Mapping[str, str] | None = None,
        timeout: float | None = None, **_kwargs: Any,
    ) -> Response:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(url)
            if hit and method == "GET" and now - hit[0] < self.cache_for:
                return hit[1]
        out = request(method, url, body=body, headers=headers, timeout=timeout or 10)
        if out.status == 200 and method == "GET":
            with self._lock:
                self._cache[url] = (now, out)
        return out

