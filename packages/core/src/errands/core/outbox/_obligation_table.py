"""The obligation table ``em_obligations``: its schema and every statement the saga runs on it.

An obligation is unique per ``(effect_key, kind)``; ``id`` orders a run's obligations, which are compensated
last-registered first. Claims bump a fencing token like effects' do, and each completion is fenced by it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..store import POSTGRES, Tx
from ._records import (
    OBLIGATION_COLUMNS,
    NewObligation,
    ObligationRecord,
    obligation_from_row,
    stored_json,
)
from ._transitions import ObligationChange, ObligationCompletion

#: The table, created by the outbox's first migration (the effect table module holds the migrations).
SCHEMA = """
        CREATE TABLE IF NOT EXISTS em_obligations (
            id {serial_pk},
            effect_key TEXT NOT NULL,
            kind TEXT NOT NULL,
            payload TEXT,
            run_id TEXT,
            compensator TEXT,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            next_attempt_at {double},
            lease_owner TEXT,
            lease_token {bigint} NOT NULL DEFAULT 0,
            response TEXT,
            error TEXT,
            created_at {double} NOT NULL,
            updated_at {double} NOT NULL,
            UNIQUE (effect_key, kind)
        );
        CREATE INDEX IF NOT EXISTS em_obligations_due ON em_obligations (status, next_attempt_at);
        CREATE INDEX IF NOT EXISTS em_obligations_run ON em_obligations (run_id, id)
"""

_COLS = ", ".join(OBLIGATION_COLUMNS)


def insert(tx: Tx, ob: NewObligation, now: float) -> int | None:
    """Record ``ob`` unless its ``(effect_key, kind)`` is owed already; its id when it is new."""
    row = tx.one(
        "INSERT INTO em_obligations (effect_key, kind, payload, run_id, compensator, status, max_attempts, "
        "next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (effect_key, kind) DO NOTHING RETURNING id",
        (ob.effect_key, ob.kind, stored_json(ob.payload), ob.run_id, ob.compensator, ob.status.value,
         ob.max_attempts, ob.next_attempt_at, now, now),
    )
    return None if row is None else int(row[0])


def get(tx: Tx, effect_key: str, kind: str) -> ObligationRecord | None:
    """The obligation of ``kind`` owed for ``effect_key``."""
    row = tx.one(f"SELECT {_COLS} FROM em_obligations WHERE effect_key = ? AND kind = ?", (effect_key, kind))
    return None if row is None else obligation_from_row(row)[0]


def make_run_due(tx: Tx, run_id: str, now: float) -> list[ObligationRecord]:
    """Make the registered obligations of saga ``run_id`` due now; returns them."""
    rows = tx.query(
        "UPDATE em_obligations SET status = 'PENDING', next_attempt_at = ?, updated_at = ? "
        f"WHERE run_id = ? AND status = 'REGISTERED' RETURNING {_COLS}",
        (now, now, run_id),
    )
    return [obligation_from_row(r)[0] for r in rows]


def claim(tx: Tx, owner: str, until: float, now: float, limit: int) -> list[tuple[ObligationRecord, int]]:
    """Lease up to ``limit`` due obligations to ``owner``, each only once every later one of its run is done
    (LIFO within a run); returns them with their fencing tokens."""
    rows = tx.query(
        "UPDATE em_obligations SET status = 'COMPENSATING', lease_owner = ?, "
        "lease_token = lease_token + 1, attempts = attempts + 1, next_attempt_at = ?, updated_at = ? "
        "WHERE id IN (SELECT o.id FROM em_obligations o WHERE o.status IN ('PENDING', 'COMPENSATING') "
        "AND o.next_attempt_at <= ? AND NOT EXISTS (SELECT 1 FROM em_obligations l WHERE "
        "l.run_id = o.run_id AND l.id > o.id AND l.status IN ('PENDING', 'COMPENSATING', 'STUCK')) "
        f"ORDER BY o.id DESC LIMIT ?{tx.skip_locked}) RETURNING {_COLS}",
        (owner, until, now, now, limit),
    )
    return [obligation_from_row(r) for r in rows]


def release_claim(tx: Tx, owner: str, claimed_at: float) -> list[tuple[int, str, str]]:
    """Give back, due at once, the claim ``owner`` made at ``claimed_at``, with the attempt it charged; returns
    the ids, effect keys and kinds given back."""
    rows = tx.query(
        "UPDATE em_obligations SET status = 'PENDING', attempts = attempts - 1, next_attempt_at = ?, "
        "lease_owner = NULL WHERE lease_owner = ? AND status = 'COMPENSATING' AND updated_at = ? "
        "RETURNING id, effect_key, kind",
        (claimed_at, owner, claimed_at),
    )
    return [(int(i), k, kind) for i, k, kind in rows]


def extend(tx: Tx, held: Sequence[tuple[int, int]], until: float) -> set[int]:
    """Push the leases ``held`` (id, token) of obligations being compensated out to ``until``; the ids still
    held."""
    if not held:
        return set()
    pairs = " OR ".join(["(id = ? AND lease_token = ?)"] * len(held))
    rows = tx.query(
        f"UPDATE em_obligations SET next_attempt_at = ? WHERE status = 'COMPENSATING' AND ({pairs}) RETURNING id",
        (until, *(v for pair in held for v in pair)),
    )
    return {int(r[0]) for r in rows}


def complete(tx: Tx, c: ObligationCompletion) -> bool:
    """Store completion ``c`` if its lease token still matches; whether it did."""
    return tx.rowcount(
        "UPDATE em_obligations SET status = ?, next_attempt_at = ?, response = ?, error = ?, "
        "lease_owner = NULL, updated_at = ? WHERE id = ? AND lease_token = ? AND status = 'COMPENSATING'",
        (c.status.value, c.next_attempt_at, stored_json(c.response), c.error, c.updated_at, c.id, c.token),
    ) == 1


def recorded_before(tx: Tx, c: ObligationCompletion) -> bool:
    """Whether completion ``c`` stands as recorded (by an earlier try whose commit went unheard)."""
    row = tx.one("SELECT lease_token, status, lease_owner FROM em_obligations WHERE id = ?", (c.id,))
    return row is not None and int(row[0]) == c.token and row[1] == c.status.value and row[2] is None


def redrive(tx: Tx, ob_id: int, now: float) -> ObligationRecord | None:
    """Make a ``STUCK`` obligation due again with fresh attempts; None if it is not ``STUCK`` (or not there)."""
    row = tx.one(
        "UPDATE em_obligations SET status = 'PENDING', attempts = 0, next_attempt_at = ?, updated_at = ? "
        f"WHERE id = ? AND status = 'STUCK' RETURNING {_COLS}",
        (now, now, ob_id),
    )
    return None if row is None else obligation_from_row(row)[0]


def get_for_change(tx: Tx, ob_id: int) -> tuple[ObligationRecord, float | None] | None:
    """Obligation ``ob_id`` and its stored ``next_attempt_at`` (for one being compensated: when its lease lapses),
    locked until the transaction ends (PostgreSQL; SQLite's write transaction holds the whole database)."""
    lock = " FOR UPDATE" if tx.dialect == POSTGRES else ""
    row = tx.one(f"SELECT {_COLS} FROM em_obligations WHERE id = ?{lock}", (ob_id,))
    if row is None:
        return None
    return obligation_from_row(row)[0], None if row[9] is None else float(row[9])


def apply_resolution(tx: Tx, ob_id: int, change: ObligationChange) -> ObligationRecord:
    """Store an operator's resolution of obligation ``ob_id`` (read for change in this transaction); the lease token
    is bumped, so that a worker whose lease lapsed records nothing over it. Returns the record afterwards."""
    row = tx.one(
        "UPDATE em_obligations SET status = ?, next_attempt_at = NULL, lease_owner = NULL, "
        "lease_token = lease_token + 1, response = COALESCE(?, response), error = ?, updated_at = ? "
        f"WHERE id = ? RETURNING {_COLS}",
        (change.status.value, stored_json(change.response), change.error, change.updated_at, ob_id),
    )
    assert row is not None
    return obligation_from_row(row)[0]


def select(tx: Tx, where: Mapping[str, Any], limit: int) -> list[ObligationRecord]:
    """Obligations whose columns equal ``where`` (column names the caller chose), oldest first."""
    clause = " WHERE " + " AND ".join(f"{column} = ?" for column in where) if where else ""
    rows = tx.query(f"SELECT {_COLS} FROM em_obligations{clause} ORDER BY id LIMIT ?", (*where.values(), int(limit)))
    return [obligation_from_row(r)[0] for r in rows]


def kinds_owed(tx: Tx, effect_key: str) -> list[str]:
    """The kinds of compensation owed for ``effect_key``."""
    return [r[0] for r in tx.query("SELECT kind FROM em_obligations WHERE effect_key = ?", (effect_key,))]


def counts(tx: Tx) -> dict[str, int]:
    """Obligations by status."""
    return {str(s): int(n) for s, n in tx.query("SELECT status, COUNT(*) FROM em_obligations GROUP BY status")}
