"""``ConnectorContract``: the behaviour every errands connector must show. Subclass it and supply ``connector``."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterator

import pytest

from .._protocols import capabilities_of
from .._runtime import CallRunner
from .._values import (
    CompensationResult,
    DispatchOutcome,
    DispatchResult,
    Effect,
    EffectStatus,
    Obligation,
    Observation,
    ObservationOutcome,
    Semantics,
)
from ..errors import ConfigError, NotFoundError
from ..outbox import ObligationStatus, Outbox
from ..store._stores import open_store


class ConnectorContract:
    """Subclass and override the ``connector`` fixture; it must return a connector whose counterparty is ready
    (a real server on a free port, a temporary file). Override ``make_effect`` to build effects the
    counterparty accepts. Sync and async connectors are both exercised the way the engine calls them.

    Example:
        >>> class TestLogConnector(ConnectorContract):     # doctest: +SKIP
        ...     @pytest.fixture
        ...     def connector(self, tmp_path):
        ...         return LogConnector(path=str(tmp_path / "dispatch.jsonl"))
    """

    connector_name = "under-test"

    @pytest.fixture
    def connector(self) -> Any:  # pragma: no cover - must be overridden
        pytest.fail(f"{type(self).__name__} must override the connector fixture to return the connector to test")

    @pytest.fixture
    def call(self) -> Iterator[Callable[[Callable[[Any], Any], Any], Any]]:
        runner = CallRunner(1)
        try:
            yield runner.call
        finally:
            runner.close()

    def make_effect(self, key: str) -> Effect:
        """An effect the counterparty accepts."""
        return Effect(key=key, connector=self.connector_name, payload={"amount": 5, "note": "h\u00e9llo"},
                      tool="contract", metadata={"errands.attempt": 1})

    def new_key(self) -> str:
        return f"contract-{uuid.uuid4().hex}"

    # -- shape -------------------------------------------------------------------------------
    def test_has_a_name(self, connector: Any) -> None:
        name = getattr(type(connector), "name", None)
        assert isinstance(name, str) and name, "a connector class needs name: ClassVar[str] (its config type)"

    def test_capabilities_agree_with_methods(self, connector: Any) -> None:
        caps = capabilities_of(connector)
        if caps.can_observe:
            assert callable(getattr(connector, "observe", None)), "can_observe=True but no observe()"
        if caps.can_compensate:
            assert callable(getattr(connector, "compensate", None)), "can_compensate=True but no compensate()"

    # -- dispatch ----------------------------------------------------------------------------
    def test_dispatch_returns_a_dispatch_result(self, connector: Any, call: Any) -> None:
        result = call(connector.dispatch, self.make_effect(self.new_key()))
        assert isinstance(result, DispatchResult)
        assert result.outcome in set(DispatchOutcome)
        assert result.outcome is DispatchOutcome.CONFIRMED, f"a healthy counterparty should confirm, got {result}"

    def test_dispatch_is_idempotent_on_the_key(self, connector: Any, call: Any) -> None:
        effect = self.make_effect(self.new_key())
        first = call(connector.dispatch, effect)
        second = call(connector.dispatch, effect)
        assert first.outcome is DispatchOutcome.CONFIRMED
        assert second.outcome is not DispatchOutcome.FAILED, "a repeated dispatch of one key must not fail"
        if capabilities_of(connector).can_observe:
            seen = call(connector.observe, effect)
            assert isinstance(seen, Observation)
            assert seen.outcome in (ObservationOutcome.CONFIRMED, ObservationOutcome.UNKNOWN), (
                f"after two dispatches of one key the counterparty must hold it once, observed {seen.outcome}")

    # -- observe -----------------------------------------------------------------------------
    def test_observe_before_dispatch_is_absent_or_unknown(self, connector: Any, call: Any) -> None:
        if not self._observes(connector):
            return
        seen = call(connector.observe, self.make_effect(self.new_key()))
        assert isinstance(seen, Observation)
        assert seen.outcome in (ObservationOutcome.ABSENT, ObservationOutcome.UNKNOWN)

    def test_observe_after_dispatch_is_confirmed_or_unknown(self, connector: Any, call: Any) -> None:
        if not self._observes(connector):
            return
        effect = self.make_effect(self.new_key())
        call(connector.dispatch, effect)
        seen = call(connector.observe, effect)
        assert seen.outcome in (ObservationOutcome.CONFIRMED, ObservationOutcome.UNKNOWN)

    # -- compensate --------------------------------------------------------------------------
    def test_compensate_returns_a_compensation_result(self, connector: Any, call: Any) -> None:
        if not self._compensates(connector):
            return
        effect = self.make_effect(self.new_key())
        call(connector.dispatch, effect)
        ob = Obligation(effect_key=effect.key, kind="contract", payload={"why": "contract"}, attempt=1,
                        compensator=self.connector_name)
        first = call(connector.compensate, ob)
        again = call(connector.compensate, ob)
        assert isinstance(first, CompensationResult) and isinstance(again, CompensationResult)

    # -- what the engine does for a connector without a capability ---------------------------
    def _observes(self, connector: Any) -> bool:
        """Whether ``connector`` observes; when it does not, what the engine does instead is checked."""
        if capabilities_of(connector).can_observe:
            return True
        self._check_cannot_observe(connector)
        return False

    def _compensates(self, connector: Any) -> bool:
        """Whether ``connector`` compensates; when it does not, what the engine does instead is checked."""
        if capabilities_of(connector).can_compensate:
            return True
        self._check_cannot_compensate(connector)
        return False

    def _check_cannot_observe(self, connector: Any) -> None:
        """A connector that cannot observe gets no NON_IDEMPOTENT effect without another safety net, and
        nothing is stored for the refused effect."""
        store = open_store("memory://")
        outbox = Outbox(store, connectors={self.connector_name: connector})
        try:
            base = self.make_effect(self.new_key())
            risky = Effect(key=base.key, connector=base.connector, payload=base.payload, tool=base.tool,
                           semantics=Semantics.NON_IDEMPOTENT)
            with pytest.raises(ConfigError):
                outbox.submit(risky)
            with pytest.raises(NotFoundError):
                outbox.get(risky.key)
        finally:
            outbox.close()
            store.close()

    def _check_cannot_compensate(self, connector: Any) -> None:
        """A compensation owed through a connector that cannot compensate is never dropped: it ends STUCK,
        visible, with the reason."""
        store = open_store("memory://")
        outbox = Outbox(store, connectors={self.connector_name: connector}, compensation_attempts=1)
        try:
            effect = self.make_effect(self.new_key())
            outbox.submit(effect)
            outbox.drain()
            outbox.register_compensation(effect.key, "contract", {"why": "contract"}, due=True)
            outbox.compensate_once()
            (owed,) = outbox.obligations(effect_key=effect.key)
            assert owed.status is ObligationStatus.STUCK, owed.status
            assert owed.error and "no compensator" in owed.error
        finally:
            outbox.close()
            store.close()

    # -- through the engine ------------------------------------------------------------------
    def test_end_to_end_through_the_outbox(self, connector: Any) -> None:
        store = open_store("memory://")
        outbox = Outbox(store, connectors={self.connector_name: connector}, max_in_flight=4)
        try:
            keys = [self.new_key() for _ in range(5)]
            outbox.submit_many([self.make_effect(k) for k in keys])
            outbox.drain()
            for key in keys:
                rec = outbox.get(key)
                assert rec.status is EffectStatus.CONFIRMED, f"{key}: {rec.status} ({rec.error})"
                assert rec.attempts == 1
        finally:
            outbox.close()
            store.close()
