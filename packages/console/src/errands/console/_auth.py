"""Who may use the console: a bearer token or basic credentials, and the CSRF check of every action.

A request carries ``Authorization: Bearer <token>`` or ``Authorization: Basic <user:password>``. Without
either configured the console answers only on a loopback address (``check_listen``). Every action (a POST)
carries the CSRF token of the ``errands_csrf`` cookie back, in the form's ``csrf`` field or the
``X-CSRF-Token`` header; a POST to ``/api/`` authenticated by a bearer token (which a browser never adds
by itself) needs none.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import os
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

from errands.core.errors import ConfigError

CSRF_COOKIE = "errands_csrf"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Access:
    """The credentials the console accepts. ``token``: a bearer token (its operator is ``token_operator``);
    ``users``: ``{username: password}`` for basic credentials (the operator is the username)."""

    token: str | None = None
    users: Mapping[str, str] | None = None
    token_operator: str = "token"

    @property
    def open(self) -> bool:
        """No credentials configured: anyone who reaches the address may use it."""
        return not self.token and not self.users

    @classmethod
    def from_settings(cls, table: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, *,
                      token: str | None = None) -> Access:
        """``token``, else ``$ERRANDS_CONSOLE_TOKEN``, else the ``[console]`` table's ``token``; basic users
        from ``[console] users`` (``{name = "password"}``) or ``$ERRANDS_CONSOLE_USER``/``_PASSWORD``."""
        env = os.environ if env is None else env
        table = dict(table or {})
        token = token or env.get("ERRANDS_CONSOLE_TOKEN") or table.get("token")
        if token is not None and (not isinstance(token, str) or len(token) < 8):
            raise ConfigError("the console token must be a string of at least 8 characters", field="console.token")
        users = dict(table.get("users") or {})
        if env.get("ERRANDS_CONSOLE_USER") and env.get("ERRANDS_CONSOLE_PASSWORD"):
            users[env["ERRANDS_CONSOLE_USER"]] = env["ERRANDS_CONSOLE_PASSWORD"]
        for name, password in users.items():
            if not isinstance(password, str) or not password:
                raise ConfigError(f"console user {name!r} needs a non-empty password", field=f"console.users.{name}")
        operator = table.get("token_operator") or "token"
        return cls(token=token, users=users or None, token_operator=str(operator))

    def operator(self, authorization: str | None) -> str | None:
        """The operator a request's ``Authorization`` header proves, or None (``"anonymous"`` when open)."""
        if self.open:
            return "anonymous"
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == "bearer" and self.token and hmac.compare_digest(value.encode(), self.token.encode()):
            return self.token_operator
        if scheme == "basic" and self.users:
            try:
                user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            expected = self.users.get(user)
            if expected is not None and hmac.compare_digest(password.encode(), expected.encode()):
                return user
        return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, access: Access) -> None:
    """Refuse to serve a non-loopback address without credentials."""
    if access.open and not is_loopback(host):
        raise ConfigError(
            f"the console will not listen on {host!r} without credentials: set $ERRANDS_CONSOLE_TOKEN, "
            "[console] token in errands.toml, or basic users; or listen on 127.0.0.1", field="console.host",
            value=host)


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(cookie: str | None, sent: str | None) -> bool:
    return bool(cookie) and bool(sent) and hmac.compare_digest(str(cookie).encode(), str(sent).encode())
