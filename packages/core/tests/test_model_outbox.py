"""Model-based test of the outbox: random submits (one by one and in batches), dispatches with scripted
connector answers (confirmed, lost acknowledgements, unknown, transient and permanent failures, accepted,
crashes before and after delivering), observations (conclusive or not), approvals, rejections, cancels,
redrives, compensations, process restarts, clock jumps and injected store faults, checked against a small
model of the counterparty.

Invariants, after every step:
- nothing lost: every effect whose submit returned exists (a submit that failed on a fault is retried by
  the caller, and returns the stored record);
- nothing performed twice beyond its semantics: no lease (key, fencing token) is dispatched twice; a
  ``NON_IDEMPOTENT`` effect is never delivered twice without an observation (or a human's redrive) between;
  ``OBSERVE_ONLY`` effects and effects awaiting approval are never dispatched; a finished effect is never
  dispatched again;
- no fault recorded as a business failure: no error recorded is a store fault's; a ``FAILED`` effect failed
  on the connector's own answer, or ran out of attempts; and every attempt charged to an effect went to the
  connector (or was taken by a crash of the process holding it), so a store fault never costs an attempt;
- every lease completes or lapses: a leased row's lease ends within ``lease_for`` from now;
- a ``CONFIRMED`` effect never changes;
and at the end, with faults paused and time moved on: nothing is left pending, dispatching or unresolved
(only effects awaiting a human: approval, or flagged), every obligation is compensated or stuck.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import Counter, defaultdict
from typing import Any, ClassVar

from errands.core import (
    CompensationOutcome,
    CompensationResult,
    ConfigError,
    ConnectorCapabilities,
    DispatchOutcome,
    DispatchResult,
    Effect,
    FakeClock,
    Obligation,
    Observation,
    ObservationOutcome,
    Outbox,
    PermanentError,
    Semantics,
    TransientError,
    is_infrastructure_error,
    open_store,
)
from errands.core.testing import faults
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

LEASE_FOR = 10.0
MAX_ATTEMPTS = 3
BACKOFF_CAP = 20.0
ANSWERS = ["ok", "lost_ack", "unknown", "transient", "failed", "permanent", "pending", "crash_before",
           "crash_after"]
LOOKS = ["truth", "truth", "unknown", "stuck", "raise"]
KINDS = {
    # name: (connector, semantics, human_gate, business_key)
    "idem": ("obs", Semantics.IDEMPOTENT, False, None),
    "nonidem": ("obs", Semantics.NON_IDEMPOTENT, False, None),
    "alo": ("obs", Semantics.AT_LEAST_ONCE, False, None),
    "observe_only": ("obs", Semantics.OBSERVE_ONLY, False, None),
    "gated": ("obs", Semantics.NON_IDEMPOTENT, True, None),
    "blind_idem": ("blind", Semantics.IDEMPOTENT, False, None),
    "blind_nonidem": ("blind", Semantics.NON_IDEMPOTENT, False, "bk"),
}
INFRA = re.compile(r"locked|disk i/o|server closed|serializ|lock timeout|OperationalError|InterfaceError", re.I)
CONNECTOR_ERRORS = re.compile(r"planned|outcome unknown|observed ABSENT after|gave up after")


class Crash(BaseException):
    """The worker process dies here: nothing after this line runs (the model restarts the outbox)."""


class Counterparty:
    """The far side of both connectors: it records every call and delivery, answers dispatches from a
    script (then ``ok``), and observations from what it received (or from a script of inconclusive looks)."""

    def __init__(self, model: OutboxModel) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.answers: list[str] = []
        self.looks: list[str] = []
        self.delivered: Counter[str] = Counter()
        self.tokens: set[tuple[str, int]] = set()
        self.compensated: Counter[tuple[str, str]] = Counter()

    def dispatch(self, effect: Effect) -> DispatchResult:
        m = self.model
        key, token = effect.key, int(effect.metadata["errands.lease_token"])
        with self.lock:
            if (key, token) in self.tokens:
                m.violations.append(f"lease {key}/{token} dispatched twice")
            self.tokens.add((key, token))
            answer = self.answers.pop(0) if self.answers else "ok"
        spec = m.specs.get(key)
        if spec is None or spec[1] is Semantics.OBSERVE_ONLY:
            m.violations.append(f"{key} ({spec}) was dispatched")
        if key in m.gated_waiting:
            m.violations.append(f"{key} was dispatched before it was approved")
        if key in m.confirmed:
            m.violations.append(f"{key} was dispatched after it was CONFIRMED")
        m.calls[key] += 1
        m.step_calls.add(key)
        m.said[key].append(answer)
        if answer == "crash_before":
            raise Crash
        if answer in ("ok", "lost_ack", "pending", "crash_after"):
            self._deliver(effect)
        if answer == "crash_after":
            raise Crash
        if answer == "transient":
            raise TransientError("planned transient failure")
        if answer == "permanent":
            raise PermanentError("planned permanent failure")
        outcome = {"ok": DispatchOutcome.CONFIRMED, "lost_ack": DispatchOutcome.UNKNOWN,
                   "unknown": DispatchOutcome.UNKNOWN, "failed": DispatchOutcome.FAILED,
                   "pending": DispatchOutcome.PENDING}[answer]
        error = "planned failure" if answer == "failed" else None
        return DispatchResult(outcome=outcome, error=error, external_ref=f"ref-{key}")

    def _deliver(self, effect: Effect) -> None:
        m = self.model
        key = effect.key
        with self.lock:
            self.delivered[key] += 1
        if m.specs[key][1] is Semantics.NON_IDEMPOTENT:
            if m.unobserved[key]:
                m.violations.append(f"NON_IDEMPOTENT {key} delivered twice with no observation between")
            m.unobserved[key] = True

    def observe(self, effect: Effect) -> Observation:
        key = effect.key
        with self.lock:
            look = self.looks.pop(0) if self.looks else "truth"
            n = self.delivered[key]
        self.model.unobserved[key] = False
        self.model.looks[key].append(look)
        if look == "raise":
            raise TransientError("planned observation failure")
        if look == "unknown":
            return Observation(outcome=ObservationOutcome.UNKNOWN)
        if look == "stuck":
            return Observation(outcome=ObservationOutcome.STUCK)
        if n == 0:
            return Observation(outcome=ObservationOutcome.ABSENT)
        if n == 1:
            return Observation(outcome=ObservationOutcome.CONFIRMED, external_ref=f"ref-{key}")
        return Observation(outcome=ObservationOutcome.DUPLICATE, response={"count": n})

    def compensate(self, obligation: Obligation) -> CompensationResult:
        with self.lock:
            self.compensated[(obligation.effect_key, obligation.kind)] += 1
        return CompensationResult(outcome=CompensationOutcome.COMPENSATED)


class Observing:
    name: ClassVar[str] = "obs"
    capabilities = ConnectorCapabilities(can_observe=True, can_compensate=True)

    def __init__(self, cp: Counterparty) -> None:
        self.cp = cp

    def dispatch(self, effect: Effect) -> DispatchResult:
        return self.cp.dispatch(effect)

    def observe(self, effect: Effect) -> Observation:
        return self.cp.observe(effect)

    def compensate(self, obligation: Obligation) -> CompensationResult:
        return self.cp.compensate(obligation)


class Blind:
    """Dispatch only: it can neither observe nor compensate."""

    name: ClassVar[str] = "blind"

    def __init__(self, cp: Counterparty) -> None:
        self.cp = cp

    def dispatch(self, effect: Effect) -> DispatchResult:
        return self.cp.dispatch(effect)


class OutboxModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.store = open_store("memory://", clock=self.clock)
        self.plan = faults.FaultPlan()
        self.stack = contextlib.ExitStack()
        self.cp = Counterparty(self)
        self.connectors = {"obs": Observing(self.cp), "blind": Blind(self.cp)}
        self.outbox: Outbox | None = None
        self.generation = 0
        self.n = 0
        self.specs: dict[str, tuple[str, Semantics, bool, str | None]] = {}
        self.violations: list[str] = []
        self.calls: Counter[str] = Counter()  # dispatch calls since the last redrive
        self.spent: Counter[str] = Counter()  # attempts charged by a crash without a call of their own
        self.said: defaultdict[str, list[str]] = defaultdict(list)
        self.looks: defaultdict[str, list[str]] = defaultdict(list)
        self.unobserved: defaultdict[str, bool] = defaultdict(bool)
        self.gated_waiting: set[str] = set()
        self.step_calls: set[str] = set()
        self.confirmed: dict[str, tuple[Any, ...]] = {}

    # -- the system under test -----------------------------------------------------------------------
    def _new_outbox(self) -> None:
        if self.outbox is not None:
            self.outbox.close()
        self.generation += 1
        with self.plan.paused():  # a process that cannot open its store is restarted: not modelled here
            self.outbox = Outbox(self.store, connectors=self.connectors, batch_size=3, max_in_flight=1,
                                 max_attempts=MAX_ATTEMPTS, max_observations=2, compensation_attempts=3,
                                 backoff_base=1.0, backoff_cap=BACKOFF_CAP, owner=f"worker-{self.generation}",
                                 seed=self.generation)

    @property
    def ob(self) -> Outbox:
        assert self.outbox is not None
        return self.outbox

    def _rows(self) -> dict[str, tuple[Any, ...]]:
        with self.plan.paused(), self.store.read() as tx:
            return {r[0]: tuple(r[1:]) for r in tx.query(
                "SELECT key, status, attempts, response, error, external_ref, lease_owner, next_attempt_at, flagged, "
                "lease_token FROM em_effects")}

    def _effect(self, kind: str) -> Effect:
        self.n += 1
        key = f"e{self.n}"
        connector, semantics, gate, business_key = KINDS[kind]
        self.specs[key] = (connector, semantics, gate, business_key)
        if gate:
            self.gated_waiting.add(key)
        return Effect(key=key, connector=connector, payload={"n": self.n}, semantics=semantics, human_gate=gate,
                      business_key=business_key)

    def _user_call(self, fn: Any, *args: Any) -> Any:
        """A caller's own call under faults: an infrastructure error is the only failure allowed, and the
        caller retries it (without faults) as a user would."""
        try:
            return fn(*args)
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
        with self.plan.paused():
            return fn(*args)

    def _engine_step(self, fn: Any) -> None:
        """A worker step under faults: it may fail on an infrastructure error (the worker logs it and runs the
        next pass) or die with the process (a crash: the process is restarted)."""
        self.step_calls.clear()
        try:
            fn()
        except Crash:
            # The dead process's claimed effects it had not called the connector for yet cost an attempt.
            me = self.ob.owner
            for key, row in self._rows().items():
                if row[0] == "DISPATCHING" and row[5] == me and key not in self.step_calls:
                    self.spent[key] += 1
            self._new_outbox()
        except Exception as exc:
            assert is_infrastructure_error(exc), f"a worker step raised {exc!r}"

    # -- rules ---------------------------------------------------------------------------------------
    @initialize(seed=st.integers(0, 2**32 - 1), rate=st.sampled_from([0.0, 0.03, 0.1, 0.25]))
    def start(self, seed: int, rate: float) -> None:
        self.plan = faults.FaultPlan(seed=seed, rate=rate, kinds=faults.KINDS, when=faults.WHEN)
        self.stack.enter_context(faults.inject(self.store, self.plan))
        self._new_outbox()

    @rule(kind=st.sampled_from(sorted(KINDS)))
    def submit(self, kind: str) -> None:
        effect = self._effect(kind)
        rec = self._user_call(self.ob.submit, effect)
        assert rec.key == effect.key

    @rule(kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=4))
    def submit_many(self, kinds: list[str]) -> None:
        effects = [self._effect(k) for k in kinds]
        recs = self._user_call(self.ob.submit_many, effects)
        assert [r.key for r in recs] == [e.key for e in effects]

    @rule(answers=st.lists(st.sampled_from(ANSWERS), min_size=1, max_size=4))
    def script_answers(self, answers: list[str]) -> None:
        self.cp.answers.extend(answers)

    @rule(looks=st.lists(st.sampled_from(LOOKS), min_size=1, max_size=3))
    def script_looks(self, looks: list[str]) -> None:
        self.cp.looks.extend(looks)

    @rule()
    def dispatch(self) -> None:
        self._engine_step(self.ob.dispatch_once)

    @rule()
    def reconcile(self) -> None:
        self._engine_step(self.ob.reconcile_once)

    @rule()
    def compensate(self) -> None:
        self._engine_step(self.ob.compensate_once)

    def _pick(self, pick: int) -> str | None:
        keys = sorted(self.specs)
        return keys[pick % len(keys)] if keys else None

    @rule(pick=st.integers(0, 1000), verb=st.sampled_from(["approve", "reject", "cancel", "redrive"]))
    def human(self, pick: int, verb: str) -> None:
        key = self._pick(pick)
        if key is None:
            return
        status, flagged = self._rows()[key][0], self._rows()[key][7]
        allowed = {"approve": status == "AWAITING_APPROVAL", "reject": status == "AWAITING_APPROVAL",
                   "cancel": status in ("PENDING", "AWAITING_APPROVAL"),
                   "redrive": status in ("FAILED", "CANCELLED") or (status == "UNKNOWN" and bool(flagged))}[verb]
        try:
            getattr(self.ob, verb)(key)
        except ConfigError:
            assert not allowed, f"{verb} {key} refused while it was {status}"
            return
        except Exception as exc:
            assert is_infrastructure_error(exc), repr(exc)
            # The caller retries; if the first try committed after all, the retry is refused.
            with self.plan.paused(), contextlib.suppress(ConfigError):
                getattr(self.ob, verb)(key)
        else:
            assert allowed, f"{verb} {key} accepted while it was {status}"
        if not allowed:
            return
        self.gated_waiting.discard(key)
        if verb == "redrive":
            # A human's decision that a new delivery is wanted: the count of attempts starts again.
            self.calls[key] = 0
            self.spent[key] = 0
            self.said[key].clear()
            self.unobserved[key] = False

    @rule()
    def restart(self) -> None:
        """The worker process is replaced (its leases, none held between steps, stay as they are)."""
        self._new_outbox()

    @rule(seconds=st.sampled_from([0.5, 3.0, LEASE_FOR + 1, 60.0, BACKOFF_CAP * 20]))
    def jump(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # -- invariants ----------------------------------------------------------------------------------
    @invariant()
    def holds(self) -> None:
        assert not self.violations, self.violations
        if self.outbox is None:
            return
        rows = self._rows()
        now = self.clock.now()
        for key in self.specs:
            assert key in rows, f"effect {key} was lost"
        for key, (status, attempts, response, error, ref, owner, next_at, _flag, _token) in rows.items():
            if key in self.confirmed:
                assert (status, response, ref) == self.confirmed[key][:3], f"CONFIRMED {key} changed"
            elif status == "CONFIRMED":
                self.confirmed[key] = (status, response, ref, attempts)
            if error is not None:
                assert not INFRA.search(error), f"a store fault was recorded on {key}: {error}"
            # Every attempt charged went to the connector, or was taken by a crash: a store fault costs none.
            assert int(attempts) <= self.calls[key] + self.spent[key], (
                f"{key} was charged {attempts} attempts for {self.calls[key]} calls ({self.said[key]}) and "
                f"{self.spent[key]} crashes")
            if status == "FAILED":
                assert error is not None and CONNECTOR_ERRORS.search(error), (key, error, self.said[key])
                if "gave up after" not in error and "observed ABSENT after" not in error:
                    assert self.said[key] and self.said[key][-1] in ("failed", "permanent"), (key, error)
            if status in ("DISPATCHING",) or owner is not None:
                assert next_at is not None and float(next_at) <= now + LEASE_FOR + 1e-6, (
                    f"{key} holds a lease beyond lease_for: {status} until {next_at}, now {now}")

    def teardown(self) -> None:
        try:
            if self.outbox is not None:
                self._settle()
        finally:
            if self.outbox is not None:
                self.outbox.close()
            self.stack.close()
            self.store.close()

    def _settle(self) -> None:
        """Faults stop, the counterparty answers truthfully, time passes: everything must come to rest."""
        with self.plan.paused():
            self.cp.answers.clear()
            self.cp.looks.clear()
            self._new_outbox()
            for _ in range(12):
                self.clock.advance(BACKOFF_CAP * 20)
                self.ob.drain()
            self.holds()
            rows = self._rows()
            for key, (status, _a, _r, _e, _ref, owner, _n, flagged, _t) in rows.items():
                assert owner is None, f"{key} still leased by {owner}"
                assert status in ("CONFIRMED", "FAILED", "CANCELLED", "AWAITING_APPROVAL") or (
                    status == "UNKNOWN" and flagged), f"{key} did not come to rest: {status}"
            for rec in self.ob.obligations(limit=10_000):
                assert rec.status.value in ("COMPENSATED", "STUCK"), f"obligation {rec.id} is {rec.status}"
                if rec.status.value == "COMPENSATED":
                    assert self.cp.compensated[(rec.effect_key, rec.kind)] >= 1


OutboxModel.TestCase.settings = faults.model_settings()
test_outbox_model = OutboxModel.TestCase
