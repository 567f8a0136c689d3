"""Fan-out's tables, as functions over a ``Tx``: route states (``em_fanout_routes``), parked events
(``em_fanout_dead``, which keep each event's journal position; the events themselves are read through the
store) and the routes' cursors (versioned key-value entries ``fanout:<route>`` under ``CURSOR_NAMESPACE``).
The engine (``_fanout``) decides; this module only reads and writes rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ._fanout_transitions import RouteState
from ._values import Event
from .store import Migration, Tx, in_clause, loads

#: The key-value namespace of durable cursors: fan-out's routes (``fanout:<route>``) and reactions
#: (``reactor:<name>``).
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

_CURSOR_PREFIX = "fanout:"


@dataclass(frozen=True, slots=True)
class Parked:
    """A row of the dead-letter list: the event is the journal's at ``position``."""

    route: str
    position: int
    error: str
    attempts: int
    parked_at: float
    redrive: bool


def cursor_key(route: str) -> str:
    """The key of ``route``'s cursor under ``CURSOR_NAMESPACE``."""
    return _CURSOR_PREFIX + route


def cursors(tx: Tx) -> list[tuple[str, int]]:
    """Every route's cursor, ``(route, position)``, by route name."""
    rows = tx.query(f"SELECT key, value FROM em_kv WHERE namespace = ? AND key LIKE '{_CURSOR_PREFIX}%' ORDER BY key",
                    (CURSOR_NAMESPACE,))
    return [(key[len(_CURSOR_PREFIX):], int(loads(value))) for key, value in rows]


# -- route states ----------------------------------------------------------------------------------

def state(tx: Tx, route: str) -> tuple[RouteState, str | None]:
    """A route's state and why (a route with no row runs)."""
    row = tx.one("SELECT state, reason FROM em_fanout_routes WHERE route = ?", (route,))
    return (RouteState(row[0]), row[1]) if row else (RouteState.RUNNING, None)


def states(tx: Tx) -> dict[str, tuple[str, str | None]]:
    """Every route with a state row (the stopped ones) and why."""
    return {r[0]: (r[1], r[2]) for r in tx.query("SELECT route, state, reason FROM em_fanout_routes")}


def set_state(tx: Tx, route: str, state: RouteState, reason: str | None, now: float) -> None:
    tx.execute(
        "INSERT INTO em_fanout_routes (route, state, reason, updated_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (route) DO UPDATE SET state = excluded.state, reason = excluded.reason, "
        "updated_at = excluded.updated_at",
        (route, str(state), reason, now),
    )


def resume(tx: Tx, route: str) -> bool:
    """Clear a route's STOPPED state. Returns whether it was stopped."""
    return tx.rowcount("DELETE FROM em_fanout_routes WHERE route = ? AND state = ?",
                       (route, str(RouteState.STOPPED))) > 0


# -- parked events ---------------------------------------------------------------------------------

def park(tx: Tx, route: str, parked: Sequence[tuple[Event, str]], now: float) -> None:
    """Add events the sink refused on their own (with its error) to the route's dead-letter list; one
    parked again counts another attempt and is no longer marked for redrive."""
    if parked:
        tx.executemany(
            "INSERT INTO em_fanout_dead (route, event_id, position, error, attempts, redrive, "
            "parked_at, updated_at) VALUES (?, ?, ?, ?, 1, 0, ?, ?) ON CONFLICT (route, event_id) "
            "DO UPDATE SET error = excluded.error, attempts = em_fanout_dead.attempts + 1, "
            "redrive = 0, updated_at = excluded.updated_at",
            [(route, ev.id, ev.position, err, now, now) for ev, err in parked],
        )


def to_redrive(tx: Tx, route: str, limit: int) -> list[int]:
    """Positions of the route's parked events marked for redrive, oldest first."""
    return [int(r[0]) for r in tx.query(
        "SELECT position FROM em_fanout_dead WHERE route = ? AND redrive = 1 ORDER BY position LIMIT ?",
        (route, limit))]


def refused_again(tx: Tx, route: str, event_id: str, error: str, now: float) -> None:
    """A redriven event the sink refused again: parked as before, with one more attempt."""
    tx.execute("UPDATE em_fanout_dead SET redrive = 0, attempts = attempts + 1, error = ?, updated_at = ? "
               "WHERE route = ? AND event_id = ?", (error, now, route, event_id))


def unpark(tx: Tx, route: str, event_id: str) -> None:
    """Drop a delivered event from the route's dead-letter list."""
    tx.execute("DELETE FROM em_fanout_dead WHERE route = ? AND event_id = ?", (route, event_id))


def parked(tx: Tx, route: str | None, limit: int) -> list[Parked]:
    """Parked events of ``route`` (every route if None), by route then position."""
    sql = "SELECT route, position, error, attempts, parked_at, redrive FROM em_fanout_dead"
    params: list[Any] = []
    if route is not None:
        sql += " WHERE route = ?"
        params.append(route)
    rows = tx.query(sql + " ORDER BY route, position LIMIT ?", (*params, limit))
    return [Parked(r[0], int(r[1]), r[2], int(r[3]), float(r[4]), bool(r[5])) for r in rows]


def parked_counts(tx: Tx) -> dict[str, int]:
    """How many events each route has parked; routes with none are left out."""
    return {r[0]: int(r[1]) for r in tx.query("SELECT route, COUNT(*) FROM em_fanout_dead GROUP BY route")}


def parked_ids(tx: Tx, route: str, event_ids: Sequence[str]) -> set[str]:
    """Which of ``event_ids`` the route has parked."""
    return {r[0] for r in tx.query(
        f"SELECT event_id FROM em_fanout_dead WHERE route = ? AND event_id IN {in_clause(len(event_ids))}",
        (route, *event_ids))}


def mark_redrive(tx: Tx, route: str, event_ids: Sequence[str] | None, now: float) -> int:
    """Mark the route's parked events (all, or those in ``event_ids``) for redrive. Returns how many."""
    if event_ids is None:
        return tx.rowcount("UPDATE em_fanout_dead SET redrive = 1, updated_at = ? WHERE route = ?", (now, route))
    return tx.rowcount(
        f"UPDATE em_fanout_dead SET redrive = 1, updated_at = ? WHERE route = ? AND event_id IN "
        f"{in_clause(len(event_ids))}",
        (now, route, *event_ids),
    )
