"""Fan-out: each route relays the journal events matching its subjects to one sink, from a durable cursor.

Delivery is at least once and in order per stream. Within one pass a route reads a window of up to
``batch_size * max_in_flight`` events, splits it into lanes by stream (so that one stream's events stay in
one lane, in order) and publishes the lanes' batches concurrently. The cursor moves, in one transaction
with any parked events, to just before the earliest event not yet delivered.
"""

from __future__ import annotations

import logging
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from ._backoff import backoff
from ._runtime import CallRunner, drain
from ._values import Event, _StrEnum
from .errors import ConfigError, LeaseLostError, NotFoundError, PermanentError, TransientError
from .store._sql import Migration, Tx, in_clause, subject_matcher, subject_regex
from .store._stores import SQLStore, _event_from_row

log = logging.getLogger("errands.fanout")

CURSOR_NAMESPACE = "cursor"

FANOUT_MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE IF NOT EXISTS em_fanout_dead (
            route TEXT NOT NULL,
            event_id TEXT NOT NULL,
            position {bigint} NOT NULL,
            error TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 1,
            redrive INTEGER NOT NULL DEFAULT 0,
            parked_at {double} NOT NULL,
            updated_at {double} NOT NULL,
            PRIMARY KEY (route, event_id)
        );
        CREATE TABLE IF NOT EXISTS em_fanout_routes (
            route TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            reason TEXT,
            updated_at {double} NOT NULL
        )
        """,
    ),
]


class RouteState(_StrEnum):
    """Whether a route is delivering."""

    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


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
    if len(problems) == 1:
        raise problems[0]
    err = ConfigError("\n".join(f"- {p}" for p in problems), field=problems[0].field, value=problems[0].value)
    err.problems = problems  # type: ignore[attr-defined]
    raise err


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
class _Lane:
    batches: list[list[Event]]
    delivered: list[Event] = field(default_factory=list)
    parked: list[tuple[Event, str]] = field(default_factory=list)
    failed_at: Event | None = None
    error: BaseException | None = None
    stop: BaseException | None = None


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


def _stops_route(exc: BaseException) -> bool:
    return bool(getattr(exc, "stop_route", False))


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
        self._bridge = CallRunner(name="errands-fanout")
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

    def _cursor_key(self, name: str) -> str:
        return f"fanout:{name}"

    def _load_cursor(self, run: _RouteRun) -> None:
        got = self.store.kv_get(CURSOR_NAMESPACE, self._cursor_key(run.route.name))
        if got is not None:
            run.cursor, run.version = int(got[0]), got[1]
            return
        start = self.store.last_position() if run.route.start == "end" else 0
        try:
            run.version = self.store.kv_put(CURSOR_NAMESPACE, self._cursor_key(run.route.name), start,
                                            expected_version=0)
            run.cursor = start
        except LeaseLostError:
            self._load_cursor(run)

    def _state(self, name: str) -> tuple[RouteState, str | None]:
        with self.store.read() as tx:
            row = tx.one("SELECT state, reason FROM em_fanout_routes WHERE route = ?", (name,))
        return (RouteState(row[0]), row[1]) if row else (RouteState.RUNNING, None)

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
        window = route.batch_size * route.max_in_flight
        events, last = self.store.scan_events(run.cursor, window, list(route.subjects) or None)
        if run.ahead:
            events = [e for e in events if e.id not in run.ahead]
        if not events:
            if last > run.cursor:
                self._commit(run, last, [])
            return delivered
        lanes = self._lanes(route, events)
        if len(lanes) == 1:
            self._publish_lane(route, lanes[0])
        else:
            pool = self._executor(route.max_in_flight)
            for f in [pool.submit(self._publish_lane, route, lane) for lane in lanes]:
                f.result()
        failed = [lane for lane in lanes if lane.failed_at is not None]
        if failed:
            first = min(lane.failed_at.position for lane in failed if lane.failed_at is not None)
            new_cursor = first - 1
            for lane in lanes:
                for ev in lane.delivered:
                    if ev.position > new_cursor:
                        run.ahead[ev.id] = ev.position
                for ev, _err in lane.parked:
                    if ev.position > new_cursor:
                        run.ahead[ev.id] = ev.position
        else:
            new_cursor = last
        parked = [p for lane in lanes for p in lane.parked]
        self._commit(run, new_cursor, parked)
        count = sum(len(lane.delivered) for lane in lanes)
        stop = next((lane.stop for lane in lanes if lane.stop is not None), None)
        if stop is not None:
            self._stop(route.name, stop)
        elif failed:
            err = next(lane.error for lane in failed if lane.error is not None)
            self._back_off(run, err)
        else:
            run.attempt = 0
        for ev, error in parked:
            log.warning("route %s parked event %s: %s", route.name, ev.id, error)
        return delivered + count

    def _lanes(self, route: Route, events: list[Event]) -> list[_Lane]:
        size = route.batch_size
        if route.max_in_flight == 1:
            return [_Lane([events[i:i + size] for i in range(0, len(events), size)])]
        buckets: dict[int, list[Event]] = {}
        n = route.max_in_flight
        for ev in events:
            buckets.setdefault(zlib.crc32(ev.stream.encode()) % n, []).append(ev)
        return [_Lane([b[i:i + size] for i in range(0, len(b), size)]) for b in buckets.values()]

    def _executor(self, n: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool._max_workers < n:
                old, self._pool = self._pool, ThreadPoolExecutor(max_workers=max(n, 2), thread_name_prefix="errands-fanout")
                if old is not None:
                    old.shutdown(wait=False)
            return self._pool

    def _publish(self, route: Route, batch: Sequence[Event]) -> None:
        self._bridge.call(route.sink.publish, batch)

    def _publish_lane(self, route: Route, lane: _Lane) -> None:
        for batch in lane.batches:
            try:
                self._publish(route, batch)
                lane.delivered.extend(batch)
                continue
            except PermanentError as exc:
                if _stops_route(exc):
                    lane.failed_at, lane.error, lane.stop = batch[0], exc, exc
                    return
            except Exception as exc:
                if not isinstance(exc, TransientError):
                    log.warning("route %s: sink %s raised %s; retrying as a transient failure", route.name,
                                type(route.sink).__name__, type(exc).__name__, exc_info=True)
                lane.failed_at, lane.error = batch[0], exc
                return
            # The batch was refused for good: find the events that fail on their own.
            for ev in batch:
                try:
                    self._publish(route, [ev])
                    lane.delivered.append(ev)
                except PermanentError as exc:
                    if _stops_route(exc):
                        lane.failed_at, lane.error, lane.stop = ev, exc, exc
                        return
                    lane.parked.append((ev, _describe(exc)))
                except Exception as exc:
                    lane.failed_at, lane.error = ev, exc
                    return

    def _commit(self, run: _RouteRun, cursor: int, parked: Sequence[tuple[Event, str]]) -> None:
        now = self.store.clock.now()
        try:
            with self.store.transaction() as tx:
                if parked:
                    tx.executemany(
                        "INSERT INTO em_fanout_dead (route, event_id, position, error, attempts, redrive, "
                        "parked_at, updated_at) VALUES (?, ?, ?, ?, 1, 0, ?, ?) ON CONFLICT (route, event_id) "
                        "DO UPDATE SET error = excluded.error, attempts = em_fanout_dead.attempts + 1, "
                        "redrive = 0, updated_at = excluded.updated_at",
                        [(run.route.name, ev.id, ev.position, err, now, now) for ev, err in parked],
                    )
                if cursor != run.cursor:
                    run.version = self.store.kv_put(CURSOR_NAMESPACE, self._cursor_key(run.route.name), cursor,
                                                    expected_version=run.version, tx=tx)
        except LeaseLostError:
            log.warning("route %s: its cursor was moved by another process; reloading it", run.route.name)
            run.ahead.clear()
            self._load_cursor(run)
            return
        run.cursor = cursor
        if run.ahead:
            run.ahead = {k: p for k, p in run.ahead.items() if p > cursor}

    def _back_off(self, run: _RouteRun, exc: BaseException) -> None:
        run.attempt += 1
        # One rule with the Retry-After header: NaN or no number -> backoff; inf or absurd -> MAX_RETRY_AFTER.
        delay = backoff(run.attempt, base=self.retry_base, cap=self.retry_cap,
                        retry_after=getattr(exc, "retry_after", None))
        run.retry_at = self.store.clock.now() + delay
        log.warning("route %s: delivery failed (%s); retry %d in %.2fs", run.route.name, _describe(exc),
                    run.attempt, delay)

    def _stop(self, name: str, exc: BaseException) -> None:
        reason = _describe(exc)
        with self.store.transaction() as tx:
            _set_state(tx, name, RouteState.STOPPED, reason, self.store.clock.now())
        log.error("route %s stopped: %s; fix the sink, then resume it (FanOut.resume or "
                  "'errands routes resume')", name, reason)

    # -- redrive ---------------------------------------------------------------------------------
    def _deliver_redrives(self, run: _RouteRun) -> int:
        route = run.route
        with self.store.read() as tx:
            rows = tx.query(
                "SELECT e.position, e.stream, e.seq, e.subject, e.type, e.data, e.time FROM em_fanout_dead d "
                "JOIN em_events e ON e.position = d.position WHERE d.route = ? AND d.redrive = 1 "
                "ORDER BY d.position LIMIT ?",
                (route.name, route.batch_size),
            )
        delivered = 0
        for row in rows:
            ev = _event_from_row(row)
            try:
                self._publish(route, [ev])
            except PermanentError as exc:
                if _stops_route(exc):
                    self._stop(route.name, exc)
                    return delivered
                with self.store.transaction() as tx:
                    tx.execute(
                        "UPDATE em_fanout_dead SET redrive = 0, attempts = attempts + 1, error = ?, updated_at = ? "
                        "WHERE route = ? AND event_id = ?",
                        (_describe(exc), self.store.clock.now(), route.name, ev.id),
                    )
                log.warning("route %s: redriven event %s refused again: %s", route.name, ev.id, _describe(exc))
                continue
            except Exception as exc:
                self._back_off(run, exc)
                return delivered
            with self.store.transaction() as tx:
                tx.execute("DELETE FROM em_fanout_dead WHERE route = ? AND event_id = ?", (route.name, ev.id))
            delivered += 1
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
        out = []
        for name, run in self._runs.items():
            if run.cursor is None:
                self._load_cursor(run)
            assert run.cursor is not None
            state, reason = self._state(name)
            with self.store.read() as tx:
                row = tx.one("SELECT COUNT(*) FROM em_fanout_dead WHERE route = ?", (name,))
            out.append(RouteStatus(
                name=name, cursor=run.cursor, behind=max(0, head - run.cursor), state=state, reason=reason,
                dead=int(row[0]) if row else 0, retry_at=run.retry_at or None,
            ))
        return out

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
        self._bridge.close()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _set_state(tx: Tx, name: str, state: RouteState, reason: str | None, now: float) -> None:
    tx.execute(
        "INSERT INTO em_fanout_routes (route, state, reason, updated_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (route) DO UPDATE SET state = excluded.state, reason = excluded.reason, "
        "updated_at = excluded.updated_at",
        (name, str(state), reason, now),
    )


def list_dead(store: SQLStore, route: str | None = None, limit: int = 100) -> list[DeadEvent]:
    """Parked events of ``route`` (every route if None), oldest first. Works without the sinks, for the
    command line."""
    store.migrate("fanout", FANOUT_MIGRATIONS)
    sql = (
        "SELECT d.route, d.error, d.attempts, d.parked_at, d.redrive, e.position, e.stream, e.seq, e.subject, "
        "e.type, e.data, e.time FROM em_fanout_dead d JOIN em_events e ON e.position = d.position"
    )
    params: list[Any] = []
    if route is not None:
        sql += " WHERE d.route = ?"
        params.append(route)
    sql += " ORDER BY d.route, d.position LIMIT ?"
    params.append(limit)
    with store.read() as tx:
        rows = tx.query(sql, params)
    return [
        DeadEvent(route=r[0], error=r[1], attempts=int(r[2]),
                  parked_at=datetime.fromtimestamp(float(r[3]), tz=timezone.utc), redrive=bool(r[4]),
                  event=_event_from_row(r[5:]))
        for r in rows
    ]


def mark_redrive(store: SQLStore, route: str, event_ids: Sequence[str] | None = None) -> int:
    """Mark parked events of ``route`` for delivery by the next pass of the worker running it."""
    store.migrate("fanout", FANOUT_MIGRATIONS)
    now = store.clock.now()
    with store.transaction() as tx:
        if event_ids is None:
            return tx.rowcount("UPDATE em_fanout_dead SET redrive = 1, updated_at = ? WHERE route = ?", (now, route))
        ids = list(event_ids)
        if not ids:
            return 0
        found = {r[0] for r in tx.query(
            f"SELECT event_id FROM em_fanout_dead WHERE route = ? AND event_id IN {in_clause(len(ids))}",
            (route, *ids))}
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFoundError(f"route {route!r} has no parked event {missing[0]!r}; see 'errands dead list'")
        return tx.rowcount(
            f"UPDATE em_fanout_dead SET redrive = 1, updated_at = ? WHERE route = ? AND event_id IN "
            f"{in_clause(len(ids))}",
            (now, route, *ids),
        )


def resume_route(store: SQLStore, route: str) -> bool:
    """Clear a route's STOPPED state. Returns whether it was stopped."""
    store.migrate("fanout", FANOUT_MIGRATIONS)
    with store.transaction() as tx:
        return tx.rowcount("DELETE FROM em_fanout_routes WHERE route = ? AND state = ?",
                           (route, str(RouteState.STOPPED))) > 0


def route_states(store: SQLStore) -> Mapping[str, tuple[str, str | None]]:
    """Stopped routes and why, for the command line."""
    store.migrate("fanout", FANOUT_MIGRATIONS)
    with store.read() as tx:
        return {r[0]: (r[1], r[2]) for r in tx.query("SELECT route, state, reason FROM em_fanout_routes")}

