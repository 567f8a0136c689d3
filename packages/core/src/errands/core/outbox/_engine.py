"""``Outbox``: the engine's one class. It checks its options, owns the parts one outbox shares (``Context``),
and hands each call to the module that does that job: admission, inline runs, operators' decisions, the
dispatcher, the saga and the read models."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable, Collection, Iterable, List, Mapping, TypeVar

from .. import telemetry
from .._values import Effect, EffectStatus, Event, Obligation, ObservationOutcome
from .._wake import OUTBOX
from ..errors import ConfigError, NotFoundError
from ..runtime import DEFAULT_LEASE_FOR, CallRunner, drain, notify_work
from ..store import Batch, SQLStore, Tx, default_owner, dumps
from . import _effect_table, _inline, _obligation_table, _queries, _transitions
from ._admission import DEFAULT_PAYLOAD_LIMIT, admit, check_same, check_str, distinct
from ._context import ConnectorSet, Context, Settings
from ._dispatch import Dispatcher
from ._obligations import Saga
from ._records import (
    EffectOutcome,
    EffectRecord,
    NewEffect,
    ObligationOutcome,
    ObligationRecord,
    ObligationStatus,
    StoredEffect,
    new_effect_record,
)

SQLStore.reserve_positioned_prefix(_transitions.EFFECT_STREAMS, "the outbox")

F = TypeVar("F", bound=Callable[..., Any])
SUBMIT = "errands.outbox.submit"


def _problems(options: Mapping[str, Any], connectors: Any) -> list[str]:
    """Every bad option, so that one error names them all."""
    problems = []
    for name in ("payload_limit", "batch_size", "max_in_flight", "max_attempts", "max_observations",
                 "compensation_attempts"):
        value = options[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be an integer >= 1, got {value!r}")
    for name in ("lease_for", "backoff_base", "backoff_cap"):
        value = options[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            problems.append(f"{name} must be a positive number of seconds, got {value!r}")
    if connectors is not None and not isinstance(connectors, Mapping) and (
            isinstance(connectors, (str, bytes)) or not isinstance(connectors, Collection)):
        problems.append("connectors must be a mapping of name to connector, or a collection of names (submit-only), "
                        f"got {type(connectors).__name__}")
    return problems


class Outbox:
    """Durable effects: submit them (in your own transaction if you like); a worker dispatches, observes and
    compensates them.

    Args:
        store: an open store (``open_store(url)``).
        connectors: name -> connector instance. None: the registry's named instances (looked up at use,
            so connectors registered later count). A collection of names (``["bank", "crm"]``, or
            ``connector_names("errands.toml")``): a submit-only outbox, for a process that records effects and
            leaves them to a worker: it builds no connector (no clients, no secrets), refuses effects for other
            names, and its ``dispatch_once``, ``reconcile_once``, ``compensate_once`` and ``drain`` raise
            ``ConfigError``. What admission would check against a connector's capabilities (the safety net of a
            ``NON_IDEMPOTENT`` effect, an ``OBSERVE_ONLY`` connector that can observe) the worker checks.
        payload_limit: the largest payload, in bytes of JSON (1 MiB by default).
        lease_for: seconds a dispatch, observation or compensation holds its effect before another worker
            may take it (10 by default). A heartbeat renews the leases of a claimed batch every
            ``lease_for / 3`` while its connector calls run, so a slow counterparty keeps them, and a worker
            killed outright leaves them to lapse within ``lease_for``.
        batch_size: how many effects one ``*_once`` step claims.
        max_in_flight: how many connector calls run at once within a step (a ``Worker`` passes its own).
        max_attempts: dispatch attempts before an effect is ``FAILED`` (an ``Effect`` may override).
        max_observations: inconclusive observations (``STUCK``/``UNKNOWN``) before an effect is flagged.
        compensation_attempts: attempts before an obligation is ``STUCK``.
        backoff_base: the first retry delay in seconds; it doubles per attempt, with jitter.
        backoff_cap: the longest retry delay in seconds.
        owner: this worker's name in leases (host:pid:thread by default).
        seed: seeds the jitter (tests).

    Example:
        >>> from errands.core import Effect, Outbox, open_store
        >>> from errands.core.testing import FakeConnector
        >>> outbox = Outbox(open_store("memory://"), connectors={"bank": FakeConnector()})
        >>> outbox.submit(Effect(key="order-42", connector="bank", payload={"cents": 500})).status
        <EffectStatus.PENDING: 'PENDING'>
        >>> [o.status for o in outbox.dispatch_once()]
        [<EffectStatus.CONFIRMED: 'CONFIRMED'>]
    """

    def __init__(
        self, store: SQLStore, connectors: Mapping[str, Any] | Collection[str] | None = None, *,
        payload_limit: int = DEFAULT_PAYLOAD_LIMIT, lease_for: float = DEFAULT_LEASE_FOR, batch_size: int = 100,
        max_in_flight: int = 16, max_attempts: int = 5, max_observations: int = 5,
        compensation_attempts: int = 5, backoff_base: float = 1.0, backoff_cap: float = 300.0,
        owner: str | None = None, seed: int | None = None,
    ) -> None:
        problems = _problems(dict(
            payload_limit=payload_limit, batch_size=batch_size, max_in_flight=max_in_flight,
            max_attempts=max_attempts, max_observations=max_observations,
            compensation_attempts=compensation_attempts, lease_for=lease_for, backoff_base=backoff_base,
            backoff_cap=backoff_cap), connectors)
        if problems:
            raise ConfigError("Outbox: " + "; ".join(problems), field=problems[0].split(" ", 1)[0])
        self.store = store
        settings = Settings(payload_limit, float(lease_for), batch_size, max_attempts, max_observations,
                            compensation_attempts, float(backoff_base), float(backoff_cap), owner or default_owner())
        self._ctx = Context(store, settings, ConnectorSet(connectors), CallRunner(max_in_flight), seed)
        self._own_runner = True
        self._dispatcher = Dispatcher(self._ctx)
        self._saga = Saga(self._ctx)
        store.migrate("outbox", _effect_table.migrations(store.dialect))
        telemetry.backlog("outbox", self, lambda outbox, tx, now: _effect_table.backlog(tx, now))

    # -- configuration ----------------------------------------------------------------------------------------
    @property
    def payload_limit(self) -> int:
        return self._ctx.settings.payload_limit

    @property
    def lease_for(self) -> float:
        return self._ctx.settings.lease_for

    @property
    def batch_size(self) -> int:
        return self._ctx.settings.batch_size

    @property
    def max_attempts(self) -> int:
        return self._ctx.settings.max_attempts

    @property
    def max_observations(self) -> int:
        return self._ctx.settings.max_observations

    @property
    def compensation_attempts(self) -> int:
        return self._ctx.settings.compensation_attempts

    @property
    def backoff_base(self) -> float:
        return self._ctx.settings.backoff_base

    @property
    def backoff_cap(self) -> float:
        return self._ctx.settings.backoff_cap

    @property
    def owner(self) -> str:
        return self._ctx.settings.owner

    @property
    def max_in_flight(self) -> int:
        return self._ctx.runner.max_in_flight

    @property
    def submit_only(self) -> bool:
        """Whether this outbox knows its connectors by name only (it submits, and dispatches nothing)."""
        return self._ctx.connectors.submit_only

    @property
    def _compensators(self) -> dict[str, Callable[[Obligation], Any]]:
        return self._ctx.compensators

    def use_runner(self, runner: CallRunner) -> None:
        """Run connector calls through ``runner`` (a ``Worker`` shares one across engines)."""
        if self._own_runner:
            self._ctx.runner.close()
        self._ctx.runner = runner
        self._own_runner = False

    def close(self) -> None:
        """Stop this outbox's call threads (after the calls in flight)."""
        if self._own_runner:
            self._ctx.runner.close()

    @property
    def connectors(self) -> dict[str, Any]:
        """The connectors this outbox dispatches through, by name (none in a submit-only outbox)."""
        return self._ctx.connectors.instances()

    def connector(self, name: str) -> Any:
        """The connector named ``name``.

        Raises:
            ConfigError: no such connector here (or this outbox knows it by name only).
        """
        return self._ctx.connectors.instance(name)

    def compensator(self, kind: str) -> Callable[[F], F]:
        """Decorator: ``fn(obligation) -> CompensationResult | CompensationOutcome | None`` (None means
        compensated) compensates obligations of ``kind``, ahead of the connector's ``compensate``.

        Example:
            >>> @outbox.compensator("refund")                       # doctest: +SKIP
            ... def refund(obligation): bank.refund(obligation.payload["cents"])
        """
        check_str("kind", kind)

        def register(fn: F) -> F:
            if not callable(fn):
                raise ConfigError(f"compensator for {kind!r} must be callable", field="compensator", value=fn)
            self._ctx.compensators[kind] = fn
            return fn

        return register

    # -- submit -----------------------------------------------------------------------------------------------
    def _admit(self, effect: Any, now: float) -> tuple[NewEffect, Mapping[str, Any] | None]:
        """``effect``'s row, checked against what this outbox knows of its connector, and the metadata it stores
        when that is not ``effect.metadata``: with the current trace context (None when there is none)."""
        s = self._ctx.settings
        metadata = None
        if telemetry.tracing() and isinstance(getattr(effect, "metadata", None), dict):
            traced = telemetry.with_trace(effect.metadata)
            metadata = None if traced is effect.metadata else traced
        return admit(effect, now, max_attempts=s.max_attempts, payload_limit=s.payload_limit,
                     capabilities=self._ctx.connectors.admission_capabilities, compensators=self._ctx.compensators,
                     metadata=metadata), metadata

    def check(self, effect: Effect) -> None:
        """Raise what ``submit`` would raise for ``effect``'s own faults, storing nothing (a key taken by
        another effect is found only by ``submit``).

        Raises:
            ConfigError: bad input. PayloadError: the payload is not JSON or over ``payload_limit``.
        """
        self._admit(effect, self.store.clock.now())

    def submit(self, effect: Effect, conn: Any = None) -> EffectRecord:
        """Record ``effect`` durably; the worker dispatches it.

        Idempotent on ``effect.key``: the same key with the same payload returns the stored record.

        Args:
            effect: the effect.
            conn: the caller's own connection to the same database (sqlite3, psycopg, a SQLAlchemy ``Connection``
                or ``Session``, Django's connection inside ``atomic()``): the effect then commits or rolls back
                with the caller's transaction (the transactional outbox). Async connections and sessions go to
                ``submit_async``.

        Raises:
            ConfigError: bad input (empty key, unknown connector, wrong types, no safety net for
                ``NON_IDEMPOTENT``); nothing is stored.
            PayloadError: the payload is not JSON or over ``payload_limit``.
            EffectConflictError: the key exists with a different payload, connector or tool.
        """
        store = self.store
        with telemetry.span(SUBMIT, effect_key=getattr(effect, "key", None),
                            connector=getattr(effect, "connector", None), run_id=getattr(effect, "run_id", None)):
            # In the caller's thread: the effect's metadata takes this thread's trace context here, before
            # ``write`` runs (under group commit, in the thread of the group's leader).
            row, metadata = self._admit(effect, store.clock.now())
            journal = self._ctx.journal

            def write(tx: Any) -> EffectRecord | StoredEffect | None:
                # Insert first and look only on a conflict (the common case is a new key).
                if _effect_table.insert_new(tx, row):
                    journal(tx, [_transitions.submitted_event(row)])
                    tx.notify(OUTBOX)
                    return new_effect_record(row, effect, metadata=metadata)
                return _effect_table.get(tx, row.key)

            if conn is None:
                # Concurrent submitters share a commit (their rows written together); this call returns once its
                # own row is committed.
                written = store.group_commit(write, together=Batch(self._write_submitted, (row, effect, metadata)))
            else:
                with store.transaction(conn) as tx:
                    written = write(tx)
        if isinstance(written, EffectRecord):
            notify_work(store, OUTBOX)
            return written
        stored = written
        if stored is None:
            # Not stored and not inserted: only a concurrent delete could do this; go the general way.
            return self.submit_many([effect], conn=conn)[0]
        check_same(row, stored.record)
        return stored.record

    def _write_submitted(self, tx: Tx, items: list[tuple[NewEffect, Effect, Mapping[str, Any] | None]]
                         ) -> list[EffectRecord | Any]:
        """The rows of concurrent submits, written together by their group's leader (``Batch``): the new keys in one
        statement, with their events; a key taken before (or twice in the group) is left to its submit's own
        ``write`` (``Batch.OWN``), which returns the stored record or raises the conflict to that caller."""
        first: dict[str, int] = {}
        for i, (row, _, _) in enumerate(items):
            first.setdefault(row.key, i)
        new = _effect_table.insert_new_rows(tx, [items[i][0] for i in first.values()])
        if not new:
            return [Batch.OWN] * len(items)
        self._ctx.journal(tx, [_transitions.submitted_event(items[i][0]) for key, i in first.items() if key in new])
        tx.notify(OUTBOX)
        out: list[EffectRecord | Any] = []
        for i, (row, effect, metadata) in enumerate(items):
            out.append(new_effect_record(row, effect, metadata=metadata) if row.key in new and first[row.key] == i
                       else Batch.OWN)
        return out

    def submit_many(self, effects: Iterable[Effect], conn: Any = None) -> List[EffectRecord]:
        """Record many effects in one transaction: all of them, or (on any error) none.

        Returns:
            One record per effect, in order (the stored one for keys submitted before).
        """
        store = self.store
        now = store.clock.now()
        effects = list(effects)
        with telemetry.span(SUBMIT, count=len(effects)):
            admitted = [self._admit(e, now) for e in effects]
        rows = [row for row, _ in admitted]
        if not rows:
            return []
        by_key = distinct(rows)
        with store.transaction(conn) as tx:
            # The rule is a batch of new keys, inserted at once; else look first, and insert what is absent.
            stored: dict[str, EffectRecord] = {}
            inserted = list(by_key.values())
            if not _effect_table.insert_all_new(tx, inserted):
                stored = self._stored_alike(tx, by_key, list(by_key))
                inserted = _effect_table.insert_absent(tx, [row for key, row in by_key.items() if key not in stored])
                # Taken by a concurrent submit meanwhile (PostgreSQL): stored now, and the same effect or a conflict.
                new = {row.key for row in inserted}
                stored.update(self._stored_alike(tx, by_key, [k for k in by_key if k not in stored and k not in new]))
            if inserted:
                self._ctx.journal(tx, [_transitions.submitted_event(row) for row in inserted])
                tx.notify(OUTBOX)
        if inserted:
            notify_work(store, OUTBOX)
        created = datetime.fromtimestamp(now, tz=timezone.utc)
        return [stored.get(row.key) or new_effect_record(row, effect, created, metadata)
                for (row, metadata), effect in zip(admitted, effects)]

    async def submit_async(self, effect: Effect, conn: Any = None) -> EffectRecord:
        """``submit`` for coroutines, without blocking the event loop (``SQLStore.run_async``); ``conn`` may also be
        an async connection or session (psycopg ``AsyncConnection``, SQLAlchemy ``AsyncConnection`` /
        ``AsyncSession``)."""
        return await self.store.run_async(self.submit, effect, conn=conn)

    async def submit_many_async(self, effects: Iterable[Effect], conn: Any = None) -> List[EffectRecord]:
        """``submit_many`` for coroutines (``SQLStore.run_async``)."""
        return await self.store.run_async(self.submit_many, list(effects), conn=conn)

    @staticmethod
    def _stored_alike(tx: Any, by_key: Mapping[str, NewEffect], keys: List[str]) -> dict[str, EffectRecord]:
        """The stored records among ``keys``, each checked to be the effect submitted again (or a conflict)."""
        stored = _effect_table.get_many(tx, keys) if keys else {}
        for key, rec in stored.items():
            check_same(by_key[key], rec)
        return stored

    # -- inline -----------------------------------------------------------------------------------------------
    def run_inline(self, effect: Effect, fn: Callable[[Effect], Any]) -> EffectRecord:
        """Run ``fn(effect)`` now, in this thread, and record its result once.

        ``fn`` may return a ``DispatchResult`` or any JSON value (recorded as the response of a confirmed
        effect); if it raises, the effect is recorded ``FAILED`` with the error and the exception propagates.
        A replay with the same key returns the stored record without calling ``fn`` (unless a previous run
        died mid-way and its lease lapsed). ``NON_IDEMPOTENT`` effects are refused (``ConfigError``).
        """
        return _inline.run_inline(self._ctx, effect, fn)

    async def run_inline_async(self, effect: Effect, fn: Callable[[Effect], Any]) -> EffectRecord:
        """``run_inline`` for coroutines: ``fn`` (sync or ``async def``) is called, and awaited, on the caller's
        event loop; the store's work goes through ``SQLStore.run_async``."""
        return await _inline.run_inline_async(self._ctx, effect, fn)

    # -- human gate, redrive, cancel --------------------------------------------------------------------------
    def _decide(self, key: str, decide: Callable[[StoredEffect, float], _transitions.Change],
                conn: Any = None) -> EffectRecord:
        """Apply an operator's decision to effect ``key``, read and changed in one transaction (the caller's, on
        ``conn``)."""
        now = self.store.clock.now()
        with self.store.transaction(conn) as tx:
            stored = _effect_table.get(tx, key, for_change=True)
            if stored is None:
                raise NotFoundError(f"no effect with key {key!r}")
            change = decide(stored, now)
            _effect_table.apply_change(tx, key, change)
            events = [change.event]
            owed = change.obligation
            if owed is not None:
                ob_id = _obligation_table.insert(tx, owed, now)
                if ob_id is not None:
                    events.append(_transitions.obligation_event(ob_id, owed.effect_key, owed.kind, owed.status,
                                                                run_id=owed.run_id))
            self._ctx.journal(tx, events)
            changed = _effect_table.get(tx, key)
        assert changed is not None
        return changed.record

    def approve(self, key: str, *, payload: Any = None, by: str | None = None, conn: Any = None) -> EffectRecord:
        """Let a human-gated effect go: ``AWAITING_APPROVAL`` -> ``PENDING`` (in the caller's transaction on
        ``conn``, if given).

        Args:
            key: the effect.
            payload: what the approver adds (JSON: a signed-off amount, a ticket); the connector finds it in
                ``effect.metadata["errands.approval"]``.
            by: who approved (the event's ``by`` and ``approved_by``).
            conn: the caller's own connection.

        Raises:
            NotFoundError: no such effect.
            ConfigError: the effect is not awaiting approval, or ``by`` is not a string.
            PayloadError: ``payload`` is not JSON or over ``payload_limit``.
        """
        check_str("by", by, optional=True)
        if payload is not None:
            dumps(payload, field="payload", limit=self.payload_limit)
        return self._decide(key, lambda stored, now: _transitions.approve(stored, now, by=by, payload=payload), conn)

    async def approve_async(self, key: str, *, payload: Any = None, by: str | None = None,
                            conn: Any = None) -> EffectRecord:
        """``approve`` for coroutines (``SQLStore.run_async``)."""
        return await self.store.run_async(self.approve, key, payload=payload, by=by, conn=conn)

    def reject(self, key: str, *, reason: str | None = None, by: str | None = None,
               conn: Any = None) -> EffectRecord:
        """Refuse a human-gated effect: ``AWAITING_APPROVAL`` -> ``CANCELLED``; it is never dispatched."""
        return self._decide(key, lambda stored, now: _transitions.reject(stored, now, reason=reason, by=by), conn)

    async def reject_async(self, key: str, *, reason: str | None = None, by: str | None = None,
                           conn: Any = None) -> EffectRecord:
        """``reject`` for coroutines (``SQLStore.run_async``)."""
        return await self.store.run_async(self.reject, key, reason=reason, by=by, conn=conn)

    def cancel(self, key: str, *, reason: str | None = None) -> EffectRecord:
        """Withdraw an effect not yet dispatched (``PENDING`` or ``AWAITING_APPROVAL``) -> ``CANCELLED``."""
        return self._decide(key, lambda stored, now: _transitions.cancel(stored, now, reason=reason))

    def resolve(
        self, key: str, status: EffectStatus | ObservationOutcome | str, *, response: Any = None,
        error: str | None = None, external_ref: str | None = None, compensate_kind: str | None = None,
        by: str | None = None, conn: Any = None,
    ) -> EffectRecord:
        """Settle an effect's outcome from what an operator found at the counterparty, without calling its
        connector (the reconciler's answer, given by a human).

        Args:
            key: the effect: ``UNKNOWN`` (flagged or not), ``PENDING``, ``DISPATCHING`` with a lapsed lease, or
                ``AWAITING_APPROVAL``.
            status: ``CONFIRMED`` (it happened), ``FAILED`` (it failed for good), ``ABSENT`` (it never arrived:
                dispatched again, with fresh attempts) or ``DUPLICATE`` (it happened more than once: confirmed,
                and a compensation of ``compensate_kind`` owed, due at once).
            response: what the counterparty answered (JSON), kept as the effect's response.
            error: why it failed (``FAILED``).
            external_ref: the counterparty's reference.
            compensate_kind: the kind of compensation a ``DUPLICATE`` owes (required there, refused elsewhere).
            by: who resolved it (the event's ``by``).
            conn: the caller's own connection.

        Raises:
            NotFoundError: no such effect.
            ConfigError: a finished effect, one a worker holds now (a live lease), or a resolution that does not
                fit it; nothing changes.
            PayloadError: ``response`` is not JSON or over ``payload_limit``.
        """
        for name, value in (("error", error), ("external_ref", external_ref), ("compensate_kind", compensate_kind),
                            ("by", by)):
            check_str(name, value, optional=True)
        _transitions.resolution(status)
        dumps(response, field="response", limit=self.payload_limit)
        attempts = self.compensation_attempts

        def decide(stored: StoredEffect, now: float) -> _transitions.Change:
            return _transitions.resolve(stored, now, status=status, response=response, error=error,
                                        external_ref=external_ref, compensate_kind=compensate_kind, by=by,
                                        compensation_attempts=attempts)

        return self._decide(key, decide, conn)

    async def resolve_async(
        self, key: str, status: EffectStatus | ObservationOutcome | str, *, response: Any = None,
        error: str | None = None, external_ref: str | None = None, compensate_kind: str | None = None,
        by: str | None = None, conn: Any = None,
    ) -> EffectRecord:
        """``resolve`` for coroutines (``SQLStore.run_async``)."""
        return await self.store.run_async(self.resolve, key, status, response=response, error=error,
                                          external_ref=external_ref, compensate_kind=compensate_kind, by=by,
                                          conn=conn)

    def redrive(self, key: str, *, conn: Any = None) -> EffectRecord:
        """Queue a ``FAILED`` or ``CANCELLED`` effect (or a flagged ``UNKNOWN`` one) again with fresh attempts.

        A flagged ``UNKNOWN`` effect whose connector can observe goes back to observation; otherwise it is
        dispatched again: redriving is the human's decision that a new delivery is wanted. A submit-only outbox
        refuses the redrives where that choice depends on the connector.
        """
        connectors = self._ctx.connectors

        def decide(stored: StoredEffect, now: float) -> _transitions.Change:
            name = stored.record.connector
            can_observe = None if connectors.submit_only else connectors.can_observe(name)
            return _transitions.redrive(stored, now, can_observe=can_observe)

        return self._decide(key, decide, conn)

    async def redrive_async(self, key: str, *, conn: Any = None) -> EffectRecord:
        """``redrive`` for coroutines (``SQLStore.run_async``)."""
        return await self.store.run_async(self.redrive, key, conn=conn)

    # -- the worker's steps -----------------------------------------------------------------------------------
    def dispatch_once(self, limit: int | None = None) -> List[EffectOutcome]:
        """Claim due effects (``PENDING``, or ``DISPATCHING`` with a lapsed lease unless ``NON_IDEMPOTENT``),
        dispatch them with up to ``max_in_flight`` at once, and record every result in one transaction.

        Returns:
            One outcome per claimed effect.

        Raises:
            ConfigError: a submit-only outbox dispatches nothing.
        """
        return self._dispatcher.dispatch_once(limit)

    def reconcile_once(self, limit: int | None = None) -> List[EffectOutcome]:
        """Observe effects whose outcome is unknown and act on the answer: ``CONFIRMED`` -> confirmed;
        ``ABSENT`` -> dispatched again; ``DUPLICATE`` -> confirmed and a compensation owed (same transaction);
        ``STUCK``/``UNKNOWN`` -> observed again after backoff, flagged after ``max_observations``.

        ``NON_IDEMPOTENT`` effects whose dispatch lease lapsed (a worker died mid-call) become ``UNKNOWN``
        here first: they are observed, never dispatched blind.
        """
        return self._dispatcher.reconcile_once(limit)

    # -- obligations ------------------------------------------------------------------------------------------
    def register_compensation(
        self, effect_key: str, kind: str, payload: Any = None, *, run_id: str | None = None,
        compensator: str | None = None, due: bool = False, conn: Any = None,
    ) -> ObligationRecord:
        """Record that ``effect_key`` owes a compensation of ``kind`` (idempotent on the pair).

        It stays ``REGISTERED`` until ``compensate_run(run_id)`` (or is due at once with ``due=True``).

        Args:
            effect_key: the effect it compensates (must exist).
            kind: what kind of compensation (``"refund"``); a ``@outbox.compensator(kind)`` function runs it,
                else the compensator connector's ``compensate``.
            payload: JSON data for the compensator.
            run_id: the saga it belongs to (default: the effect's ``run_id``).
            compensator: the connector that compensates (default: the effect's connector).
            due: make it due now instead of waiting for ``compensate_run``.
            conn: the caller's own connection (joins the caller's transaction).

        Raises:
            NotFoundError: no such effect.
            EffectConflictError: the pair was registered before with a different payload.
        """
        return self._saga.register(effect_key, kind, payload, run_id=run_id, compensator=compensator, due=due,
                                   conn=conn)

    def compensate_run(self, run_id: str) -> List[ObligationRecord]:
        """Start the saga rollback of ``run_id``: its effects not yet dispatched are cancelled and its
        registered obligations become due, to be compensated last-registered first (LIFO: each waits until
        every later one of the run is compensated). The worker (or ``compensate_once``) runs them.

        Returns:
            The run's obligations made due, in the order they will be compensated.
        """
        return self._saga.compensate_run(run_id)

    def compensate_once(self, limit: int | None = None) -> List[ObligationOutcome]:
        """Claim due obligations (LIFO within a run), compensate them, record every result in one transaction."""
        self._ctx.connectors.for_calls("compensate")
        return self._saga.compensate_once(limit)

    def redrive_obligation(self, obligation_id: int) -> ObligationRecord:
        """Make a ``STUCK`` obligation due again with fresh attempts."""
        return self._saga.redrive(obligation_id)

    def resolve_obligation(self, obligation_id: int, status: ObligationStatus | str, *, result: Any = None,
                           by: str | None = None, conn: Any = None) -> ObligationRecord:
        """Settle a compensation owed by hand: ``COMPENSATED`` (done, or found done) or ``STUCK`` (stop trying).

        It applies to a ``REGISTERED``, ``PENDING`` or ``STUCK`` obligation, or a ``COMPENSATING`` one whose lease
        lapsed; ``result`` (JSON) is kept as its response, and the event carries ``by``.

        Raises:
            NotFoundError: no such obligation.
            ConfigError: another status, or an obligation finished, already so, or held by a worker now.
        """
        return self._saga.resolve(obligation_id, status, result=result, by=by, conn=conn)

    async def resolve_obligation_async(self, obligation_id: int, status: ObligationStatus | str, *,
                                       result: Any = None, by: str | None = None,
                                       conn: Any = None) -> ObligationRecord:
        """``resolve_obligation`` for coroutines (``SQLStore.run_async``)."""
        return await self.store.run_async(self.resolve_obligation, obligation_id, status, result=result, by=by,
                                          conn=conn)

    # -- views ------------------------------------------------------------------------------------------------
    def get(self, key: str, *, conn: Any = None) -> EffectRecord:
        """The record of effect ``key`` (read inside the caller's transaction on ``conn``, if given).

        Raises:
            NotFoundError: no such effect.
        """
        return _queries.get(self.store, key, conn)

    async def get_async(self, key: str, *, conn: Any = None) -> EffectRecord:
        """``get`` for coroutines (``SQLStore.run_async``)."""
        return await self.store.run_async(self.get, key, conn=conn)

    def list(
        self, status: EffectStatus | str | None = None, connector: str | None = None, limit: int = 100, *,
        flagged: bool | None = None, run_id: str | None = None, conn: Any = None,
    ) -> List[EffectRecord]:
        """Effects, oldest first, filtered by status, connector, flag and run."""
        return _queries.effects(self.store, status, connector, limit, flagged, run_id, conn)

    async def list_async(
        self, status: EffectStatus | str | None = None, connector: str | None = None, limit: int = 100, *,
        flagged: bool | None = None, run_id: str | None = None, conn: Any = None,
    ) -> List[EffectRecord]:
        """``list`` for coroutines (``SQLStore.run_async``)."""
        return await self.store.run_async(self.list, status, connector, limit, flagged=flagged, run_id=run_id,
                                          conn=conn)

    def obligations(
        self, status: ObligationStatus | str | None = None, *, effect_key: str | None = None,
        run_id: str | None = None, limit: int = 100,
    ) -> List[ObligationRecord]:
        """Obligations, oldest first."""
        return _queries.obligations(self.store, status, effect_key, run_id, limit)

    def history(self, key: str, limit: int = 1000) -> List[Event]:
        """The journal events of effect ``key`` and its obligations, oldest first.

        A scan of the effect's connector stream (and the streams of the obligations it owes) from the effect's
        first event: meant for inspection, not for hot paths.
        """
        return _queries.history(self.store, key, limit)

    def stats(self) -> dict[str, Any]:
        """Counts: ``effects`` by status, ``flagged`` effects, ``obligations`` by status, and ``due`` (effects
        a worker would take now)."""
        return _queries.stats(self.store)

    def drain(self, max_steps: int = 10_000) -> int:
        """Run dispatch, reconcile and compensate steps until one round finds nothing due now.

        Returns:
            How many items the steps handled.
        """
        return drain(lambda: len(self.dispatch_once()) + len(self.reconcile_once()) + len(self.compensate_once()),
                     max_steps)

