"""The store layer: the one place with SQL for the shared tables (the journal ``em_events`` and
``em_streams``, the queue ``em_queue``, key-value ``em_kv``, migrations ``em_migrations``), transactions
(``Tx``) and the SQLite and PostgreSQL dialects.

Engines reach their own tables through one ``*_table`` (or ``*_schema``) module each, written over ``Tx``
with the helpers exported here; the shared tables they reach only through ``Store``'s methods (append
and read events, enqueue / claim / extend / complete / release with fencing, key-value).
"""

from __future__ import annotations

from ._group import Batch
from ._sql import (
    POSTGRES,
    SQLITE,
    JSONText,
    Migration,
    Tx,
    dumps,
    in_clause,
    json_value,
    loads,
    subject_matcher,
    subject_regex,
)
from ._stores import (
    BUILTIN_STORES,
    CORE_MIGRATIONS,
    MemoryStore,
    NewEvent,
    PostgresStore,
    SQLiteStore,
    SQLStore,
    Store,
    as_epoch,
    default_owner,
    new_id,
    open_store,
)

__all__ = [
    "Batch",
    "BUILTIN_STORES",
    "CORE_MIGRATIONS",
    "JSONText",
    "MemoryStore",
    "Migration",
    "NewEvent",
    "POSTGRES",
    "PostgresStore",
    "SQLITE",
    "SQLStore",
    "SQLiteStore",
    "Store",
    "Tx",
    "as_epoch",
    "default_owner",
    "dumps",
    "in_clause",
    "json_value",
    "loads",
    "new_id",
    "open_store",
    "subject_matcher",
    "subject_regex",
]
