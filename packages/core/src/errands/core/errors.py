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

from typing import Any, Iterable, Sequence

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

    Validation reports every problem at once, so that one run shows all there is to fix: it gathers one
    ``ConfigError`` per bad field and raises :meth:`collect` of them, whose ``problems`` hold each one.

    Args:
        message: what is wrong and how to fix it.
        field: the field path (``connectors."bank.wire".url``), if any.
        value: the offending value, if any.
        problems: the single problems this error reports together (empty for a single problem).
    """

    def __init__(self, message: str, *, field: str | None = None, value: Any = None,
                 problems: Iterable[ConfigError] = ()) -> None:
        super().__init__(message)
        self.field = field
        self.value = value
        self.problems = problems

    @property
    def problems(self) -> tuple[ConfigError, ...]:
        """The single problems this error reports together; empty when it is one problem itself."""
        return self._problems

    @problems.setter
    def problems(self, problems: Iterable[ConfigError]) -> None:
        # Kept as a tuple whatever was gathered, so that the report cannot change after it is raised.
        self._problems = tuple(problems)

    @classmethod
    def collect(cls, problems: Sequence[ConfigError], summary: str) -> ConfigError:
        """One error reporting every problem in ``problems``.

        Args:
            problems: the problems found, at least one.
            summary: what was checked (``"errands.toml"``, ``"http connector connectors.crm"``), for the
                first line of the message: ``"3 problems in <summary>:"``, then a line per problem.

        Returns:
            The problem itself when there is only one; else a ``ConfigError`` whose ``field`` and
            ``value`` are those of the first problem and whose ``problems`` are all of them.

        Raises:
            ValueError: ``problems`` is empty.

        Example:
            >>> err = ConfigError.collect([ConfigError("url is required", field="url"),
            ...                            ConfigError("timeout must be > 0", field="timeout")], "settings")
            >>> print(err)
            2 problems in settings:
              - url is required
              - timeout must be > 0
            >>> [p.field for p in err.problems]
            ['url', 'timeout']
        """
        if not problems:
            raise ValueError("ConfigError.collect needs at least one problem")
        if len(problems) == 1:
            return problems[0]
        first = problems[0]
        lines = "\n".join(f"  - {p}" for p in problems)
        return cls(f"{len(problems)} problems in {summary}:\n{lines}", field=first.field, value=first.value,
                   problems=problems)


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
    """A failure that retrying will not cure: park the work for a human.

    A sink sets ``stop_route`` (on the instance, or as a class attribute of its own subclass) when the
    failure is the route's, not the event's (a webhook answering 410 Gone): the fan-out then stops the
    route until it is resumed instead of parking event after event.
    """

    stop_route: bool = False


def error_text(exc: BaseException) -> str:
    """How errands records an error it caught: ``"TypeName: message"`` (``"TypeName"`` with no message)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
