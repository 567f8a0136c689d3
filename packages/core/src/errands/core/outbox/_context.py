"""What the parts of one outbox share: its settings, its connectors, the runner of its calls, its retry delays,
and the leases of the batches it claims."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Sequence, TypeVar

from .._protocols import capabilities_of
from .._values import ConnectorCapabilities
from ..errors import ConfigError
from ..runtime import CallRunner, LeaseBatch, backoff, error_text, is_infrastructure_error, retry_infrastructure
from ..store import NewEvent, SQLStore, Tx

log = logging.getLogger("errands.outbox")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Settings:
    """An outbox's options, checked (see ``Outbox``)."""

    payload_limit: int
    lease_for: float
    batch_size: int
    max_attempts: int
    max_observations: int
    compensation_attempts: int
    backoff_base: float
    backoff_cap: float
    owner: str


class ConnectorSet:
    """The connectors an outbox knows: instances by name (given, or the registry's, looked up at each use so
    that connectors registered later count), or names alone.

    An outbox given names alone is submit-only: it admits effects for those connectors without building them
    (no clients, no secrets in an API process), and dispatches nothing; capability checks it cannot make are
    left to the worker, which holds the instances.
    """

    def __init__(self, given: Mapping[str, Any] | Collection[str] | None) -> None:
        self._given: dict[str, Any] | None = None
        self._names: tuple[str, ...] | None = None
        if isinstance(given, Mapping):
            self._given = dict(given)
            for name, conn in self._given.items():
                if not callable(getattr(conn, "dispatch", None)):
                    raise ConfigError(
                        f"connectors[{name!r}] must have a dispatch(effect) method, got {type(conn).__name__}",
                        field=f"connectors.{name}", value=type(conn).__name__,
                    )
        elif given is not None:
            for name in given:
                if not isinstance(name, str) or not name:
                    raise ConfigError(f"connectors must name connectors with non-empty strings, got {name!r}",
                                      field="connectors", value=name)
            self._names = tuple(sorted(set(given)))
        # One computation per connector instance; a race computes the same value twice, harmlessly.
        self._caps: dict[str, tuple[Any, ConnectorCapabilities]] = {}

    @property
    def submit_only(self) -> bool:
        """Whether these are names alone."""
        return self._names is not None

    def instances(self) -> dict[str, Any]:
        """The connector instances, by name (none for names alone)."""
        if self._names is not None:
            return {}
        if self._given is not None:
            return self._given
        from .._plugins import get_registry

        return get_registry().connector_instances

    def names(self) -> list[str]:
        """The names known, sorted."""
        return list(self._names) if self._names is not None else sorted(self.instances())

    def for_calls(self, step: str) -> list[str]:
        """The names of the connectors this outbox can call to ``step`` (dispatch, observe, compensate).

        Raises:
            ConfigError: names alone (submit-only): there is no instance to call.
        """
        if self._names is not None:
            raise ConfigError(
                f"this outbox is submit-only (it knows connectors {', '.join(self._names) or 'none'} by name): it "
                f"cannot {step}; the worker does, with Outbox(store, connectors={{name: connector}})",
                field="connectors", value=list(self._names),
            )
        return self.names()

    def unknown(self, name: str) -> ConfigError:
        """The error for an effect naming a connector not known here."""
        known = self.names()
        return ConfigError(
            f"effect.connector {name!r} is not a known connector; known: {', '.join(known) or 'none'} "
            "(pass it in Outbox(connectors=...) or register it by name)",
            field="effect.connector", value=name,
        )

    def instance(self, name: str) -> Any:
        """The connector named ``name``.

        Raises:
            ConfigError: no such connector here (or names alone: no instance at all).
        """
        if self._names is not None:
            if name in self._names:
                raise ConfigError(
                    f"connector {name!r} is known here by name only (a submit-only outbox); build the outbox with "
                    "its instance, Outbox(store, connectors={name: connector}), to use it",
                    field="connectors", value=name,
                )
            raise self.unknown(name)
        try:
            return self.instances()[name]
        except KeyError:
            raise self.unknown(name) from None

    def admission_capabilities(self, name: str) -> ConnectorCapabilities | None:
        """What connector ``name`` can do, for admission: None when it is known by name only (the worker checks
        what depends on it).

        Raises:
            ConfigError: no such connector here.
        """
        if self._names is not None:
            if name not in self._names:
                raise self.unknown(name)
            return None
        return self.capabilities(name)

    def can_observe(self, name: str) -> bool:
        """Whether connector ``name`` is here and can observe."""
        conn = self.instances().get(name)
        return conn is not None and self._capabilities_of(name, conn).can_observe

    def capabilities(self, name: str) -> ConnectorCapabilities:
        """What the instance of connector ``name`` can do.

        Raises:
            ConfigError: no such instance here.
        """
        return self._capabilities_of(name, self.instance(name))

    def _capabilities_of(self, name: str, conn: Any) -> ConnectorCapabilities:
        cached = self._caps.get(name)
        if cached is None or cached[0] is not conn:
            cached = (conn, capabilities_of(conn))
            self._caps[name] = cached
        return cached[1]


class Context:
    """One outbox's shared parts. ``runner`` may be replaced (a ``Worker`` shares one across engines)."""

    def __init__(self, store: SQLStore, settings: Settings, connectors: ConnectorSet, runner: CallRunner,
                 seed: int | None) -> None:
        self.store = store
        self.settings = settings
        self.connectors = connectors
        self.runner = runner
        self.compensators: dict[str, Callable[..., Any]] = {}
        self._rng = random.Random(seed)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """The backoff before the try after ``attempt``, with this outbox's jitter."""
        s = self.settings
        return backoff(attempt, base=s.backoff_base, cap=s.backoff_cap, retry_after=retry_after, rng=self._rng)

    def journal(self, tx: Tx, events: Sequence[NewEvent]) -> None:
        """Append the events of a change in the transaction that makes it."""
        self.store.append_engine_events(tx, events)


#: A call not made: its lease lapsed before it started.
SKIPPED = object()


class TableLease(LeaseBatch):
    """The leases of one claimed batch (``held``: key or id -> fencing token), renewed by ``extend(tx, pairs,
    until)``: one statement of the table that owns the rows per beat, returning those still held."""

    __slots__ = ("_renew_in", "held", "store")

    def __init__(self, store: SQLStore, extend: Callable[[Tx, list[tuple[Any, int]], float], set[Any]],
                 held: Mapping[Any, int], *, expires: float, lease_for: float, what: str) -> None:
        self.store = store
        self._renew_in = extend
        self.held = dict(held)
        super().__init__(store.clock, self.held, expires=expires, lease_for=lease_for, what=what)

    def _extend(self, keys: list[Any], until: float) -> set[Any]:
        with self.store.transaction() as tx:
            return self._renew_in(tx, [(k, self.held[k]) for k in keys], until)

    def call(self, key: Any, fn: Callable[[T], Any], item: T) -> Any:
        """``fn(item)``, unless the lease on ``key`` may have passed to another worker by now: then no call is made,
        and ``SKIPPED`` stands for its result."""
        return fn(item) if self.holds(key) else SKIPPED


def release_failed_claim(ctx: Context, exc: BaseException, what: str, release: Callable[[Tx], None]) -> None:
    """After an infrastructure fault in a claim (``what`` names it), give back at once what the claim may have
    committed unbeknown to this worker (a commit whose acknowledgement was lost): no call was made for it, so
    ``release(tx)`` makes it due again now, with the attempt it was charged given back (the rows are found by this
    worker's name and the claim's timestamp). Retried through faults; if it still fails, the leases lapse within
    ``lease_for``."""
    if not is_infrastructure_error(exc):
        return

    def once(_attempt: int) -> None:
        with ctx.store.transaction() as tx:
            release(tx)

    try:
        retry_infrastructure(once, clock=ctx.store.clock, what=f"releasing {what}")
    except Exception as again:
        log.warning("could not release %s after a store fault (%s); its leases lapse within %ss",
                    what, error_text(again), ctx.settings.lease_for)
