"""Outbound credentials of the http connector: ``GoogleIdToken``, OIDC ID tokens from google-auth for
service-to-service calls to IAM-protected targets (Cloud Run, Cloud Functions, IAP).

A token is fetched once per audience and kept until shortly before it expires; a target that answers 401
gets one more try with a fresh token. The token is sent as ``Authorization: Bearer ...`` and nowhere else:
not in logs, reprs or error messages.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from typing import Any, Callable, Mapping, Tuple, Union
from urllib.parse import urlsplit

import httpx
from errands.core.errors import ConfigError, MissingDependencyError

__all__ = ["GoogleIdToken", "TokenError", "TokenSource", "audience_of", "token_expiry"]

#: What a token source returns for an audience: the token (its expiry read from the JWT's ``exp``), or
#: ``(token, expires_at)`` with ``expires_at`` in epoch seconds.
TokenResult = Union[str, Tuple[str, float]]
#: ``source(audience) -> token``: where tokens come from (google-auth's ``fetch_id_token`` by default).
TokenSource = Callable[[str], TokenResult]

#: How long a token whose expiry is unknown is kept (Google ID tokens live an hour).
DEFAULT_LIFETIME = 3600.0


class TokenError(Exception):
    """No token could be had for a request: it was not sent."""


def audience_of(url: str) -> str:
    """The default audience of a request to ``url``: its scheme and host (and port, if given), as Cloud Run
    expects (``https://svc-abc-uc.a.run.app``)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}"


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim (epoch seconds) of a JWT, read without checking its signature (the token is ours
    to send, not to trust); None if ``token`` is not a JWT with one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    exp = claims.get("exp") if isinstance(claims, Mapping) else None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def _google_source(timeout: float) -> TokenSource:
    """google-auth's ``fetch_id_token`` over an httpx transport: a service-account file or impersonated
    credentials in ``GOOGLE_APPLICATION_CREDENTIALS``, else the metadata server (Cloud Run, GKE, GCE)."""
    try:
        from google.auth import exceptions, transport
        from google.oauth2 import id_token
    except ImportError:
        # the extra is the http package's own (``errands[all]`` has it too)
        missing = MissingDependencyError("google-auth", "all")
        missing.msg = "google-auth is not installed: pip install 'errands-connectors-http[google]'"
        missing.args = (missing.msg,)
        raise missing from None

    class _Response(transport.Response):
        def __init__(self, response: httpx.Response) -> None:
            self._response = response

        @property
        def status(self) -> int:
            return self._response.status_code

        @property
        def headers(self) -> Mapping[str, str]:
            return self._response.headers

        @property
        def data(self) -> bytes:
            return self._response.content

    class _Request(transport.Request):
        def __call__(self, url: str, method: str = "GET", body: bytes | None = None,
                     headers: Mapping[str, str] | None = None, timeout: float | None = None,
                     **_kwargs: Any) -> _Response:
            try:
                return _Response(httpx.request(method, url, content=body, headers=headers,
                                               timeout=timeout or default_timeout))
            except httpx.HTTPError as exc:
                # google-auth's errors are untyped
                raise exceptions.TransportError(f"{type(exc).__name__}: {exc}") from exc  # type: ignore[no-untyped-call]

    default_timeout = timeout

    def fetch(audience: str) -> str:
        token: str = id_token.fetch_id_token(_Request(), audience)  # type: ignore[no-untyped-call]  # untyped upstream
        return token

    return fetch


class GoogleIdToken:
    """OIDC ID tokens for an IAM-protected target, from google-auth: ``HttpConnector(url, auth=GoogleIdToken())``.

    Args:
        audience: the token's audience; by default each request's URL's scheme and host.
        token_source: ``source(audience) -> token`` (or ``(token, expires_at)``) instead of google-auth's
            ``google.oauth2.id_token.fetch_id_token``, which reads a service-account file or impersonated
            credentials from ``GOOGLE_APPLICATION_CREDENTIALS``, else asks the metadata server.
        refresh_margin: fetch a new token this many seconds before the cached one expires.
        timeout: seconds allowed for google-auth's own requests (the metadata server, the token endpoint).
        clock: epoch seconds now (for tests).

    Raises:
        ConfigError: a bad audience, source, margin or timeout, naming the field.
        MissingDependencyError: google-auth is not installed and no ``token_source`` was given
            (``pip install "errands-connectors-http[google]"``).

    Example:
        >>> auth = GoogleIdToken(token_source=lambda audience: ("t0ken", 4102444800.0))
        >>> auth.headers("https://svc-abc-uc.a.run.app/pay")["Authorization"] == "Bearer t0ken"
        True
        >>> auth
        GoogleIdToken(audience=None)
    """

    def __init__(self, audience: str | None = None, *, token_source: TokenSource | None = None,
                 refresh_margin: float = 300.0, timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        problems: list[ConfigError] = []
        if audience is not None and (not isinstance(audience, str) or not audience.strip()):
            problems.append(ConfigError(f"auth.audience must be a non-empty string such as "
                                        f"'https://svc-abc-uc.a.run.app', got {audience!r}",
                                        field="auth.audience", value=audience))
        if token_source is not None and not callable(token_source):
            problems.append(ConfigError(f"auth.token_source must be callable, got {token_source!r}",
                                        field="auth.token_source", value=repr(token_source)))
        for name, value in (("refresh_margin", refresh_margin), ("timeout", timeout)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (
                    name == "timeout" and value == 0):
                problems.append(ConfigError(f"auth.{name} must be a positive number of seconds, got {value!r}",
                                            field=f"auth.{name}", value=value))
        if problems:
            raise ConfigError.collect(problems, "GoogleIdToken")
        self.audience = audience
        self.refresh_margin = float(refresh_margin)
        self._source = token_source if token_source is not None else _google_source(float(timeout))
        self._clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"GoogleIdToken(audience={self.audience!r})"

    def audience_for(self, url: str) -> str:
        """The audience of a request to ``url``."""
        return self.audience or audience_of(url)

    def _cached(self, audience: str) -> str | None:
        held = self._tokens.get(audience)
        if held is not None and self._clock() < held[1] - self.refresh_margin:
            return held[0]
        return None

    def token(self, url: str) -> str:
        """A token for a request to ``url``: the cached one while it is fresh, else a new one.

        Raises:
            TokenError: the source failed or gave no token (the message never holds a token).
        """
        audience = self.audience_for(url)
        cached = self._cached(audience)
        if cached is not None:
            return cached
        with self._lock:  # one fetch at a time; a thread that waited finds the new token
            cached = self._cached(audience)
            if cached is not None:
                return cached
            try:
                got = self._source(audience)
            except Exception as exc:
                raise TokenError(f"no ID token for audience {audience}: {type(exc).__name__}: {exc}") from exc
            token, expires_at = got if isinstance(got, tuple) else (got, None)
            if not isinstance(token, str) or not token:
                raise TokenError(f"the token source gave no ID token for audience {audience}")
            if expires_at is None:
                expires_at = token_expiry(token) or self._clock() + DEFAULT_LIFETIME
            self._tokens[audience] = (token, float(expires_at))
            return token

    async def atoken(self, url: str) -> str:
        """:meth:`token` for coroutines: a cached token at once, a fetch on a thread."""
        cached = self._cached(self.audience_for(url))
        if cached is not None:
            return cached
        return await asyncio.to_thread(self.token, url)

    def invalidate(self, url: str, token: str) -> None:
        """Forget ``token`` (the target refused it), so that the next request fetches a new one."""
        audience = self.audience_for(url)
        with self._lock:
            held = self._tokens.get(audience)
            if held is not None and held[0] == token:
                del self._tokens[audience]

    def headers(self, url: str) -> dict[str, str]:
        """The ``Authorization`` header of a request to ``url``."""
        return {"Authorization": f"Bearer {self.token(url)}"}

    def fragments(self) -> tuple[str, ...]:
        """The tokens held now: never to appear in a log line or an error."""
        return tuple(token for token, _ in list(self._tokens.values()))
