"""Callback authentication: Google OIDC tokens (Cloud Tasks) and the local scheduler's HMAC header."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from errands.core.errors import MissingDependencyError

if TYPE_CHECKING:
    from ._oidc import CertsRequest

log = logging.getLogger("errands.lro.auth")

SIGNATURE_HEADER = "x-errands-signature"
TOLERANCE = 300


def sign(secret: str, method: str, target: str, now: float | None = None) -> str:
    """The ``X-Errands-Signature`` value for a request: ``t=<unix>,v1=<hex HMAC-SHA256>`` over
    ``{t}.{METHOD}.{path?query}``."""
    t = int(now if now is not None else time.time())
    mac = hmac.new(secret.encode(), f"{t}.{method.upper()}.{target}".encode(), hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_signature(secret: str, header: str, method: str, target: str, now: float | None = None) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        t = int(parts.get("t", ""))
    except ValueError:
        return False
    current = now if now is not None else time.time()
    if abs(current - t) > TOLERANCE:
        return False
    expected = sign(secret, method, target, now=t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


@dataclass
class CallbackAuth:
    """Decides whether a callback request may resume an operation.

    Accepted: ``Authorization: Bearer <Google OIDC token>`` whose audience is ``audience`` and whose
    verified email is one of ``service_accounts`` (with none configured every token is refused: a token any
    Google identity can mint for that audience proves nothing), or a valid ``X-Errands-Signature`` HMAC.
    Requests with neither are accepted only with ``allow_unauthenticated``; bad credentials never are.
    Replays are refused by the resume token each callback carries, which is spent once its handler ran.
    """

    secret: str | None = field(repr=False)
    audience: str | None
    service_accounts: tuple[str, ...]
    certs_url: str
    issuers: tuple[str, ...]
    allow_unauthenticated: bool = False

    def __post_init__(self) -> None:
        self._certs: CertsRequest | None = None  # made at the first token, which needs google-auth

    def check(self, headers: Mapping[str, str], method: str, target: str) -> bool:
        """Whether the request is allowed. ``headers`` have lower-case names; ``target`` is the raw
        ``path?query``. Never logs credentials."""
        signature = headers.get(SIGNATURE_HEADER)
        authorization = headers.get("authorization")
        if signature is not None:
            if self.secret is None:
                return False
            return verify_signature(self.secret, signature, method, target)
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return False
            return self._check_oidc(token.strip())
        return self.allow_unauthenticated

    def _check_oidc(self, token: str) -> bool:
        if not self.audience:
            log.warning("OIDC callback refused: no audience configured (set Config.host or oidc_audience)")
            return False
        try:
            from google.oauth2 import id_token

            from ._oidc import CertsRequest
        except ImportError as exc:
            raise MissingDependencyError("google-auth", "lro") from exc
        if self._certs is None:
            self._certs = CertsRequest()
        try:
            claims = id_token.verify_token(token, self._certs, audience=self.audience, certs_url=self.certs_url)
        except Exception as exc:  # google-auth raises ValueError and its own errors for bad tokens
            log.warning("OIDC callback refused: %s", type(exc).__name__)
            return False
        if claims.get("iss") not in self.issuers:
            log.warning("OIDC callback refused: issuer not accepted")
            return False
        if not self.service_accounts:
            log.warning("OIDC callback refused: no service account is accepted (set Config.oidc_service_accounts "
                        "or Config.service_account)")
            return False
        if claims.get("email") not in self.service_accounts or not claims.get("email_verified", False):
            log.warning("OIDC callback refused: email not an accepted service account")
            return False
        return True
