"""Outbox throughput: effects submitted and dispatched through a no-op connector, beside a naive outbox.

The naive outbox is what one writes with the raw ``sqlite3`` driver: per effect, one INSERT committed,
the dispatch, and one UPDATE committed (two commits per effect). emissary is measured two ways on the
same workload and the same durability setting:

- ``emissary one-by-one``: ``outbox.submit(effect)`` per effect (one transaction each, with its journal
  event), then the worker's ``dispatch_once`` claiming and completing batches;
- ``emissary submit_many``: ``outbox.submit_many`` in batches of ``--batch`` effects, then the same
  dispatch.

Both count the whole trip: submitted, dispatched, CONFIRMED, every transition journalled. Each row runs on
a fresh SQLite file in WAL mode, for ``synchronous=NORMAL`` and ``synchronous=FULL``.

Run: ``hatch run bench:outbox`` (options: ``--effects``, ``--batch``).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time
from typing import Any, Callable, ClassVar

from emissary.core import DispatchOutcome, DispatchResult, Effect, EffectStatus, Outbox, open_store


class NoopConnector:
    """Confirms every effect without doing anything: the engine's own cost is what is measured."""

    name: ClassVar[str] = "noop"

    def dispatch(self, effect: Effect) -> DispatchResult:
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED)


def _payload(i: int) -> dict[str, Any]:
    return {"order": i, "amount_cents": 1000 + i, "currency": "EUR", "note": "bench"}


def naive(path: str, sync: str, n: int) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync}")
    conn.execute(
        "CREATE TABLE outbox (key TEXT PRIMARY KEY, connector TEXT NOT NULL, payload TEXT NOT NULL, "
        "status TEXT NOT NULL, attempts INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL)"
    )
    connector = NoopConnector()
    started = time.perf_counter()
    for i in range(n):
        key = f"order-{i}"
        now = time.time()
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO outbox (key, connector, payload, status, attempts, created_at, updated_at) "
            "VALUES (?, ?, ?, 'PENDING', 0, ?, ?)",
            (key, "noop", json.dumps(_payload(i)), now, now),
        )
        conn.execute("COMMIT")
        connector.dispatch(Effect(key=key, connector="noop", payload=_payload(i)))
        conn.execute("BEGIN")
        conn.execute("UPDATE outbox SET status = 'CONFIRMED', attempts = 1, updated_at = ? WHERE key = ?",
                     (time.time(), key))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    (done,) = conn.execute("SELECT COUNT(*) FROM outbox WHERE status = 'CONFIRMED'").fetchone()
    assert done == n, done
    conn.close()
    return elapsed


def _emissary(path: str, sync: str, n: int, submit: Callable[[Outbox, list[Effect]], None]) -> float:
    store = open_store(f"sqlite:///{path}?synchronous={sync}")
    outbox = Outbox(store, connectors={"noop": NoopConnector()}, batch_size=500)
    effects = [Effect(key=f"order-{i}", connector="noop", payload=_payload(i)) for i in range(n)]
    started = time.perf_counter()
    submit(outbox, effects)
    while outbox.dispatch_once():
        pass
    elapsed = time.perf_counter() - started
    stats = outbox.stats()
    assert stats["effects"][EffectStatus.CONFIRMED.value] == n, stats
    outbox.close()
    store.close()
    return elapsed


def one_by_one(outbox: Outbox, effects: list[Effect]) -> None:
    for effect in effects:
        outbox.submit(effect)


def batched(size: int) -> Callable[[Outbox, list[Effect]], None]:
    def run(outbox: Outbox, effects: list[Effect]) -> None:
        for i in range(0, len(effects), size):
            outbox.submit_many(effects[i:i + size])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--effects", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    n = args.effects
    rows: list[tuple[str, str, float, float]] = []
    ratios: dict[str, list[float]] = {"one": [], "many": []}
    with tempfile.TemporaryDirectory(prefix="emissary-bench-outbox-") as tmp:
        for sync in ("NORMAL", "FULL"):
            base = naive(os.path.join(tmp, f"naive-{sync}.db"), sync, n)
            one = _emissary(os.path.join(tmp, f"one-{sync}.db"), sync, n, one_by_one)
            many = _emissary(os.path.join(tmp, f"many-{sync}.db"), sync, n, batched(args.batch))
            rows += [
                (sync, "naive raw sqlite3 (2 commits/effect)", base, 1.0),
                (sync, "emissary one-by-one submit", one, base / one),
                (sync, f"emissary submit_many({args.batch})", many, base / many),
            ]
            ratios["one"].append(base / one)
            ratios["many"].append(base / many)
    print(f"{n} effects submitted and dispatched through a no-op connector, SQLite WAL\n")
    print(f"| {'synchronous':<11} | {'outbox':<38} | {'seconds':>8} | {'effects/s':>10} | {'vs naive':>8} |")
    print(f"|{'-' * 13}|{'-' * 40}|{'-' * 10}|{'-' * 12}|{'-' * 10}|")
    for sync, name, secs, ratio in rows:
        print(f"| {sync:<11} | {name:<38} | {secs:>8.2f} | {n / secs:>10.0f} | {ratio:>7.2f}x |")
    print()
    # The goal must hold at both durability settings: report the worse one.
    print(f"outbox one-by-one vs naive: {min(ratios['one']):.2f}x (goal >= 1.2)")
    print(f"outbox submit_many vs naive: {min(ratios['many']):.2f}x (goal >= 3)")


if __name__ == "__main__":
    main()
