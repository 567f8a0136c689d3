"""durable's own tables, ``durable_executions``, ``durable_operations`` and ``durable_signals``: their
migrations, how rows map to ``ExecutionInfo`` and ``Operation``, and every statement over them, written over
``Tx``.

This is the one module of errands-durable with SQL. The queue item of an execution (its key is the
execution's id, in ``QUEUE``) lives in core's queue and is reached only through the store's queue methods.
"""

from __future__ import annotations

import json
import re
from typing import Any, List, Sequence

from errands.core.store import POSTGRES, SQLITE, Migration, Tx, in_clause, loads

from ._values import (
    TERMINAL_OP,
    ErrorObject,
    ExecutionInfo,
    ExecutionStatus,
    Operation,
    OperationStatus,
    OperationSubType,
    OperationType,
)

#: The core queue holding one item per execution that is due to run (or running, while leased).
QUEUE = "durable.work"
#: The core queue holding one item per execution started with a timeout, due at its deadline.
DEADLINES = "durable.deadlines"

MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE IF NOT EXISTS durable_executions (
            id TEXT PRIMARY KEY,
            function TEXT NOT NULL,
            status TEXT NOT NULL,
            input TEXT,
            result TEXT,
            error TEXT,
            parent_id TEXT,
            parent_op TEXT,
            run_token {bigint} NOT NULL DEFAULT 0,
            signal_seq {bigint} NOT NULL DEFAULT 0,
            invocations {bigint} NOT NULL DEFAULT 0,
            wake_at {double},
            created_at {double} NOT NULL,
            updated_at {double} NOT NULL,
            ended_at {double}
        );
        CREATE INDEX IF NOT EXISTS durable_executions_status ON durable_executions (status, created_at);
        CREATE INDEX IF NOT EXISTS durable_executions_parent ON durable_executions (parent_id);
        CREATE INDEX IF NOT EXISTS durable_executions_ended ON durable_executions (ended_at);
        CREATE TABLE IF NOT EXISTS durable_operations (
            execution_id TEXT NOT NULL,
            id TEXT NOT NULL,
            seq {bigint} NOT NULL,
            parent_id TEXT,
            name TEXT,
            type TEXT NOT NULL,
            sub_type TEXT,
            status TEXT NOT NULL,
            attempt INTEGER NOT NULL DEFAULT 0,
            result TEXT,
            error TEXT,
            callback_id TEXT,
            start_ts {double},
            end_ts {double},
            next_attempt_ts {double},
            scheduled_ts {double},
            timeout_ts {double},
            heartbeat_timeout {double},
            heartbeat_ts {double},
            child_execution_id TEXT,
            PRIMARY KEY (execution_id, id)
        );
        CREATE UNIQUE INDEX IF NOT EXISTS durable_operations_callback ON durable_operations (callback_id)
        """,
    ),
    # Signals sent to an execution by name, in the order they were sent (``seq``, per execution); each is
    # kept (``operation_id`` NULL) until a ``wait_for_signal`` of its name takes it.
    Migration(
        2,
        """
        CREATE TABLE IF NOT EXISTS durable_signals (
            execution_id TEXT NOT NULL,
            seq {bigint} NOT NULL,
            name TEXT NOT NULL,
            payload TEXT,
            sent_at {double} NOT NULL,
            operation_id TEXT,
            taken_at {double},
            PRIMARY KEY (execution_id, seq)
        );
        CREATE INDEX IF NOT EXISTS durable_signals_name ON durable_signals (execution_id, name, seq)
        """,
    ),
    # ``ctx.set_event``: the latest value of each key of an execution; ``runs``: how many histories the
    # execution has had (``ctx.continue_as_new`` starts the next).
    Migration(
        3,
        """
        CREATE TABLE IF NOT EXISTS durable_events (
            execution_id TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT,
            set_at {double} NOT NULL,
            PRIMARY KEY (execution_id, key)
        );
        ALTER TABLE durable_executions ADD COLUMN runs {bigint} NOT NULL DEFAULT 1
        """,
    ),
    # Queues and schedules. An execution started on a queue has a row in ``durable_queue_items`` from its
    # start: waiting (``admitted_at`` NULL), admitted by a worker (``executor``), then ended (``ended_at``, its
    # ``dedup_id`` cleared); the partial indexes keep the admission's reads to the live rows. A queue's row
    # in ``durable_queues`` is the lock every admission to it takes. ``durable_schedules``: one row per cron
    # schedule, its next tick due.
    Migration(
        4,
        """
        CREATE TABLE IF NOT EXISTS durable_queue_items (
            execution_id TEXT PRIMARY KEY,
            queue TEXT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            dedup_id TEXT,
            enqueued_at {double} NOT NULL,
            admitted_at {double},
            executor TEXT,
            ended_at {double}
        );
        CREATE UNIQUE INDEX IF NOT EXISTS durable_queue_items_dedup ON durable_queue_items (queue, dedup_id);
        CREATE INDEX IF NOT EXISTS durable_queue_items_waiting ON durable_queue_items (queue, priority, enqueued_at)
            WHERE admitted_at IS NULL AND ended_at IS NULL;
        CREATE INDEX IF NOT EXISTS durable_queue_items_running ON durable_queue_items (queue, executor)
            WHERE admitted_at IS NOT NULL AND ended_at IS NULL;
        CREATE INDEX IF NOT EXISTS durable_queue_items_admitted ON durable_queue_items (queue, admitted_at);
        CREATE TABLE IF NOT EXISTS durable_queues (
            name TEXT PRIMARY KEY,
            created_at {double} NOT NULL
        );
        CREATE TABLE IF NOT EXISTS durable_schedules (
            name TEXT PRIMARY KEY,
            function TEXT NOT NULL,
            cron TEXT NOT NULL,
            input TEXT,
            next_at {double} NOT NULL,
            last_at {double},
            created_at {double} NOT NULL,
            updated_at {double} NOT NULL
        );
        CREATE INDEX IF NOT EXISTS durable_schedules_due ON durable_schedules (next_at)
        """,
    ),
    # The trace context current at a queued start (``telemetry.carrier_text``; NULL without one), handed to
    # the invocation its admission queues, as a start that is not queued hands it with its queue item.
    Migration(
        5,
        """
        ALTER TABLE durable_queue_items ADD COLUMN trace TEXT
        """,
    ),
    # Operations clustered on their primary key (on SQLite one B-tree per row instead of a table and its key's
    # index), and the callback index holding only the operations that have a callback: a step's checkpoint writes
    # one B-tree instead of three. Same columns, same rows, same uniqueness. The executions' parent and end
    # indexes hold only the executions that have one: a top-level start writes neither.
    Migration(
        6,
        """
        DROP INDEX IF EXISTS durable_executions_parent;
        CREATE INDEX durable_executions_parent ON durable_executions (parent_id) WHERE parent_id IS NOT NULL;
        DROP INDEX IF EXISTS durable_executions_ended;
        CREATE INDEX durable_executions_ended ON durable_executions (ended_at) WHERE ended_at IS NOT NULL;
        CREATE TABLE durable_operations_v6 (
            execution_id TEXT NOT NULL,
            id TEXT NOT NULL,
            seq {bigint} NOT NULL,
            parent_id TEXT,
            name TEXT,
            type TEXT NOT NULL,
            sub_type TEXT,
            status TEXT NOT NULL,
            attempt INTEGER NOT NULL DEFAULT 0,
            result TEXT,
            error TEXT,
            callback_id TEXT,
            start_ts {double},
            end_ts {double},
            next_attempt_ts {double},
            scheduled_ts {double},
            timeout_ts {double},
            heartbeat_timeout {double},
            heartbeat_ts {double},
            child_execution_id TEXT,
            PRIMARY KEY (execution_id, id)
        ){without_rowid};
        INSERT INTO durable_operations_v6 (execution_id, id, seq, parent_id, name, type, sub_type, status, attempt,
            result, error, callback_id, start_ts, end_ts, next_attempt_ts, scheduled_ts, timeout_ts, heartbeat_timeout,
            heartbeat_ts, child_execution_id)
        SELECT execution_id, id, seq, parent_id, name, type, sub_type, status, attempt, result, error, callback_id,
            start_ts, end_ts, next_attempt_ts, scheduled_ts, timeout_ts, heartbeat_timeout, heartbeat_ts,
            child_execution_id FROM durable_operations;
        DROP TABLE durable_operations;
        ALTER TABLE durable_operations_v6 RENAME TO durable_operations;
        CREATE UNIQUE INDEX durable_operations_callback ON durable_operations (callback_id)
            WHERE callback_id IS NOT NULL
        """,
    ),
]

#: Executions that may still run: due or running (``RUNNING``), or waiting for a timer, callback or child.
ACTIVE = (ExecutionStatus.RUNNING.value, ExecutionStatus.PENDING.value)

_OP_COLS = ("execution_id, id, seq, parent_id, name, type, sub_type, status, attempt, result, error, callback_id, "
            "start_ts, end_ts, next_attempt_ts, scheduled_ts, timeout_ts, heartbeat_timeout, heartbeat_ts, "
            "child_execution_id")
_INSERT_OP = f"INSERT INTO durable_operations ({_OP_COLS}) VALUES ({','.join('?' * 20)})"
_TERMINAL_SQL = "(" + ",".join(f"'{s.value}'" for s in TERMINAL_OP) + ")"
# A finished operation is never overwritten: a callback answered or a child ended meanwhile wins.
_UPSERT_OP = (
    f"{_INSERT_OP} ON CONFLICT (execution_id, id) DO UPDATE SET status = excluded.status, "
    "attempt = excluded.attempt, result = excluded.result, error = excluded.error, "
    "callback_id = excluded.callback_id, end_ts = excluded.end_ts, next_attempt_ts = excluded.next_attempt_ts, "
    "scheduled_ts = excluded.scheduled_ts, timeout_ts = excluded.timeout_ts, "
    "heartbeat_timeout = excluded.heartbeat_timeout, heartbeat_ts = excluded.heartbeat_ts, "
    "child_execution_id = excluded.child_execution_id "
    f"WHERE durable_operations.status NOT IN {_TERMINAL_SQL}"
)
# The fence and the checkpoint in one statement: the operation is written only while the execution is ``RUNNING``
# under the invocation's run token. On PostgreSQL the fence's row is locked as the ``UPDATE`` of a separate fence
# locked it (a termination, suspension or take-over waits for the checkpoint's commit, or the checkpoint waits for
# theirs and then sees the new token), and the values are cast to their columns' types (a ``SELECT`` list does not
# take them from the target's columns).
_FENCE_SQL = "SELECT 1 FROM durable_executions WHERE id = ? AND run_token = ? AND status = 'RUNNING'"


def _declared_types(migrations: Sequence[Migration], table: str, dialect: str) -> dict[str, str]:
    """The type each column of ``table`` is declared with in the last of ``migrations`` that creates it (one
    column a line, as this module writes them), on ``dialect``: the casts below read the schema, not a copy."""
    found: dict[str, str] = {}
    for migration in migrations:
        for statement in migration.statements(dialect):
            head = statement.split("(", 1)[0].split()
            if head[:2] == ["CREATE", "TABLE"] and head[-1].startswith(table):
                found = {}
                for line in statement.split("(", 1)[1].splitlines():
                    m = re.match(r"\s*(\w+) (DOUBLE PRECISION|BIGINT|INTEGER|TEXT|REAL)\b", line)
                    if m:
                        found[m.group(1)] = m.group(2)
    return found


_OP_TYPES = tuple(_declared_types(MIGRATIONS, "durable_operations", POSTGRES)[c] for c in _OP_COLS.split(", "))
_UPSERT_SET = _UPSERT_OP[len(_INSERT_OP):]
_FENCED_UPSERT_OP = {
    SQLITE: f"INSERT INTO durable_operations ({_OP_COLS}) SELECT {','.join('?' * 20)} "
            f"WHERE EXISTS ({_FENCE_SQL}){_UPSERT_SET}",
    POSTGRES: f"INSERT INTO durable_operations ({_OP_COLS}) SELECT "
              + ", ".join(f"CAST(? AS {t})" for t in _OP_TYPES)
              + f" WHERE EXISTS ({_FENCE_SQL} FOR NO KEY UPDATE){_UPSERT_SET}",
}
_EXEC_COLS = ("id, function, status, input, result, error, parent_id, created_at, updated_at, ended_at, "
              "invocations")


# -- rows -----------------------------------------------------------------------------------------
def _error_text(error: ErrorObject | None) -> str | None:
    return json.dumps(error.to_dict()) if error else None


def _error_from(text: str | None) -> ErrorObject | None:
    return ErrorObject.from_dict(json.loads(text)) if text else None


def _op_row(execution_id: str, op: Operation) -> tuple[Any, ...]:
    return (execution_id, op.id, op.seq, op.parent_id, op.name, op.type.value,
            op.sub_type.value if op.sub_type else None, op.status.value, op.attempt, op.result,
            _error_text(op.error), op.callback_id, op.start_timestamp, op.end_timestamp, op.next_attempt_timestamp,
            op.scheduled_timestamp, op.timeout_timestamp, op.heartbeat_timeout, op.heartbeat_timestamp,
            op.child_execution_id)


def _op_from_row(row: Sequence[Any]) -> Operation:
    (_e, id_, seq, parent, name, type_, sub, status, attempt, result, error, cb, start, end, nxt, sched, tmo,
     hbt, hbts, child) = row
    return Operation(
        id=id_, type=OperationType(type_), status=OperationStatus(status), parent_id=parent, name=name,
        sub_type=OperationSubType(sub) if sub else None, start_timestamp=start, end_timestamp=end,
        attempt=int(attempt), result=result, error=_error_from(error), next_attempt_timestamp=nxt,
        scheduled_timestamp=sched, callback_id=cb, timeout_timestamp=tmo, heartbeat_timeout=hbt,
        heartbeat_timestamp=hbts, child_execution_id=child, seq=int(seq),
    )


def execution_info(row: Sequence[Any]) -> ExecutionInfo:
    """The ``ExecutionInfo`` of a row of the execution's columns (``_EXEC_COLS``, as ``end_execution`` returns
    them)."""
    id_, function, status, input_, result, error, parent, created, updated, ended, invocations = row
    return ExecutionInfo(
        execution_id=id_, function=function, status=ExecutionStatus(status),
        input=loads(input_), result=loads(result), result_text=result,
        error=_error_from(error), parent_id=parent, created_at=float(created), updated_at=float(updated),
        ended_at=float(ended) if ended is not None else None, invocations=int(invocations),
    )


# -- executions -----------------------------------------------------------------------------------
def insert_execution(tx: Tx, execution_id: str, function: str, input_text: str | None, now: float, *,
                     parent: tuple[str, str | None] | None = None, run_token: int = 0) -> bool:
    """A new ``RUNNING`` execution (a child when ``parent`` is ``(execution, operation)``, the operation None
    for a child nothing waits for); ``run_token`` 1
    means its first invocation is already under way here. False if the id exists (nothing changes)."""
    return tx.rowcount(
        "INSERT INTO durable_executions (id, function, status, input, parent_id, parent_op, run_token, "
        "invocations, created_at, updated_at) VALUES (?, ?, 'RUNNING', ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO NOTHING",
        (execution_id, function, input_text, parent[0] if parent else None, parent[1] if parent else None,
         run_token, 1 if run_token else 0, now, now),
    ) == 1


def function_and_input(tx: Tx, execution_id: str) -> tuple[str, str | None] | None:
    """What an execution runs: its function's name and its input's JSON text."""
    row = tx.one("SELECT function, input FROM durable_executions WHERE id = ?", (execution_id,))
    return (row[0], row[1]) if row is not None else None


def get_execution(tx: Tx, execution_id: str) -> ExecutionInfo | None:
    row = tx.one(f"SELECT {_EXEC_COLS} FROM durable_executions WHERE id = ?", (execution_id,))
    return execution_info(row) if row is not None else None


def list_executions(tx: Tx, *, statuses: Sequence[str] | None, function: str | None, parent_id: str | None,
                    limit: int, offset: int) -> List[ExecutionInfo]:
    """Executions newest first, filtered by any of ``statuses``, a function and a parent (None: any)."""
    where: list[str] = []
    params: list[Any] = []
    if statuses is not None:
        where.append(f"status IN {in_clause(len(statuses))}")
        params.extend(statuses)
    for column, value in (("function", function), ("parent_id", parent_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    sql = f"SELECT {_EXEC_COLS} FROM durable_executions"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
    return [execution_info(r) for r in tx.query(sql, (*params, limit, offset))]


def execution_status(tx: Tx, execution_id: str) -> ExecutionStatus | None:
    row = tx.one("SELECT status FROM durable_executions WHERE id = ?", (execution_id,))
    return ExecutionStatus(row[0]) if row is not None else None


def runs_under(tx: Tx, execution_id: str, run_token: int) -> bool:
    """Whether the execution is ``RUNNING`` under ``run_token``: still the invocation's to write."""
    row = tx.one("SELECT run_token, status FROM durable_executions WHERE id = ?", (execution_id,))
    return row is not None and int(row[0]) == run_token and row[1] == ExecutionStatus.RUNNING.value


def touch_running(tx: Tx, execution_id: str, run_token: int, now: float) -> bool:
    """The fence of every write an invocation makes: mark the execution updated if it is still ``RUNNING``
    under ``run_token``, and say whether it was. Taking the row's write lock first also orders the writers."""
    return tx.rowcount(
        "UPDATE durable_executions SET updated_at = ? WHERE id = ? AND run_token = ? AND status = 'RUNNING'",
        (now, execution_id, run_token),
    ) == 1


def take_execution(tx: Tx, execution_id: str, now: float) -> tuple[int, str, str | None, int] | None:
    """Start an invocation of a ``RUNNING`` or ``PENDING`` execution: a new run token (fencing out any
    earlier invocation) and one more invocation counted. ``(run_token, function, input, signal_seq)``, or
    None when the execution is not runnable (suspended, finished, gone)."""
    row = tx.one(
        "UPDATE durable_executions SET run_token = run_token + 1, invocations = invocations + 1, "
        "status = 'RUNNING', updated_at = ? WHERE id = ? AND status IN ('RUNNING', 'PENDING') "
        "RETURNING run_token, function, input, signal_seq",
        (now, execution_id),
    )
    return (int(row[0]), row[1], row[2], int(row[3])) if row is not None else None


def signal_seq(tx: Tx, execution_id: str) -> int | None:
    """How many signals (a callback answered, a child ended) the execution has received."""
    row = tx.one("SELECT signal_seq FROM durable_executions WHERE id = ?", (execution_id,))
    return int(row[0]) if row is not None else None


def signal(tx: Tx, execution_id: str) -> ExecutionStatus | None:
    """Count a signal for the execution; its status afterwards, None if it does not exist."""
    row = tx.one("UPDATE durable_executions SET signal_seq = signal_seq + 1 WHERE id = ? RETURNING status",
                 (execution_id,))
    return ExecutionStatus(row[0]) if row is not None else None


def set_pending(tx: Tx, execution_id: str, wake_at: float | None) -> None:
    tx.execute("UPDATE durable_executions SET status = 'PENDING', wake_at = ? WHERE id = ?", (wake_at, execution_id))


_END = ("UPDATE durable_executions SET status = ?, result = ?, error = ?, ended_at = ?, updated_at = ?, "
        "wake_at = NULL, run_token = run_token + 1 WHERE id = ?")
_ENDED = (" RETURNING parent_op, EXISTS (SELECT 1 FROM durable_queue_items q WHERE q.execution_id = "
          f"durable_executions.id AND q.ended_at IS NULL), {_EXEC_COLS}")


def end_execution(tx: Tx, execution_id: str, status: ExecutionStatus, result: str | None,
                  error: ErrorObject | None, now: float, *, run_token: int | None = None
                  ) -> tuple[str | None, bool, tuple[Any, ...]] | None:
    """Record a terminal status (bumping the run token, so that no invocation writes after it).
    ``(parent_op, queued, row)``: the operation of the parent waiting for it, whether its queue row has not
    ended yet (it was started on a queue), and the execution's row as it now is (``execution_info`` makes it
    the ``ExecutionInfo`` that ``get_execution`` would read).

    With ``run_token``, the end is also the invocation's fence (``touch_running``): None, changing nothing,
    unless the execution is ``RUNNING`` under that token."""
    if run_token is None:
        got = tx.one(_END + _ENDED, (status.value, result, _error_text(error), now, now, execution_id))
        assert got is not None, f"execution {execution_id} ended while it did not exist"
    else:
        got = tx.one(_END + " AND run_token = ? AND status = 'RUNNING'" + _ENDED,
                     (status.value, result, _error_text(error), now, now, execution_id, run_token))
        if got is None:
            return None
    return got[0], bool(got[1]), got[2:]


def suspend_execution(tx: Tx, execution_id: str, now: float) -> bool:
    """Pause a ``RUNNING`` or ``PENDING`` execution, fencing out an invocation in flight. Whether it was."""
    return tx.rowcount(
        "UPDATE durable_executions SET status = 'SUSPENDED', run_token = run_token + 1, updated_at = ? "
        "WHERE id = ? AND status IN ('RUNNING', 'PENDING')",
        (now, execution_id),
    ) == 1


def resume_execution(tx: Tx, execution_id: str, now: float) -> bool:
    """Make a ``SUSPENDED`` execution ``RUNNING`` again. Whether it was suspended."""
    return tx.rowcount(
        "UPDATE durable_executions SET status = 'RUNNING', updated_at = ? WHERE id = ? AND status = 'SUSPENDED'",
        (now, execution_id),
    ) == 1


def children(tx: Tx, execution_id: str) -> list[str]:
    """The executions this one invoked."""
    return [r[0] for r in tx.query("SELECT id FROM durable_executions WHERE parent_id = ?", (execution_id,))]


def active_family(tx: Tx, execution_id: str) -> list[str]:
    """The execution and every active execution it invoked, if active (a child's id extends its parent's)."""
    prefix = execution_id + "/"
    rows = tx.query("SELECT id FROM durable_executions WHERE (id = ? OR substr(id, 1, ?) = ?) "
                    f"AND status IN {in_clause(len(ACTIVE))}", (execution_id, len(prefix), prefix, *ACTIVE))
    return [r[0] for r in rows]


def delete_execution(tx: Tx, execution_id: str) -> int:
    """Delete one execution and its operations (not its children). How many executions were deleted."""
    tx.execute("DELETE FROM durable_operations WHERE execution_id = ?", (execution_id,))
    tx.execute("DELETE FROM durable_signals WHERE execution_id = ?", (execution_id,))
    tx.execute("DELETE FROM durable_events WHERE execution_id = ?", (execution_id,))
    tx.execute("DELETE FROM durable_queue_items WHERE execution_id = ?", (execution_id,))
    return tx.rowcount("DELETE FROM durable_executions WHERE id = ?", (execution_id,))


def ended_before(tx: Tx, cutoff: float, limit: int) -> list[str]:
    """Top-level executions that finished before ``cutoff``, oldest first."""
    return [r[0] for r in tx.query(
        "SELECT id FROM durable_executions WHERE parent_id IS NULL AND ended_at IS NOT NULL AND ended_at < ? "
        "ORDER BY ended_at LIMIT ?", (cutoff, limit))]


# -- operations -----------------------------------------------------------------------------------
def operations(tx: Tx, execution_id: str) -> List[Operation]:
    """The execution's checkpointed operations in the order they started."""
    return [_op_from_row(r) for r in tx.query(
        f"SELECT {_OP_COLS} FROM durable_operations WHERE execution_id = ? ORDER BY seq", (execution_id,))]


def insert_operation(tx: Tx, execution_id: str, op: Operation) -> None:
    tx.execute(_INSERT_OP, _op_row(execution_id, op))


def write_operation(tx: Tx, execution_id: str, op: Operation) -> bool:
    """Checkpoint ``op``. False when the stored operation is finished otherwise: it was settled meanwhile
    (a callback answered, a child ended) and the invocation must replay. The same finished operation
    stored already (written by an earlier attempt whose commit was not acknowledged) counts as written."""
    row = _op_row(execution_id, op)
    if tx.rowcount(_UPSERT_OP, row) == 1:
        return True
    return _same_stored(tx, execution_id, op, row)


def write_operation_fenced(tx: Tx, execution_id: str, op: Operation, run_token: int) -> bool | None:
    """``write_operation`` behind the fence of ``touch_running`` (without touching ``updated_at``), in one
    statement: None, writing nothing, when the execution is no longer ``RUNNING`` under ``run_token``. The fence
    holds for the rest of the transaction, as ``touch_running``'s does (on PostgreSQL the execution's row stays
    locked)."""
    row = _op_row(execution_id, op)
    if tx.rowcount(_FENCED_UPSERT_OP[tx.dialect], (*row, execution_id, run_token)) == 1:
        return True
    if not runs_under(tx, execution_id, run_token):  # nothing was written: the fence said no, or ...
        return None
    return _same_stored(tx, execution_id, op, row)  # ... the stored operation is finished


def _same_stored(tx: Tx, execution_id: str, op: Operation, row: tuple[Any, ...]) -> bool:
    """Whether the finished operation stored under ``op``'s id is ``op`` (status, result, error)."""
    stored = tx.one("SELECT status, result, error FROM durable_operations WHERE execution_id = ? AND id = ?",
                    (execution_id, op.id))
    return stored is not None and tuple(stored) == (row[7], row[9], row[10])


def unstart(tx: Tx, execution_id: str, operation_id: str, attempt: int, now: float) -> None:
    """Put back an at-most-once start whose commit was never confirmed: the attempt never ran."""
    tx.execute("UPDATE durable_operations SET status = 'PENDING', next_attempt_ts = ? "
               "WHERE execution_id = ? AND id = ? AND status = 'STARTED' AND attempt = ?",
               (now, execution_id, operation_id, attempt))


def settle_operation(tx: Tx, execution_id: str, operation_id: str, status: OperationStatus, result: str | None,
                     error: ErrorObject | None, now: float) -> None:
    """Finish a ``STARTED`` operation from outside its invocation (a callback's answer, a child's end)."""
    tx.execute(
        "UPDATE durable_operations SET status = ?, result = ?, error = ?, end_ts = ? "
        "WHERE execution_id = ? AND id = ? AND status = 'STARTED'",
        (status.value, result, _error_text(error), now, execution_id, operation_id),
    )


def find_callback(tx: Tx, callback_id: str) -> tuple[str, str, OperationStatus, ExecutionStatus] | None:
    """``(execution_id, operation_id, operation status, execution status)`` of a callback."""
    row = tx.one("SELECT o.execution_id, o.id, o.status, e.status FROM durable_operations o "
                 "JOIN durable_executions e ON e.id = o.execution_id WHERE o.callback_id = ?", (callback_id,))
    if row is None:
        return None
    return row[0], row[1], OperationStatus(row[2]), ExecutionStatus(row[3])


def touch_callback(tx: Tx, execution_id: str, operation_id: str, now: float) -> None:
    """Record a heartbeat of the party completing a callback."""
    tx.execute("UPDATE durable_operations SET heartbeat_ts = ? WHERE execution_id = ? AND id = ?",
               (now, execution_id, operation_id))


# -- signals --------------------------------------------------------------------------------------
def lock_execution(tx: Tx, execution_id: str) -> ExecutionStatus | None:
    """Take the execution row's write lock (ordering a signal with the invocation's checkpoints, which take
    it first too) and return its status; None if it does not exist."""
    row = tx.one("UPDATE durable_executions SET updated_at = updated_at WHERE id = ? RETURNING status",
                 (execution_id,))
    return ExecutionStatus(row[0]) if row is not None else None


def insert_signal(tx: Tx, execution_id: str, name: str, payload: str | None, now: float) -> int:
    """Keep a signal after every earlier one of the execution; its sequence number. Callers hold the
    execution's lock (``lock_execution``), which orders concurrent senders."""
    row = tx.one("SELECT COALESCE(MAX(seq), 0) + 1 FROM durable_signals WHERE execution_id = ?", (execution_id,))
    seq = int(row[0]) if row is not None else 1
    tx.execute("INSERT INTO durable_signals (execution_id, seq, name, payload, sent_at) VALUES (?, ?, ?, ?, ?)",
               (execution_id, seq, name, payload, now))
    return seq


def kept_signals(tx: Tx, execution_id: str, name: str) -> list[tuple[int, str | None]]:
    """``(seq, payload)`` of the signals named ``name`` no wait has taken yet, oldest first."""
    return [(int(r[0]), r[1]) for r in tx.query(
        "SELECT seq, payload FROM durable_signals WHERE execution_id = ? AND name = ? AND operation_id IS NULL "
        "ORDER BY seq", (execution_id, name))]


def signal_waits(tx: Tx, execution_id: str, name: str) -> list[str]:
    """Ids of the execution's ``wait_for_signal`` operations for ``name`` still waiting, in start order."""
    return [r[0] for r in tx.query(
        "SELECT id FROM durable_operations WHERE execution_id = ? AND type = ? AND sub_type = ? AND name = ? "
        "AND status = 'STARTED' ORDER BY seq",
        (execution_id, OperationType.CALLBACK.value, OperationSubType.WAIT_FOR_SIGNAL.value, name))]


def take_signal(tx: Tx, execution_id: str, seq: int, operation_id: str, now: float) -> None:
    """Record that the wait ``operation_id`` took the signal ``seq``."""
    tx.execute("UPDATE durable_signals SET operation_id = ?, taken_at = ? WHERE execution_id = ? AND seq = ? "
               "AND operation_id IS NULL", (operation_id, now, execution_id, seq))


# -- events ---------------------------------------------------------------------------------------
def set_event(tx: Tx, execution_id: str, key: str, value: str | None, now: float) -> None:
    """Record ``value`` (JSON text) as the latest of the execution's event ``key``."""
    tx.execute("INSERT INTO durable_events (execution_id, key, value, set_at) VALUES (?, ?, ?, ?) "
               "ON CONFLICT (execution_id, key) DO UPDATE SET value = excluded.value, set_at = excluded.set_at",
               (execution_id, key, value, now))


def get_event(tx: Tx, execution_id: str, key: str) -> tuple[str | None] | None:
    """``(value,)`` of the execution's event ``key`` (the value JSON text), None while it is not set."""
    row = tx.one("SELECT value FROM durable_events WHERE execution_id = ? AND key = ?", (execution_id, key))
    return (row[0],) if row is not None else None


# -- continue as new ------------------------------------------------------------------------------
def continue_execution(tx: Tx, execution_id: str, input_text: str | None, now: float) -> int:
    """Start the execution's next history: its operations deleted, ``input_text`` its input, still
    ``RUNNING``. The number of the run that starts."""
    tx.execute("DELETE FROM durable_operations WHERE execution_id = ?", (execution_id,))
    row = tx.one("UPDATE durable_executions SET input = ?, runs = runs + 1, status = 'RUNNING', wake_at = NULL, "
                 "updated_at = ? WHERE id = ? RETURNING runs", (input_text, now, execution_id))
    assert row is not None, f"execution {execution_id} continued while it did not exist"
    return int(row[0])


def runs(tx: Tx, execution_id: str) -> int | None:
    """How many histories the execution has had (1 until it continues as new)."""
    row = tx.one("SELECT runs FROM durable_executions WHERE id = ?", (execution_id,))
    return int(row[0]) if row is not None else None


# -- queues ---------------------------------------------------------------------------------------
def insert_queue_item(tx: Tx, execution_id: str, queue: str, priority: int, dedup_id: str | None,
                      now: float, *, trace: str | None = None) -> bool:
    """The queue row of an execution started on ``queue``, waiting, with the start's trace context
    (``telemetry.carrier_text``). False (nothing changes) when the id has one already or ``dedup_id`` is held
    by an execution of the queue that has not ended."""
    return tx.rowcount(
        "INSERT INTO durable_queue_items (execution_id, queue, priority, dedup_id, enqueued_at, trace) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (execution_id, queue, priority, dedup_id, now, trace),
    ) == 1


def dedup_holder(tx: Tx, queue: str, dedup_id: str) -> str | None:
    """The execution of ``queue`` not yet ended that holds ``dedup_id``."""
    row = tx.one("SELECT execution_id FROM durable_queue_items WHERE queue = ? AND dedup_id = ?", (queue, dedup_id))
    return row[0] if row is not None else None


def hold_execution(tx: Tx, execution_id: str) -> None:
    """A new execution waits for its queue (``ENQUEUED``) instead of running."""
    tx.execute("UPDATE durable_executions SET status = 'ENQUEUED' WHERE id = ? AND status = 'RUNNING'",
               (execution_id,))


def end_queue_item(tx: Tx, execution_id: str, now: float) -> None:
    """The execution ended: it no longer counts against its queue's limits, and its ``dedup_id`` is free."""
    tx.execute("UPDATE durable_queue_items SET ended_at = ?, dedup_id = NULL WHERE execution_id = ? "
               "AND ended_at IS NULL", (now, execution_id))


def has_waiting(tx: Tx, queue: str) -> bool:
    """Whether an execution waits on ``queue``."""
    return tx.one("SELECT 1 FROM durable_queue_items WHERE queue = ? AND admitted_at IS NULL AND ended_at IS NULL "
                  "LIMIT 1", (queue,)) is not None


def lock_queue(tx: Tx, queue: str, now: float) -> None:
    """Take ``queue``'s lock until the transaction ends: admissions to one queue run one at a time across
    every process (a row lock on PostgreSQL; SQLite's write transaction is one already)."""
    tx.execute("INSERT INTO durable_queues (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
               (queue, now))
    if tx.dialect == POSTGRES:
        tx.execute("SELECT name FROM durable_queues WHERE name = ? FOR UPDATE", (queue,))


def queue_load(tx: Tx, queue: str, executor: str, since: float | None) -> tuple[int, int, int]:
    """``(admitted, admitted by executor, admitted since)`` of ``queue``: the executions admitted and not
    ended, those of them ``executor`` admitted, and how many were admitted after ``since`` (0 when None)."""
    row = tx.one("SELECT COUNT(*), COALESCE(SUM(CASE WHEN executor = ? THEN 1 ELSE 0 END), 0) "
                 "FROM durable_queue_items WHERE queue = ? AND admitted_at IS NOT NULL AND ended_at IS NULL",
                 (executor, queue))
    active, mine = (int(row[0]), int(row[1])) if row is not None else (0, 0)
    recent = 0
    if since is not None:
        got = tx.one("SELECT COUNT(*) FROM durable_queue_items WHERE queue = ? AND admitted_at > ?", (queue, since))
        recent = int(got[0]) if got is not None else 0
    return active, mine, recent


def admit(tx: Tx, queue: str, executor: str, limit: int, now: float) -> list[tuple[str, str | None]]:
    """Admit up to ``limit`` of the executions waiting on ``queue``, lowest ``priority`` first, then oldest:
    ``RUNNING`` again, admitted by ``executor``. Their ids with their start's trace context, in that order.
    The caller holds the queue's lock (``lock_queue``)."""
    rows = [(str(r[0]), r[1]) for r in tx.query(
        "SELECT execution_id, trace FROM durable_queue_items WHERE queue = ? AND admitted_at IS NULL "
        "AND ended_at IS NULL ORDER BY priority, enqueued_at, execution_id LIMIT ?", (queue, limit))]
    ids = [i for i, _ in rows]
    if not ids:
        return []
    tx.execute(f"UPDATE durable_queue_items SET admitted_at = ?, executor = ? WHERE execution_id IN "
               f"{in_clause(len(ids))}", (now, executor, *ids))
    running = {r[0] for r in tx.query(
        f"UPDATE durable_executions SET status = 'RUNNING', updated_at = ? WHERE id IN {in_clause(len(ids))} "
        "AND status = 'ENQUEUED' RETURNING id", (now, *ids))}
    for stale in (i for i in ids if i not in running):  # its execution is not waiting (a start raced it)
        end_queue_item(tx, stale, now)
    return [(i, trace) for i, trace in rows if i in running]


# -- schedules ------------------------------------------------------------------------------------
def put_schedule(tx: Tx, name: str, function: str, cron: str, input_text: str | None, next_at: float,
                 now: float) -> None:
    """Create or change the schedule ``name``. An unchanged schedule keeps its next tick; a changed one takes
    ``next_at``."""
    tx.execute(
        "INSERT INTO durable_schedules (name, function, cron, input, next_at, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET function = excluded.function, "
        "cron = excluded.cron, input = excluded.input, next_at = excluded.next_at, updated_at = excluded.updated_at "
        "WHERE durable_schedules.function <> excluded.function OR durable_schedules.cron <> excluded.cron "
        "OR COALESCE(durable_schedules.input, '') <> COALESCE(excluded.input, '')",
        (name, function, cron, input_text, next_at, now, now),
    )


def due_schedules(tx: Tx, now: float) -> list[tuple[str, str, str, str | None, float]]:
    """``(name, function, cron, input, next_at)`` of the schedules whose next tick is due at ``now``."""
    return [(r[0], r[1], r[2], r[3], float(r[4])) for r in tx.query(
        "SELECT name, function, cron, input, next_at FROM durable_schedules WHERE next_at <= ? ORDER BY next_at, name",
        (now,))]


def advance_schedule(tx: Tx, name: str, was: float, tick: float, next_at: float, now: float) -> bool:
    """Move schedule ``name`` from its tick ``was`` to ``next_at``, having started ``tick``; False when another
    worker moved it first (that worker started the same tick, under the same id)."""
    return tx.rowcount("UPDATE durable_schedules SET next_at = ?, last_at = ?, updated_at = ? WHERE name = ? "
                       "AND next_at = ?", (next_at, tick, now, name, was)) == 1


def remove_schedule(tx: Tx, name: str) -> bool:
    return tx.rowcount("DELETE FROM durable_schedules WHERE name = ?", (name,)) > 0
