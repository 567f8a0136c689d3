"""Reactions: journal events matching a subject pattern (and a CEL ``predicate``) become tasks of the task
engine.

``key=`` gives each event an ordering key: a dotted path into the event (``data.customer``, ``stream``), a
CEL expression over its envelope, or a function of it. The tasks of a reaction with the same key run one at
a time in journal order, across workers; tasks of different keys run in parallel. Without ``key=`` a
reaction's tasks run in any order.

With ``debounce_ms`` a reaction coalesces a burst of events *of one key* into one run, for the key's last
event. Without ``key=`` the debounce key is the effect key on the outbox's effect streams
(``effects/<connector>``), the obligation id on ``obligations/<kind>``, the operation name on lro's
``lro/<neuron>``, and the stream itself on every other stream (one stream per entity, ``orders/42``).
Events whose key cannot be read are never merged with others nor ordered after them.
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from . import _reactor_table as reactor_table
from . import _tasks_table as tasks_table
from . import _wake, telemetry
from ._fanout_table import CURSOR_NAMESPACE
from ._leases import is_infrastructure_error
from ._reactor_exprs import EntityKey, Envelopes, Matcher, describe_key, matcher
from ._runtime import CallRunner
from ._tasks import TaskEngine, TaskRecord
from ._values import Event
from .errors import ConfigError, LeaseLostError, NotFoundError
from .store import SQLStore, dumps, subject_regex

__all__ = ["EntityKey", "Reaction", "Reactor"]

log = logging.getLogger("errands.reactor")

_NAMESPACE = uuid.UUID("0b5d7f0e-5c7a-4a53-9d6e-656d69737361")


@dataclass(frozen=True, slots=True)
class Reaction:
    """One ``Reactor.on`` registration. Its tasks have type ``reaction:<name>``."""

    name: str
    subject_pattern: str
    task_type: str
    debounce_ms: int
    start: str
    key: EntityKey | None = None
    predicate: str | None = None
    max_concurrency: int | None = 1
    retry_max: int = 5
    dlq_after: int | None = 5
    retry_backoff_ms: int | None = None
    matcher: Matcher | None = field(default=None, repr=False, compare=False)

    @property
    def ordered(self) -> bool:
        """Whether tasks of one key run one at a time in journal order (a ``key`` was given)."""
        return self.key is not None

    def task_id(self, event: Event) -> str:
        """The task id of this reaction to ``event``: the same event always makes the same task."""
        return str(uuid.uuid5(_NAMESPACE, f"{self.name}|{event.id}"))

    def entity(self, event: Event) -> str:
        """The key of ``event`` as this reaction sees it (see ``Reactor.on(key=)``)."""
        return (self.matcher or matcher(None, self.key)).key(event, Envelopes(1))

    def describe(self) -> dict[str, Any]:
        """This reaction's options as JSON values (what ``errands reactions list`` shows)."""
        return {"name": self.name, "subject_pattern": self.subject_pattern, "predicate": self.predicate,
                "key": describe_key(self.key), "debounce_ms": self.debounce_ms,
                "max_concurrency": self.max_concurrency, "retry_max": self.retry_max, "dlq_after": self.dlq_after,
                "retry_backoff_ms": self.retry_backoff_ms, "start": self.start}


def _call_with_event(handler: Callable[[Event], Any], params: Any) -> Any:
    return handler(Event.from_cloudevent(params))


class Reactor:
    """Turns matching journal events into tasks, each reaction from its own durable cursor.

    Args:
        store: the open store.
        engine: the ``TaskEngine`` that runs the reactions (a new one on ``store`` if None).
        batch_size: the most events read per reaction per pass.

    Example:
        >>> reactor = Reactor(store)
        >>> reactor.on("order.placed", send_receipt, max_concurrency=4, retry_max=5)
        >>> Worker(store, jobs=[reactor.run_once]).run()
    """

    def __init__(self, store: SQLStore, engine: TaskEngine | None = None, *, batch_size: int = 500) -> None:
        self.store = store
        self.engine = engine or TaskEngine(store)
        self.batch_size = batch_size
        self._reactions: dict[str, Reaction] = {}
        self._cursors: dict[str, tuple[int, int]] = {}
        self._described: set[str] = set()
        # The CEL variables of recent events, converted once for every reaction that reads them.
        self._envelopes = Envelopes(max(4096, 2 * batch_size))

    def on(
        self, subject_pattern: str, handler: Callable[[Event], Any], max_concurrency: int | None = 1,
        rate_limit_per_s: float | None = None, debounce_ms: int = 0, retry_max: int = 5, dlq_after: int | None = 5,
        *, name: str | None = None, start: str = "beginning", key: EntityKey | None = None,
        predicate: str | None = None, retry_backoff_ms: int | None = None,
    ) -> Reaction:
        """React to events whose subject matches ``subject_pattern`` (and ``predicate``) by running
        ``handler(event)`` as a task.

        Args:
            subject_pattern: dot-separated; ``*`` one token, ``**`` the rest.
            handler: ``handler(event)``, sync or async; must be idempotent (at least once).
            max_concurrency: the most runs of this reaction at once, across workers (None: no limit but the
                engine's ``concurrency``). With ``key``, at most one of them per key.
            rate_limit_per_s: the most runs started per second (per worker process).
            debounce_ms: wait this long after an event; a newer event of the same key arriving meanwhile
                replaces it, so a burst runs the handler once per key, for the key's last event. Events of
                different keys are never merged.
            retry_max: retries after a failure.
            dlq_after: park the task in the dead-letter list after this many failed attempts (or when
                retries run out first); None ends such tasks ``FAILED``.
            name: the reaction's name (its cursor and task type); the handler's qualified name by default.
            start: a new reaction begins at the ``"beginning"`` of the journal or its ``"end"``.
            key: each event's ordering key: a dotted path (``"data.customer"``, ``"stream"``, ``"subject"``,
                ``"type"``, ``"source"``, ``"id"``), read without CEL; a CEL expression over the envelope
                (``"data.region + '/' + data.customer"``); or a function of the event. Tasks with the same key
                run one at a time in journal order, across workers; different keys in parallel. A task that
                fails holds its key's later tasks back while it retries; once it is dead (``dlq_after``) or
                failed they go on. ``debounce_ms`` merges events of one key only. Without ``key`` tasks run
                in any order, and debounce merges by the default entity: the effect key on effect streams
                (``effects/<connector>``), the obligation id on ``obligations/<kind>``, the operation name
                on ``lro/<neuron>``, and the stream on every other stream. An event whose key cannot be read
                is its own key.
            predicate: a CEL expression over the event's CloudEvents envelope (``type``, ``subject``,
                ``source``, ``id``, ``time``, ``data``; and ``stream``), such as ``"data.amount > 100"``:
                only events for which it is true become tasks (one that cannot be evaluated on an event, a
                missing field say, is false there). Compiled now; needs the ``cel`` extra.
            retry_backoff_ms: the first retry delay in milliseconds, doubling each attempt with jitter up to
                the engine's ``retry_cap`` (default: the engine's ``retry_base``).

        Raises:
            ConfigError: a bad pattern, option, CEL expression or a name used twice, naming the field.
            MissingDependencyError: a CEL ``predicate`` or ``key`` without ``cel-python`` (the ``cel`` extra).
        """
        name = name or f"{getattr(handler, '__module__', '')}.{getattr(handler, '__qualname__', repr(handler))}"
        problems: list[ConfigError] = []
        try:
            subject_regex(subject_pattern)
        except ConfigError as exc:
            problems.append(ConfigError(str(exc), field="subject_pattern", value=subject_pattern))
        if name in self._reactions:
            problems.append(ConfigError(f"a reaction named {name!r} exists already; pass name= to tell them apart",
                                        field="name", value=name))
        if not isinstance(debounce_ms, int) or isinstance(debounce_ms, bool) or debounce_ms < 0:
            problems.append(ConfigError(f"debounce_ms must be an integer >= 0, got {debounce_ms!r}",
                                        field="debounce_ms", value=debounce_ms))
        if retry_backoff_ms is not None and (
            not isinstance(retry_backoff_ms, int) or isinstance(retry_backoff_ms, bool) or retry_backoff_ms < 1
        ):
            problems.append(ConfigError(f"retry_backoff_ms must be an integer >= 1, got {retry_backoff_ms!r}",
                                        field="retry_backoff_ms", value=retry_backoff_ms))
        compiled: Matcher | None = None
        try:
            compiled = matcher(predicate, key)
        except ConfigError as exc:
            problems.extend(exc.problems or [exc])
        if start not in ("beginning", "end"):
            problems.append(ConfigError(f"start must be 'beginning' or 'end', got {start!r}", field="start",
                                        value=start))
        task_type = f"reaction:{name}"
        if not problems:
            try:
                self.engine.register(task_type, functools.partial(_call_with_event, handler),
                                     max_concurrency=max_concurrency, rate_limit_per_s=rate_limit_per_s,
                                     retry_max=retry_max, dlq_after=dlq_after,
                                     retry_base=None if retry_backoff_ms is None else retry_backoff_ms / 1000.0)
            except ConfigError as exc:
                problems.append(exc)
        if problems:
            raise ConfigError.collect(problems, f"reaction {name!r}")
        reaction = Reaction(name=name, subject_pattern=subject_pattern, task_type=task_type,
                            debounce_ms=debounce_ms, start=start, key=key, predicate=predicate,
                            max_concurrency=max_concurrency, retry_max=retry_max, dlq_after=dlq_after,
                            retry_backoff_ms=retry_backoff_ms, matcher=compiled)
        self._reactions[name] = reaction
        return reaction

    def off(self, name: str) -> Reaction:
        """Stop reacting to new events with the reaction ``name``; returns it.

        Its tasks already queued still run here (its handler stays with the engine), and its cursor stays in
        the store: ``on`` again with the same name goes on from where it stopped.

        Raises:
            NotFoundError: no reaction of that name here.
        """
        reaction = self._reactions.pop(name, None)
        if reaction is None:
            raise NotFoundError(f"no reaction named {name!r}; reactions: {', '.join(self._reactions) or 'none'}")
        self._cursors.pop(name, None)
        self._described.discard(name)
        return reaction

    def reactions(self) -> list[Reaction]:
        """The reactions registered here, in registration order."""
        return list(self._reactions.values())

    def _cursor(self, reaction: Reaction) -> tuple[int, int]:
        key = f"reactor:{reaction.name}"
        if reaction.name not in self._described:
            # What the reaction is, for ``errands reactions list`` (rewritten only when it changed).
            described = reaction.describe()
            got_description = self.store.kv_get(reactor_table.DEFINITION_NAMESPACE, reaction.name)
            if got_description is None or got_description[0] != described:
                self.store.kv_put(reactor_table.DEFINITION_NAMESPACE, reaction.name, described)
            self._described.add(reaction.name)
        got = self.store.kv_get(CURSOR_NAMESPACE, key)
        if got is not None:
            return int(got[0]), got[1]
        start = self.store.last_position() if reaction.start == "end" else 0
        try:
            return start, self.store.kv_put(CURSOR_NAMESPACE, key, start, expected_version=0)
        except LeaseLostError:
            return self._cursor(reaction)

    def submit_once(self) -> int:
        """Turn one batch of new matching events per reaction into tasks. Returns how many were queued.

        The tasks and the reaction's cursor commit together. An infrastructure error from the store (a
        locked database, a dropped connection) is logged and the batch read again at the next call."""
        queued = 0
        for reaction in list(self._reactions.values()):
            try:
                queued += self._submit(reaction)
            except LeaseLostError:
                log.warning("reaction %s: its cursor was moved by another process; reloading it", reaction.name)
                self._cursors.pop(reaction.name, None)
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise
                # The batch may have committed before the error reached us: read the cursor again.
                self._cursors.pop(reaction.name, None)
                log.info("reaction %s: the store failed (%s: %s); reading again at the next pass", reaction.name,
                         type(exc).__name__, exc)
        return queued

    def _submit(self, reaction: Reaction) -> int:
        cursor, version = self._cursors.get(reaction.name) or self._cursor(reaction)
        events, last = self.store.scan_events(cursor, self.batch_size, [reaction.subject_pattern])
        if last == cursor:
            self._cursors[reaction.name] = (cursor, version)
            return 0
        delay = reaction.debounce_ms / 1000.0
        compiled = reaction.matcher
        assert compiled is not None
        envelopes = self._envelopes
        keyed = reaction.debounce_ms or reaction.ordered
        now = self.store.clock.now()
        queued = 0
        rows: list[tuple[str, str, str | None, float, float, str | None, int | None, str | None]] = []
        with self.store.transaction() as tx:
            # Each task continues the trace of its event's append (only when tracing is installed: one read more).
            traces = self.store.event_traces(tx, [ev.position for ev in events]) if telemetry.ENABLED else {}
            for ev in events:
                if not compiled.matches(ev, envelopes):
                    continue
                key = f"{reaction.name}|{compiled.key(ev, envelopes)}" if keyed else None
                params = dumps(ev.to_cloudevent(), field="data")
                order_key, order_seq = (key, ev.position) if reaction.ordered else (None, None)
                if reaction.debounce_ms:  # one at a time: each replaces the pending task of its key
                    queued += tasks_table.insert(tx, reaction.task_id(ev), reaction.task_type, params, now + delay,
                                                 key, now, order_key=order_key, order_seq=order_seq,
                                                 trace=traces.get(ev.position))
                else:
                    rows.append((reaction.task_id(ev), reaction.task_type, params, now, now, order_key, order_seq,
                                 traces.get(ev.position)))
            queued += tasks_table.insert_many(tx, rows)
            version = self.store.kv_put(CURSOR_NAMESPACE, f"reactor:{reaction.name}", last,
                                        expected_version=version, tx=tx)
            if queued:
                tx.notify(_wake.TASKS)
        self._cursors[reaction.name] = (last, version)
        if queued:
            _wake.notify(self.store, _wake.TASKS)
        return queued

    def run_once(self) -> int:
        """Queue tasks for new events, then start due reaction tasks. Returns the work done."""
        return self.submit_once() + self.engine.run_once()

    def dead(self, name: str | None = None, limit: int = 100) -> list[TaskRecord]:
        """Reaction tasks parked in the dead-letter list (of one reaction, or all)."""
        if name is not None:
            return self.engine.dead(type=f"reaction:{name}", limit=limit)
        return [t for t in self.engine.dead(limit=limit) if t.type.startswith("reaction:")]

    def redrive(self, name: str | None = None, ids: list[str] | None = None) -> int:
        """Queue dead reaction tasks again (those of ``name``, or the ``ids`` given)."""
        if ids is not None:
            return self.engine.redrive(ids)
        if name is not None:
            return self.engine.redrive(type=f"reaction:{name}")
        return sum(self.engine.redrive(type=r.task_type) for r in self._reactions.values())

    def use_runner(self, runner: CallRunner | None) -> None:
        """Await async handlers through ``runner`` (``TaskEngine.use_runner``)."""
        self.engine.use_runner(runner)

    def close(self, wait: bool = True) -> None:
        self.engine.close(wait=wait)
