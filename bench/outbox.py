"""Outbox throughput: effects submitted and dispatched through a no-op connector, beside a naive outbox.

The naive outbox is what one writes with the raw ``sqlite3`` driver: per effect, one INSERT committed,
the dispatch, and one UPDATE committed (two commits per effect). errands is measured two ways on the
same workload and the same durability setting:

- ``errands one-by-one``: ``outbox.submit(effect)`` per effect (one transaction each, with its journal
  event), then the worker's ``dispatch_once`` claiming and completing batches;
- ``errands submit_many``: ``outbox.submit_many`` in batches of ``--batch`` effects, then the same
  dispatch;
- ``errands 8 concurrent submitters``: eight threads each calling ``outbox.submit(effect)`` one by one (their
  submits share commits: the store's group commit), then the same dispatch.

Both count the whole trip: submitted, dispatched, CONFIRMED, every transition journalled. Each row runs on
a fresh SQLite file in WAL mode, for ``synchronous=NORMAL`` and ``synchronous=FULL``.

The goal lines are read at ``FULL``, the store's default: the durability setting at which a commit survives
power loss, where the naive outbox's two commits per effect cost what they cost in production. At ``NORMAL``
(an explicit opt-in) a commit is only a memory copy into the WAL; its one-by-one row has a goal line too.

Tracing: ``errands one-by-one traced`` is the one-by-one row with the OpenTelemetry SDK recording every span
(submit and dispatch, the trace context stored with each effect) into a batch processor whose exporter drops
them; ``untraced`` is the same row with the API alone (no SDK configured: what a user who installs
``errands-core[otel]`` without configuring it gets). They alternate with the other rows; the goal line is the
``FULL`` ratio like the others, and the ``NORMAL`` one (where a commit costs least and tracing's share is
largest) is printed beside it. Without opentelemetry installed those rows are left out, and the other rows run
as before.

Run: ``hatch run bench:outbox`` (options: ``--effects``, ``--batch``).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import threading
import time
from typing import Any, ClassVar

from errands.core import DispatchOutcome, DispatchResult, Effect, EffectStatus, Outbox, open_store, telemetry


class NoopConnector:
    """Confirms every effect without doing anything: the engine's own cost is what is measured."""

    name: ClassVar[str] = "noop"

    def dispatch(self, effect: Effect) -> DispatchResult:
        return DispatchResult(outcome=DispatchOutcome.CONFIRMED)


def _payload(i: int) -> dict[str, Any]:
    return {"order": i, "amount_cents": 1000 + i, "currency": "EUR", "note": "bench"}


class Naive:
    """The raw-driver outbox: per effect, one INSERT committed, the dispatch, one UPDATE committed."""

    def __init__(self, path: str, sync: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(f"PRAGMA synchronous = {sync}")
        self.conn.execute(
            "CREATE TABLE outbox (key TEXT PRIMARY KEY, connector TEXT NOT NULL, payload TEXT NOT NULL, "
            "status TEXT NOT NULL, attempts INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL)"
        )
        self.connector = NoopConnector()

    def run(self, effects: list[Effect]) -> float:
        conn = self.conn
        started = time.perf_counter()
        for effect in effects:
            now = time.time()
            conn.execute("BEGIN")
            conn.execute(
                "INSERT INTO outbox (key, connector, payload, status, attempts, created_at, updated_at) "
                "VALUES (?, ?, ?, 'PENDING', 0, ?, ?)",
                (effect.key, effect.connector, json.dumps(effect.payload), now, now),
            )
            conn.execute("COMMIT")
            self.connector.dispatch(effect)
            conn.execute("BEGIN")
            conn.execute("UPDATE outbox SET status = 'CONFIRMED', attempts = 1, updated_at = ? WHERE key = ?",
                         (time.time(), effect.key))
            conn.execute("COMMIT")
        return time.perf_counter() - started

    def close(self, n: int) -> None:
        (done,) = self.conn.execute("SELECT COUNT(*) FROM outbox WHERE status = 'CONFIRMED'").fetchone()
        assert done == n, done
        self.conn.close()


class Errands:
    """The outbox engine: effects submitted one by one or with ``submit_many``, then the worker's dispatch
    step claiming and completing batches until nothing is due."""

    def __init__(self, path: str, sync: str, batch: int | None, threads: int = 1) -> None:
        self.store = open_store(f"sqlite:///{path}?synchronous={sync}")
        self.outbox = Outbox(self.store, connectors={"noop": NoopConnector()}, batch_size=500)
        self.batch = batch
        self.threads = threads

    def run(self, effects: list[Effect]) -> float:
        outbox = self.outbox
        started = time.perf_counter()
        if self.threads > 1:
            def submit(part: list[Effect]) -> None:
                for effect in part:
                    outbox.submit(effect)

            workers = [threading.Thread(target=submit, args=(effects[t::self.threads],))
                       for t in range(self.threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        elif self.batch is None:
            for effect in effects:
                outbox.submit(effect)
        else:
            for i in range(0, len(effects), self.batch):
                outbox.submit_many(effects[i:i + self.batch])
        while outbox.dispatch_once():
            pass
        return time.perf_counter() - started

    def close(self, n: int) -> None:
        stats = self.outbox.stats()
        assert stats["effects"][EffectStatus.CONFIRMED.value] == n, stats
        self.outbox.close()
        self.store.close()


class Tracing:
    """The SDK's tracer provider, recording every span into a batch processor whose exporter drops them; errands
    records with it only inside ``telemetry.use_providers`` (the traced rows), else with the API's global no-op
    tracer (no SDK configured)."""

    def __init__(self) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        class Dropped(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        self.sdk = TracerProvider()
        self.sdk.add_span_processor(BatchSpanProcessor(Dropped()))


class Traced(Errands):
    """The one-by-one row with spans recorded by the SDK (``on``) or not."""

    def __init__(self, path: str, sync: str, tracing: Tracing, on: bool) -> None:
        super().__init__(path, sync, None)
        self.tracing, self.on = tracing, on

    def run(self, effects: list[Effect]) -> float:
        if not self.on:
            return super().run(effects)
        with telemetry.use_providers(tracer_provider=self.tracing.sdk):
            return super().run(effects)


class Ceiling(Errands):
    """The untraced one-by-one row plus, per effect, the two spans a traced effect records (its submit's and its
    dispatch attempt's, with the same attributes) made directly with the SDK's tracer around errands' untraced
    calls: what the SDK alone costs, nothing of errands. Its ratio to the untraced row bounds the traced one."""

    def __init__(self, path: str, sync: str, tracing: Tracing) -> None:
        super().__init__(path, sync, None)
        self.tracer = tracing.sdk.get_tracer("bench")

    def run(self, effects: list[Effect]) -> float:
        outbox, tracer = self.outbox, self.tracer
        started = time.perf_counter()
        for effect in effects:
            with tracer.start_as_current_span("errands.outbox.submit", attributes={
                    "errands.effect_key": effect.key, "errands.connector": effect.connector}):
                outbox.submit(effect)
        while outbox.dispatch_once():
            pass
        for effect in effects:
            with tracer.start_as_current_span("errands.outbox.dispatch", attributes={
                    "errands.effect_key": effect.key, "errands.connector": effect.connector, "errands.attempt": 1,
                    "errands.lease_owner": "bench"}) as current:
                current.set_attribute("errands.status", "CONFIRMED")
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--effects", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=10,
                        help="the workload is split into rounds, the three outboxes taking turns, so that a "
                             "change in machine load hits them alike")
    args = parser.parse_args()
    n = args.effects
    per_round = n // args.rounds
    rows: list[tuple[str, str, float, float]] = []
    ratios: dict[str, dict[str, float]] = {}
    tracing = Tracing() if telemetry.ENABLED else None
    traced_ratios: dict[str, float] = {}
    ceilings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="errands-bench-outbox-") as tmp:
        for sync in ("NORMAL", "FULL"):
            parts: dict[str, Any] = {
                "naive": Naive(os.path.join(tmp, f"naive-{sync}.db"), sync),
                "one": Errands(os.path.join(tmp, f"one-{sync}.db"), sync, None),
                "many": Errands(os.path.join(tmp, f"many-{sync}.db"), sync, args.batch),
                "eight": Errands(os.path.join(tmp, f"eight-{sync}.db"), sync, None, threads=8),
            }
            if tracing is not None:
                parts["untraced"] = Traced(os.path.join(tmp, f"untraced-{sync}.db"), sync, tracing, False)
                parts["traced"] = Traced(os.path.join(tmp, f"traced-{sync}.db"), sync, tracing, True)
                parts["ceiling"] = Ceiling(os.path.join(tmp, f"ceiling-{sync}.db"), sync, tracing)
            spent = dict.fromkeys(parts, 0.0)
            for r in range(args.rounds):
                effects = [Effect(key=f"order-{i}", connector="noop", payload=_payload(i))
                           for i in range(r * per_round, (r + 1) * per_round)]
                for name, part in parts.items():
                    spent[name] += part.run(effects)
            for part in parts.values():
                part.close(per_round * args.rounds)
            base = spent["naive"]
            ratios[sync] = {name: base / spent[name] for name in ("one", "many", "eight")}
            rows += [
                (sync, "naive raw sqlite3 (2 commits/effect)", base, 1.0),
                (sync, "errands one-by-one submit", spent["one"], ratios[sync]["one"]),
                (sync, f"errands submit_many({args.batch})", spent["many"], ratios[sync]["many"]),
                (sync, "errands 8 concurrent submitters", spent["eight"], ratios[sync]["eight"]),
            ]
            if "traced" in spent:
                traced_ratios[sync] = spent["untraced"] / spent["traced"]
                ceilings[sync] = spent["untraced"] / spent["ceiling"]
                rows += [
                    (sync, "errands one-by-one, otel API untraced", spent["untraced"], base / spent["untraced"]),
                    (sync, "errands one-by-one, otel SDK traced", spent["traced"], base / spent["traced"]),
                    (sync, "untraced + the SDK's 2 spans alone", spent["ceiling"], base / spent["ceiling"]),
                ]
    total = per_round * args.rounds
    print(f"{total} effects submitted and dispatched through a no-op connector, SQLite WAL\n")
    print(f"| {'synchronous':<11} | {'outbox':<38} | {'seconds':>8} | {'effects/s':>10} | {'vs naive':>8} |")
    print(f"|{'-' * 13}|{'-' * 40}|{'-' * 10}|{'-' * 12}|{'-' * 10}|")
    for sync, name, secs, ratio in rows:
        print(f"| {sync:<11} | {name:<38} | {secs:>8.2f} | {total / secs:>10.0f} | {ratio:>7.2f}x |")
    print()
    print("Goal lines: synchronous=FULL (the default), where every commit waits for the disk; at NORMAL a commit is a "
          "memory copy into the WAL.")
    print(f"outbox one-by-one vs naive: {ratios['FULL']['one']:.2f}x (goal >= 1.2)")
    print(f"outbox submit_many vs naive: {ratios['FULL']['many']:.2f}x (goal >= 3)")
    if not traced_ratios:
        print("outbox traced vs untraced: not measured, opentelemetry is not installed (goal >= 0.85)")
    else:
        print(f"(tracing at NORMAL, where a commit costs least: traced vs untraced {traced_ratios['NORMAL']:.2f})")
        print("(the SDK's own cost: the untraced row plus the two spans of a traced effect made directly with the "
              f"SDK, nothing of errands, vs untraced: {ceilings['FULL']:.2f} at FULL, {ceilings['NORMAL']:.2f} at "
              "NORMAL; the traced ratio cannot pass it)")
        print(f"outbox traced vs untraced: {traced_ratios['FULL']:.2f} (goal >= 0.85)")
    print(f"outbox 8 concurrent submitters vs naive: {ratios['FULL']['eight']:.2f}x (goal >= 3)")
    print(f"outbox one-by-one at NORMAL vs naive: {ratios['NORMAL']['one']:.2f}x (goal >= 1.0)")


if __name__ == "__main__":
    main()
