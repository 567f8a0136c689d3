"""The protocols engines consume. Plugins need not inherit from anything.

Every method may be sync or async; engines accept both.

Plugins register classes, and errands builds each one from the options of its ``errands.toml`` table
(``cls(**options)``, or ``cls.from_config``), so ``type[Connector]``, ``type[Sink]`` and ``type[Scheduler]``
are called with whatever options a class takes: for the type checker only, each protocol declares an
``__init__`` that accepts any arguments (a class's own ``__init__`` is never part of a protocol match).
At run time the protocols have none, so a class that inherits one explicitly keeps ``object.__init__``.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Awaitable, ClassVar, Protocol, Sequence, Union, runtime_checkable

from ._values import (
    CompensationResult,
    ConnectorCapabilities,
    DispatchResult,
    Effect,
    Event,
    Obligation,
    Observation,
)

DispatchReturn = Union[DispatchResult, Awaitable[DispatchResult]]


@runtime_checkable
class Connector(Protocol):
    """Delivers effects to one counterparty. Only ``name`` and ``dispatch`` are required.

    Optional: ``observe(effect) -> Observation``, ``compensate(obligation) -> CompensationResult`` and a
    ``capabilities`` class attribute; without it, the engine infers ``can_observe`` / ``can_compensate``
    from the methods present.
    """

    name: ClassVar[str]

    if TYPE_CHECKING:
        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def dispatch(self, effect: Effect) -> DispatchResult | Awaitable[DispatchResult]: ...


@runtime_checkable
class ObservingConnector(Connector, Protocol):
    """A connector that can look up whether an effect key already took effect."""

    def observe(self, effect: Effect) -> Observation | Awaitable[Observation]: ...


@runtime_checkable
class CompensatingConnector(Connector, Protocol):
    """A connector that can undo an effect it delivered."""

    def compensate(
        self, obligation: Obligation
    ) -> CompensationResult | Awaitable[CompensationResult]: ...


@runtime_checkable
class Sink(Protocol):
    """Receives batches of journal events.

    Raise ``TransientError(retry_after=...)`` to retry the batch, ``PermanentError`` to park it.
    An optional ``close()`` is called on shutdown.
    """

    name: ClassVar[str]

    if TYPE_CHECKING:
        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def publish(self, events: Sequence[Event]) -> Awaitable[None] | None: ...


@runtime_checkable
class Scheduler(Protocol):
    """Runs ``payload`` under ``topic`` at ``at``; ``key`` makes scheduling idempotent."""

    if TYPE_CHECKING:
        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def schedule(
        self, topic: str, payload: Any, at: datetime | float, key: str | None = None
    ) -> str | Awaitable[str]: ...

    def cancel(self, key: str) -> bool | Awaitable[bool]: ...


def capabilities_of(connector: object) -> ConnectorCapabilities:
    """The declared capabilities of a connector, or those inferred from its methods."""
    declared = getattr(connector, "capabilities", None)
    if isinstance(declared, ConnectorCapabilities):
        return declared
    return ConnectorCapabilities(
        can_observe=callable(getattr(connector, "observe", None)),
        can_compensate=callable(getattr(connector, "compensate", None)),
    )
