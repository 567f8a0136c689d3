"""Fan-out: each route relays the journal events matching its subjects to one sink, from a durable cursor.

Delivery is at least once and in order per stream. A route's events go into ``max_in_flight`` lanes by stream
(one stream's events stay in one lane, in order). A pass is a pipeline: each lane has at most one batch in
flight, and its next batch is published as soon as the sink has acknowledged the previous one (so a batch holding
a stream, an ordering key of the sink, never goes before that stream's previous batch was acknowledged); the
journal is read ahead while batches are in flight; the cursor is committed as acknowledgements arrive, in one
transaction with any events parked, to just before the earliest event not yet acknowledged. A failed batch stops
the pass: the cursor stays before it, and the next pass publishes again from there.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import threading
import zlib
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from . import _fanout_table as table
from ._fanout_table import CURSOR_NAMESPACE, FANOUT_MIGRATIONS
from ._fanout_transitions import Lane, RouteState, Verdict, Window, retry_delay, settle, verdict
from ._runtime import CallRunner, drain
from ._values import Event
from .errors import ConfigError, LeaseLostError, NotFoundError, TransientError, error_text
from .store import SQLStore, subject_matcher, subject_regex

__all__ = ["DeadEvent", "FanOut", "Route", "RouteState", "RouteStatus", "list_dead", "mark_redrive", "resume_route",
           "route_states"]

log = logging.getLogger("errands.fanout")

#: How many windows (``batch_size * max_in_flight`` events) one pass of a route reads at most: a pass keeps the
#: pipeline full over several windows, and still ends, so that a worker's loop runs its other engines.
PASS_WINDOWS = 8


@dataclass(frozen=True, slots=True)
class Route:
    """One sink fed from the journal.

    Args:
        name: the route's name; its cursor and dead-letter list are kept under it.
        sink: an object with ``publish(events)`` (sync or async), e.g. ``LogSink`` or ``WebhookSink``.
        subjects: subject patterns (``*`` one token, ``**`` the rest); empty means every event.
        batch_size: the most events handed to one ``publish`` call.
        max_in_flight: the most batches being published at once (each carries different streams).
        start: where a new route begins: ``"beginning"`` of the journal or its ``"end"``.
    """

    name: str
    sink: Any
    subjects: Sequence[str] = ()
    batch_size: int = 100
    max_in_flight: int = 1
    start: str = "beginning"

    def __post_init__(self) -> None:
        problems: list[ConfigError] = []
        name = self.name
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            problems.append(ConfigError(
                f"route name must be a non-empty string without spaces, got {name!r}", field="name", value=name))
        where = f"routes.{name}" if isinstance(name, str) and name else "routes"
        if not callable(getattr(self.sink, "publish", None)):
            problems.append(ConfigError(
                f"{where}.sink must have a publish(events) method, got {type(self.sink).__name__}",
                field=f"{where}.sink", value=type(self.sink).__name__))
        if isinstance(self.subjects, str) or not isinstance(self.subjects, (list, tuple)):
            problems.append(ConfigError(
                f"{where}.subjects must be a list of patterns such as ['order.**'], got {self.subjects!r}",
                field=f"{where}.subjects", value=self.subjects))
        else:
            for pattern in self.subjects:
                try:
                    if not isinstance(pattern, str):
                        raise ConfigError(f"subject pattern {pattern!r} must be a string")
                    subject_regex(pattern)
                except ConfigError as exc:
                    problems.append(ConfigError(f"{where}.subjects: {exc}", field=f"{where}.subjects",
                                                value=pattern))
        for key in ("batch_size", "max_in_flight"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(ConfigError(f"{where}.{key} must be a positive integer, got {value!r}",
                                            field=f"{where}.{key}", value=value))
        if self.start not in ("beginning", "end"):
            problems.append(ConfigError(f"{where}.start must be 'beginning' or 'end', got {self.start!r}",
                                        field=f"{where}.start", value=self.start))
        _raise_all(problems)


def _raise_all(problems: list[ConfigError]) -> None:
    if not problems:
        return
    raise ConfigError.collect(problems, "fan-out routes")


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadEvent:
    """An event a route parked because its sink refused it on its own."""

    route: str
    event: Event
    error: str
    attempts: int
    parked_at: datetime
    redrive: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteStatus:
    """Where a route stands: ``behind`` counts journal positions after its cursor."""

    name: str
    cursor: int
    behind: int
    state: RouteState
    reason: str | None
    dead: int
    retry_at: float | None


@dataclass
class _RouteRun:
    route: Route
    match: Any
    cursor: int | None = None
    version: int = 0
    attempt: int = 0
    retry_at: float = 0.0
    # Events past the cursor that were already delivered or parked: skipped when the window is re-read.
    ahead: dict[str, int] = field(default_factory=dict)


class FanOut:
    """Relays journal events to sinks, one durable cursor per route.

    Args:
        store: the open store holding the journal.
        routes: the routes; names must be unique.
        retry_base: first backoff delay in seconds after a transient failure (doubles per attempt, with
            jitter).
        retry_cap: the longest backoff delay, unless the sink asks for longer with ``retry_after``.

    Example:
        >>> fanout = FanOut(store, routes=[Route("audit", LogSink(path="audit.jsonl"), subjects=["order.**"])])
        >>> fanout.run_once()   # -> number of events delivered
    """

    def __init__(
        self, store: SQLStore, routes: Iterable[Route] = (), *, retry_base: float = 0.5, retry_cap: float = 60.0,
    ) -> None:
        self.store = store
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self._runs: dict[str, _RouteRun] = {}
        problems = []
        for route in routes:
            if not isinstance(route, Route):
                problems.append(ConfigError(f"routes must hold Route objects, got {type(route).__name__}",
                                            field="routes", value=type(route).__name__))
            elif route.name in self._runs:
                problems.append(ConfigError(f"route name {route.name!r} is used twice", field="routes",
                                            value=route.name))
            else:
                self._runs[route.name] = _RouteRun(route, subject_matcher(list(route.subjects)))
        _raise_all(problems)
        store.migrate("fanout", FANOUT_MIGRATIONS)
        self._own_bridge = CallRunner(name="errands-fanout")
        self._bridge = self._own_bridge
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, store: SQLStore, config: Any, **kwargs: Any) -> FanOut:
        """Routes for every sink of a loaded ``errands.toml`` (``ErrandsConfig``), with the route keys
        (``subjects``, ``batch_size``, ``max_in_flight``) given beside each sink."""
        routes = []
        for name, sink in config.sinks.items():
            options: dict[str, Any] = dict(config.routes.get(name, {}))
            if "subjects" in options and isinstance(options["subjects"], (list, tuple)):
                options["subjects"] = list(options["subjects"])
            routes.append(Route(name, sink, **options))
        return cls(store, routes, **kwargs)

    @property
    def routes(self) -> list[Route]:
        return [r.route for r in self._runs.values()]

    def _run_of(self, name: str) -> _RouteRun:
        try:
            return self._runs[name]
        except KeyError:
            raise NotFoundError(
                f"no route named {name!r}; routes: {', '.join(self._runs) or 'none'}") from None

    # -- the relay ---------------------------------------------------------------------------
    def run_once(self) -> int:
        """Deliver one window of pending events on every route.

        Returns:
            How many events the sinks accepted.
        """
        total = 0
        for run in self._runs.values():
            total += self._run_route(run)
        return total

    def drain(self, max_passes: int = 1_000_000) -> int:
        """Call ``run_once`` until a pass delivers nothing. Returns the events delivered."""
        return drain(self.run_once, max_passes)

    def _load_cursor(self, run: _RouteRun) -> None:
        got = self.store.kv_get(CURSOR_NAMESPACE, table.cursor_key(run.route.name))
        if got is not None:
            run.cursor, run.version = int(got[0]), got[1]
            return
        start = self.store.last_position() if run.route.start == "end" else 0
        try:
            run.version = self.store.kv_put(CURSOR_NAMESPACE, table.cursor_key(run.route.name), start,
                                            expected_version=0)
            run.cursor = start
        except LeaseLostError:
            self._load_cursor(run)

    def _state(self, name: str) -> tuple[RouteState, str | None]:
        with self.store.read() as tx:
            return table.state(tx, name)

    def _run_route(self, run: _RouteRun) -> int:
        route = run.route
        if self.store.clock.now() < run.retry_at:
            return 0
        if self._state(route.name)[0] is RouteState.STOPPED:
            return 0
        if run.cursor is None:
            self._load_cursor(run)
        delivered = self._deliver_redrives(run)
        if run.retry_at > self.store.clock.now() or self._state(route.name)[0] is RouteState.STOPPED:
            return delivered
        assert run.cursor is not None
        window = self._pipeline(run)
        if window is None:
            return delivered
        run.ahead.update(window.ahead)
        self._commit(run, window.cursor, window.parked)
        if window.stop is not None:
            self._stop(route.name, window.stop)
        elif window.retry is not None:
            self._back_off(run, window.retry)
        else:
            run.attempt = 0
        return delivered + window.delivered

    def _pipeline(self, run: _RouteRun) -> Window | None:
        """Publish the route's pending events, up to ``PASS_WINDOWS`` windows of them, as a pipeline: up to
        ``max_in_flight`` batches in flight (one per lane: a stream's events stay in one lane, so a batch holding
        a stream is published only once the lane's previous batch was acknowledged), the journal read further
        while they are, and the cursor committed as acknowledgements arrive, never past an event not yet taken.

        Returns:
            What is left to settle (the last cursor, the events parked since the last commit, an error to stop
            or back off on), or None if nothing was pending.
        """
        route = run.route
        n = route.max_in_flight
        size = route.batch_size
        subjects = list(route.subjects) or None
        assert run.cursor is not None
        scanned = run.cursor
        budget = size * n * PASS_WINDOWS
        lanes = [Lane([]) for _ in range(n)]
        pending: list[collections.deque[Event]] = [collections.deque() for _ in range(n)]
        flying: dict[Future[bool], tuple[int, list[Event]]] = {}
        busy = [False] * n
        committed = [0] * n  # per lane, how many of its parked events went with a commit already
        buffered = acknowledged = 0
        exhausted = failed = lost = False
        any_events = False
        pool = self._executor(n)
        try:
            while True:
                # Read ahead while batches are in flight: at most two windows buffered, at most ``budget`` a pass.
                if not exhausted and not failed and buffered < 2 * size * n:
                    events, last = self.store.scan_events(scanned, size * n, subjects)
                    if last <= scanned:
                        exhausted = True
                    else:
                        scanned = last
                        if run.ahead:
                            events = [e for e in events if e.id not in run.ahead]
                        for ev in events:
                            pending[zlib.crc32(ev.stream.encode()) % n if n > 1 else 0].append(ev)
                        buffered += len(events)
                        budget -= len(events)
                        any_events = any_events or bool(events)
                        exhausted = budget <= 0
                if not failed:
                    for i in range(n):
                        if not busy[i] and pending[i]:
                            q = pending[i]
                            batch = [q.popleft() for _ in range(min(size, len(q)))]
                            buffered -= len(batch)
                            busy[i] = True
                            # In this context (a worker's runner made current for ``run_sync`` in a sink, say).
                            call = contextvars.copy_context().run
                            flying[pool.submit(call, self._publish_batch, route, lanes[i], batch)] = (i, batch)
                if not flying:
                    break
                if not exhausted and not failed and buffered < 2 * size * n:
                    # Room to read more: take the acknowledgements that came, without waiting for one.
                    done, _ = wait(flying, timeout=0)
                    if not done:
                        continue
                else:
                    done, _ = wait(flying, return_when=FIRST_COMPLETED)
                for future in done:
                    i, batch = flying.pop(future)
                    busy[i] = False
                    acknowledged += len(batch)
                    if not future.result():
                        failed = True
                # A commit (an fsync at the default durability) per window of acknowledgements while the journal
                # has more, per acknowledgement at the tail of the pass.
                if failed or (acknowledged < size * n and not exhausted):
                    continue
                held = _earliest_held(lanes, pending, flying)
                cursor = scanned if held is None else held - 1
                if cursor > run.cursor:
                    acknowledged = 0
                    parked = _take_parked(lanes, committed)
                    if not self._commit(run, cursor, parked):
                        failed = lost = True  # another process moved the cursor: this pass ends here
        except BaseException:
            # A store fault (or an interruption) ends the pass: let the batches in flight answer first, so that
            # the next pass never has two batches of one stream in flight at once.
            wait(flying)
            raise
        if lost:
            return Window(cursor=run.cursor, ahead={}, delivered=sum(len(lane.delivered) for lane in lanes),
                          parked=_take_parked(lanes, committed), stop=None, retry=None)
        if not any_events and scanned == run.cursor:
            return None
        # Events read but never published (a lane failed) hold the cursor as a failed batch does.
        for lane, q in zip(lanes, pending):
            if q and lane.failed_at is None:
                lane.failed_at = q[0]
        return replace(settle(scanned, lanes), parked=_take_parked(lanes, committed))

    def _executor(self, n: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool._max_workers < n:
                old, self._pool = self._pool, ThreadPoolExecutor(max_workers=max(n, 2), thread_name_prefix="errands-fanout")
                if old is not None:
                    old.shutdown(wait=False)
            return self._pool

    def _publish(self, route: Route, batch: Sequence[Event]) -> Exception | None:
        """Hand ``batch`` to the sink: None if it took it, else what it raised."""
        try:
            self._bridge.call(route.sink.publish, batch)
        except Exception as exc:
            return exc
        return None

    def _publish_batch(self, route: Route, lane: Lane, batch: list[Event]) -> bool:
        """Publish one batch of ``lane``; whether the lane may go on (its events delivered, or parked)."""
        lane.batches.append(batch)
        exc = self._publish(route, batch)
        if exc is None:
            lane.delivered.extend(batch)
            return True
        answer = verdict(exc)
        if answer is not Verdict.PARK:
            if answer is Verdict.RETRY and not isinstance(exc, TransientError):
                log.warning("route %s: sink %s raised %s; retrying as a transient failure", route.name,
                            type(route.sink).__name__, type(exc).__name__, exc_info=exc)
            lane.hold(batch[0], exc, answer)
            return False
        # The batch was refused for good: find the events that fail on their own.
        for ev in batch:
            exc = self._publish(route, [ev])
            if exc is None:
                lane.delivered.append(ev)
                continue
            answer = verdict(exc)
            if answer is not Verdict.PARK:
                lane.hold(ev, exc, answer)
                return False
            lane.parked.append((ev, error_text(exc)))
        return True

    def _commit(self, run: _RouteRun, cursor: int, parked: Sequence[tuple[Event, str]]) -> bool:
        """Move the route's cursor to ``cursor`` with ``parked`` added to its dead letters; False if another
        process had moved the cursor (it is reloaded, and nothing here is written)."""
        now = self.store.clock.now()
        try:
            with self.store.transaction() as tx:
                table.park(tx, run.route.name, parked, now)
                if cursor != run.cursor:
                    run.version = self.store.kv_put(CURSOR_NAMESPACE, table.cursor_key(run.route.name), cursor,
                                                    expected_version=run.version, tx=tx)
        except LeaseLostError:
            log.warning("route %s: its cursor was moved by another process; reloading it", run.route.name)
            run.ahead.clear()
            self._load_cursor(run)
            return False
        for ev, error in parked:
            log.warning("route %s parked event %s: %s", run.route.name, ev.id, error)
        run.cursor = cursor
        if run.ahead:
            run.ahead = {k: p for k, p in run.ahead.items() if p > cursor}
        return True

    def _back_off(self, run: _RouteRun, exc: Exception) -> None:
        run.attempt += 1
        delay = retry_delay(run.attempt, exc, base=self.retry_base, cap=self.retry_cap)
        run.retry_at = self.store.clock.now() + delay
        log.warning("route %s: delivery failed (%s); retry %d in %.2fs", run.route.name, error_text(exc),
                    run.attempt, delay)

    def _stop(self, name: str, exc: Exception) -> None:
        reason = error_text(exc)
        with self.store.transaction() as tx:
            table.set_state(tx, name, RouteState.STOPPED, reason, self.store.clock.now())
        log.error("route %s stopped: %s; fix the sink, then resume it (FanOut.resume or "
                  "'errands routes resume')", name, reason)

    # -- redrive ---------------------------------------------------------------------------------
    def _deliver_redrives(self, run: _RouteRun) -> int:
        """Publish, each on its own, the route's parked events marked for redrive."""
        route = run.route
        with self.store.read() as tx:
            positions = table.to_redrive(tx, route.name, route.batch_size)
        delivered = 0
        for ev in self.store.events_at(positions) if positions else ():
            exc = self._publish(route, [ev])
            if exc is None:
                with self.store.transaction() as tx:
                    table.unpark(tx, route.name, ev.id)
                delivered += 1
                continue
            answer = verdict(exc)
            if answer is Verdict.STOP:
                self._stop(route.name, exc)
                return delivered
            if answer is Verdict.RETRY:
                self._back_off(run, exc)
                return delivered
            with self.store.transaction() as tx:
                table.refused_again(tx, route.name, ev.id, error_text(exc), self.store.clock.now())
            log.warning("route %s: redriven event %s refused again: %s", route.name, ev.id, error_text(exc))
        return delivered

    def dead(self, route: str | None = None, limit: int = 100) -> list[DeadEvent]:
        """Parked events of ``route`` (every route if None), oldest first."""
        return list_dead(self.store, route, limit)

    def redrive(self, route: str, event_ids: Sequence[str] | None = None) -> int:
        """Mark parked events of ``route`` (all, or those in ``event_ids``) for delivery; the next
        ``run_once`` publishes each on its own and drops it from the list once the sink accepts it.

        Returns:
            How many events were marked.
        """
        return mark_redrive(self.store, route, event_ids)

    # -- state -----------------------------------------------------------------------------------
    def resume(self, route: str) -> bool:
        """Let a stopped route deliver again, from where it stopped. Returns whether it was stopped."""
        run = self._run_of(route)
        run.retry_at, run.attempt = 0.0, 0
        return resume_route(self.store, route)

    def status(self) -> list[RouteStatus]:
        """Each route's cursor, how far behind it is, its state and its dead-letter count."""
        head = self.store.last_position()
        with self.store.read() as tx:
            dead = table.parked_counts(tx)
        out = []
        for name, run in self._runs.items():
            if run.cursor is None:
                self._load_cursor(run)
            assert run.cursor is not None
            state, reason = self._state(name)
            out.append(RouteStatus(
                name=name, cursor=run.cursor, behind=max(0, head - run.cursor), state=state, reason=reason,
                dead=dead.get(name, 0), retry_at=run.retry_at or None,
            ))
        return out

    @staticmethod
    def stored_status(store: SQLStore) -> list[RouteStatus]:
        """Every route the store holds a cursor of, as ``status`` reports it, without the sinks (for the
        command line and the console); ``retry_at`` is None, since only the process running a route knows it."""
        store.migrate("fanout", FANOUT_MIGRATIONS)
        head = store.last_position()
        with store.read() as tx:
            cursors = table.cursors(tx)
            dead = table.parked_counts(tx)
            states = {name: table.state(tx, name) for name, _ in cursors}
        return [RouteStatus(name=name, cursor=cursor, behind=max(0, head - cursor), state=states[name][0],
                            reason=states[name][1], dead=dead.get(name, 0), retry_at=None)
                for name, cursor in cursors]

    def use_runner(self, runner: CallRunner | None) -> None:
        """Await async sinks through ``runner`` (a ``Worker`` lends its own while it runs this engine);
        None: through this engine's own again."""
        self._bridge = runner or self._own_bridge

    def close(self) -> None:
        """Close every sink that has ``close()`` and stop the engine's threads."""
        for run in self._runs.values():
            close = getattr(run.route.sink, "close", None)
            if callable(close):
                self._bridge.call(close)
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._own_bridge.close()


def _earliest_held(lanes: Sequence[Lane], pending: Sequence[collections.deque[Event]],
                   flying: Mapping[Any, tuple[int, list[Event]]]) -> int | None:
    """The position of the earliest event read and not yet acknowledged (in flight, waiting, or failed)."""
    held = [lane.failed_at.position for lane in lanes if lane.failed_at is not None]
    held += [q[0].position for q in pending if q]
    held += [batch[0].position for _, batch in flying.values()]
    return min(held) if held else None


def _take_parked(lanes: Sequence[Lane], taken: list[int]) -> list[tuple[Event, str]]:
    """The events the lanes parked since the last call (``taken``: how many of each lane's were taken)."""
    out: list[tuple[Event, str]] = []
    for i, lane in enumerate(lanes):
        k = len(lane.parked)  # a lane in flight may append meanwhile: those go next time
        out += lane.parked[taken[i]:k]
        taken[i] = k
    return out


def list_dead(store: SQLStore, route: str | None = None, limit: int = 100) -> list[DeadEvent]:
    """Parked events of ``route`` (every route if None), oldest first. Works without the sinks, for the
    command line."""
    store.migrate("fanout", FANOUT_MIGRATIONS)
    with store.read() as tx:
        rows = table.parked(tx, route, limit)
    events = {ev.position: ev for ev in store.events_at([r.position for r in rows])} if rows else {}
    return [
        DeadEvent(route=r.route, error=r.error, attempts=r.attempts,
                  parked_at=datetime.fromtimestamp(r.parked_at, tz=timezone.utc), redrive=r.redrive,
                  event=events[r.position])
        for r in rows if r.position in events
    ]


def mark_redrive(store: SQLStore, route: str, event_ids: Sequence[str] | None = None) -> int:
    """Mark parked events of ``route`` for delivery by the next pass of the worker running it."""
    store.migrate("fanout", FANOUT_MIGRATIONS)
    ids = None if event_ids is None else list(event_ids)
    if ids is not None and not ids:
        return 0
    with store.transaction() as tx:
        if ids is not None:
            found = table.parked_ids(tx, route, ids)
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFoundError(f"route {route!r} has no parked event {missing[0]!r}; see 'errands dead list'")
        return table.mark_redrive(tx, route, ids, store.clock.now())


def resume_route(store: SQLStore, route: str) -> bool:
    """Clear a route's STOPPED state. Returns whether it was stopped."""
    store.migrate("fanout", FANOUT_MIGRATIONS)
    with store.transaction() as tx:
        return table.resume(tx, route)


def route_states(store: SQLStore) -> Mapping[str, tuple[str, str | None]]:
    """Stopped routes and why, for the command line."""
    store.migrate("fanout", FANOUT_MIGRATIONS)
    with store.read() as tx:
        return table.states(tx)
