"""Inline runs: the caller's own function performs an effect now, in the caller's thread, and its result is
recorded once; a replay returns the record (unless a run died mid-way and its lease lapsed)."""

from __future__ import annotations

from typing import Any, Callable

from .._values import Effect, EffectStatus
from ..runtime import retry_infrastructure
from . import _effect_table
from ._admission import admit, check_same
from ._context import Context, TableLease, release_failed_claim
from ._records import EffectRecord, NewEffect
from ._transitions import CallResult, effect_event, inline_result


def run_inline(ctx: Context, effect: Effect, fn: Callable[[Effect], Any]) -> EffectRecord:
    """``Outbox.run_inline``."""
    token, stored, lease = begin(ctx, effect)
    if lease is None:
        assert stored is not None
        return stored
    try:
        try:
            value = fn(effect)
            if hasattr(value, "__await__"):
                value = ctx.runner.call(lambda aw: aw, value)
        except Exception as exc:
            finish(ctx, effect, token, (False, exc), lease)
            raise
        return finish(ctx, effect, token, (True, value), lease)
    finally:
        lease.stop()


async def run_inline_async(ctx: Context, effect: Effect, fn: Callable[[Effect], Any]) -> EffectRecord:
    """``Outbox.run_inline_async``: the phases of ``run_inline``, the store's through ``run_async`` and ``fn`` (sync
    or ``async def``) on the caller's event loop."""
    store = ctx.store
    token, stored, lease = await store.run_async(begin, ctx, effect)
    if lease is None:
        assert stored is not None
        return stored
    try:
        try:
            value = fn(effect)
            if hasattr(value, "__await__"):
                value = await value
        except Exception as exc:
            await store.run_async(finish, ctx, effect, token, (False, exc), lease)
            raise
        return await store.run_async(finish, ctx, effect, token, (True, value), lease)
    finally:
        lease.stop()


def begin(ctx: Context, effect: Effect) -> tuple[int, EffectRecord | None, TableLease | None]:
    """The first phase of an inline run: ``(token, None, lease)`` to run ``fn`` under (the lease renewed until
    ``lease.stop()``), or ``(0, the stored record to return, None)``."""
    s = ctx.settings
    now = ctx.store.clock.now()
    until = now + s.lease_for
    row = admit(effect, now, max_attempts=s.max_attempts, payload_limit=s.payload_limit, capabilities=None)
    try:
        token, stored = _claim(ctx, effect, row._replace(next_attempt_at=until), now, until)
    except Exception as exc:
        # The claim may have committed after all (its acknowledgement lost): let a replay take it at once.
        release_failed_claim(ctx, exc, f"the inline claim of effect {effect.key}",
                             lambda tx: _effect_table.release_inline(tx, effect.key, s.owner, now))
        raise
    if stored is not None:
        return 0, stored, None
    lease = TableLease(ctx.store, lambda tx, held, at: _effect_table.extend(tx, held, at, "DISPATCHING"),
                       {effect.key: token}, expires=until, lease_for=s.lease_for, what=f"inline effect {effect.key}")
    return token, None, lease


def _claim(ctx: Context, effect: Effect, row: NewEffect, now: float, until: float) -> tuple[int, EffectRecord | None]:
    """Lease ``effect`` for an inline run: ``(token, None)``, or ``(0, the stored record to return)``."""
    owner = ctx.settings.owner
    with ctx.store.transaction() as tx:
        stored = _effect_table.get(tx, effect.key)
        if stored is None:
            _effect_table.insert_leased(tx, row, owner)
            token, attempts = 1, 1
        else:
            rec = stored.record
            check_same(row, rec)
            lapsed = rec.status in (EffectStatus.PENDING, EffectStatus.DISPATCHING) and (
                stored.next_attempt_at is None or stored.next_attempt_at <= now)
            if not lapsed:
                return 0, rec
            token, attempts = stored.token + 1, rec.attempts + 1
            _effect_table.take_over(tx, effect.key, token, attempts, owner, until, now)
        ctx.journal(tx, [effect_event(effect.key, effect.connector, effect.tool, EffectStatus.DISPATCHING,
                                      attempt=attempts, run_id=effect.run_id, business_key=effect.business_key)])
    return token, None


def finish(ctx: Context, effect: Effect, token: int, result: CallResult, lease: TableLease) -> EffectRecord:
    """Record the run's result (again after a store fault, while the lease lasts); the record afterwards."""
    done = inline_result(result)

    def record(_attempt: int) -> None:
        now = ctx.store.clock.now()
        with ctx.store.transaction() as tx:
            if _effect_table.finish_inline(tx, effect.key, token, done.status.value, done.response,
                                           done.external_ref, done.error, now):
                ctx.journal(tx, [effect_event(effect.key, effect.connector, effect.tool, done.status,
                                              error=done.error, external_ref=done.external_ref,
                                              run_id=effect.run_id, business_key=effect.business_key)])

    retry_infrastructure(lambda attempt: lease.recorded(lambda: record(attempt)), clock=ctx.store.clock,
                         what=f"recording inline effect {effect.key}", keep_going=lease.alive)
    with ctx.store.read() as tx:
        stored = _effect_table.get(tx, effect.key)
    assert stored is not None
    return stored.record
