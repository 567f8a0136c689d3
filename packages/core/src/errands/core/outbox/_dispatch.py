"""The worker's effect steps: claim a batch, call its connectors (``dispatch``, or ``observe`` for effects whose
outcome is unknown), apply the answers (``_transitions``) and record them in one transaction fenced by the leases.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Callable, Sequence

from .. import telemetry
from .._runtime import Latency
from .._values import EffectStatus, Semantics
from ..errors import ConfigError, PermanentError
from ..runtime import retry_infrastructure
from ..store import NewEvent, Tx
from . import _effect_table, _obligation_table
from ._admission import safety_net_problem
from ._context import SKIPPED, Context, TableLease, release_failed_claim
from ._records import Claimed, EffectOutcome
from ._transitions import (
    CallResult,
    Completion,
    dispatch_transition,
    dispatching_event,
    effect_event,
    lease_lost,
    not_started,
    obligation_event,
    observe_transition,
)

log = logging.getLogger("errands.outbox")
DISPATCH, OBSERVE = "errands.outbox.dispatch", "errands.outbox.observe"
EFFECTS, LEASE_LOST = "errands.outbox.effects", "errands.lease.lost"
ATTEMPTS = "errands.outbox.dispatch.attempts"


def _count_by(counter: str, attribute: str, values: Sequence[str]) -> None:
    """Add to ``counter`` one per item of ``values``, by value (as ``attribute``): once per distinct value of a
    batch, not once per effect."""
    if values and telemetry.is_enabled():
        for value, n in Counter(values).items():
            telemetry.count(counter, n, **{attribute: value})


class Dispatcher:
    """The ``dispatch_once`` and ``reconcile_once`` steps of one outbox."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.latency = Latency()

    def _lease(self, claimed: Sequence[Claimed], status: str, until: float, verb: str) -> TableLease:
        s = self.ctx.settings

        def extend(tx: Tx, held: list[tuple[Any, int]], at: float) -> set[Any]:
            return _effect_table.extend(tx, held, at, status)

        return TableLease(self.ctx.store, extend, {c.effect.key: c.token for c in claimed}, expires=until,
                          lease_for=s.lease_for, what=f"{len(claimed)} effects {verb} by {s.owner}")

    def _release_dispatch(self, tx: Tx, claimed_at: float) -> None:
        """Give a dispatch claim back (``release_failed_claim``), journalling each effect due again."""
        given_back = _effect_table.release_dispatch_claim(tx, self.ctx.settings.owner, claimed_at)
        self.ctx.journal(tx, [effect_event(e.key, e.connector, e.tool, "PENDING", released="store fault during claim",
                                           run_id=e.run_id, business_key=e.business_key) for e in given_back])

    # -- dispatch -------------------------------------------------------------------------------------------------
    def dispatch_once(self, limit: int | None) -> list[EffectOutcome]:
        known = self.ctx.connectors.for_calls("dispatch")
        if not known:
            return []
        ctx, s = self.ctx, self.ctx.settings
        now = ctx.store.clock.now()
        until = now + s.lease_for
        try:
            with ctx.store.transaction() as tx:
                claimed = _effect_table.claim_for_dispatch(tx, s.owner, until, now, known, limit or s.batch_size)
                if not claimed:
                    return []
                ctx.journal(tx, [dispatching_event(c) for c in claimed])
        except Exception as exc:
            release_failed_claim(ctx, exc, "a dispatch claim", lambda tx: self._release_dispatch(tx, now))
            raise
        lease = self._lease(claimed, "DISPATCHING", until, "dispatched")
        # The connector of each call made, counted once per batch as dispatch attempts (appends are atomic: the
        # calls may run on the runner's threads).
        made: list[str] = []
        try:
            def call(c: Claimed) -> Any:
                return lease.call(c.effect.key, self._dispatch_call, (c, made))

            names = sorted({c.effect.connector for c in claimed})
            results: list[CallResult] = []
            try:
                if len(claimed) > 1 and self.latency.untimed(names):
                    # A connector not timed yet: its first call runs alone, to learn whether it is quick.
                    results = ctx.runner.map(call, claimed[:1], inline=True)
                results += ctx.runner.map(call, claimed[len(results):], inline=self.latency.quick(names))
            finally:
                _count_by(ATTEMPTS, "connector", made)
            observes = {name: ctx.connectors.can_observe(name) for name in names}
            answered = ctx.store.clock.now()

            def transition(c: Claimed, result: CallResult) -> Completion:
                return dispatch_transition(c, result, can_observe=observes[c.effect.connector], now=answered,
                                           delay=ctx.delay)

            return self._finish(claimed, results, EffectStatus.DISPATCHING, lease, transition)
        finally:
            lease.stop()

    def _dispatch_call(self, call: tuple[Claimed, list[str]]) -> Any:
        c, made = call
        effect = c.effect
        connectors = self.ctx.connectors
        conn = connectors.instance(effect.connector)
        if effect.semantics is Semantics.NON_IDEMPOTENT:
            # Admitted where the connector was known by name only, perhaps: its safety net is checked here, before
            # any delivery.
            problem = safety_net_problem(effect, connectors.capabilities(effect.connector), self.ctx.compensators,
                                         human_gate=c.human_gate)
            if problem is not None:
                raise PermanentError(problem)
        started = time.perf_counter()
        if not telemetry.tracing():
            # No span to start: neither its attributes nor its parent are worth reading.
            try:
                return self.ctx.runner.call(conn.dispatch, effect)
            finally:
                self._timed(effect.connector, started, made)
        with telemetry.span(DISPATCH, telemetry.stored(effect.metadata), **self._attributes(c)) as span:
            try:
                return telemetry.answered(span, self.ctx.runner.call(conn.dispatch, effect))
            finally:
                self._timed(effect.connector, started, made)

    def _timed(self, connector: str, started: float, made: list[str]) -> None:
        """A dispatch call of ``connector`` begun at ``started`` is over: its time recorded, its attempt noted."""
        made.append(connector)
        self.latency.record(connector, telemetry.dispatched(connector, started))

    # -- reconcile ------------------------------------------------------------------------------------------------
    def reconcile_once(self, limit: int | None) -> list[EffectOutcome]:
        known = self.ctx.connectors.for_calls("observe")
        ctx, s = self.ctx, self.ctx.settings
        now = ctx.store.clock.now()
        until = now + s.lease_for
        try:
            with ctx.store.transaction() as tx:
                lapsed = _effect_table.lapse_non_idempotent(tx, now)
                if lapsed:
                    ctx.journal(tx, [effect_event(e.key, e.connector, e.tool, "UNKNOWN",
                                                  error="lease lapsed during dispatch", run_id=e.run_id,
                                                  business_key=e.business_key) for e in lapsed])
                if not known:
                    return []
                claimed = _effect_table.claim_for_observation(tx, s.owner, until, now, known,
                                                              limit or s.batch_size)
        except Exception as exc:
            release_failed_claim(ctx, exc, "an observation claim",
                                 lambda tx: _effect_table.release_observation_claim(tx, s.owner, now))
            raise
        if not claimed:
            return []
        lease = self._lease(claimed, "UNKNOWN", until, "observed")
        try:
            results = ctx.runner.map(lambda c: lease.call(c.effect.key, self._observe_call, c), claimed)
            answered = ctx.store.clock.now()

            def transition(c: Claimed, result: CallResult) -> Completion:
                return observe_transition(c, result, max_observations=s.max_observations,
                                          compensation_attempts=s.compensation_attempts, backoff_cap=s.backoff_cap,
                                          now=answered, delay=ctx.delay)

            return self._finish(claimed, results, EffectStatus.UNKNOWN, lease, transition)
        finally:
            lease.stop()

    def _observe_call(self, c: Claimed) -> Any:
        effect = c.effect
        if not self.ctx.connectors.can_observe(effect.connector):
            raise ConfigError(f"connector {effect.connector!r} cannot observe", field="connector",
                              value=effect.connector)
        with telemetry.span(OBSERVE, telemetry.stored(effect.metadata), **self._attributes(c)) as span:
            return telemetry.answered(span, self.ctx.connectors.instance(effect.connector).observe(effect))

    def _attributes(self, c: Claimed) -> dict[str, Any]:
        """What the span of a call on ``c`` says of it (never its payload)."""
        effect = c.effect
        return {"effect_key": effect.key, "connector": effect.connector, "run_id": effect.run_id,
                "attempt": effect.metadata.get("errands.attempt", c.attempts), "lease_owner": self.ctx.settings.owner}

    # -- recording ------------------------------------------------------------------------------------------------
    def _finish(self, claimed: Sequence[Claimed], results: Sequence[CallResult], held: EffectStatus,
                lease: TableLease, transition: Callable[[Claimed, CallResult], Completion]) -> list[EffectOutcome]:
        """Apply each call's answer to its effect with ``transition`` and record the batch's results in one
        transaction, again after an infrastructure fault while the leases last: the connectors' answers are
        known, and a fault must cost a retry, not the answers. A call not made is reported, not recorded."""
        completions: list[Completion] = []
        skipped: list[EffectOutcome] = []
        for c, result in zip(claimed, results):
            if result[1] is SKIPPED:
                log.warning("lease on effect %s lapsed before its call started; another worker may hold it",
                            c.effect.key)
                skipped.append(not_started(c, held))
            else:
                completions.append(transition(c, result))
        if not completions:
            return skipped

        def record(attempt: int) -> list[EffectOutcome]:
            return lease.recorded(lambda: self._apply(completions, held, again=attempt > 0))

        out = retry_infrastructure(record, clock=self.ctx.store.clock,
                                   what=f"recording {len(completions)} effect results", keep_going=lease.alive)
        return out + skipped

    def _apply(self, completions: Sequence[Completion], held: EffectStatus, *, again: bool) -> list[EffectOutcome]:
        """Record a batch of completions in one transaction, each fenced by its lease token, with the obligations
        they owe. ``again``: an earlier try met a store fault and may have committed anyway (its acknowledgement
        lost); a completion it recorded (the token unchanged, the status it set) counts as recorded, not as lost."""
        out: list[EffectOutcome] = []
        events: list[NewEvent] = []
        with self.ctx.store.transaction() as tx:
            still_held = _effect_table.complete(tx, completions, held.value)
            recorded = _effect_table.recorded_before(tx, [c for c in completions if c.key not in still_held]) \
                if again and len(still_held) < len(completions) else set()
            reached: list[str] = []
            for c in completions:
                if c.key in still_held:
                    reached.append(c.status)
                    out.append(c.outcome)
                    events.append(c.event)
                    owed = c.obligation
                    if owed is not None:
                        ob_id = _obligation_table.insert(tx, owed, c.updated_at)
                        if ob_id is not None:
                            events.append(obligation_event(ob_id, owed.effect_key, owed.kind, owed.status))
                elif c.key in recorded:
                    out.append(c.outcome)
                else:
                    log.warning("lease on effect %s lapsed before its result was recorded", c.key,
                                extra={"effect_key": c.key, "lease_owner": self.ctx.settings.owner})
                    telemetry.count(LEASE_LOST, engine="outbox")
                    out.append(lease_lost(c.outcome, held))
            _count_by(EFFECTS, "status", reached)
            if events:
                self.ctx.journal(tx, events)
        return out
