"""The published ConnectorContract, run against the fakes shipped in errands.core.testing and an async
connector, so that the suite itself is exercised here."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest
from errands.core import (
    CompensationOutcome,
    CompensationResult,
    DispatchOutcome,
    DispatchResult,
    Effect,
    Obligation,
    Observation,
    ObservationOutcome,
)
from errands.core.testing import ChaosConnector, ConnectorContract, FakeConnector


class AsyncLedger:
    """An async counterparty that dedups on the key."""

    name: ClassVar[str] = "async-ledger"

    def __init__(self) -> None:
        self.keys: set[str] = set()

    async def dispatch(self, effect: Effect) -> DispatchResult:
        await asyncio.sleep(0)
        self.keys.add(effect.key)
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED)

    async def observe(self, effect: Effect) -> Observation:
        found = effect.key in self.keys
        return Observation(outcome=ObservationOutcome.CONFIRMED if found else ObservationOutcome.ABSENT)

    async def compensate(self, obligation: Obligation) -> CompensationResult:
        self.keys.discard(obligation.effect_key)
        return CompensationResult(outcome=CompensationOutcome.COMPENSATED)


class TestAsyncConnector(ConnectorContract):
    @pytest.fixture
    def connector(self) -> Any:
        return AsyncLedger()


class TestChaosAroundAsync(ConnectorContract):
    @pytest.fixture
    def connector(self) -> Any:
        return ChaosConnector(AsyncLedger(), seed=3, delay=0.5, max_delay=0.001)


def test_chaos_around_an_async_connector_duplicates_and_loses_acks() -> None:
    from errands.core import EffectStatus, Outbox, open_store

    ledger = AsyncLedger()
    calls: list[str] = []
    original = ledger.dispatch

    async def counting(effect: Effect) -> DispatchResult:
        calls.append(effect.key)
        return await original(effect)

    ledger.dispatch = counting  # type: ignore[method-assign]
    outbox = Outbox(open_store("memory://"), connectors={"c": ChaosConnector(ledger, duplicate=1.0, lose_ack=1.0)})
    outbox.submit(Effect(key="k", connector="c", payload={}))
    [out] = outbox.dispatch_once()
    assert out.status is EffectStatus.UNKNOWN and calls == ["k", "k"]
    outbox.close()


class TestChaosWithoutFaults(ConnectorContract):
    @pytest.fixture
    def connector(self) -> Any:
        return ChaosConnector(SyncLedger(), seed=3)


class SyncLedger:
    """A sync counterparty that dedups on the key."""

    name: ClassVar[str] = "sync-ledger"

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def dispatch(self, effect: Effect) -> DispatchResult:
        self.keys.add(effect.key)
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED)

    def observe(self, effect: Effect) -> Observation:
        found = effect.key in self.keys
        return Observation(outcome=ObservationOutcome.CONFIRMED if found else ObservationOutcome.ABSENT)


def test_the_contract_catches_a_connector_that_duplicates() -> None:
    # FakeConnector records every delivery and dedups nothing: the idempotency check must notice.
    contract = ConnectorContract()
    fake = FakeConnector("fake")
    with pytest.raises(AssertionError, match="must hold it once"):
        contract.test_dispatch_is_idempotent_on_the_key(fake, lambda fn, item: fn(item))


def test_chaos_faults_are_seeded_and_counted() -> None:
    def run(seed: int) -> tuple[list[str], dict[str, int]]:
        inner = FakeConnector("bank")
        chaos = ChaosConnector(inner, seed=seed, fail=0.2, lose_ack=0.2, duplicate=0.2, delay=0.2, max_delay=0.001)
        answers = []
        for i in range(50):
            try:
                answers.append(chaos.dispatch(Effect(key=f"k{i}", connector="bank", payload={})).outcome.value)
            except Exception as exc:
                answers.append(type(exc).__name__)
        assert sum(inner.received.values()) == 50 - chaos.faults["fail"] + chaos.faults["duplicate"]
        return answers, dict(chaos.faults)

    assert run(4) == run(4)
    answers, faults = run(4)
    assert set(faults) == {"fail", "lose_ack", "duplicate", "delay"}
    assert answers.count("TransientError") == faults["fail"] and answers.count("UNKNOWN") == faults["lose_ack"]
    with pytest.raises(Exception, match="probability"):
        ChaosConnector(FakeConnector(), fail=2)
