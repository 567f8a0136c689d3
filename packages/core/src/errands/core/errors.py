"""Errors raised by errands.

The tree::

    ErrandsError
    ├── ConfigError               bad configuration or input; names the field path and the value
    │   ├── PayloadError          payload not JSON-serialisable or over the size limit
    │   └── InvalidTaskIdError    a caller-given task id that is not a UUID
    ├── PluginError               a plugin misbehaved; carries ``plugin``
    ├── MissingDependencyError    an optional dependency is absent; names the extra to install
    ├── EffectConflictError       same effect key submitted with a different payload
    ├── LeaseLostError            a lease was completed with a stale fencing token
    ├── NotFoundError             no such effect, operation, execution, ...
    ├── AlreadyExistsError        a resource with that name exists already
    ├── InfrastructureError       the store's database or connection failed (locked, dropped, serialization);
    │                             the invocation is abandoned and retried, never recorded as a failure
    └── DeliveryError             a connector or sink could not deliver
        ├── TransientError        retry later (``retry_after`` seconds, if known)
        └── PermanentError        retrying will not help; park it

Vendor exceptions are mapped to these once, at each connector's edge, with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AlreadyExistsError",
    "ConfigError",
    "DeliveryError",
    "EffectConflictError",
    "ErrandsError",
    "InfrastructureError",
    "InvalidTaskIdError",
    "LeaseLostError",
    "MissingDependencyError",
    "NotFoundError",
    "PayloadError",
    "PermanentError",
    "PluginError",
    "TransientError",
]


class ErrandsError(Exception):
    """Root of every error errands raises."""


class ConfigError(ErrandsError):
    """Invalid configuration or input.

    Args:
        message: what is wrong and how to fix it.
        field: the field path (``connectors."bank.wire".url``), if any.
        value: the offending value, if any.
    """

    def __init__(self, message: str, *, field: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class PayloadError(ConfigError):
    """A payload that is not JSON-serialisable or is larger than the configured limit."""


class InvalidTaskIdError(ConfigError):
    """A caller-supplied task id that is not a UUID."""


class PluginError(ErrandsError):
    """A plugin failed to load or registered something invalid.

    Args:
        message: what went wrong.
        plugin: the plugin name (entry-point name) or object at fault.
    """

    def __init__(self, message: str, *, plugin: object = None) -> None:
        super().__init__(message)
        self.plugin = plugin


class MissingDependencyError(ErrandsError, ImportError):
    """An optional dependency is not installed.

    Args:
        package: the missing import.
        extra: the ``errands`` extra that installs it.
    """

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed: pip install 'errands[{extra}]'")
        self.package = package
        self.extra = extra


class EffectConflictError(ErrandsError):
    """An effect key was submitted again with a different payload or connector."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class LeaseLostError(ErrandsError):
    """A lease was completed or saved with a fencing token that is no longer current."""


class NotFoundError(ErrandsError, KeyError):
    """The named thing does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AlreadyExistsError(ErrandsError):
    """A resource with that name exists already."""


class InfrastructureError(ErrandsError):
    """The store's database or the connection to it failed: a locked or busy SQLite file, a PostgreSQL
    serialization failure, deadlock or dropped connection. Engines abandon the invocation and retry it
    promptly; it is never recorded as the user's failure. The original error is ``__cause__``."""


class DeliveryError(ErrandsError):
    """A connector or sink could not deliver."""


class TransientError(DeliveryError):
    """A failure that may pass: retry, after ``retry_after`` seconds if given."""

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(DeliveryError):
    """A failure that retrying will not cure: park the work for a human."""


def error_text(exc: BaseException) -> str:
    """How errands records an error it caught: ``"TypeName: message"`` (``"TypeName"`` with no message)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
