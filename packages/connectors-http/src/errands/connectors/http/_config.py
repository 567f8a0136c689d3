"""Validation of ``HttpConnector`` settings, from code or from ``errands.toml``.

Every problem is collected and reported at once, each naming its field path, the value and the fix.
Secret header values never appear in a message.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

from errands.core.errors import ConfigError

from ._headers import PROTOCOL_HEADERS, REDACTED, is_secret_header

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_RESERVED = frozenset(h.lower() for h in (*PROTOCOL_HEADERS, "Content-Type", "Content-Length", "Host"))

OPTION_KEYS = ("url", "observe_url", "compensate_url", "headers", "timeout", "connect_retries",
               "max_connections", "ca_bundle")


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpSettings:
    """Validated settings of one connector."""

    url: str
    observe_url: str | None
    compensate_url: str | None
    headers: dict[str, str]
    timeout: float
    connect_retries: int
    max_connections: int
    ca_bundle: str | None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_url(problems: list[ConfigError], prefix: str, name: str, value: Any, *, required: bool) -> str | None:
    path = _join(prefix, name)
    if value is None:
        if required:
            problems.append(ConfigError(f"{path} is required: the http(s) URL effects are POSTed to",
                                        field=path, value=None))
        return None
    if not isinstance(value, str):
        problems.append(ConfigError(f"{path} must be an http(s) URL string, got {value!r}", field=path, value=value))
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        shown = redact_url(value)
        problems.append(ConfigError(f"{path} must be an http(s) URL such as 'https://api.example.com/pay', "
                                    f"got {shown!r}", field=path, value=shown))
        return None
    return value


def redact_url(url: str) -> str:
    """``url`` with any password in its user-info replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:{REDACTED}@{netloc}").geturl()


def _expand_env(problems: list[ConfigError], path: str, value: str) -> str:
    missing: list[str] = []

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            missing.append(name)
            return ""
        return os.environ[name]

    out = _ENV_RE.sub(sub, value)
    for name in missing:
        problems.append(ConfigError(f"{path} refers to environment variable {name} which is not set; "
                                    f"export {name} before starting", field=path, value=f"${{{name}}}"))
    return out


def _check_headers(problems: list[ConfigError], prefix: str, value: Any, *, expand_env: bool) -> dict[str, str]:
    path = _join(prefix, "headers")
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.append(ConfigError(f"{path} must be a table of header name = string value, got "
                                    f"{type(value).__name__}", field=path, value=type(value).__name__))
        return {}
    out: dict[str, str] = {}
    for name, raw in value.items():
        hpath = f'{path}."{name}"'
        if not isinstance(name, str) or not _HEADER_NAME_RE.match(name):
            problems.append(ConfigError(f"{hpath} is not a valid header name: use letters, digits and '-'",
                                        field=hpath, value=name))
            continue
        if name.lower() in _RESERVED:
            problems.append(ConfigError(f"{hpath} is set by the connector itself and cannot be configured; "
                                        f"remove it", field=hpath, value=name))
            continue
        shown = REDACTED if is_secret_header(name) else raw
        if not isinstance(raw, str):
            problems.append(ConfigError(f"{hpath} must be a string, got {type(raw).__name__}",
                                        field=hpath, value=type(raw).__name__))
            continue
        text = _expand_env(problems, hpath, raw) if expand_env else raw
        if "\r" in text or "\n" in text:
            problems.append(ConfigError(f"{hpath} must not contain line breaks", field=hpath, value=shown))
            continue
        out[name] = text
    return out


def _check_number(problems: list[ConfigError], prefix: str, name: str, value: Any, *, integer: bool,
                  minimum: float, default: float) -> float:
    path = _join(prefix, name)
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not ok or value < minimum or (not integer and value != value):
        kind = "an integer" if integer else "a number of seconds"
        bound = f">= {minimum:g}" if minimum <= 0 or integer else "> 0"
        problems.append(ConfigError(f"{path} must be {kind} {bound}, got {value!r}", field=path, value=value))
        return default
    return float(value)


def validate(options: Mapping[str, Any], *, prefix: str = "", expand_env: bool = False,
             allow_unknown: bool = False) -> HttpSettings:
    """Check connector options and return them normalised.

    Args:
        options: ``url``, ``observe_url``, ``compensate_url``, ``headers``, ``timeout``,
            ``connect_retries``, ``max_connections``, ``ca_bundle``.
        prefix: the field path of the connector (``connectors."bank.wire"``), prepended to every field.
        expand_env: replace ``${NAME}`` in header values with the environment variable ``NAME``.
        allow_unknown: accept keys not listed above (constructor use, where Python checks names).

    Raises:
        ConfigError: naming each bad field; several problems are reported in one error.
    """
    problems: list[ConfigError] = []
    if not allow_unknown:
        for key in options:
            if key not in OPTION_KEYS:
                path = _join(prefix, str(key))
                problems.append(ConfigError(f"{path} is not an http connector option; expected one of "
                                            f"{', '.join(OPTION_KEYS)}", field=path, value=key))
    url = _check_url(problems, prefix, "url", options.get("url"), required=True)
    observe_url = _check_url(problems, prefix, "observe_url", options.get("observe_url"), required=False)
    compensate_url = _check_url(problems, prefix, "compensate_url", options.get("compensate_url"), required=False)
    headers = _check_headers(problems, prefix, options.get("headers"), expand_env=expand_env)
    timeout = _check_number(problems, prefix, "timeout", options.get("timeout", 10.0), integer=False,
                            minimum=1e-9, default=10.0)
    retries = _check_number(problems, prefix, "connect_retries", options.get("connect_retries", 2), integer=True,
                            minimum=0, default=2)
    max_conn = _check_number(problems, prefix, "max_connections", options.get("max_connections", 100),
                             integer=True, minimum=1, default=100)
    ca_bundle = options.get("ca_bundle")
    if ca_bundle is not None and (not isinstance(ca_bundle, str) or not os.path.isfile(ca_bundle)):
        path = _join(prefix, "ca_bundle")
        problems.append(ConfigError(f"{path} must be the path of a PEM file of CA certificates, got {ca_bundle!r}",
                                    field=path, value=ca_bundle))
    if problems:
        raise ConfigError.collect(problems, f"http connector {prefix or 'settings'}")
    assert url is not None  # a missing url is a problem above
    return HttpSettings(url=url, observe_url=observe_url, compensate_url=compensate_url, headers=headers,
                        timeout=timeout, connect_retries=int(retries), max_connections=int(max_conn),
                        ca_bundle=ca_bundle)
