"""The outbox's read models: one effect, filtered lists of effects and obligations, an effect's history from the
journal, and the counts an operator watches."""

from __future__ import annotations

import heapq
from typing import Any

from .._values import EffectStatus, Event, _StrEnum
from ..errors import ConfigError, NotFoundError
from ..store import SQLStore
from . import _effect_table, _obligation_table
from ._records import EffectRecord, ObligationRecord, ObligationStatus
from ._transitions import EFFECT_STREAMS


def _status(value: Any, kind: type[_StrEnum]) -> str:
    try:
        return str(kind(str(value).upper()))
    except ValueError:
        raise ConfigError(f"status must be one of {', '.join(s.value for s in kind)}, got {value!r}",
                          field="status", value=value) from None


def _reading(store: SQLStore, conn: Any) -> Any:
    """A read: the store's own, or inside the caller's transaction on ``conn``."""
    return store.read() if conn is None else store.transaction(conn)


def get(store: SQLStore, key: str, conn: Any = None) -> EffectRecord:
    with _reading(store, conn) as tx:
        stored = _effect_table.get(tx, key)
    if stored is None:
        raise NotFoundError(f"no effect with key {key!r}")
    return stored.record


def _where(**columns: Any) -> dict[str, Any]:
    """The equality filters given (None: that column is not filtered)."""
    return {column: value for column, value in columns.items() if value is not None}


def effects(store: SQLStore, status: Any, connector: str | None, limit: int, flagged: bool | None,
            run_id: str | None, conn: Any = None) -> list[EffectRecord]:
    where = _where(status=None if status is None else _status(status, EffectStatus), connector=connector,
                   flagged=None if flagged is None else int(flagged), run_id=run_id)
    with _reading(store, conn) as tx:
        return _effect_table.select(tx, where, limit)


def obligations(store: SQLStore, status: Any, effect_key: str | None, run_id: str | None,
                limit: int) -> list[ObligationRecord]:
    where = _where(status=None if status is None else _status(status, ObligationStatus), effect_key=effect_key,
                   run_id=run_id)
    with store.read() as tx:
        return _obligation_table.select(tx, where, limit)


def _stream_of(store: SQLStore, stream: str, after: int, key: str) -> list[Event]:
    """The events of ``stream`` after position ``after`` whose data is about effect ``key``."""
    out: list[Event] = []
    while True:
        events, last = store.scan_events(after, 1000, stream=stream)
        out += [e for e in events if isinstance(e.data, dict) and e.data.get("key") == key]
        if last == after or len(events) < 1000:
            return out
        after = last


def history(store: SQLStore, key: str, limit: int) -> list[Event]:
    """The events of effect ``key`` and its obligations, oldest first: its connector's stream and the streams of
    the kinds it owes, read from a position below its first event. A scan meant for inspection, not hot paths."""
    with store.read() as tx:
        start = _effect_table.history_start(tx, key)
        if start is None:
            raise NotFoundError(f"no effect with key {key!r}")
        kinds = _obligation_table.kinds_owed(tx, key)
    connector, after = start
    streams = [f"{EFFECT_STREAMS}{connector}", *(f"obligations/{kind}" for kind in sorted(set(kinds)))]
    merged = heapq.merge(*(_stream_of(store, s, after, key) for s in streams), key=lambda e: e.position)
    return list(merged)[:int(limit)]


def stats(store: SQLStore) -> dict[str, Any]:
    with store.read() as tx:
        by_status, flagged, due = _effect_table.counts(tx, store.clock.now())
        owed = _obligation_table.counts(tx)
    return {
        "effects": {s.value: by_status.get(s.value, 0) for s in EffectStatus},
        "flagged": flagged,
        "due": due,
        "obligations": {s.value: owed.get(s.value, 0) for s in ObligationStatus},
    }
