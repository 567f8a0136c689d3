"""The saga: compensations owed, registered by callers or by the reconciler (a ``DUPLICATE``), made due by a run's
rollback, and run by compensators, each result recorded fenced by its lease."""

from __future__ import annotations

import logging
from typing import Any

from .. import telemetry
from .._protocols import capabilities_of
from .._values import CompensationOutcome, CompensationResult
from ..errors import ConfigError, EffectConflictError, NotFoundError
from ..runtime import retry_infrastructure
from ..store import dumps
from . import _effect_table, _obligation_table
from ._admission import check_str
from ._context import SKIPPED, Context, TableLease, release_failed_claim
from ._records import NewObligation, ObligationOutcome, ObligationRecord, ObligationStatus
from ._transitions import (
    ObligationCompletion,
    compensation_transition,
    effect_event,
    obligation_event,
    obligation_lost,
    obligation_not_started,
    resolve_obligation,
)

log = logging.getLogger("errands.outbox")


class Saga:
    """Compensations for one outbox: the ``register_compensation``, ``compensate_run``, ``compensate_once`` and
    ``redrive_obligation`` behind ``Outbox``'s methods of those names."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def register(self, effect_key: str, kind: str, payload: Any, *, run_id: str | None, compensator: str | None,
                 due: bool, conn: Any) -> ObligationRecord:
        check_str("effect_key", effect_key)
        check_str("kind", kind)
        check_str("run_id", run_id, optional=True)
        check_str("compensator", compensator, optional=True)
        dumps(payload, field="payload", limit=self.ctx.settings.payload_limit)
        store = self.ctx.store
        now = store.clock.now()
        with store.transaction(conn) as tx:
            effect = _effect_table.owner_of(tx, effect_key)
            if effect is None:
                raise NotFoundError(f"no effect with key {effect_key!r} to owe a compensation for")
            status = ObligationStatus.PENDING if due else ObligationStatus.REGISTERED
            owed = NewObligation(effect_key, kind, payload, run_id or effect[1], compensator or effect[0], status,
                                 self.ctx.settings.compensation_attempts, now if due else None)
            ob_id = _obligation_table.insert(tx, owed, now)
            if ob_id is not None:
                self.ctx.journal(tx, [obligation_event(ob_id, effect_key, kind, status)])
            rec = _obligation_table.get(tx, effect_key, kind)
            assert rec is not None
        if rec.payload != payload:
            raise EffectConflictError(
                f"a {kind!r} compensation for {effect_key!r} was registered before with a different payload",
                key=effect_key)
        return rec

    def compensate_run(self, run_id: str) -> list[ObligationRecord]:
        check_str("run_id", run_id)
        store = self.ctx.store
        now = store.clock.now()
        with store.transaction() as tx:
            cancelled = _effect_table.cancel_run(tx, run_id, now)
            due = sorted(_obligation_table.make_run_due(tx, run_id, now), key=lambda o: -o.id)
            events = [effect_event(k, c, t, "CANCELLED", reason="run compensated", run_id=run_id, business_key=b)
                      for k, c, t, b in cancelled]
            events += [obligation_event(o.id, o.effect_key, o.kind, "PENDING", run_id=run_id) for o in due]
            if events:
                self.ctx.journal(tx, events)
        return due

    def compensate_once(self, limit: int | None) -> list[ObligationOutcome]:
        ctx, s = self.ctx, self.ctx.settings
        now = ctx.store.clock.now()
        until = now + s.lease_for
        try:
            with ctx.store.transaction() as tx:
                claimed = _obligation_table.claim(tx, s.owner, until, now, limit or s.batch_size)
                if not claimed:
                    return []
                ctx.journal(tx, [obligation_event(r.id, r.effect_key, r.kind, "COMPENSATING", attempt=r.attempts)
                                 for r, _token in claimed])
        except Exception as exc:
            release_failed_claim(ctx, exc, "a compensation claim", lambda tx: self._release(tx, now))
            raise
        lease = TableLease(ctx.store, _obligation_table.extend, {r.id: token for r, token in claimed},
                           expires=until, lease_for=s.lease_for,
                           what=f"{len(claimed)} obligations compensated by {s.owner}")
        try:
            results = ctx.runner.map(lambda rec: lease.call(rec.id, self._call, rec), [r for r, _token in claimed])
            now = ctx.store.clock.now()
            done: list[ObligationCompletion] = []
            skipped: list[ObligationOutcome] = []
            for (rec, token), (ok, value) in zip(claimed, results):
                if value is SKIPPED:
                    log.warning("lease on obligation %s lapsed before its call started; another worker may hold it",
                                rec.id)
                    skipped.append(obligation_not_started(rec))
                    continue
                done.append(compensation_transition(rec, token, (ok, value), now=now, delay=ctx.delay))
            if not done:
                return skipped
            out = retry_infrastructure(
                lambda attempt: lease.recorded(lambda: self._record(done, again=attempt > 0)),
                clock=ctx.store.clock, what=f"recording {len(done)} compensation results", keep_going=lease.alive)
            return out + skipped
        finally:
            lease.stop()

    def _release(self, tx: Any, claimed_at: float) -> None:
        given_back = _obligation_table.release_claim(tx, self.ctx.settings.owner, claimed_at)
        self.ctx.journal(tx, [obligation_event(i, k, kind, "PENDING", released="store fault during claim")
                              for i, k, kind in given_back])

    def _call(self, rec: ObligationRecord) -> Any:
        with telemetry.span("errands.outbox.compensate", effect_key=rec.effect_key, kind=rec.kind,
                            attempt=rec.attempts + 1, lease_owner=self.ctx.settings.owner) as span:
            return telemetry.answered(span, self._compensate(rec))

    def _compensate(self, rec: ObligationRecord) -> Any:
        fn = self.ctx.compensators.get(rec.kind)
        if fn is not None:
            return fn(rec.obligation)
        conn = self.ctx.connectors.instances().get(rec.compensator or "")
        if conn is None or not capabilities_of(conn).can_compensate:
            return CompensationResult(
                outcome=CompensationOutcome.STUCK,
                error=f"no compensator for kind {rec.kind!r}: register @outbox.compensator({rec.kind!r}) or use a "
                f"connector that can compensate (compensator {rec.compensator!r})",
            )
        return conn.compensate(rec.obligation)

    def _record(self, done: list[ObligationCompletion], *, again: bool) -> list[ObligationOutcome]:
        """Record compensation results in one transaction, each fenced by its lease token. ``again``: an earlier
        try met a store fault and may have committed anyway; a result it recorded counts as recorded."""
        out: list[ObligationOutcome] = []
        events = []
        with self.ctx.store.transaction() as tx:
            for c in done:
                if _obligation_table.complete(tx, c):
                    out.append(c.outcome)
                    events.append(c.event)
                elif again and _obligation_table.recorded_before(tx, c):
                    out.append(c.outcome)
                else:
                    out.append(obligation_lost(c.outcome))
            if events:
                self.ctx.journal(tx, events)
        return out

    def redrive(self, obligation_id: int) -> ObligationRecord:
        store = self.ctx.store
        now = store.clock.now()
        with store.transaction() as tx:
            rec = _obligation_table.redrive(tx, obligation_id, now)
            if rec is None:
                raise ConfigError(f"obligation {obligation_id!r} does not exist or is not STUCK",
                                  field="id", value=obligation_id)
            self.ctx.journal(tx, [obligation_event(rec.id, rec.effect_key, rec.kind, "PENDING", redriven=True)])
        return rec

    def resolve(self, obligation_id: int, status: Any, *, result: Any, by: str | None, conn: Any) -> ObligationRecord:
        if not isinstance(obligation_id, int) or isinstance(obligation_id, bool):
            raise ConfigError(f"id must be an obligation id (an integer), got {obligation_id!r}", field="id",
                              value=obligation_id)
        check_str("by", by, optional=True)
        dumps(result, field="result", limit=self.ctx.settings.payload_limit)
        store = self.ctx.store
        now = store.clock.now()
        with store.transaction(conn) as tx:
            found = _obligation_table.get_for_change(tx, obligation_id)
            if found is None:
                raise NotFoundError(f"no obligation with id {obligation_id!r}")
            record, leased_until = found
            change = resolve_obligation(record, leased_until, now, status=status, result=result, by=by)
            rec = _obligation_table.apply_resolution(tx, obligation_id, change)
            self.ctx.journal(tx, [change.event])
        return rec
