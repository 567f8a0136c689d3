"""Model-based test of ``ctx.effect``: random workflows of effects (plain non-idempotent ones through a chaos
connector, human-gated ones, ones the counterparty refuses), run by two runners with outboxes of their own on
one SQLite file, in random order, with clock jumps, restarts and gate decisions.

Invariants, after every step:
- every effect in the outbox belongs to a started effect operation of its execution and vice versa (nothing
  submitted without its checkpoint, nothing checkpointed without its effect);
- the counterparty received each effect at most once (lost acknowledgements are observed, never resent);
- a settled effect operation holds the record of an ended effect, and never changes afterwards;
- a finished execution never changes;
and at the end, with the gates decided and time moved on, every execution finishes with what the model
says: CONFIRMED for delivered and approved effects, CANCELLED for rejected ones, FAILED for refused ones.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from errands.core import Effect, EffectStatus, FakeClock, Outbox, Semantics, open_store
from errands.core.testing import ChaosConnector, FakeConnector, faults
from errands.durable import (
    DurableContext,
    DurableRunner,
    EffectFailedError,
    ExecutionStatus,
    OperationStatus,
    OperationSubType,
)
from errands.durable._effects import record_from_json
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

KINDS = st.sampled_from(["plain", "plain", "gated", "refused"])


def effects(event: Any, ctx: DurableContext) -> Any:
    out = []
    for i, kind in enumerate(event):
        connector = "shop" if kind == "refused" else "bank"
        effect = Effect(key="-", connector=connector, payload={"i": i}, semantics=Semantics.NON_IDEMPOTENT,
                        human_gate=kind == "gated")
        try:
            out.append(ctx.effect(f"e{i}", effect).status.value)
        except EffectFailedError as exc:
            out.append(exc.record.status.value)
    return out


class EffectsModel(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 1000))
    def open(self, seed: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="errands-effects-model-")
        self.url = f"sqlite:///{Path(self.dir) / 'durable.db'}"
        self.clock = FakeClock()
        self.bank = FakeConnector("bank")
        self.chaos = ChaosConnector(self.bank, seed=seed, fail=0.3, lose_ack=0.3)
        self.parts: list[tuple[Any, Outbox, DurableRunner]] = [self._part() for _ in range(2)]
        self.kinds: dict[str, list[str]] = {}
        self.decisions: dict[str, bool] = {}  # gated effect key -> approved
        self.ended: dict[str, Any] = {}
        self.settled: dict[tuple[str, str], str | None] = {}

    def _part(self) -> tuple[Any, Outbox, DurableRunner]:
        store = open_store(self.url, clock=self.clock)
        outbox = Outbox(store, connectors={"bank": self.chaos, "shop": _Refusing()}, backoff_base=0.01,
                        backoff_cap=0.05, max_attempts=100)
        return store, outbox, DurableRunner(store, outbox=outbox, functions={"effects": effects})

    def teardown(self) -> None:
        try:
            if hasattr(self, "parts"):
                self.settle_everything()
        finally:
            self._close()

    def _close(self) -> None:
        for store, outbox, runner in getattr(self, "parts", []):
            runner.close()
            outbox.close()
            store.close()
        shutil.rmtree(getattr(self, "dir", ""), ignore_errors=True)

    @property
    def look(self) -> DurableRunner:
        return self.parts[0][2]

    # -- rules -----------------------------------------------------------------------------------
    @rule(kinds=st.lists(KINDS, min_size=1, max_size=3))
    def start(self, kinds: list[str]) -> None:
        eid = self.look.start("effects", kinds)
        self.kinds[eid] = kinds

    @rule(part=st.sampled_from([0, 1]))
    def work(self, part: int) -> None:
        self.parts[part][2].work_once()

    @rule(part=st.sampled_from([0, 1]))
    def dispatch(self, part: int) -> None:
        outbox = self.parts[part][1]
        outbox.dispatch_once()
        outbox.reconcile_once()
        outbox.compensate_once()

    @rule(seconds=st.sampled_from([0.02, 0.1, 1.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(part=st.sampled_from([0, 1]))
    def restart(self, part: int) -> None:
        store, outbox, runner = self.parts[part]
        runner.close()
        outbox.close()
        store.close()
        self.parts[part] = self._part()

    def _waiting(self) -> list[str]:
        return sorted(r.key for r in self.parts[0][1].list(status=EffectStatus.AWAITING_APPROVAL, limit=100))

    @precondition(lambda self: bool(self._waiting()))
    @rule(approve=st.booleans(), data=st.data())
    def decide(self, approve: bool, data: st.DataObject) -> None:
        outbox = self.parts[0][1]
        key = data.draw(st.sampled_from(self._waiting()))
        (outbox.approve if approve else outbox.reject)(key)
        self.decisions[key] = approve

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def effects_and_operations_match(self) -> None:
        if not hasattr(self, "parts"):
            return
        ops = {}
        for eid in self.kinds:
            for op in self.look.history(eid):
                assert op.sub_type is OperationSubType.EFFECT
                ops[op.callback_id] = (eid, op)
        submitted = {r.key: r for r in self.parts[0][1].list(limit=1000)}
        assert set(submitted) == set(ops)
        for key, (eid, op) in ops.items():
            assert key == f"durable/{eid}/{op.id}"
            assert self.bank.deliveries(key) <= 1, key
            if op.status is OperationStatus.SUCCEEDED:
                record = record_from_json(op.result)
                assert record.key == key and record.status in (
                    EffectStatus.CONFIRMED, EffectStatus.FAILED, EffectStatus.CANCELLED)
                assert self.settled.setdefault((eid, op.id), op.result) == op.result
            else:
                assert op.status is OperationStatus.STARTED

    @invariant()
    def finished_executions_never_change(self) -> None:
        if not hasattr(self, "parts"):
            return
        for eid in self.kinds:
            info = self.look.get(eid)
            if info.status.terminal:
                assert self.ended.setdefault(eid, (info.status, info.result)) == (info.status, info.result)

    # -- the end ---------------------------------------------------------------------------------
    @rule()
    def settle_everything(self) -> None:
        """Decide every gate and run until every execution ends (the model's last step, also mid-way)."""
        for _ in range(400):
            outbox = self.parts[0][1]
            for r in outbox.list(status=EffectStatus.AWAITING_APPROVAL, limit=100):
                outbox.approve(r.key)
                self.decisions[r.key] = True
            for _store, box, runner in self.parts:
                runner.work_once()
                box.drain()
            self.clock.advance(0.1)
            if all(self.look.get(e).status.terminal for e in self.kinds):
                break
        for eid, kinds in self.kinds.items():
            info = self.look.get(eid)
            assert info.status is ExecutionStatus.SUCCEEDED, (eid, info.status, info.error)
            keys = [op.callback_id for op in self.look.history(eid)]
            expected = []
            for kind, key in zip(kinds, keys):
                if kind == "refused":
                    expected.append("FAILED")
                elif kind == "gated" and not self.decisions[key]:
                    expected.append("CANCELLED")
                else:
                    expected.append("CONFIRMED")
                    assert self.bank.deliveries(key) == 1
            assert info.result == expected


class _Refusing:
    """A counterparty that refuses every effect for good."""

    name = "shop"

    def dispatch(self, effect: Any) -> Any:
        from errands.core import DispatchOutcome, DispatchResult

        return DispatchResult(outcome=DispatchOutcome.FAILED, error="out of stock")

    def observe(self, effect: Any) -> Any:
        from errands.core import Observation, ObservationOutcome

        return Observation(outcome=ObservationOutcome.ABSENT)


EffectsModel.TestCase.settings = faults.model_settings(int(os.environ.get("ERRANDS_MODEL_EXAMPLES", "60")), steps=30)
test_effects_model = EffectsModel.TestCase
