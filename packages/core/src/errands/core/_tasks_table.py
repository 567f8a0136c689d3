"""The task tables ``em_tasks`` and ``em_task_schedules``: their migrations and every statement the task
engine and reactions run on them, as functions over a ``Tx``. The engine (``_tasks``) decides; this module only reads and writes rows.

Every write to a running task is fenced by its token (``token = ?``, bumped at each claim), so a worker
whose lease moved on writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from ._tasks_transitions import TaskStatus
from .store import POSTGRES, Migration, Tx, dumps, in_clause, loads

TASK_MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE IF NOT EXISTS em_tasks (
            id TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            params TEXT,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            available_at {double} NOT NULL,
            owner TEXT,
            token {bigint} NOT NULL DEFAULT 0,
            lease_expires {double},
            result TEXT,
            error TEXT,
            debounce_key TEXT,
            created_at {double} NOT NULL,
            updated_at {double} NOT NULL,
            started_at {double},
            finished_at {double}
        );
        CREATE INDEX IF NOT EXISTS em_tasks_due ON em_tasks (type, status, available_at);
        CREATE INDEX IF NOT EXISTS em_tasks_created ON em_tasks (created_at);
        CREATE INDEX IF NOT EXISTS em_tasks_debounce ON em_tasks (debounce_key)
        """,
    ),
    # Priorities (higher first among due tasks), cancellation asked of a running task's worker, the purge of
    # finished tasks by age, and periodic tasks (one row per schedule: the next tick due).
    Migration(
        2,
        """
        ALTER TABLE em_tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE em_tasks ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
        DROP INDEX IF EXISTS em_tasks_due;
        CREATE INDEX IF NOT EXISTS em_tasks_due ON em_tasks (type, status, priority DESC, available_at);
        CREATE INDEX IF NOT EXISTS em_tasks_finished ON em_tasks (status, finished_at);
        CREATE TABLE IF NOT EXISTS em_task_schedules (
            name TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            cron TEXT NOT NULL,
            params TEXT,
            priority INTEGER NOT NULL DEFAULT 0,
            next_at {double} NOT NULL,
            last_at {double},
            created_at {double} NOT NULL,
            updated_at {double} NOT NULL
        )
        """,
    ),
    # Ordering keys: tasks sharing an ``order_key`` run one at a time, in ``order_seq`` order (reactions
    # keyed with ``key=``: the event's journal position). The partial index holds live keyed tasks only.
    Migration(
        3,
        """
        ALTER TABLE em_tasks ADD COLUMN order_key TEXT;
        ALTER TABLE em_tasks ADD COLUMN order_seq {bigint};
        CREATE INDEX IF NOT EXISTS em_tasks_order ON em_tasks (order_key, order_seq)
            WHERE order_key IS NOT NULL AND status IN ('PENDING', 'RUNNING')
        """,
    ),
    # The W3C trace context current when the task was submitted (JSON): its run continues that trace.
    Migration(5, "ALTER TABLE em_tasks ADD COLUMN trace TEXT"),
]

#: The claim index (tasks migration 4): main's due index (type, status, priority DESC, available_at) made
#: partial, over the rows a claim may take only (pending and running ones), so that finished tasks (the
#: table's history) are neither walked nor indexed and a claim costs O(batch), not O(table). Its predicate is
#: written as literals, and every claim-path query repeats it (``_LIVE``) as one of its AND terms: SQLite uses a
#: partial index only for a query holding the index's own terms, and PostgreSQL only when it can prove the
#: predicate (bound parameters would hide it from a generic plan). The debounce index keeps only the rows with
#: a key (most tasks have none), one index entry fewer to write per task.
CLAIM_INDEX = Migration(
    4,
    """
    CREATE INDEX IF NOT EXISTS em_tasks_claim ON em_tasks (type, status, priority DESC, available_at)
        WHERE status IN ('PENDING', 'RUNNING');
    DROP INDEX IF EXISTS em_tasks_due;
    CREATE INDEX IF NOT EXISTS em_tasks_debounced ON em_tasks (debounce_key) WHERE debounce_key IS NOT NULL;
    DROP INDEX IF EXISTS em_tasks_debounce
    """,
)
TASK_MIGRATIONS.append(CLAIM_INDEX)

# PostgreSQL advisory lock class for task admission: engines claiming a type with ``max_concurrency`` take
# ``(_ADMIT_LOCK, hashtext(type))`` for the transaction, so counting the running tasks and claiming more is
# one step across workers (READ COMMITTED would otherwise let two counts see the same free slot).
_ADMIT_LOCK = 0x656D7461

_PENDING, _RUNNING = str(TaskStatus.PENDING), str(TaskStatus.RUNNING)
#: The claim index's predicate (``CLAIM_INDEX``), a term of every query that should walk it.
_LIVE = f"status IN ('{_PENDING}', '{_RUNNING}')"
_COLS = ("id, type, params, status, attempts, result, error, created_at, updated_at, started_at, finished_at, "
         "available_at, priority, cancel_requested")
_SCHEDULE_COLS = "name, type, cron, params, priority, next_at, last_at"
#: What the purge of old tasks deletes: finished tasks, not the dead-letter list (parked for an operator).
_PURGED = (str(TaskStatus.SUCCEEDED), str(TaskStatus.FAILED), str(TaskStatus.CANCELLED))
# An abandoned invocation (an infrastructure fault, not the handler's) does not count as an attempt.
_GIVE_BACK = ("UPDATE em_tasks SET status = ?, owner = NULL, lease_expires = NULL, available_at = ?, updated_at = ?, "
              "attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END WHERE status = ?")


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRecord:
    """A task as stored."""

    id: str
    type: str
    params: Any
    status: TaskStatus
    attempts: int
    result: Any
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    available_at: datetime
    priority: int = 0
    cancel_requested: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The task as JSON-ready values (times in ISO 8601)."""
        return {
            "id": self.id, "type": self.type, "status": str(self.status), "priority": self.priority,
            "attempts": self.attempts, "params": self.params, "result": self.result, "error": self.error,
            "cancel_requested": self.cancel_requested,
            **{name: None if (t := getattr(self, name)) is None else t.isoformat()
               for name in ("created_at", "updated_at", "started_at", "finished_at", "available_at")},
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ScheduleRecord:
    """A periodic task: ``type`` with ``params`` queued at each tick of ``cron`` (UTC)."""

    name: str
    type: str
    cron: str
    params: Any
    priority: int
    next_at: datetime
    last_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "cron": self.cron, "params": self.params,
                "priority": self.priority, "next_at": self.next_at.isoformat(),
                "last_at": None if self.last_at is None else self.last_at.isoformat()}


@dataclass(frozen=True, slots=True)
class Claimed:
    """A task a claim took: run it as attempt ``attempt``, writing its outcome under ``token``."""

    id: str
    type: str
    params: Any
    token: int
    attempt: int
    trace: str | None = None


def _at(t: Any) -> datetime:
    return datetime.fromtimestamp(float(t), tz=timezone.utc)


def _when(t: Any) -> datetime | None:
    return None if t is None else _at(t)


def _record(row: Sequence[Any]) -> TaskRecord:
    return TaskRecord(
        id=row[0], type=row[1], params=loads(row[2]), status=TaskStatus(row[3]), attempts=int(row[4]),
        result=loads(row[5]), error=row[6], created_at=_at(row[7]), updated_at=_at(row[8]),
        started_at=_when(row[9]), finished_at=_when(row[10]), available_at=_at(row[11]), priority=int(row[12]),
        cancel_requested=bool(row[13]),
    )


def _schedule(row: Sequence[Any]) -> ScheduleRecord:
    return ScheduleRecord(name=row[0], type=row[1], cron=row[2], params=loads(row[3]), priority=int(row[4]),
                          next_at=_at(row[5]), last_at=_when(row[6]))


# -- submitting and reading ----------------------------------------------------------------------

def insert(tx: Tx, task_id: str, type: str, params: str | None, at: float, debounce_key: str | None, now: float,
           *, priority: int = 0, order_key: str | None = None, order_seq: int | None = None,
           trace: str | None = None) -> int:
    """Queue a task due at ``at`` unless its id exists (returns 0 then). A ``debounce_key`` first removes the
    pending task queued under the same key, so the newest one of a burst is the one that runs. Tasks with the
    same ``order_key`` run one at a time, lowest ``order_seq`` first (see ``claim``)."""
    if debounce_key is not None:
        tx.execute("DELETE FROM em_tasks WHERE debounce_key = ? AND status = ?", (debounce_key, _PENDING))
    return tx.rowcount(
        "INSERT INTO em_tasks (id, type, params, status, available_at, debounce_key, created_at, updated_at, "
        "priority, order_key, order_seq, trace) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO NOTHING",
        (task_id, type, params, _PENDING, at, debounce_key, now, now, priority, order_key, order_seq, trace),
    )


def insert_batch(tx: Tx, ids: Sequence[str], type: str, params: Sequence[str], at: float, priority: int,
                 now: float, trace: str | None = None) -> int:
    """Queue tasks of ``type`` (ids ``ids``, JSON texts ``params``), each unless its id exists; returns how many
    were new (``trace``: the submitter's trace context, one for the batch). One statement on PostgreSQL: the
    ids as one comma-separated text (UUIDs hold no comma) and the params as one JSON array (``json`` keeps each element's text as written), so that nothing is adapted per
    row; on SQLite the store's multi-row ``INSERT``."""
    if not ids:
        return 0
    if tx.dialect == POSTGRES:
        return tx.rowcount(
            "INSERT INTO em_tasks (id, type, params, status, available_at, created_at, updated_at, priority, trace) "
            "SELECT i.id, ?, p.params::text, ?, ?, ?, ?, ?, ? FROM unnest(string_to_array(?, ',')) WITH ORDINALITY "
            "AS i(id, n) JOIN json_array_elements(?::json) WITH ORDINALITY AS p(params, n) USING (n) "
            "ON CONFLICT (id) DO NOTHING",
            (type, _PENDING, at, now, now, priority, trace, ",".join(ids), "[" + ",".join(params) + "]"))
    return tx.insert_rows(
        "INSERT INTO em_tasks (id, type, params, status, available_at, created_at, updated_at, priority, trace) "
        "VALUES ", "(?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(i, type, p, _PENDING, at, now, now, priority, trace) for i, p in zip(ids, params)],
        " ON CONFLICT (id) DO NOTHING")


def insert_many(tx: Tx, rows: Sequence[tuple[str, str, str | None, float, float, str | None, int | None, str | None]],
                ) -> int:
    """Queue many tasks at once, each ``(id, type, params, at, now, order_key, order_seq, trace)`` (priority 0, no
    debounce key), those whose id exists left as they are; returns how many were queued."""
    return tx.insert_rows(
        "INSERT INTO em_tasks (id, type, params, status, available_at, created_at, updated_at, order_key, "
        "order_seq, trace) VALUES ", "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(task_id, type_, params, _PENDING, at, now, now, order_key, order_seq, trace)
         for task_id, type_, params, at, now, order_key, order_seq, trace in rows],
        " ON CONFLICT (id) DO NOTHING")


def get(tx: Tx, task_id: str) -> TaskRecord | None:
    row = tx.one(f"SELECT {_COLS} FROM em_tasks WHERE id = ?", (task_id,))
    return _record(row) if row else None


def _where(filters: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """`` WHERE a = ? AND b = ?`` over the filters given (None: that column is not filtered), and the values."""
    given = {column: value for column, value in filters.items() if value is not None}
    return (" WHERE " + " AND ".join(f"{c} = ?" for c in given) if given else ""), list(given.values())


def recent(tx: Tx, limit: int, status: TaskStatus | None, type: str | None) -> list[TaskRecord]:
    """The newest tasks first, optionally of one status or type."""
    where, params = _where({"status": None if status is None else str(status), "type": type})
    return [_record(r) for r in tx.query(f"SELECT {_COLS} FROM em_tasks{where} ORDER BY created_at DESC, id LIMIT ?",
                                         (*params, limit))]


def dead(tx: Tx, type: str | None, limit: int) -> list[TaskRecord]:
    """Tasks parked in the dead-letter list, oldest first."""
    where, params = _where({"status": str(TaskStatus.DEAD), "type": type})
    return [_record(r) for r in tx.query(f"SELECT {_COLS} FROM em_tasks{where} ORDER BY updated_at, id LIMIT ?",
                                         (*params, limit))]


def remove(tx: Tx, task_id: str) -> bool:
    return tx.rowcount("DELETE FROM em_tasks WHERE id = ?", (task_id,)) > 0


def redrive(tx: Tx, now: float, *, ids: Sequence[str] | None = None, type: str | None = None) -> int:
    """Queue again, with fresh retries, the tasks named by ``ids`` if they are dead or failed, else every
    dead task (of ``type``, if given)."""
    sql = "UPDATE em_tasks SET status = ?, attempts = 0, available_at = ?, updated_at = ?, error = NULL "
    if ids is not None:
        return tx.rowcount(sql + f"WHERE id IN {in_clause(len(ids))} AND status IN (?, ?)",
                           (_PENDING, now, now, *ids, str(TaskStatus.DEAD), str(TaskStatus.FAILED)))
    params: list[Any] = [_PENDING, now, now, str(TaskStatus.DEAD)]
    sql += "WHERE status = ?"
    if type is not None:
        sql += " AND type = ?"
        params.append(type)
    return tx.rowcount(sql, params)


def counts(tx: Tx, type_prefix: str) -> dict[str, dict[str, int]]:
    """Tasks per type (of the types starting with ``type_prefix``) and status: ``{type: {status: n}}``."""
    out: dict[str, dict[str, int]] = {}
    for type_, status, n in tx.query("SELECT type, status, COUNT(*) FROM em_tasks WHERE type LIKE ? "
                                     "GROUP BY type, status", (type_prefix + "%",)):
        out.setdefault(type_, {})[status] = int(n)
    return out


def cancel(tx: Tx, task_id: str, now: float) -> TaskStatus | None:
    """Cancel a task: a pending one ends ``CANCELLED`` now, a running one is marked for its worker (which asks
    its handler to stop). Returns the status the task had (None: no such task); a final task is left as it is."""
    row = tx.one("SELECT status FROM em_tasks WHERE id = ?", (task_id,))
    if row is None:
        return None
    status = TaskStatus(row[0])
    if status is TaskStatus.PENDING:
        tx.execute("UPDATE em_tasks SET status = ?, error = ?, finished_at = ?, updated_at = ? WHERE id = ? "
                   "AND status = ?", (str(TaskStatus.CANCELLED), "cancelled", now, now, task_id, _PENDING))
    elif status is TaskStatus.RUNNING:
        tx.execute("UPDATE em_tasks SET cancel_requested = 1, updated_at = ? WHERE id = ? AND status = ?",
                   (now, task_id, _RUNNING))
    return status


def cancel_requested(tx: Tx, ids: Sequence[str]) -> list[str]:
    """Which of the running tasks ``ids`` were asked to stop (``cancel``)."""
    if not ids:
        return []
    return [r[0] for r in tx.query(f"SELECT id FROM em_tasks WHERE id IN {in_clause(len(ids))} AND status = ? "
                                   "AND cancel_requested = 1", (*ids, _RUNNING))]


def purge(tx: Tx, before: float, limit: int) -> int:
    """Delete up to ``limit`` finished tasks (succeeded, failed, cancelled) that finished before ``before``,
    oldest first."""
    return tx.rowcount(
        f"DELETE FROM em_tasks WHERE id IN (SELECT id FROM em_tasks WHERE status IN {in_clause(len(_PURGED))} "
        "AND finished_at < ? ORDER BY finished_at LIMIT ?)", (*_PURGED, before, limit))


def backlog(tx: Tx, now: float) -> tuple[int, float | None]:
    """How many pending tasks are due at ``now``, and the due time of the one due longest (None if none)."""
    row = tx.one("SELECT COUNT(*), MIN(available_at) FROM em_tasks WHERE status = ? AND available_at <= ?",
                 (_PENDING, now))
    return (int(row[0]), None if row[1] is None else float(row[1])) if row else (0, None)


def due_count(tx: Tx, types: Sequence[str], now: float) -> int:
    """How many pending tasks of ``types`` are due at ``now``."""
    if not types:
        return 0
    row = tx.one(f"SELECT COUNT(*) FROM em_tasks WHERE type IN {in_clause(len(types))} AND {_LIVE} "
                 "AND status = ? AND available_at <= ?", (*types, _PENDING, now))
    return int(row[0]) if row else 0


# -- running -------------------------------------------------------------------------------------

def running(tx: Tx) -> list[tuple[str, str | None, float | None]]:
    """``(id, owner, lease_expires)`` of every running task."""
    return [(r[0], r[1], None if r[2] is None else float(r[2]))
            for r in tx.query("SELECT id, owner, lease_expires FROM em_tasks WHERE status = ?", (_RUNNING,))]


def requeue(tx: Tx, task_id: str, now: float) -> None:
    """Queue a running task again, due now: its process stopped or its lease lapsed."""
    tx.execute("UPDATE em_tasks SET status = ?, owner = NULL, lease_expires = NULL, available_at = ?, "
               "updated_at = ? WHERE id = ? AND status = ?", (_PENDING, now, now, task_id, _RUNNING))


def give_back(tx: Tx, owner: str, held: Sequence[str], now: float) -> int:
    """Queue again, due now, the tasks ``owner`` left running except those in ``held`` (which it runs)."""
    sql = _GIVE_BACK + " AND owner = ?"
    params: list[Any] = [_PENDING, now, now, _RUNNING, owner]
    if held:
        sql += f" AND id NOT IN {in_clause(len(held))}"
        params.extend(held)
    return tx.rowcount(sql, params)


def abandon(tx: Tx, task_id: str, token: int, now: float) -> None:
    """Queue a run's task again, due now, its invocation not counted (the store failed, not the handler)."""
    tx.execute(_GIVE_BACK + " AND id = ? AND token = ?", (_PENDING, now, now, _RUNNING, task_id, token))


def admitted(tx: Tx, limited: Sequence[str], now: float) -> dict[str, int]:
    """Running tasks with a live lease per type of ``limited`` (the types with ``max_concurrency``), counted
    under a per-type advisory lock on PostgreSQL, held until the transaction ends, so that the claim that
    follows in the same transaction cannot over-admit against another worker's."""
    if not limited:
        return {}
    if tx.dialect == POSTGRES:
        for type_ in sorted(limited):  # in one order everywhere, so two engines never deadlock
            tx.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (_ADMIT_LOCK, type_))
    return {t: int(n) for t, n in tx.query(
        f"SELECT type, COUNT(*) FROM em_tasks WHERE type IN {in_clause(len(limited))} AND {_LIVE} AND status = ? "
        "AND lease_expires > ? GROUP BY type", (*limited, _RUNNING, now))}


# -- what a claim can take -------------------------------------------------------------------------

# A task ``t`` with an order key is at the head of its key: no task of the key with a lower order_seq is
# pending or running. One probe of the partial index of live keyed tasks (order_key, order_seq), which a
# finished task leaves.
_HEAD = ("NOT EXISTS (SELECT 1 FROM em_tasks o WHERE o.order_key = t.order_key AND o.status IN ('PENDING', "
         "'RUNNING') AND o.order_seq < t.order_seq)")
# The two kinds of task a claim takes: running ones whose lease lapsed, and due pending ones.
# Literals, with the claim index's predicate, so that each walks the partial index (``CLAIM_INDEX``).
_KINDS = (f"t.{_LIVE} AND t.status = '{_RUNNING}' AND t.lease_expires <= ?",
          f"t.{_LIVE} AND t.status = '{_PENDING}' AND t.available_at <= ?")
# Types read by one ``due_order`` statement: two walks each, within SQLite's 500 terms of a compound select.
_TYPES_PER_STATEMENT = 100


def _candidates(tx: Tx, types: Sequence[str], held: Sequence[str], limit: int, now: float, *,
                lock: bool) -> tuple[str, list[Any]]:
    """A query of the tasks a claim of ``types`` could take, as rows ``(id, type, priority, available_at,
    created_at)``: the first ``limit`` of each type and kind, ``held`` left out, a keyed task only at the head
    of its key. Each is one walk of the due index (type, status, priority DESC, available_at) in order that
    stops at ``limit``, so the cost is that of ``limit`` tasks per type and of those the walk passes over
    (keyed tasks behind the head of their key, tasks of a higher priority not due yet), not of the queue; the
    caller orders the union (``priority DESC, available_at, created_at``) and keeps its first ``limit``. With
    ``lock`` the rows read are locked, skipping those another claim holds (PostgreSQL; a candidate the caller
    leaves stays locked until its transaction ends)."""
    mine = f" AND t.id NOT IN {in_clause(len(held))}" if held else ""
    # A walk orders by the index's own columns only: naming created_at there too would make the database sort
    # every due task (ties of available_at are tasks queued at once; the index holds them about in the order
    # they were written), where the caller sorts at most ``2 * limit`` candidates by it.
    locked = tx.skip_locked if lock else ""
    walks: list[str] = []
    params: list[Any] = []
    for type_ in types:
        for due in _KINDS:
            walks.append(
                "SELECT * FROM (SELECT t.id, t.type, t.priority, t.available_at, t.created_at FROM em_tasks t "
                f"WHERE t.type = ? AND {due}{mine} AND (t.order_key IS NULL OR {_HEAD}) "
                f"ORDER BY t.priority DESC, t.available_at LIMIT ?{locked}) w")
            params.extend((type_, now, *held, limit))
    return " UNION ALL ".join(walks), params


def due_order(tx: Tx, types: Sequence[str], held: Sequence[str], limit: int, now: float) -> list[str]:
    """The types of the first ``limit`` tasks of ``types`` a claim could take (``held`` left out), highest
    priority first: the order in which the engine gives its free slots to its types."""
    rows: list[tuple[Any, ...]] = []
    for start in range(0, len(types), _TYPES_PER_STATEMENT):
        walks, params = _candidates(tx, types[start:start + _TYPES_PER_STATEMENT], held, limit, now, lock=False)
        rows.extend(tx.query(f"SELECT type, priority, available_at, created_at FROM ({walks}) c "
                             "ORDER BY priority DESC, available_at, created_at LIMIT ?", (*params, limit)))
    rows.sort(key=lambda r: (-int(r[1]), float(r[2]), float(r[3])))
    return [r[0] for r in rows[:limit]]


def claim(tx: Tx, type: str, owner: str, held: Sequence[str], limit: int, lease_until: float,
          now: float) -> list[Claimed]:
    """Take up to ``limit`` tasks of ``type``, highest priority first: due pending ones, and running ones whose
    lease lapsed, except those in ``held`` (this owner still runs them, or a handler of theirs that ran past
    its time limit: they are for other workers to take, never for this one to start twice).

    A task with an ``order_key`` is taken only at the head of its key: no task of that key with a lower
    ``order_seq`` is pending or running. So tasks of one key run one at a time in ``order_seq`` order across
    workers (an earlier task waiting for its retry, or running past a cancel, holds the later ones back; a
    finished, failed, cancelled or dead one does not; a dead one queued again by ``redrive`` runs at once, even
    beside a later one of its key).

    The candidates are read by ``_candidates``, walks of the due index that stop at ``limit``."""
    return [_claimed(r) for r in tx.query(*_claim_statement(tx, type, owner, held, limit, lease_until, now))]


def _claim_statement(tx: Tx, type: str, owner: str, held: Sequence[str], limit: int, lease_until: float,
                     now: float) -> tuple[str, list[Any]]:
    """``claim``'s ``UPDATE ... RETURNING id, type, params, token, attempts, trace`` and its parameters."""
    walks, params = _candidates(tx, [type], held, limit, now, lock=True)
    return ("UPDATE em_tasks SET status = ?, owner = ?, token = token + 1, lease_expires = ?, "
            f"attempts = attempts + 1, started_at = ?, updated_at = ? WHERE id IN (SELECT id FROM ({walks}) c "
            "ORDER BY priority DESC, available_at, created_at LIMIT ?) RETURNING id, type, params, token, attempts, "
            "trace", [_RUNNING, owner, lease_until, now, now, *params, limit])


def _claimed(row: Sequence[Any]) -> Claimed:
    return Claimed(row[0], row[1], loads(row[2]), int(row[3]), int(row[4]), row[5])


def renew(tx: Tx, task_id: str, token: int, lease_until: float) -> bool:
    """Extend a run's lease; False when the task is no longer that run's."""
    return tx.rowcount("UPDATE em_tasks SET lease_expires = ? WHERE id = ? AND token = ? AND status = ?",
                       (lease_until, task_id, token, _RUNNING)) == 1


def finish(tx: Tx, task_id: str, token: int, columns: Mapping[str, Any], now: float) -> bool:
    """Write a run's outcome (``columns``: column -> value, from a ``Transition``) and release its lease.
    False when the task is no longer that run's: removed, taken since, or already written."""
    assignments = ", ".join(f"{name} = ?" for name in columns)
    return tx.rowcount(
        f"UPDATE em_tasks SET {assignments}, owner = NULL, lease_expires = NULL, cancel_requested = 0, updated_at = ? "
        "WHERE id = ? AND token = ? AND status = ?",
        (*columns.values(), now, task_id, token, _RUNNING),
    ) == 1


#: The PostgreSQL array type of each column an outcome writes (``finish_many``).
_ARRAY_TYPES = {"status": "text", "result": "text", "error": "text", "finished_at": "double precision",
                "available_at": "double precision", "attempts": "integer"}


def _outcome_arrays(outcomes: Sequence[tuple[str, int, Mapping[str, Any]]], names: tuple[str, ...],
                    now: float) -> tuple[str, list[Any]]:
    """The PostgreSQL ``UPDATE`` writing ``outcomes`` (each writing the columns ``names``) in one statement, the
    values as arrays (``unnest``), returning the ids it wrote; and its parameters."""
    arrays = [[o[0] for o in outcomes], [o[1] for o in outcomes], *([o[2][c] for o in outcomes] for c in names)]
    casts = ", ".join(["?::text[]", "?::bigint[]", *(f"?::{_ARRAY_TYPES[c]}[]" for c in names)])
    assignments = ", ".join(f"{c} = v.{c}" for c in names)
    return (f"UPDATE em_tasks AS t SET {assignments}, owner = NULL, lease_expires = NULL, cancel_requested = 0, "
            f"updated_at = ? FROM unnest({casts}) AS v(id, token, {', '.join(names)}) "
            f"WHERE t.id = v.id AND t.token = v.token AND t.status = '{_RUNNING}' RETURNING t.id", [now, *arrays])


def _outcome_records(outcomes: Sequence[tuple[str, int, Mapping[str, Any]]], names: tuple[str, ...],
                     now: float) -> tuple[str, list[Any]]:
    """``_outcome_arrays`` with the values as one JSON parameter (``json_to_recordset``): for a worker's round
    of a few outcomes, quicker to send than arrays, and few parameters, so that the driver keeps the statement
    parsed."""
    records = dumps([{"id": task_id, "token": token, **{c: columns[c] for c in names}}
                     for task_id, token, columns in outcomes], field="outcomes")
    assignments = ", ".join(f"{c} = v.{c}" for c in names)
    types = ", ".join(f"{c} {_ARRAY_TYPES[c]}" for c in names)
    # The status is tested as an expression no index holds: as ``status = 'RUNNING'`` the planner may also read
    # the (status, finished_at) index for it, every entry saying RUNNING, those the finished tasks left behind
    # too (until a vacuum): a cost growing with history. The rows come by primary key: the LIMIT tells the
    # planner how few records there are (it guesses 100 for a function, and would scan the table).
    return (f"UPDATE em_tasks AS t SET {assignments}, owner = NULL, lease_expires = NULL, cancel_requested = 0, "
            f"updated_at = ? FROM (SELECT * FROM json_to_recordset(?::json) AS r(id text, token bigint, {types}) "
            f"LIMIT {len(outcomes)}) v "
            f"WHERE t.id = v.id AND t.token = v.token AND COALESCE(t.status, '') = '{_RUNNING}' RETURNING t.id",
            [now, records])


def finish_many(tx: Tx, outcomes: Sequence[tuple[str, int, Mapping[str, Any]]], now: float) -> list[bool]:
    """``finish`` for each ``(id, token, columns)`` of ``outcomes``, in order; on PostgreSQL the outcomes that
    write the same columns go in one statement (the values as arrays, ``unnest``)."""
    done = [False] * len(outcomes)
    groups: dict[tuple[str, ...], list[int]] = {}
    for n, (_, _, columns) in enumerate(outcomes):
        groups.setdefault(tuple(columns), []).append(n)
    for names, members in groups.items():
        if tx.dialect != POSTGRES or len(members) == 1 or any(c not in _ARRAY_TYPES for c in names):
            for n in members:
                task_id, token, columns = outcomes[n]
                done[n] = finish(tx, task_id, token, columns, now)
            continue
        sql, params = _outcome_arrays([outcomes[n] for n in members], names, now)
        written = {r[0] for r in tx.query(sql, params)}
        for n in members:
            done[n] = outcomes[n][0] in written
    return done


def one_statement(outcomes: Sequence[tuple[str, int, Mapping[str, Any]]]) -> bool:
    """Whether ``finish_and_claim`` of ``outcomes`` is one statement on PostgreSQL (to be run in
    ``SQLStore.statement``): every outcome writes the same columns, each one an array can carry."""
    names = tuple(outcomes[0][2]) if outcomes else ()
    return all(c in _ARRAY_TYPES for c in names) and all(tuple(o[2]) == names for o in outcomes)


def finish_and_claim(tx: Tx, outcomes: Sequence[tuple[str, int, Mapping[str, Any]]], now: float, type: str,
                     owner: str, held: Sequence[str], limit: int, lease_until: float
                     ) -> tuple[list[bool], list[Claimed]]:
    """``finish_many(outcomes)``, then, if ``limit``, ``claim`` of up to ``limit`` tasks of ``type``: what each
    outcome's write did and what the claim took.

    On PostgreSQL, when ``one_statement(outcomes)``, both are one statement (two data-modifying ``WITH``
    terms), so that a worker's round (its outcomes written, the next tasks taken) is one round trip. Its claim
    sees the table as it was before the outcomes (one snapshot): the runs ending are in ``held`` (still this
    owner's) and so never candidates; a task ordered behind one of them (``order_key``) waits for the next
    claim, as if that run were still running. Otherwise, and on SQLite, the two run one after the other."""
    if tx.dialect != POSTGRES or not one_statement(outcomes) or not (outcomes and limit > 0):
        done = finish_many(tx, outcomes, now)
        return done, claim(tx, type, owner, held, limit, lease_until, now) if limit > 0 else []
    finish_sql, finish_params = _outcome_records(outcomes, tuple(outcomes[0][2]), now)
    claim_sql, claim_params = _claim_statement(tx, type, owner, held, limit, lease_until, now)
    # The written ids come back with no type (every task has one): that tells them from the claimed tasks.
    rows = tx.query(f"WITH done AS ({finish_sql}), took AS ({claim_sql}) SELECT id, NULL, NULL, NULL, NULL, NULL "
                    "FROM done UNION ALL SELECT id, type, params, token, attempts, trace FROM took",
                    (*finish_params, *claim_params))
    written = {r[0] for r in rows if r[1] is None}
    return [o[0] in written for o in outcomes], [_claimed(r) for r in rows if r[1] is not None]


def finished(tx: Tx, task_id: str, token: int) -> bool:
    """Whether the run holding ``token`` left the task no longer running: asked before writing again after
    a write that met a fault at commit, whose outcome may have landed."""
    return tx.one("SELECT 1 FROM em_tasks WHERE id = ? AND token = ? AND status <> ?",
                  (task_id, token, _RUNNING)) is not None


# -- periodic tasks ------------------------------------------------------------------------------

def put_schedule(tx: Tx, name: str, type: str, cron: str, params: str | None, priority: int, next_at: float,
                 now: float) -> None:
    """Create or change the schedule ``name``. An unchanged schedule keeps its next tick; a changed one takes
    ``next_at``."""
    tx.execute(
        "INSERT INTO em_task_schedules (name, type, cron, params, priority, next_at, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET type = excluded.type, "
        "cron = excluded.cron, params = excluded.params, priority = excluded.priority, "
        "next_at = excluded.next_at, updated_at = excluded.updated_at WHERE em_task_schedules.type <> excluded.type "
        "OR em_task_schedules.cron <> excluded.cron OR em_task_schedules.priority <> excluded.priority "
        "OR COALESCE(em_task_schedules.params, '') <> COALESCE(excluded.params, '')",
        (name, type, cron, params, priority, next_at, now, now),
    )


def schedules(tx: Tx) -> list[ScheduleRecord]:
    return [_schedule(r) for r in tx.query(f"SELECT {_SCHEDULE_COLS} FROM em_task_schedules ORDER BY name")]


def remove_schedule(tx: Tx, name: str) -> bool:
    return tx.rowcount("DELETE FROM em_task_schedules WHERE name = ?", (name,)) > 0


def due_schedules(tx: Tx, types: Sequence[str], now: float) -> list[ScheduleRecord]:
    """The schedules of ``types`` whose next tick is due at ``now``."""
    if not types:
        return []
    return [_schedule(r) for r in tx.query(
        f"SELECT {_SCHEDULE_COLS} FROM em_task_schedules WHERE type IN {in_clause(len(types))} AND next_at <= ? "
        "ORDER BY next_at, name", (*types, now))]


def advance_schedule(tx: Tx, name: str, was: float, tick: float, next_at: float, now: float) -> bool:
    """Move schedule ``name`` from its tick ``was`` to ``next_at``, having queued ``tick``; False when another
    worker moved it first (that worker queued the same tick, under the same id)."""
    return tx.rowcount("UPDATE em_task_schedules SET next_at = ?, last_at = ?, updated_at = ? WHERE name = ? "
                       "AND next_at = ?", (next_at, tick, now, name, was)) == 1
