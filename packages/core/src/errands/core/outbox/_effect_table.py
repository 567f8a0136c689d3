"""The effect table ``em_effects``: its schema and every statement the outbox runs on it.

The outbox finds its work here, through the index on ``(status, next_attempt_at)``: every effect a worker may
take has a ``next_attempt_at`` (when it is due, or for a leased one when its lease lapses). Claims are
``UPDATE ... RETURNING`` statements that bump a fencing token (``FOR UPDATE SKIP LOCKED`` on PostgreSQL);
completions are fenced by that token, a whole batch in one statement.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from ..store import POSTGRES, SQLITE, Migration, SQLStore, Tx, in_clause
from . import _obligation_table
from ._records import (
    CLAIM_COLUMNS,
    EFFECT_COLUMNS,
    Claimed,
    EffectRecord,
    NewEffect,
    StoredEffect,
    Touched,
    claimed_from_row,
    effect_from_row,
    stored_json,
)
from ._transitions import Change, Completion

_V1 = """
        CREATE TABLE IF NOT EXISTS em_effects (
            key TEXT PRIMARY KEY,
            connector TEXT NOT NULL,
            tool TEXT NOT NULL,
            payload TEXT NOT NULL,
            business_key TEXT,
            semantics TEXT NOT NULL,
            run_id TEXT,
            metadata TEXT,
            human_gate INTEGER NOT NULL,
            not_before {double} NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            observations INTEGER NOT NULL DEFAULT 0,
            next_attempt_at {double},
            lease_owner TEXT,
            lease_token {bigint} NOT NULL DEFAULT 0,
            flagged INTEGER NOT NULL DEFAULT 0,
            response TEXT,
            error TEXT,
            external_ref TEXT,
            created_at {double} NOT NULL,
            updated_at {double} NOT NULL,
            journal_from {bigint} NOT NULL DEFAULT 0
        )/*effects table options*/;
        CREATE INDEX IF NOT EXISTS em_effects_due ON em_effects (status, next_attempt_at)
            WHERE next_attempt_at IS NOT NULL;
        CREATE INDEX IF NOT EXISTS em_effects_run ON em_effects (run_id) WHERE run_id IS NOT NULL
"""

# Version 2 kept a cursor of fresh effects in em_kv, announced by their journal events; version 3 retired it.
_V2 = ""

# Version 3: every effect a worker may take is in the due index. Fresh effects written under version 2 (pending,
# with no next_attempt_at) get theirs, and the cursor goes.
_V3 = """
        UPDATE em_effects SET next_attempt_at = CASE WHEN not_before > created_at THEN not_before ELSE created_at END
            WHERE status = 'PENDING' AND next_attempt_at IS NULL;
        DELETE FROM em_kv WHERE namespace = 'outbox' AND key = 'fresh'
"""


def migrations(dialect: str) -> list[Migration]:
    """The outbox's schema (component ``outbox``: both its tables) for ``dialect``. On SQLite the effects table is
    clustered on its key (``WITHOUT ROWID``): one b-tree less to write on every submit."""
    options = " WITHOUT ROWID" if dialect == SQLITE else ""
    v1 = _V1.replace("/*effects table options*/", options) + ";" + _obligation_table.SCHEMA
    return [Migration(1, v1), Migration(2, _V2), Migration(3, _V3)]


_COLS = ", ".join(EFFECT_COLUMNS)
_TOUCHED = "key, connector, tool, run_id, business_key"
_CLAIMED = ", ".join(CLAIM_COLUMNS)
# Every new row keeps the journal's position (``journal_from``): its events come after it.
# One row reads it in the statement; a batch reads it once and passes it to every row.
_INSERT_INTO = (
    "INSERT INTO em_effects (key, connector, tool, payload, business_key, semantics, run_id, metadata, "
    "human_gate, not_before, status, attempts, max_attempts, observations, next_attempt_at, flagged, "
    "created_at, updated_at, journal_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, 0, ?, 0, ?, ?, "
)
_INSERT_ONE_NEW = _INSERT_INTO + f"{SQLStore.LAST_POSITION_SQL}) ON CONFLICT (key) DO NOTHING"
_BATCH_HEAD = (
    "INSERT INTO em_effects (key, connector, tool, payload, business_key, semantics, run_id, metadata, "
    "human_gate, not_before, status, attempts, max_attempts, observations, next_attempt_at, flagged, "
    "created_at, updated_at, journal_from) VALUES "
)
_BATCH_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, 0, ?, 0, ?, ?, ?)"
_NEW_ONLY = " ON CONFLICT (key) DO NOTHING"
_CHUNK = 500


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _each_or_none(tx: Tx, rows: Sequence[Any], run: Callable[[], int]) -> bool:
    """On SQLite, inside a transaction: ``run()`` the statements for ``rows`` (it returns the rows changed) and keep
    them only if each row changed one row (the rule), else undo them; whether they were kept. Elsewhere it runs
    nothing and says no, and the caller takes its general way."""
    if tx.dialect != SQLITE or not rows or not tx.raw.in_transaction:
        return False
    tx.execute("SAVEPOINT em_each")
    if run() == len(rows):
        tx.execute("RELEASE em_each")
        return True
    tx.execute("ROLLBACK TO em_each")
    tx.execute("RELEASE em_each")
    return False


# -- admission ------------------------------------------------------------------------------------------------
def insert_new(tx: Tx, row: NewEffect) -> bool:
    """Insert ``row`` unless its key is taken; whether it was inserted."""
    return tx.rowcount(_INSERT_ONE_NEW, row) == 1


_ROW_AT_POSITION = f"(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, 0, ?, 0, ?, ?, {SQLStore.LAST_POSITION_SQL})"


def insert_new_rows(tx: Tx, rows: Sequence[NewEffect]) -> set[str]:
    """Insert ``rows`` (distinct keys) but those whose key is taken, in multi-row statements; the keys inserted.

    On SQLite they go in plain multi-row ``INSERT`` statements, all or none (``Tx.insert_all_or_none``): no
    ``RETURNING`` clause, whose rows come back one step at a time; a taken key among them leaves each row to its
    caller's own way."""
    if not rows:
        return set()
    inserted = tx.insert_all_or_none(_BATCH_HEAD, _ROW_AT_POSITION, rows)
    if inserted is not None:
        return {r[0] for r in rows} if inserted else set()
    return {r[0] for r in tx.insert_returning(_BATCH_HEAD, _ROW_AT_POSITION, rows, _NEW_ONLY + " RETURNING key")}


def _with_position(tx: Tx, rows: Sequence[NewEffect]) -> list[tuple[Any, ...]]:
    """``rows`` as the batch statement's parameters: each followed by the journal's last position."""
    (position,) = tx.one(f"SELECT {SQLStore.LAST_POSITION_SQL}") or (0,)
    return [(*row, position) for row in rows]


def insert_all_new(tx: Tx, rows: Sequence[NewEffect]) -> bool:
    """Insert ``rows`` (distinct keys) if no key among them is taken: whether it did (if one is taken, or this
    cannot be done at once here, nothing is inserted: ``Tx.insert_all_or_none``)."""
    if tx.dialect != SQLITE:
        return False
    # Every row carries the journal's last position, read once (a subquery in each row runs once per row).
    return bool(tx.insert_all_or_none(_BATCH_HEAD, _BATCH_ROW, _with_position(tx, rows)))


def insert_absent(tx: Tx, rows: Sequence[NewEffect]) -> list[NewEffect]:
    """Insert ``rows``, whose keys were found absent in this transaction; returns those inserted. On SQLite the
    write lock keeps them absent (one prepared statement for the batch); on PostgreSQL a concurrent submit may
    have taken a key since, and that row is left out."""
    if tx.dialect == POSTGRES:
        return [row for row in rows if insert_new(tx, row)]
    if rows:
        tx.insert_rows(_BATCH_HEAD, _BATCH_ROW, _with_position(tx, rows))
    return list(rows)


def get(tx: Tx, key: str, *, for_change: bool = False) -> StoredEffect | None:
    """The stored effect ``key``; ``for_change``: locked until the transaction ends (PostgreSQL; SQLite's write
    transaction holds the whole database)."""
    lock = " FOR UPDATE" if for_change and tx.dialect == POSTGRES else ""
    row = tx.one(f"SELECT {_COLS} FROM em_effects WHERE key = ?{lock}", (key,))
    return None if row is None else effect_from_row(row)


def get_many(tx: Tx, keys: Sequence[str]) -> dict[str, EffectRecord]:
    """The stored records among ``keys``."""
    out: dict[str, EffectRecord] = {}
    for chunk in _chunks(keys):
        for row in tx.query(f"SELECT {_COLS} FROM em_effects WHERE key IN {in_clause(len(chunk))}", chunk):
            out[row[0]] = effect_from_row(row).record
    return out


def owner_of(tx: Tx, key: str) -> tuple[str, str | None] | None:
    """The connector and run of effect ``key`` (who compensates it, and for which saga)."""
    row = tx.one("SELECT connector, run_id FROM em_effects WHERE key = ?", (key,))
    return None if row is None else (row[0], row[1])


# -- claims ---------------------------------------------------------------------------------------------------
def claim_for_dispatch(tx: Tx, owner: str, until: float, now: float, connectors: Sequence[str],
                       limit: int) -> list[Claimed]:
    """Lease up to ``limit`` due effects of ``connectors``, earliest due first: ``PENDING`` ones, and
    ``DISPATCHING`` ones whose lease lapsed (never ``NON_IDEMPOTENT``: those go to observation).

    Each status is read in index order and the two merged, so that a claim reads about ``limit`` index entries
    however many effects wait."""
    known = in_clause(len(connectors))
    due = (f"SELECT key, next_attempt_at FROM em_effects WHERE status = {{status}} AND next_attempt_at <= ? "
           f"AND connector IN {known}{{extra}} ORDER BY next_attempt_at LIMIT ?{tx.skip_locked}")
    pending = due.format(status="'PENDING'", extra="")
    lapsed = due.format(status="'DISPATCHING'", extra=" AND semantics <> 'NON_IDEMPOTENT'")
    rows = tx.query(
        "UPDATE em_effects SET status = 'DISPATCHING', lease_owner = ?, lease_token = lease_token + 1, "
        "attempts = attempts + 1, next_attempt_at = ?, updated_at = ? WHERE key IN (SELECT key FROM ("
        f"SELECT key, next_attempt_at FROM ({pending}) AS p UNION ALL SELECT key, next_attempt_at FROM ({lapsed}) "
        f"AS l ORDER BY next_attempt_at LIMIT ?) AS due) RETURNING {_CLAIMED}",
        (owner, until, now, now, *connectors, limit, now, *connectors, limit, limit),
    )
    return [claimed_from_row(r) for r in rows]


def lapse_non_idempotent(tx: Tx, now: float) -> list[Touched]:
    """Turn ``NON_IDEMPOTENT`` effects whose dispatch lease lapsed (a worker died mid-call) ``UNKNOWN``, to be
    observed; returns their keys, connectors, tools, runs and business keys."""
    rows = tx.query(
        "UPDATE em_effects SET status = 'UNKNOWN', lease_owner = NULL, updated_at = ?, "
        "error = 'lease lapsed during dispatch; outcome unknown' WHERE key IN (SELECT key FROM em_effects "
        "WHERE status = 'DISPATCHING' AND semantics = 'NON_IDEMPOTENT' AND next_attempt_at <= ?"
        f"{tx.skip_locked}) RETURNING {_TOUCHED}",
        (now, now),
    )
    return [Touched(*r) for r in rows]


def claim_for_observation(tx: Tx, owner: str, until: float, now: float, connectors: Sequence[str],
                          limit: int) -> list[Claimed]:
    """Lease up to ``limit`` ``UNKNOWN`` effects of ``connectors`` due for observation, earliest first."""
    rows = tx.query(
        "UPDATE em_effects SET lease_owner = ?, lease_token = lease_token + 1, "
        "observations = observations + 1, next_attempt_at = ?, updated_at = ? WHERE key IN (SELECT key "
        f"FROM em_effects WHERE status = 'UNKNOWN' AND next_attempt_at <= ? AND connector IN "
        f"{in_clause(len(connectors))} ORDER BY next_attempt_at LIMIT ?{tx.skip_locked}) RETURNING {_CLAIMED}",
        (owner, until, now, now, *connectors, limit),
    )
    return [claimed_from_row(r) for r in rows]


def release_dispatch_claim(tx: Tx, owner: str, claimed_at: float) -> list[Touched]:
    """Give back, due at once, the dispatch claim ``owner`` made at ``claimed_at`` (found by both), with the
    attempt it charged; returns the effects given back."""
    rows = tx.query(
        "UPDATE em_effects SET status = 'PENDING', attempts = attempts - 1, next_attempt_at = ?, "
        "lease_owner = NULL WHERE lease_owner = ? AND status = 'DISPATCHING' AND updated_at = ? "
        f"RETURNING {_TOUCHED}",
        (claimed_at, owner, claimed_at),
    )
    return [Touched(*r) for r in rows]


def release_observation_claim(tx: Tx, owner: str, claimed_at: float) -> None:
    """Give back, due at once, the observation claim ``owner`` made at ``claimed_at``, with the observation it
    counted."""
    tx.execute(
        "UPDATE em_effects SET observations = observations - 1, next_attempt_at = ?, "
        "lease_owner = NULL WHERE lease_owner = ? AND status = 'UNKNOWN' AND updated_at = ?",
        (claimed_at, owner, claimed_at),
    )


def extend(tx: Tx, held: Sequence[tuple[str, int]], until: float, status: str) -> set[str]:
    """Push the leases ``held`` (key, token) of effects in ``status`` out to ``until``; the keys still held."""
    still: set[str] = set()
    for chunk in _chunks(held):
        rows = tx.query(
            f"UPDATE em_effects SET next_attempt_at = ? WHERE status = ? AND (key, lease_token) IN (VALUES "
            f"{', '.join(['(CAST(? AS TEXT), CAST(? AS BIGINT))'] * len(chunk))}) RETURNING key",
            (until, status, *(v for pair in chunk for v in pair)),
        )
        still.update(r[0] for r in rows)
    return still


# -- completions ----------------------------------------------------------------------------------------------
def _params(c: Completion) -> tuple[Any, ...]:
    # ``_value_``, not the ``.value`` descriptor: read once per completion.
    return (c.status._value_, c.next_attempt_at, None if c.response is None else stored_json(c.response), c.error,
            c.external_ref, int(c.flagged), c.updated_at, c.key, c.token)


def complete(tx: Tx, completions: Sequence[Completion], held: str) -> set[str]:
    """Store ``completions`` of effects leased in status ``held`` where the lease token still matches; returns the
    keys that were still held."""
    rows = [_params(c) for c in completions]
    # On SQLite, one prepared statement run per completion, kept when every lease was still held (the rule).
    # Otherwise the statement that names the keys held.
    update = ("UPDATE em_effects SET status = ?, next_attempt_at = ?, response = COALESCE(?, response), "
              "error = ?, external_ref = COALESCE(?, external_ref), flagged = ?, lease_owner = NULL, "
              f"updated_at = ? WHERE key = ? AND lease_token = ? AND status = '{held}'")
    if _each_or_none(tx, rows, lambda: int(tx.raw.executemany(update, rows).rowcount)):
        return {c.key for c in completions}
    done: set[str] = set()
    row_sql = ("(CAST(? AS TEXT), CAST(? AS DOUBLE PRECISION), CAST(? AS TEXT), CAST(? AS TEXT), "
               "CAST(? AS TEXT), CAST(? AS INTEGER), CAST(? AS DOUBLE PRECISION), CAST(? AS TEXT), "
               "CAST(? AS BIGINT))")
    for chunk in _chunks(rows, 1000):
        got = tx.query(
            "WITH v (status, next_at, response, error, ref, flagged, now, key, token) AS (VALUES "
            + ", ".join([row_sql] * len(chunk))
            + ") UPDATE em_effects SET status = v.status, next_attempt_at = v.next_at, "
            "response = COALESCE(v.response, em_effects.response), error = v.error, "
            "external_ref = COALESCE(v.ref, em_effects.external_ref), flagged = v.flagged, lease_owner = NULL, "
            "updated_at = v.now FROM v WHERE em_effects.key = v.key AND em_effects.lease_token = v.token "
            f"AND em_effects.status = '{held}' RETURNING em_effects.key",
            [value for row in chunk for value in row],
        )
        done.update(r[0] for r in got)
    return done


def recorded_before(tx: Tx, completions: Sequence[Completion]) -> set[str]:
    """The keys among ``completions`` that stand as recorded (by an earlier try whose commit went unheard): the
    lease token unchanged since, the status the completion set, no lease owner."""
    want = {c.key: (c.token, c.status.value) for c in completions}
    done: set[str] = set()
    for chunk in _chunks(list(want)):
        for key, token, status, owner in tx.query(
                f"SELECT key, lease_token, status, lease_owner FROM em_effects WHERE key IN {in_clause(len(chunk))}",
                chunk):
            if owner is None and (int(token), status) == want[key]:
                done.add(key)
    return done


# -- inline runs ----------------------------------------------------------------------------------------------
def insert_leased(tx: Tx, row: NewEffect, owner: str) -> None:
    """Insert ``row`` (``DISPATCHING``, due when its lease lapses) leased to ``owner``: its first attempt."""
    tx.execute(
        "INSERT INTO em_effects (key, connector, tool, payload, business_key, semantics, run_id, metadata, "
        "human_gate, not_before, status, attempts, max_attempts, observations, next_attempt_at, lease_owner, "
        "lease_token, flagged, created_at, updated_at, journal_from) "
        f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, 0, ?, ?, 1, 0, ?, ?, {SQLStore.LAST_POSITION_SQL})",
        (*row[:13], owner, *row[13:]),
    )


def take_over(tx: Tx, key: str, token: int, attempts: int, owner: str, until: float, now: float) -> None:
    """Lease effect ``key`` to ``owner`` for another attempt, its lease lapsed."""
    tx.execute(
        "UPDATE em_effects SET status = 'DISPATCHING', lease_token = ?, lease_owner = ?, attempts = ?, "
        "next_attempt_at = ?, updated_at = ? WHERE key = ?",
        (token, owner, attempts, until, now, key),
    )


def finish_inline(tx: Tx, key: str, token: int, status: str, response: Any, ref: str | None, error: str | None,
                  now: float) -> bool:
    """Store an inline run's result where its lease token still matches; whether it did."""
    return tx.rowcount(
        "UPDATE em_effects SET status = ?, response = ?, external_ref = ?, error = ?, "
        "next_attempt_at = NULL, lease_owner = NULL, updated_at = ? WHERE key = ? AND lease_token = ? "
        "AND status = 'DISPATCHING'",
        (status, stored_json(response), ref, error, now, key, token),
    ) == 1


def release_inline(tx: Tx, key: str, owner: str, claimed_at: float) -> None:
    """Make effect ``key`` due at once if ``owner``'s inline claim at ``claimed_at`` holds it (its run never
    started)."""
    tx.execute("UPDATE em_effects SET next_attempt_at = ?, lease_owner = NULL WHERE key = ? AND "
               "lease_owner = ? AND status = 'DISPATCHING' AND updated_at = ?", (claimed_at, key, owner, claimed_at))


# -- operators and sagas --------------------------------------------------------------------------------------
def apply_change(tx: Tx, key: str, change: Change) -> None:
    """Store an operator's ``change`` of effect ``key`` (read for change in this transaction). The lease token is
    bumped, so that a worker whose lease lapsed records nothing over the decision."""
    fresh = ", attempts = 0, observations = 0, flagged = 0" if change.fresh_attempts else ""
    if change.unflag and not change.fresh_attempts:
        fresh += ", flagged = 0"
    extra: tuple[Any, ...] = ()
    if change.response is not None or change.external_ref is not None:
        fresh += ", response = COALESCE(?, response), external_ref = COALESCE(?, external_ref)"
        extra += (stored_json(change.response), change.external_ref)
    if change.metadata is not None:
        fresh += ", metadata = ?"
        extra += (stored_json(change.metadata),)
    tx.execute(
        "UPDATE em_effects SET status = ?, next_attempt_at = ?, lease_owner = NULL, lease_token = lease_token + 1, "
        f"updated_at = ?, error = ?{fresh} WHERE key = ?",
        (change.status.value, change.next_attempt_at, change.updated_at, change.error, *extra, key),
    )


def cancel_run(tx: Tx, run_id: str, now: float) -> list[tuple[str, str, str, str | None]]:
    """Cancel the effects of saga ``run_id`` not yet dispatched; returns their keys, connectors, tools and business
    keys."""
    rows = tx.query(
        "UPDATE em_effects SET status = 'CANCELLED', next_attempt_at = NULL, updated_at = ?, "
        "error = 'cancelled: run compensated' WHERE run_id = ? AND status IN ('PENDING', 'AWAITING_APPROVAL') "
        "RETURNING key, connector, tool, business_key",
        (now, run_id),
    )
    return [(k, c, t, b) for k, c, t, b in rows]


# -- read models ----------------------------------------------------------------------------------------------
def select(tx: Tx, where: Mapping[str, Any], limit: int) -> list[EffectRecord]:
    """Effects whose columns equal ``where`` (column names the caller chose), oldest first."""
    clause = " WHERE " + " AND ".join(f"{column} = ?" for column in where) if where else ""
    rows = tx.query(f"SELECT {_COLS} FROM em_effects{clause} ORDER BY created_at, key LIMIT ?",
                    (*where.values(), int(limit)))
    return [effect_from_row(r).record for r in rows]


def history_start(tx: Tx, key: str) -> tuple[str, int] | None:
    """The connector of effect ``key`` and a journal position below its first event."""
    row = tx.one("SELECT connector, journal_from FROM em_effects WHERE key = ?", (key,))
    return None if row is None else (row[0], int(row[1]))


def backlog(tx: Tx, now: float) -> tuple[int, float | None]:
    """How many effects a worker would take now, and the due time of the one due longest (None if none)."""
    row = tx.one("SELECT COUNT(*), MIN(next_attempt_at) FROM em_effects WHERE status IN ('PENDING', 'UNKNOWN') "
                 "AND next_attempt_at <= ?", (now,))
    return (int(row[0]), None if row[1] is None else float(row[1])) if row else (0, None)


def counts(tx: Tx, now: float) -> tuple[dict[str, int], int, int]:
    """Effects by status, flagged ones, and those a worker would take now."""
    by_status = {str(s): int(n) for s, n in tx.query("SELECT status, COUNT(*) FROM em_effects GROUP BY status")}
    flagged = tx.one("SELECT COUNT(*) FROM em_effects WHERE flagged = 1")
    due = tx.one("SELECT COUNT(*) FROM em_effects WHERE status IN ('PENDING', 'UNKNOWN') AND next_attempt_at <= ?",
                 (now,))
    return by_status, int(flagged[0]) if flagged else 0, int(due[0]) if due else 0
