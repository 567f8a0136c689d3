"""Fake connectors for tests: a recording counterparty and a fault injector around any connector."""

from __future__ import annotations

import asyncio
import inspect
import random
import threading
import time
from collections import Counter
from typing import Any, ClassVar, Iterable

from .._protocols import capabilities_of
from .._values import (
    CompensationOutcome,
    CompensationResult,
    ConnectorCapabilities,
    DispatchOutcome,
    DispatchResult,
    Effect,
    Obligation,
    Observation,
    ObservationOutcome,
    Semantics,
)
from ..errors import ConfigError, TransientError

__all__ = ["ChaosConnector", "FakeConnector"]


class FakeConnector:
    """An in-memory counterparty that records every delivery and deduplicates nothing, so tests can count.

    ``observe`` answers from what it received: none -> ``ABSENT``, one -> ``CONFIRMED``, more ->
    ``DUPLICATE``; ``compensate`` records the obligation and answers ``COMPENSATED``.

    Args:
        name: the connector name.
        outcomes: scripted answers to the first dispatches, in order. An exception is raised and a
            ``DispatchOutcome`` / ``DispatchResult`` returned without delivering (``CONFIRMED`` ones deliver);
            ``("deliver", outcome)`` delivers and then answers ``outcome`` (a lost acknowledgement). Once the
            script is used up, every dispatch is delivered and ``CONFIRMED``.
        can_observe: whether ``observe`` is offered.
        can_compensate: whether ``compensate`` is offered.
    """

    name: ClassVar[str] = "fake"

    def __init__(
        self, name: str = "fake", *, outcomes: Iterable[Any] = (), can_observe: bool = True,
        can_compensate: bool = True,
    ) -> None:
        self.instance_name = name
        self._script = list(outcomes)
        self._lock = threading.Lock()
        self.dispatched: list[Effect] = []
        self.received: Counter[str] = Counter()
        self.observed: list[str] = []
        self.compensated: list[Obligation] = []
        self.capabilities = ConnectorCapabilities(
            can_observe=can_observe, can_compensate=can_compensate, default_semantics=Semantics.IDEMPOTENT)

    def dispatch(self, effect: Effect) -> DispatchResult:
        with self._lock:
            self.dispatched.append(effect)
            step = self._script.pop(0) if self._script else None
        deliver = step is None
        if isinstance(step, tuple) and step and step[0] == "deliver":
            deliver, step = True, step[1]
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, DispatchOutcome):
            step = DispatchResult(outcome=step)
        if isinstance(step, DispatchResult) and step.outcome is DispatchOutcome.CONFIRMED:
            deliver = True
        if deliver:
            with self._lock:
                self.received[effect.key] += 1
        if isinstance(step, DispatchResult):
            return step
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED, response={"received": effect.key},
                              external_ref=f"fake-{effect.key}")

    def observe(self, effect: Effect) -> Observation:
        if not self.capabilities.can_observe:
            raise ConfigError(f"connector {self.instance_name!r} was built with can_observe=False", field="observe")
        with self._lock:
            self.observed.append(effect.key)
            n = self.received[effect.key]
        if n == 0:
            return Observation(outcome=ObservationOutcome.ABSENT)
        if n == 1:
            return Observation(outcome=ObservationOutcome.CONFIRMED, response={"received": effect.key})
        return Observation(outcome=ObservationOutcome.DUPLICATE, response={"count": n})

    def compensate(self, obligation: Obligation) -> CompensationResult:
        if not self.capabilities.can_compensate:
            raise ConfigError(f"connector {self.instance_name!r} was built with can_compensate=False",
                              field="compensate")
        with self._lock:
            self.compensated.append(obligation)
        return CompensationResult(outcome=CompensationOutcome.COMPENSATED)

    def deliveries(self, key: str) -> int:
        """How many times ``key`` was received."""
        with self._lock:
            return self.received[key]


class ChaosConnector:
    """Wraps a connector and injects faults at seeded random, so failures replay exactly.

    Faults (probabilities in [0, 1]), checked in this order on each dispatch:

    - ``fail``: raise ``TransientError`` without delivering (the network failed before the request).
    - ``lose_ack``: deliver, then answer ``UNKNOWN`` (the response was lost).
    - ``duplicate``: deliver twice (a retry inside the transport), answer the second result.
    - ``delay``: sleep up to ``max_delay`` seconds before delivering.

    ``observe`` and ``compensate`` pass through to the wrapped connector. An ``async`` connector is wrapped
    by an ``async`` ``dispatch``.

    Args:
        inner: the connector to wrap.
        seed: the random seed.
        fail, lose_ack, duplicate, delay: fault probabilities.
        max_delay: the longest injected delay in seconds.
    """

    name: ClassVar[str] = "chaos"

    def __init__(
        self, inner: Any, *, seed: int = 0, fail: float = 0.0, lose_ack: float = 0.0, duplicate: float = 0.0,
        delay: float = 0.0, max_delay: float = 0.05,
    ) -> None:
        for field_name, p in (("fail", fail), ("lose_ack", lose_ack), ("duplicate", duplicate), ("delay", delay)):
            if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
                raise ConfigError(f"ChaosConnector {field_name} must be a probability in [0, 1], got {p!r}",
                                  field=field_name, value=p)
        self.inner = inner
        self.p_fail, self.p_lose_ack, self.p_duplicate, self.p_delay = fail, lose_ack, duplicate, delay
        self.max_delay = max_delay
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.faults: Counter[str] = Counter()
        self.capabilities = capabilities_of(inner)

    def _roll(self, p: float) -> bool:
        with self._lock:
            return self._rng.random() < p

    def _before(self, effect: Effect) -> tuple[float, bool]:
        """Roll the faults that act before delivery: returns (pause, deliver twice)."""
        if self._roll(self.p_fail):
            self.faults["fail"] += 1
            raise TransientError(f"chaos: connection to the counterparty failed for {effect.key!r}")
        pause = 0.0
        if self._roll(self.p_delay):
            self.faults["delay"] += 1
            with self._lock:
                pause = self._rng.random() * self.max_delay
        twice = self._roll(self.p_duplicate)
        if twice:
            self.faults["duplicate"] += 1
        return pause, twice

    def _after(self, result: Any) -> Any:
        if self._roll(self.p_lose_ack):
            self.faults["lose_ack"] += 1
            return DispatchResult(outcome=DispatchOutcome.UNKNOWN, error="chaos: acknowledgement lost")
        return result

    def dispatch(self, effect: Effect) -> Any:
        if inspect.iscoroutinefunction(self.inner.dispatch):
            return self._dispatch_async(effect)
        pause, twice = self._before(effect)
        time.sleep(pause)
        if twice:
            self.inner.dispatch(effect)
        return self._after(self.inner.dispatch(effect))

    async def _dispatch_async(self, effect: Effect) -> Any:
        pause, twice = self._before(effect)
        await asyncio.sleep(pause)
        if twice:
            await self.inner.dispatch(effect)
        return self._after(await self.inner.dispatch(effect))

    def observe(self, effect: Effect) -> Any:
        return self.inner.observe(effect)

    def compensate(self, obligation: Obligation) -> Any:
        return self.inner.compensate(obligation)
