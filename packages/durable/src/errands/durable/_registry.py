"""Which function runs under which name: those registered for the whole process with
``@durable_function`` and those of one ``DurableRunner``. A name stands for one function only, so that an
execution started under it never replays with another."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from errands.core import ConfigError

from ._errors import DurableError

DurableFunction = Callable[[Any, Any], Any]

_PROCESS: dict[str, DurableFunction] = {}
_WITH_DECORATOR = " (with @durable_function)"


class DuplicateFunctionError(DurableError, ConfigError):
    """A durable function name is registered to another function already.

    Attributes:
        name: the taken name.
        existing: the function registered under it.
        new: the function that was refused.
    """

    def __init__(self, name: str, existing: Any, new: Any, *, where: str = "") -> None:
        super().__init__(
            f"durable function name {name!r} is taken{where} by {describe_function(existing)}; cannot register "
            f"{describe_function(new)} under it too (pick another name, or register the same function)",
            field="name", value=name)
        self.name = name
        self.existing = existing
        self.new = new


def describe_function(fn: Any) -> str:
    """``module.qualname`` of a function, for messages."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if qualname is None:
        return repr(fn)
    return f"{module}.{qualname}" if module else str(qualname)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"durable function name must be a non-empty string, got {name!r}", field="name",
                          value=name)


def _check_callable(name: str, fn: Any, field: str) -> None:
    if not callable(fn):
        raise ConfigError(f"durable function {name!r} must be callable", field=field, value=repr(fn))


def _check_free(name: str, fn: DurableFunction, taken: Mapping[str, DurableFunction], where: str) -> None:
    """Refuse a second function under a taken name; the same function again is fine."""
    existing = taken.get(name)
    if existing is not None and existing is not fn:
        raise DuplicateFunctionError(name, existing, fn, where=where)


def durable_function(name: str) -> Callable[[DurableFunction], DurableFunction]:
    """Register ``fn(event, ctx)`` under ``name`` for every ``DurableRunner`` in this process.

    Example:
        >>> @durable_function("greet")
        ... def greet(event, ctx):
        ...     return ctx.step("hello", lambda _: f"hello {event['name']}")
    """
    _check_name(name)

    def register(fn: DurableFunction) -> DurableFunction:
        _check_callable(name, fn, "fn")
        _check_free(name, fn, _PROCESS, _WITH_DECORATOR)
        _PROCESS[name] = fn
        return fn

    return register


class Registry:
    """One runner's functions, on top of the process's."""

    def __init__(self) -> None:
        self._functions: dict[str, DurableFunction] = {}

    def register(self, name: str, fn: DurableFunction) -> None:
        """Register ``fn`` under ``name`` for this runner.

        Raises:
            DuplicateFunctionError: ``name`` is registered to another function already (on this runner or
                with ``@durable_function``). Registering the same function again changes nothing.
        """
        _check_name(name)
        _check_callable(name, fn, f"functions.{name}")
        _check_free(name, fn, self._functions, " on this runner")
        _check_free(name, fn, _PROCESS, _WITH_DECORATOR)
        self._functions[name] = fn

    def get(self, name: str) -> DurableFunction:
        """The function registered under ``name``.

        Raises:
            ConfigError: none is, naming those that are.
        """
        fn = self._functions.get(name) or _PROCESS.get(name)
        if fn is None:
            known = sorted(set(self._functions) | set(_PROCESS))
            raise ConfigError(
                f"no durable function named {name!r}; registered: {', '.join(known) or 'none'} "
                "(decorate it with @durable_function(name) or pass functions= to DurableRunner)",
                field="function", value=name)
        return fn

    def check(self, name: str) -> None:
        """Raise ``ConfigError`` unless a function is registered under ``name``."""
        self.get(name)
