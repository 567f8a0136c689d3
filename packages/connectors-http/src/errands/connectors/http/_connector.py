"""``HttpConnector``: effects delivered as JSON POSTs carrying their idempotency key.

httpx exceptions are mapped to outcomes here and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
import weakref
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Callable, ClassVar, Generic, Mapping, TypeVar

import httpx
import stamina
from errands.core import (
    CompensationOutcome,
    CompensationResult,
    ConfigError,
    ConnectorCapabilities,
    DispatchOutcome,
    DispatchResult,
    Effect,
    Obligation,
    Observation,
    ObservationOutcome,
    Semantics,
    telemetry,
)

from .__about__ import __version__
from ._auth import GoogleIdToken, TokenError
from ._config import HttpSettings, redact_url, validate
from ._headers import parse_retry_after, redact_headers, scrub, secret_fragments

R = TypeVar("R", DispatchResult, Observation, CompensationResult)

log = logging.getLogger("errands.connectors.http")

# The only failures retried inside the connector: the request provably never left this process.
# Anything later (a read timeout, a dropped connection) may have reached the server and becomes UNKNOWN.
NEVER_SENT: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

_RETRYABLE_STATUS = frozenset({408, 425, 429})
_MAX_TEXT = 2000


def _attempt_of(effect: Effect, attempt: int | None) -> int:
    """The attempt number: the keyword, else the one the outbox puts in the metadata, else 1."""
    if attempt is not None:
        return int(attempt)
    for name in ("errands.attempt", "attempt"):
        value = effect.metadata.get(name) if effect.metadata else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 1


def _body_of(response: httpx.Response) -> Any:
    """The response body: parsed JSON when it is JSON, else text (cut at a bounded length), else None."""
    if not response.content:
        return None
    if "json" in response.headers.get("content-type", ""):
        try:
            return response.json()
        except ValueError:
            pass
    text = response.text
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "…"


def _external_ref(response: httpx.Response, body: Any) -> str | None:
    location: str | None = response.headers.get("location")
    if location:
        return location
    if isinstance(body, Mapping):
        for name in ("external_ref", "id"):
            value = body.get(name)
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                return str(value)
    return None


class _LoopPool:
    """The connector's own ``httpx.AsyncClient`` on one event loop, closed on that loop.

    Pooled connections belong to the loop that opened them, so each loop gets a pool of its own. The pool
    is held open by an async generator suspended on that loop: asyncio tracks a loop's async generators
    and closes them when the loop shuts down (``loop.shutdown_asyncgens()``, which ``asyncio.run``,
    ``asyncio.Runner`` and core's ``CallRunner`` call), so a pool the connector was not asked to close
    still closes before its loop does, without touching the loop itself.
    """

    def __init__(self, client: httpx.AsyncClient, closed: Callable[[_LoopPool], None]) -> None:
        self.client = client
        self._closed = closed
        self._held = self._hold()

    async def _hold(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            self._closed(self)
            await self.client.aclose()

    async def open(self) -> None:
        """Start holding the pool, on the running loop (which from now on tracks it)."""
        await self._held.__anext__()

    async def aclose(self) -> None:
        """Close the pool now; on its own loop."""
        await self._held.aclose()


@dataclass(frozen=True, slots=True)
class _Call(Generic[R]):
    """One POST of an operation (``dispatch``, ``observe``, ``compensate``) and how its answer, or the
    transport failure that stood in for one, becomes that operation's result. The sync and async forms
    of each operation differ only in how they send it."""

    what: str
    url: str
    body: bytes
    headers: dict[str, str]
    answered: Callable[[httpx.Response], R]
    failed: Callable[[str], R]


class HttpConnector:
    """Delivers effects to an HTTP endpoint as JSON POSTs, exactly once in effect.

    Each effect is POSTed as its JSON payload with the headers ``Idempotency-Key`` (the effect key),
    ``Errands-Business-Key`` and ``Errands-Run-Id`` (when set) and ``Errands-Attempt``. The counterparty
    deduplicates on ``Idempotency-Key``; the outbox retries and observes on the outcome:

    ============================================ ===========================================
    response                                     outcome
    ============================================ ===========================================
    2xx                                          ``CONFIRMED``
    408, 425, 429, 5xx; timeout, dropped link    ``UNKNOWN`` (``retry_after`` from ``Retry-After``)
    3xx (redirects are not followed)             ``UNKNOWN``
    other 4xx                                    ``FAILED``
    ============================================ ===========================================

    Connect failures (the request provably never left) are retried inside the connector with stamina,
    ``connect_retries`` times; nothing that may have reached the server is ever retried here.

    Args:
        url: where effects are POSTed (http or https).
        observe_url: where ``observe`` POSTs ``{idempotency_key, business_key, payload}``; the answer
            ``200 {"count": n}`` means ABSENT (0), CONFIRMED (1) or DUPLICATE (more).
        compensate_url: where ``compensate`` POSTs an obligation; without it compensation is STUCK.
        headers: extra headers for every request (``Authorization``...). Values of secret-looking headers
            (``Authorization``, cookies, ``*-Token``, ``*-Key``, ``*-Secret``) never appear in logs, reprs
            or errors.
        timeout: seconds for each request (connect, write, read and pool wait each).
        client: an ``httpx.Client`` to use instead of the connector's own (it is not closed by ``close``).
        async_client: an ``httpx.AsyncClient`` to use for the async methods (not closed by ``aclose``).
        connect_retries: how often a connect failure is retried before the outcome is UNKNOWN.
        max_connections: the size of each connection pool.
        ca_bundle: a PEM file of CA certificates to trust instead of the system ones. TLS verification is
            always on; to change that, pass your own ``client``.
        auth: outbound credentials added to every request: ``GoogleIdToken()`` sends an OIDC ID token
            (``Authorization: Bearer ...``) for an IAM-protected target such as Cloud Run, fetched once per
            audience, renewed shortly before it expires and once more when the target answers 401.

    Raises:
        ConfigError: a bad URL, header, timeout, count or auth, naming the field.

    Example:
        >>> connector = HttpConnector(url="https://bank.example/wires",
        ...                           headers={"Authorization": "Bearer s3cret"})
        >>> connector
        HttpConnector(url='https://bank.example/wires', headers={'Authorization': '***'}, timeout=10.0)
        >>> connector.close()
    """

    name: ClassVar[str] = "http"

    def __init__(
        self,
        url: str,
        observe_url: str | None = None,
        compensate_url: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        client: httpx.Client | None = None,
        *,
        async_client: httpx.AsyncClient | None = None,
        connect_retries: int = 2,
        max_connections: int = 100,
        ca_bundle: str | None = None,
        auth: GoogleIdToken | None = None,
    ) -> None:
        settings = validate(
            {"url": url, "observe_url": observe_url, "compensate_url": compensate_url, "headers": headers,
             "timeout": timeout, "connect_retries": connect_retries, "max_connections": max_connections,
             "ca_bundle": ca_bundle},
            allow_unknown=True,
        )
        self._init(settings, client, async_client, _check_auth(auth, "auth", settings.headers))

    def _init(self, settings: HttpSettings, client: httpx.Client | None,
              async_client: httpx.AsyncClient | None, auth: GoogleIdToken | None = None) -> None:
        self.settings = settings
        self.auth = auth
        self.url = settings.url
        self.observe_url = settings.observe_url
        self.compensate_url = settings.compensate_url
        self.timeout = settings.timeout
        self.capabilities = ConnectorCapabilities(
            can_observe=settings.observe_url is not None,
            can_compensate=settings.compensate_url is not None,
            default_semantics=Semantics.IDEMPOTENT,
        )
        self._headers = {
            "User-Agent": f"errands-connectors-http/{__version__}",
            "Content-Type": "application/json",
            **settings.headers,
        }
        self._secrets = secret_fragments(settings.headers)
        self._timeout = httpx.Timeout(settings.timeout)
        self._limits = httpx.Limits(max_connections=settings.max_connections,
                                    max_keepalive_connections=settings.max_connections)
        self._own_client = client is None
        self._client = client
        self._async_client = async_client
        self._async_pools: dict[asyncio.AbstractEventLoop, _LoopPool] = {}
        self._lock = threading.Lock()
        self._retried = stamina.retry(on=NEVER_SENT, attempts=settings.connect_retries + 1, timeout=None,
                                      wait_initial=0.05, wait_max=1.0, wait_jitter=0.05)

    @classmethod
    def from_config(cls, *, name: str, options: Mapping[str, Any], field: str = "") -> HttpConnector:
        """Build a connector from an ``errands.toml`` table.

        ``${NAME}`` in a header value is read from the environment, so tokens stay out of the file::

            [connectors."bank.wire"]
            type = "http"
            url = "https://bank.example/wires"
            observe_url = "https://bank.example/wires/lookup"
            headers = { Authorization = "Bearer ${BANK_TOKEN}" }
            timeout = 5.0
            auth = { type = "google-id-token" }   # optional; audience = "https://..." to set one

        Args:
            name: the instance name (``bank.wire``).
            options: the table without ``type``.
            field: the field path of the table, prefixed to every error.

        Raises:
            ConfigError: listing every bad field by its path.
        """
        prefix = field or f'connectors."{name}"'
        options = dict(options)
        auth_table = options.pop("auth", None)
        settings = validate(options, prefix=prefix, expand_env=True)
        auth = _auth_from_config(auth_table, f"{prefix}.auth") if auth_table is not None else None
        _check_auth(auth, f"{prefix}.auth", settings.headers)
        self = cls.__new__(cls)
        self._init(settings, None, None, auth)
        return self

    # -- clients --------------------------------------------------------------------------------
    def _verify(self) -> ssl.SSLContext | bool:
        if self.settings.ca_bundle is None:
            return True
        return ssl.create_default_context(cafile=self.settings.ca_bundle)

    def _sync_client(self) -> httpx.Client:
        client = self._client
        if client is None:
            # Worker threads dispatch at once: exactly one of them may build the pool.
            with self._lock:
                if self._client is None:
                    self._client = httpx.Client(timeout=self._timeout, limits=self._limits, verify=self._verify(),
                                                headers=self._headers, follow_redirects=False)
                client = self._client
        return client

    async def _aclient(self) -> httpx.AsyncClient:
        """The ``async_client`` passed in, else this connector's pool for the running loop."""
        if self._async_client is not None:
            return self._async_client
        loop = asyncio.get_running_loop()
        with self._lock:
            pool = self._async_pools.get(loop)
            if pool is not None:
                return pool.client
            for gone in [other for other in self._async_pools if other.is_closed()]:
                del self._async_pools[gone]
            client = httpx.AsyncClient(timeout=self._timeout, limits=self._limits, verify=self._verify(),
                                       headers=self._headers, follow_redirects=False)
            pool = self._async_pools[loop] = _LoopPool(client, _forget_pool(self, loop))
        await pool.open()
        return client

    def close(self) -> None:
        """Close the connector's own connection pools.

        An async pool is closed on the event loop that opened it: a loop running in another thread (a
        worker's loop) closes it there, a loop that is not running is run until it has (when no loop runs
        in this thread). The pool of this thread's own running loop is left to :meth:`aclose`, or to the
        loop's shutdown; a pool whose loop is gone can only be dropped.
        """
        with self._lock:
            client, self._client = (self._client, None) if self._own_client else (None, self._client)
            pools = list(self._async_pools.items())
        if client is not None:
            client.close()
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, pool in pools:
            if loop.is_closed():
                _forget_pool(self, loop)(pool)
            elif loop.is_running():
                if loop is not running:
                    asyncio.run_coroutine_threadsafe(pool.aclose(), loop).result(timeout=self.timeout)
            elif running is None:
                loop.run_until_complete(pool.aclose())

    async def aclose(self) -> None:
        """Close the connector's own connection pools (async and sync)."""
        with self._lock:
            pool = self._async_pools.get(asyncio.get_running_loop())
        if pool is not None:
            await pool.aclose()
        self.close()

    def __enter__(self) -> HttpConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> HttpConnector:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        parts = [f"url={redact_url(self.url)!r}"]
        if self.observe_url:
            parts.append(f"observe_url={redact_url(self.observe_url)!r}")
        if self.compensate_url:
            parts.append(f"compensate_url={redact_url(self.compensate_url)!r}")
        if self.settings.headers:
            parts.append(f"headers={redact_headers(self.settings.headers)!r}")
        parts.append(f"timeout={self.timeout!r}")
        if self.auth is not None:
            parts.append(f"auth={self.auth!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # -- requests -------------------------------------------------------------------------------
    def _request_headers(self, key: str, business_key: str | None, run_id: str | None,
                         attempt: int) -> dict[str, str]:
        """The per-request protocol headers; the static ones live on the connector's own clients."""
        headers = {"Idempotency-Key": key}
        if business_key is not None:
            headers["Errands-Business-Key"] = business_key
        if run_id is not None:
            headers["Errands-Run-Id"] = run_id
        headers["Errands-Attempt"] = str(attempt)
        telemetry.inject(headers)
        return headers

    def _post_options(self, call: _Call[Any], token: str | None, own_client: bool) -> dict[str, Any]:
        """The options of a POST: a client the connector built carries the static headers and the timeout.
        The token goes into the request's headers only, never into ``call.headers`` (which are logged)."""
        headers = call.headers if token is None else {**call.headers, "Authorization": f"Bearer {token}"}
        if own_client:
            return {"headers": headers}
        return {"headers": {**self._headers, **headers}, "timeout": self._timeout}

    def _scrub(self, text: str) -> str:
        """``text`` without the secret header values, nor any token ``auth`` holds."""
        secrets = self._secrets if self.auth is None else (*self.auth.fragments(), *self._secrets)
        return scrub(text, secrets)

    def _post(self, call: _Call[Any]) -> httpx.Response | httpx.RequestError | TokenError:
        """Send ``call`` on the sync client (connect failures retried); a transport failure, or the failure
        to get a token for it, is returned. With ``auth``, a 401 answer is tried once more with a new token."""
        post = self._retried(self._sync_client().post)
        auth = self.auth
        try:
            token = auth.token(call.url) if auth is not None else None
            response = post(call.url, content=call.body, **self._post_options(call, token, self._own_client))
            if auth is None or token is None or response.status_code != 401:
                return response
            auth.invalidate(call.url, token)
            try:
                token = auth.token(call.url)
            except TokenError:
                return response  # the refusal stands
            return post(call.url, content=call.body, **self._post_options(call, token, self._own_client))
        except (httpx.RequestError, TokenError) as exc:
            return exc

    async def _apost(self, call: _Call[Any]) -> httpx.Response | httpx.RequestError | TokenError:
        """:meth:`_post` on the async client (a token fetch runs on a thread)."""
        post = self._retried((await self._aclient()).post)
        auth = self.auth
        own = self._async_client is None
        try:
            token = await auth.atoken(call.url) if auth is not None else None
            response = await post(call.url, content=call.body, **self._post_options(call, token, own))
            if auth is None or token is None or response.status_code != 401:
                return response
            auth.invalidate(call.url, token)
            try:
                token = await auth.atoken(call.url)
            except TokenError:
                return response
            return await post(call.url, content=call.body, **self._post_options(call, token, own))
        except (httpx.RequestError, TokenError) as exc:
            return exc

    def _finish(self, call: _Call[R], answer: httpx.Response | httpx.RequestError | TokenError) -> R:
        """The result of ``call`` from its answer, logged."""
        if isinstance(answer, httpx.Response):
            result = call.answered(answer)
        else:
            result = call.failed(self._describe(answer, call.url))
        self._log(call.what, call.url, call.headers["Idempotency-Key"], call.headers, result.outcome,
                  getattr(result, "error", None))
        return result

    def _status_error(self, status: int, body: Any) -> str:
        """``HTTP <status>`` and the start of the body the server answered with, secrets scrubbed."""
        shown = self._scrub(body if isinstance(body, str) else json.dumps(body))[:300] if body else ""
        return f"HTTP {status}{': ' + shown if shown else ''}"

    def _describe(self, exc: BaseException, url: str) -> str:
        sent = ("the request was not sent" if isinstance(exc, (*NEVER_SENT, TokenError))
                else "the request may have been sent")
        detail = self._scrub(str(exc)) or type(exc).__name__
        return f"POST {redact_url(url)} failed ({type(exc).__name__}: {detail}); {sent}"

    def _log(self, what: str, url: str, key: str, headers: Mapping[str, str], outcome: object,
             error: str | None) -> None:
        if error is None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s key=%s -> %s headers=%s", what, redact_url(url), key, outcome,
                          redact_headers({**self._headers, **headers}))
        else:
            log.info("%s %s key=%s -> %s: %s", what, redact_url(url), key, outcome, error)

    # -- dispatch -------------------------------------------------------------------------------
    def _dispatch_call(self, effect: Effect, attempt: int | None) -> _Call[DispatchResult] | DispatchResult:
        try:
            body = json.dumps(effect.payload, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            return DispatchResult(outcome=DispatchOutcome.FAILED,
                                  error=f"payload of effect {effect.key!r} is not JSON-serialisable: {exc}")
        headers = self._request_headers(effect.key, effect.business_key, effect.run_id, _attempt_of(effect, attempt))
        return _Call("dispatch", self.url, body, headers, self._dispatch_result,
                     lambda error: DispatchResult(outcome=DispatchOutcome.UNKNOWN, error=error))

    def _dispatch_result(self, response: httpx.Response) -> DispatchResult:
        status = response.status_code
        body = _body_of(response)
        summary = {"status": status, "body": body}
        if 200 <= status < 300:
            return DispatchResult(outcome=DispatchOutcome.CONFIRMED, response=summary,
                                  external_ref=_external_ref(response, body))
        if 300 <= status < 400:
            where = response.headers.get("location", "")
            return DispatchResult(outcome=DispatchOutcome.UNKNOWN, response=summary,
                                  error=f"HTTP {status} redirect{' to ' + where if where else ''}: a POST is not "
                                        "followed, the effect may or may not have happened",
                                  retry_after=parse_retry_after(response.headers.get("retry-after")))
        error = self._status_error(status, body)
        if status in _RETRYABLE_STATUS or status >= 500 or status < 200:
            return DispatchResult(outcome=DispatchOutcome.UNKNOWN, response=summary, error=error,
                                  retry_after=parse_retry_after(response.headers.get("retry-after")))
        return DispatchResult(outcome=DispatchOutcome.FAILED, response=summary, error=error)

    def dispatch(self, effect: Effect, *, attempt: int | None = None) -> DispatchResult:
        """POST ``effect.payload`` as JSON to ``url``.

        Args:
            effect: the effect; its key is sent as ``Idempotency-Key``.
            attempt: the attempt number sent as ``Errands-Attempt``; by default the outbox's count
                (``effect.metadata["errands.attempt"]``), else ``effect.metadata["attempt"]``, else 1.

        Returns:
            The outcome; never raises for an HTTP or transport failure.
        """
        call = self._dispatch_call(effect, attempt)
        return self._finish(call, self._post(call)) if isinstance(call, _Call) else call

    async def adispatch(self, effect: Effect, *, attempt: int | None = None) -> DispatchResult:
        """The async form of :meth:`dispatch`, on the connector's ``httpx.AsyncClient``."""
        call = self._dispatch_call(effect, attempt)
        return self._finish(call, await self._apost(call)) if isinstance(call, _Call) else call

    # -- observe --------------------------------------------------------------------------------
    def _observe_call(self, effect: Effect, attempt: int | None) -> _Call[Observation] | Observation:
        if self.observe_url is None:
            return Observation(outcome=ObservationOutcome.UNKNOWN,
                               response={"error": "this connector has no observe_url"})
        try:
            body = json.dumps({"idempotency_key": effect.key, "business_key": effect.business_key,
                               "payload": effect.payload}, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            return Observation(outcome=ObservationOutcome.UNKNOWN,
                               response={"error": f"payload is not JSON-serialisable: {exc}"})
        headers = self._request_headers(effect.key, effect.business_key, effect.run_id, _attempt_of(effect, attempt))
        return _Call("observe", self.observe_url, body, headers, self._observation,
                     lambda error: Observation(outcome=ObservationOutcome.UNKNOWN, response={"error": error}))

    def _observation(self, response: httpx.Response) -> Observation:
        body = _body_of(response)
        summary = {"status": response.status_code, "body": body}
        count = body.get("count") if isinstance(body, Mapping) else None
        if response.status_code != 200 or not isinstance(count, int) or isinstance(count, bool) or count < 0:
            return Observation(outcome=ObservationOutcome.UNKNOWN, response=summary)
        outcome = (ObservationOutcome.ABSENT if count == 0 else
                   ObservationOutcome.CONFIRMED if count == 1 else ObservationOutcome.DUPLICATE)
        return Observation(outcome=outcome, response=summary, external_ref=_external_ref(response, body))

    def observe(self, effect: Effect, *, attempt: int | None = None) -> Observation:
        """Ask ``observe_url`` whether the effect happened, and how often.

        POSTs ``{"idempotency_key", "business_key", "payload"}``; a ``200`` answer with an integer
        ``count`` of 0, 1 or more means ABSENT, CONFIRMED or DUPLICATE. Anything else (another status, no
        ``count``, a transport failure, no ``observe_url``) is UNKNOWN.

        Args:
            effect: the effect to look up.
            attempt: sent as ``Errands-Attempt``, as for :meth:`dispatch`.
        """
        call = self._observe_call(effect, attempt)
        return self._finish(call, self._post(call)) if isinstance(call, _Call) else call

    async def aobserve(self, effect: Effect, *, attempt: int | None = None) -> Observation:
        """The async form of :meth:`observe`."""
        call = self._observe_call(effect, attempt)
        return self._finish(call, await self._apost(call)) if isinstance(call, _Call) else call

    # -- compensate -----------------------------------------------------------------------------
    def _compensate_call(self, obligation: Obligation) -> _Call[CompensationResult] | CompensationResult:
        if self.compensate_url is None:
            return CompensationResult(outcome=CompensationOutcome.STUCK,
                                      error="this connector has no compensate_url; compensate by hand")
        try:
            body = json.dumps({"effect_key": obligation.effect_key, "kind": obligation.kind,
                               "payload": obligation.payload, "run_id": obligation.run_id},
                              separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            return CompensationResult(outcome=CompensationOutcome.FAILED,
                                      error=f"obligation payload is not JSON-serialisable: {exc}")
        # A key of its own: a counterparty that deduplicates on Idempotency-Key across endpoints must not
        # take the compensation for a replay of the effect.
        key = f"{obligation.effect_key}:compensate:{obligation.kind}"
        # The outbox counts the attempt before it calls (the first call carries 1); a hand-built obligation
        # (attempt 0) is a first attempt too.
        headers = self._request_headers(key, None, obligation.run_id, max(1, obligation.attempt))
        return _Call("compensate", self.compensate_url, body, headers, self._compensation,
                     lambda error: CompensationResult(outcome=CompensationOutcome.PENDING, error=error))

    def _compensation(self, response: httpx.Response) -> CompensationResult:
        status = response.status_code
        body = _body_of(response)
        summary = {"status": status, "body": body}
        if 200 <= status < 300:
            return CompensationResult(outcome=CompensationOutcome.COMPENSATED, response=summary)
        error = self._status_error(status, body)
        if 400 <= status < 500 and status not in _RETRYABLE_STATUS:
            return CompensationResult(outcome=CompensationOutcome.FAILED, response=summary, error=error)
        return CompensationResult(outcome=CompensationOutcome.PENDING, response=summary, error=error,
                                  retry_after=parse_retry_after(response.headers.get("retry-after")))

    def compensate(self, obligation: Obligation) -> CompensationResult:
        """POST the obligation to ``compensate_url``.

        The body is ``{"effect_key", "kind", "payload", "run_id"}``; ``Idempotency-Key`` is
        ``"<effect_key>:compensate:<kind>"``. 2xx is COMPENSATED; 408/425/429/5xx/3xx and transport
        failures are PENDING (retried with backoff); other 4xx are FAILED; no ``compensate_url`` is STUCK.
        """
        call = self._compensate_call(obligation)
        return self._finish(call, self._post(call)) if isinstance(call, _Call) else call

    async def acompensate(self, obligation: Obligation) -> CompensationResult:
        """The async form of :meth:`compensate`."""
        call = self._compensate_call(obligation)
        return self._finish(call, await self._apost(call)) if isinstance(call, _Call) else call


def _check_auth(auth: object, field: str, headers: Mapping[str, str]) -> GoogleIdToken | None:
    """``auth`` if it is outbound credentials (``GoogleIdToken`` or an object with its ``token``,
    ``atoken``, ``invalidate`` and ``fragments``) and ``headers`` set no ``Authorization`` of their own.

    Raises:
        ConfigError: anything else, naming ``field``.
    """
    if auth is not None and any(name.lower() == "authorization" for name in headers):
        raise ConfigError(f"{field} sets the Authorization header: drop Authorization from headers, or auth",
                          field=field, value=type(auth).__name__)
    if auth is None or isinstance(auth, GoogleIdToken) or all(
            callable(getattr(auth, m, None)) for m in ("token", "atoken", "invalidate", "fragments")):
        return auth  # type: ignore[return-value]  # duck-typed credentials with GoogleIdToken's methods
    raise ConfigError(f"{field} must be outbound credentials such as GoogleIdToken(), got {type(auth).__name__}",
                      field=field, value=type(auth).__name__)


def _auth_from_config(table: object, field: str) -> GoogleIdToken:
    """``auth = { type = "google-id-token", audience = "..." }`` of an ``errands.toml`` connector table.

    Raises:
        ConfigError: another type, an unknown key or a bad audience, naming the field.
    """
    if not isinstance(table, Mapping) or table.get("type") != "google-id-token":
        raise ConfigError(f'{field} must be a table with type = "google-id-token", got {table!r}', field=field,
                          value=table)
    unknown = sorted(set(table) - {"type", "audience"})
    if unknown:
        raise ConfigError(f"{field}.{unknown[0]} is not an auth option; expected type, audience",
                          field=f"{field}.{unknown[0]}", value=unknown[0])
    try:
        return GoogleIdToken(audience=table.get("audience"))
    except ConfigError as exc:
        raise ConfigError(f"{field}: {exc}", field=f"{field}.audience", value=table.get("audience")) from None


def _forget_pool(connector: HttpConnector, loop: asyncio.AbstractEventLoop) -> Callable[[_LoopPool], None]:
    """What a pool of ``connector`` on ``loop`` calls as it closes: the connector, if it still exists (a
    pool outlives a connector dropped without ``close``), forgets it."""
    ref = weakref.ref(connector)

    def forget(pool: _LoopPool) -> None:
        owner = ref()
        if owner is not None:
            with owner._lock:
                if owner._async_pools.get(loop) is pool:
                    del owner._async_pools[loop]

    return forget


class AsyncHttpConnector(HttpConnector):
    """:class:`HttpConnector` whose ``dispatch``, ``observe`` and ``compensate`` are coroutines.

    The worker awaits them on its one event-loop thread, so all requests share one ``httpx.AsyncClient``
    pool. Same settings, headers and outcome mapping as :class:`HttpConnector`; ``type = "http-async"`` in
    ``errands.toml``.
    """

    name: ClassVar[str] = "http-async"

    # The three overrides below turn the inherited sync methods into coroutines on purpose: engines accept
    # either form (``Connector.dispatch`` returns a result or an awaitable of one), while a subclass that
    # changes the return type is, to the type checker, no longer substitutable for its base.
    async def dispatch(self, effect: Effect, *, attempt: int | None = None) -> DispatchResult:  # type: ignore[override]
        """POST the effect; see :meth:`HttpConnector.dispatch`."""
        return await self.adispatch(effect, attempt=attempt)

    async def observe(self, effect: Effect, *, attempt: int | None = None) -> Observation:  # type: ignore[override]
        """Look the effect up; see :meth:`HttpConnector.observe`."""
        return await self.aobserve(effect, attempt=attempt)

    async def compensate(self, obligation: Obligation) -> CompensationResult:  # type: ignore[override]
        """POST the obligation; see :meth:`HttpConnector.compensate`."""
        return await self.acompensate(obligation)
