"""``WebhookSink``: each event POSTed as a CloudEvents JSON body, signed per Standard Webhooks; and
``verify_webhook`` for receivers."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Mapping, Sequence
from urllib.parse import urlsplit

import httpx
from errands.core import ConfigError, ErrandsError, Event, PermanentError, TransientError, parse_retry_after, telemetry

SECRET_PREFIX = "whsec_"
_RETRY_STATUSES = frozenset({408, 425, 429})


class WebhookVerificationError(ErrandsError):
    """A webhook failed verification: a missing header, a stale timestamp or no matching signature."""


class WebhookGoneError(PermanentError):
    """The endpoint answered 410 Gone: the route stops until resumed (``FanOut.resume``)."""

    stop_route = True


def _decode_secret(secret: Any, field: str) -> bytes:
    # Messages describe the shape of a bad secret, never its value.
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise ConfigError(
            f"{field} must be a Standard Webhooks secret 'whsec_<base64>', got a "
            f"{type(secret).__name__} of {len(secret) if isinstance(secret, str) else 0} characters without "
            "the 'whsec_' prefix",
            field=field, value="<redacted>",
        )
    try:
        encoded = secret[len(SECRET_PREFIX):]
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{field} must be 'whsec_' followed by base64; the part after the prefix is not base64",
                          field=field, value="<redacted>") from None
    if len(key) < 16:
        raise ConfigError(f"{field} decodes to {len(key)} bytes; use at least 16 (24-64 recommended)",
                          field=field, value="<redacted>")
    return key


def sign_webhook(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``v1,<base64>`` Standard Webhooks signature of one message under one decoded key."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def _display_url(url: str) -> str:
    # Webhook URLs often carry a token in the path or query (chat and CI hooks): show only the origin.
    parts = urlsplit(url)
    host = parts.hostname or ""
    origin = f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
    return origin + ("/..." if parts.path.strip("/") or parts.query else "")


class WebhookSink:
    """POSTs each event to ``url`` as a CloudEvents 1.0 JSON body, signed per Standard Webhooks.

    Headers: ``webhook-id`` (the event id, the receiver's dedup key), ``webhook-timestamp`` (epoch
    seconds), ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of id.timestamp.body>``, one per secret
    while keys rotate). The events of a batch are posted one after another, in order; the route's
    ``max_in_flight`` gives concurrency across streams.

    Responses: 2xx delivered; 408/425/429/5xx, 3xx, timeouts and connection errors raise
    ``TransientError`` (with ``Retry-After``); 410 raises ``WebhookGoneError`` and stops the route; other
    4xx raise ``PermanentError`` and the event is parked.

    Args:
        url: the endpoint, http(s).
        secret: a ``whsec_<base64>`` secret, or several (the new one first) while rotating keys.
        secret_env: the name of an environment variable holding the secret(s), space separated, instead.
        timeout: seconds for each request.
        headers: extra headers sent with every request.
        transport: an ``httpx`` transport (tests, proxies).

    Example:
        >>> sink = WebhookSink(url="https://example.com/hooks", secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    """

    name: ClassVar[str] = "webhook"

    def __init__(
        self, url: str, secret: str | Sequence[str] | None = None, *, secret_env: str | None = None,
        timeout: float = 10.0, headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None, clock: Callable[[], float] = time.time,
    ) -> None:
        problems: list[ConfigError] = []
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            problems.append(ConfigError(f"url must be an http(s) URL, got {url!r}", field="url", value=url))
        if secret is None and secret_env is not None:
            env = os.environ.get(secret_env, "")
            if not env:
                problems.append(ConfigError(f"secret_env {secret_env!r} names an unset environment variable",
                                            field="secret_env", value=secret_env))
            secret = env.split() if env else None
        secrets = [secret] if isinstance(secret, str) else list(secret or [])
        if not secrets and not problems:
            problems.append(ConfigError("secret is required: a 'whsec_<base64>' string (or list while rotating)",
                                        field="secret", value=None))
        self._keys: list[bytes] = []
        for i, s in enumerate(secrets):
            try:
                self._keys.append(_decode_secret(s, "secret" if len(secrets) == 1 else f"secret[{i}]"))
            except ConfigError as exc:
                problems.append(exc)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            problems.append(ConfigError(f"timeout must be positive seconds, got {timeout!r}", field="timeout",
                                        value=timeout))
        if problems:
            raise ConfigError.collect(problems, "webhook sink")
        self.url = url
        self.display_url = _display_url(url)
        self.timeout = float(timeout)
        self._clock = clock
        self._headers = {"content-type": "application/cloudevents+json; charset=utf-8",
                         "user-agent": "errands-webhook", **dict(headers or {})}
        self._client = httpx.Client(timeout=self.timeout, transport=transport, follow_redirects=False)

    def __repr__(self) -> str:
        return f"WebhookSink(url={self.display_url!r}, secrets=<{len(self._keys)} redacted>)"

    def signed_headers(self, event: Event, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The headers that go with ``body`` for ``event``."""
        ts = int(self._clock()) if timestamp is None else timestamp
        return {
            **self._headers,
            "webhook-id": event.id,
            "webhook-timestamp": str(ts),
            "webhook-signature": " ".join(sign_webhook(k, event.id, ts, body) for k in self._keys),
        }

    def publish(self, events: Sequence[Event]) -> None:
        """POST each event in order; raise on the first one not accepted."""
        for event in events:
            self._post(event)

    def _post(self, event: Event) -> None:
        body = event.to_json().encode("utf-8")
        headers = telemetry.inject(self.signed_headers(event, body))
        try:
            resp = self._client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise TransientError(f"webhook {self.display_url} timed out after {self.timeout}s for {event.id}") from exc
        except httpx.TransportError as exc:
            raise TransientError(f"webhook {self.display_url} unreachable for {event.id}: {type(exc).__name__}") from exc
        status = resp.status_code
        if 200 <= status < 300:
            return
        what = f"webhook {self.display_url} answered {status} for {event.id}"
        if status == 410:
            raise WebhookGoneError(f"{what}: the endpoint is gone; the route stops until resumed")
        if status in _RETRY_STATUSES or status >= 500 or 300 <= status < 400:
            wait = parse_retry_after(resp.headers.get("retry-after"), now=self._clock())
            raise TransientError(what, retry_after=wait)
        raise PermanentError(f"{what}: {resp.text[:200]}")

    def close(self) -> None:
        """Close the HTTP connection pool. Safe to call twice."""
        self._client.close()

    @classmethod
    def from_config(cls, *, name: str, options: dict[str, Any], field: str) -> WebhookSink:
        """Build from ``[sinks.<name>]`` options: ``url``, ``secret`` or ``secret_env``, ``timeout``,
        ``headers``."""
        allowed = {"url", "secret", "secret_env", "timeout", "headers"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ConfigError(f"{field}: unknown option {unknown[0]!r}; webhook sinks take {', '.join(sorted(allowed))}",
                              field=f"{field}.{unknown[0]}", value=options[unknown[0]])
        if "url" not in options:
            raise ConfigError(f"{field}.url is required", field=f"{field}.url", value=None)
        # A ConfigError of the constructor is put under ``field`` by the registry that called this.
        return cls(**options)


def verify_webhook(
    headers: Mapping[str, str], body: bytes | str, secrets: Sequence[str], tolerance: float = 300,
    *, now: float | None = None,
) -> Any:
    """Verify a Standard Webhooks delivery and return its parsed JSON body.

    Args:
        headers: the request headers (any case).
        body: the raw request body, exactly as received.
        secrets: the ``whsec_...`` secrets currently accepted (several while rotating keys).
        tolerance: the most seconds the timestamp may be off from now, either way.
        now: the current epoch seconds (default: the wall clock).

    Returns:
        The JSON body, parsed.

    Raises:
        WebhookVerificationError: a header is missing, the timestamp is outside the tolerance or no
            signature matches any secret.
        ConfigError: a secret is malformed.
    """
    if isinstance(secrets, str):
        secrets = [secrets]
    keys = [_decode_secret(s, f"secrets[{i}]") for i, s in enumerate(secrets)]
    if not keys:
        raise ConfigError("secrets must hold at least one 'whsec_...' secret", field="secrets", value=[])
    lower = {k.lower(): v for k, v in headers.items()}
    missing = [h for h in ("webhook-id", "webhook-timestamp", "webhook-signature") if not lower.get(h)]
    if missing:
        raise WebhookVerificationError(f"missing header {missing[0]}")
    msg_id, ts_text, sig_header = lower["webhook-id"], lower["webhook-timestamp"], lower["webhook-signature"]
    try:
        ts = int(ts_text)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {ts_text!r} is not epoch seconds") from None
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        age = datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()
        raise WebhookVerificationError(
            f"webhook-timestamp {ts} ({age}) is more than {tolerance:g}s from now: stale or replayed")
    raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    offered = [s.split(",", 1)[1] for s in sig_header.split() if s.startswith("v1,")]
    for key in keys:
        expected = sign_webhook(key, msg_id, ts, raw).split(",", 1)[1]
        if any(hmac.compare_digest(expected, sig) for sig in offered):
            return json.loads(raw)
    raise WebhookVerificationError("no webhook-signature matches the accepted secrets")
