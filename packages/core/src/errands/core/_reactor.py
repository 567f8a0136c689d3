"""Reactions: journal events matching a subject pattern become tasks of the task engine.

With ``debounce_ms`` a reaction coalesces a burst of events *of one entity* into one run, for the entity's
last event. The entity is named by ``key=``: by default the effect key on the outbox's effect streams
(``effects/<connector>``), the obligation id on ``obligations/<kind>``, the operation name on lro's
``lro/<neuron>``, and the stream itself on every other stream (one stream per entity, ``orders/42``).
Events whose key cannot be read are never merged with others.
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Union

from . import _tasks_table as tasks_table
from . import _wake
from ._fanout_table import CURSOR_NAMESPACE
from ._leases import is_infrastructure_error
from ._runtime import CallRunner
from ._tasks import TaskEngine, TaskRecord
from ._values import Event
from .errors import ConfigError, LeaseLostError
from .store import SQLStore, dumps, subject_regex

log = logging.getLogger("errands.reactor")

_NAMESPACE = uuid.UUID("0b5d7f0e-5c7a-4a53-9d6e-656d69737361")

#: What ``key=`` accepts: a path into the event (``"stream"``, ``"subject"``, ``"type"``, ``"data"`` or
#: ``"data.<field>[.<field>...]"``) or a function of the event returning its entity.
EntityKey = Union[str, Callable[[Event], Any]]

# Streams that carry many entities each, and the data field that names the entity on them.
_SHARED_STREAMS = (("effects/", "key"), ("obligations/", "id"), ("lro/", "name"))
_EVENT_FIELDS = ("stream", "subject", "type", "data")
_MISSING = object()


def _default_entity(event: Event) -> str:
    """The entity of ``event`` when a reaction names none: the effect key on ``effects/...`` streams, the
    obligation id on ``obligations/...``, the operation name on ``lro/...``, otherwise the stream."""
    for prefix, name in _SHARED_STREAMS:
        if event.stream.startswith(prefix):
            value = event.data.get(name, _MISSING) if isinstance(event.data, dict) else _MISSING
            return f"{event.stream}|{_text(value, event)}"
    return event.stream


def _text(value: Any, event: Event) -> str:
    if value is _MISSING or value is None:
        return f"event:{event.id}"  # an event we cannot place stays on its own: never merged
    return value if isinstance(value, str) else dumps(value, field="key")


def _path_getter(path: str) -> Callable[[Event], str]:
    head, _, rest = path.partition(".")
    names = rest.split(".") if rest else []

    def entity(event: Event) -> str:
        value: Any = getattr(event, head)
        for name in names:
            value = value.get(name, _MISSING) if isinstance(value, dict) else _MISSING
            if value is _MISSING:
                break
        return _text(value, event)

    return entity


def _entity_fn(key: EntityKey | None) -> Callable[[Event], str]:
    if key is None:
        return _default_entity
    if callable(key):
        def entity(event: Event) -> str:
            return _text(key(event), event)

        return entity
    return _path_getter(key)


def _check_key(key: Any) -> ConfigError | None:
    if key is None or callable(key):
        return None
    if isinstance(key, str):
        head, dot, rest = key.partition(".")
        if head in _EVENT_FIELDS and (not dot or (head == "data" and all(rest.split(".")))):
            return None
    return ConfigError(
        f"key must name the entity to debounce by: 'stream', 'subject', 'type', 'data' or 'data.<field>' "
        f"(such as 'data.order'), or be a function of the event; got {key!r}", field="key", value=key,
    )


@dataclass(frozen=True, slots=True)
class Reaction:
    """One ``Reactor.on`` registration. Its tasks have type ``reaction:<name>``."""

    name: str
    subject_pattern: str
    task_type: str
    debounce_ms: int
    start: str
    key: EntityKey | None = None

    def task_id(self, event: Event) -> str:
        """The task id of this reaction to ``event``: the same event always makes the same task."""
        return str(uuid.uuid5(_NAMESPACE, f"{self.name}|{event.id}"))

    def entity(self, event: Event) -> str:
        """The entity ``event`` is about, as this reaction's debounce sees it (see ``Reactor.on(key=)``)."""
        return _entity_fn(self.key)(event)


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
        self._entities: dict[str, Callable[[Event], str]] = {}

    def on(
        self, subject_pattern: str, handler: Callable[[Event], Any], max_concurrency: int = 1,
        rate_limit_per_s: float | None = None, debounce_ms: int = 0, retry_max: int = 5, dlq_after: int = 5,
        *, name: str | None = None, start: str = "beginning", key: EntityKey | None = None,
    ) -> Reaction:
        """React to events whose subject matches ``subject_pattern`` by running ``handler(event)`` as a task.

        Args:
            subject_pattern: dot-separated; ``*`` one token, ``**`` the rest.
            handler: ``handler(event)``, sync or async; must be idempotent (at least once).
            max_concurrency: the most runs of this reaction at once, across workers.
            rate_limit_per_s: the most runs started per second (per worker process).
            debounce_ms: wait this long after an event; a newer event of the same entity (see ``key``)
                arriving meanwhile replaces it, so a burst runs the handler once per entity, for the
                entity's last event. Events of different entities are never merged.
            retry_max: retries after a failure.
            dlq_after: park the task in the dead-letter list after this many failed attempts (or when
                retries run out first).
            name: the reaction's name (its cursor and task type); the handler's qualified name by default.
            start: a new reaction begins at the ``"beginning"`` of the journal or its ``"end"``.
            key: names the entity an event is about, for ``debounce_ms``: ``"data.order"`` (a field of the
                event's data, dotted for nested ones), ``"stream"``, ``"subject"``, ``"type"``, or a function
                of the event. By default the effect key on effect streams (``effects/<connector>``), the
                obligation id on ``obligations/<kind>``, the operation name on ``lro/<neuron>``, and the stream
                on every other stream. An event whose key is missing is never merged with another.

        Raises:
            ConfigError: a bad pattern, option or a name used twice, naming the field.
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
        key_problem = _check_key(key)
        if key_problem is not None:
            problems.append(key_problem)
        if start not in ("beginning", "end"):
            problems.append(ConfigError(f"start must be 'beginning' or 'end', got {start!r}", field="start",
                                        value=start))
        task_type = f"reaction:{name}"
        if not problems:
            try:
                self.engine.register(task_type, functools.partial(_call_with_event, handler),
                                     max_concurrency=max_concurrency, rate_limit_per_s=rate_limit_per_s,
                                     retry_max=retry_max, dlq_after=dlq_after)
            except ConfigError as exc:
                problems.append(exc)
        if problems:
            raise ConfigError.collect(problems, f"reaction {name!r}")
        reaction = Reaction(name=name, subject_pattern=subject_pattern, task_type=task_type,
                            debounce_ms=debounce_ms, start=start, key=key)
        self._reactions[name] = reaction
        self._entities[name] = _entity_fn(key)
        return reaction

    @property
    def reactions(self) -> list[Reaction]:
        return list(self._reactions.values())

    def _cursor(self, reaction: Reaction) -> tuple[int, int]:
        key = f"reactor:{reaction.name}"
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
        for reaction in self._reactions.values():
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
        entity = self._entities[reaction.name]
        now = self.store.clock.now()
        queued = 0
        with self.store.transaction() as tx:
            for ev in events:
                queued += tasks_table.insert(
                    tx, reaction.task_id(ev), reaction.task_type, dumps(ev.to_cloudevent(), field="data"),
                    now + delay, f"{reaction.name}|{entity(ev)}" if reaction.debounce_ms else None, now,
                )
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
