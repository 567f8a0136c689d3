"""The SQL seam shared by the SQLite and PostgreSQL stores and by every engine's tables.

Engines write SQL once with ``?`` placeholders and ``{double}``-style type names in DDL; ``Tx`` adapts both
to the store's dialect.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import sqlite3
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from ..errors import PayloadError

SQLITE = "sqlite"
POSTGRES = "postgresql"

_DDL_TYPES = {
    SQLITE: {
        "double": "REAL",
        "bigint": "INTEGER",
        "blob": "BLOB",
        "serial_pk": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "rowid_pk": "INTEGER PRIMARY KEY",
        "text": "TEXT",
        "without_rowid": " WITHOUT ROWID",
    },
    POSTGRES: {
        "double": "DOUBLE PRECISION",
        "bigint": "BIGINT",
        "blob": "BYTEA",
        "serial_pk": "BIGSERIAL PRIMARY KEY",
        "rowid_pk": "BIGSERIAL PRIMARY KEY",
        "text": "TEXT",
        "without_rowid": "",
    },
}


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step of a component. ``sql`` holds ``;``-separated statements; ``{double}``,
    ``{bigint}``, ``{blob}``, ``{serial_pk}`` and ``{text}`` become the dialect's types; ``{without_rowid}``
    after a table's closing parenthesis clusters a SQLite table on its primary key (one B-tree to write
    instead of two); ``{rowid_pk}`` is ``{serial_pk}`` without SQLite's AUTOINCREMENT bookkeeping, for
    append-only tables whose highest row is never deleted."""

    version: int
    sql: str

    def statements(self, dialect: str) -> list[str]:
        text = self.sql.format(**_DDL_TYPES[dialect])
        return [s.strip() for s in text.split(";") if s.strip()]


@functools.lru_cache(maxsize=1024)
def _to_pyformat(sql: str) -> str:
    if "%" in sql:
        sql = sql.replace("%", "%%")
    return sql.replace("?", "%s")


#: The PostgreSQL channel of an engine's notifications: ``errands_<channel>`` (``Tx.notify``, ``SQLStore.listen``).
NOTIFY_PREFIX = "errands_"

#: Rows per multi-row ``INSERT`` on SQLite (``Tx.insert_rows``): far below its 32,766 parameters for rows of
#: up to 300 columns.
VALUES_ROWS = 100


@functools.lru_cache(maxsize=64)
def _values_statement(head: str, row: str, tail: str, n: int) -> str:
    return head + ", ".join([row] * n) + tail


class Tx:
    """One open transaction (or the caller's own connection). Rows come back as tuples."""

    __slots__ = ("dialect", "raw")

    def __init__(self, raw: Any, dialect: str) -> None:
        self.raw = raw
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql if self.dialect == SQLITE else _to_pyformat(sql)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if self.dialect == SQLITE:
            return self.raw.execute(sql, params)
        cur = self.raw.cursor()
        cur.execute(_to_pyformat(sql), params)
        return cur

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        if self.dialect == SQLITE:
            self.raw.executemany(sql, rows)
            return
        rows = list(rows)
        if rows:
            self.raw.cursor().executemany(_to_pyformat(sql), rows)

    def insert_rows(self, head: str, row: str, rows: Sequence[Sequence[Any]], tail: str = "") -> int:
        """Run ``head + row + tail`` for every row of ``rows`` (``row`` the parenthesised placeholders of one
        row, ``head`` ending in ``VALUES``); returns the rows it changed.

        On SQLite the rows go ``VALUES_ROWS`` at a time through one multi-row statement (prepared once, one step
        per statement instead of one per row), the rest through the one-row statement."""
        if self.dialect != SQLITE:
            if not rows:
                return 0
            cur = self.raw.cursor()
            cur.executemany(_to_pyformat(head + row + tail), rows)
            return int(cur.rowcount)
        n = len(rows)
        whole = n - n % VALUES_ROWS
        changed = 0
        if whole:
            many = _values_statement(head, row, tail, VALUES_ROWS)
            flat = itertools.chain.from_iterable
            execute = self.raw.execute
            for i in range(0, whole, VALUES_ROWS):
                changed += execute(many, tuple(flat(rows[i:i + VALUES_ROWS]))).rowcount
        rest = n - whole
        if rest > 1:
            # The last rows in one statement too (a group commit's rows: a few at a time).
            changed += self.raw.execute(_values_statement(head, row, tail, rest),
                                        tuple(itertools.chain.from_iterable(rows[whole:]))).rowcount
        elif rest:
            changed += self.raw.execute(head + row + tail, rows[whole]).rowcount
        return changed

    def insert_all_or_none(self, head: str, row: str, rows: Sequence[Sequence[Any]]) -> bool | None:
        """On SQLite: insert every row of ``rows`` through ``insert_rows`` (True), or, when one of them breaks a
        uniqueness constraint, none (False). Rows that fit one statement (``VALUES_ROWS``) need nothing more:
        SQLite undoes the statement that failed, alone, and the transaction goes on; more rows are written inside
        a savepoint. None where this cannot be done (PostgreSQL, where a failed statement aborts the whole
        transaction; more rows on a connection outside a transaction): nothing is inserted, and the caller takes
        its general way."""
        if self.dialect != SQLITE or not rows:
            return None
        if len(rows) <= VALUES_ROWS:
            try:
                self.insert_rows(head, row, rows)
            except sqlite3.IntegrityError:
                return False
            return True
        raw = self.raw
        if not raw.in_transaction:
            return None
        raw.execute("SAVEPOINT em_all")
        try:
            self.insert_rows(head, row, rows)
        except sqlite3.IntegrityError:
            raw.execute("ROLLBACK TO em_all")
            raw.execute("RELEASE em_all")
            return False
        raw.execute("RELEASE em_all")
        return True

    def insert_returning(self, head: str, row: str, rows: Sequence[Sequence[Any]], tail: str) -> list[tuple[Any, ...]]:
        """Insert ``rows`` through multi-row statements ``head + row, row, ... + tail`` (``tail`` ending in a
        ``RETURNING`` clause), ``VALUES_ROWS`` rows at most each; the rows they returned."""
        out: list[tuple[Any, ...]] = []
        flat = itertools.chain.from_iterable
        for i in range(0, len(rows), VALUES_ROWS):
            chunk = rows[i:i + VALUES_ROWS]
            out += self.query(_values_statement(head, row, tail, len(chunk)), tuple(flat(chunk)))
        return out

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.execute(sql, params).fetchall())

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self.execute(sql, params).fetchone()
        return tuple(row) if row is not None else None

    def rowcount(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(self.execute(sql, params).rowcount)

    def notify(self, channel: str) -> None:
        """Tell the workers listening on this database (``SQLStore.listen``) that ``channel`` has new work, when
        this transaction commits (PostgreSQL ``NOTIFY``: sent at commit, never if it rolls back, one per channel
        and transaction). SQLite has no notifications: its workers poll (``errands.core._wake``)."""
        if self.dialect == POSTGRES:
            self.raw.cursor().execute("SELECT pg_notify(%s, '')", (NOTIFY_PREFIX + channel,))

    @property
    def skip_locked(self) -> str:
        """``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite serialises writers instead."""
        return " FOR UPDATE SKIP LOCKED" if self.dialect == POSTGRES else ""


def in_clause(n: int) -> str:
    """``(?,?,...)`` with ``n`` placeholders."""
    return "(" + ",".join("?" * n) + ")"


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _make_encoder() -> Callable[[Any], str]:
    """One encoder for every write, built once: ``json.dumps`` (and ``JSONEncoder.encode``) build a new
    one per call. It keeps no markers: a circular value ends in ``RecursionError``, reported as not JSON."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # pragma: no cover - CPython always has the C encoder
        return json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
    chunks = c_make_encoder(None, _not_json, json.encoder.encode_basestring, None, ":", ",", False, False, False)
    join = "".join

    def encode(value: Any) -> str:
        return join(chunks(value, 0))

    return encode


_encode = _make_encoder()


class JSONText(str):
    """Text that is JSON already (an engine's own event data, built from a template): written as it is."""

    __slots__ = ()


_encode_str: Callable[[str], str] = json.encoder.encode_basestring


def json_value(value: Any) -> str:
    """The JSON text of one value, quickest for the strings and integers engines put in their events."""
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if kind is int:
        return str(value)
    return dumps(value, field="data")


def dumps(value: Any, *, field: str = "payload", limit: int | None = None) -> str:
    """JSON text of ``value``; ``PayloadError`` naming ``field`` if it is not JSON or too large."""
    try:
        text = _encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PayloadError(
            f"{field} must be JSON-serialisable: {exc}", field=field, value=type(value).__name__
        ) from exc
    if limit is not None and len(text) > limit and len(text.encode("utf-8")) > limit:
        raise PayloadError(
            f"{field} is {len(text.encode('utf-8'))} bytes as JSON, over the limit of {limit} bytes",
            field=field,
            value=len(text.encode("utf-8")),
        )
    return text


_decode = json.JSONDecoder().raw_decode


def loads(text: str | bytes | None) -> Any:
    """The value of stored JSON text. What the store writes is compact JSON, decoded from its first character to
    its last at once (``json.loads`` searches for whitespace at each end first, which costs as much again);
    anything else (bytes, surrounding space, trailing data, malformed text) goes to ``json.loads``, which reads
    or refuses it."""
    if text is None:
        return None
    if type(text) is str:
        try:
            value, end = _decode(text)
        except json.JSONDecodeError:
            pass
        else:
            if end == len(text):
                return value
    return json.loads(text)


_TOKEN = r"[^.]+"


@functools.lru_cache(maxsize=512)
def subject_regex(pattern: str) -> re.Pattern[str]:
    """Compile a dot-separated subject pattern: ``*`` matches one token, ``**`` one or more."""
    if not pattern or any(t == "" for t in pattern.split(".")):
        from ..errors import ConfigError

        raise ConfigError(
            f"subject pattern {pattern!r} is malformed: use dot-separated tokens, '*' or '**'",
            field="subjects",
            value=pattern,
        )
    parts = []
    tokens = pattern.split(".")
    for i, tok in enumerate(tokens):
        if tok == "**":
            if i != len(tokens) - 1:
                from ..errors import ConfigError

                raise ConfigError(
                    f"subject pattern {pattern!r}: '**' may only be the last token",
                    field="subjects",
                    value=pattern,
                )
            parts.append(r"[^.]+(?:\.[^.]+)*")
        elif tok == "*":
            parts.append(_TOKEN)
        else:
            parts.append(re.escape(tok))
    return re.compile(r"\A" + r"\.".join(parts) + r"\Z")


def subject_matcher(patterns: Sequence[str] | None) -> Any:
    """A predicate over subjects for ``patterns`` (None or empty: everything)."""
    if not patterns:
        return lambda subject: True
    regexes = [subject_regex(p) for p in patterns]
    if len(regexes) == 1:
        match = regexes[0].match
        return lambda subject: match(subject) is not None
    return lambda subject: any(r.match(subject) for r in regexes)
