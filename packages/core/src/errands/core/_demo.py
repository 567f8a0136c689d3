"""``errands demo``: every engine end to end on an embedded SQLite store, with progress and a summary."""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, cast

from ._console import Progress, print_json, print_table
from ._journal import Journal, StoreScheduler
from .store._stores import NewEvent, open_store


@dataclass
class DemoContext:
    """What each demo part gets: a store URL it may open, a scratch folder and a size."""

    store_url: str
    workdir: str
    size: int
    quiet: bool = False
    notes: list[str] = field(default_factory=list)

    def progress(self, label: str, total: int) -> Progress:
        return Progress(label, total, out=io.StringIO() if self.quiet else sys.stderr)

    def say(self, text: str) -> None:
        if not self.quiet:
            sys.stderr.write(text + "\n")


class StoreJournalDemo:
    """The store and journal: events appended in batches, read back by subject, leases, a timer."""

    name: ClassVar[str] = "store+journal"
    order: ClassVar[int] = 0

    def run(self, ctx: DemoContext) -> dict[str, Any]:
        store = open_store(ctx.store_url)
        try:
            journal = Journal(store)
            n = ctx.size
            progress = ctx.progress("journal append", n)
            batch: list[NewEvent] = []
            for i in range(n):
                kind = "order.placed" if i % 2 == 0 else "order.shipped"
                batch.append(NewEvent(f"orders/{i % 20}", kind, {"order": i}))
                if len(batch) == 200:
                    journal.append_many(batch)
                    progress.update(len(batch))
                    batch = []
            if batch:
                journal.append_many(batch)
                progress.update(len(batch))
            progress.close()
            placed = journal.read(0, limit=n, subjects=["order.placed"])
            store.enqueue("demo", [(f"job-{i}", {"i": i}) for i in range(n)])
            progress = ctx.progress("lease claim+complete", n)
            completed = 0
            while True:
                leases = store.claim("demo", 250, lease_for=30)
                if not leases:
                    break
                store.complete(leases)
                completed += len(leases)
                progress.update(len(leases))
            progress.close()
            fired: list[Any] = []
            scheduler = StoreScheduler(store)
            scheduler.schedule("demo.tick", {"hello": "timer"}, at=time.time(), key="demo-timer")
            scheduler.schedule("demo.tick", {"hello": "cancelled"}, at=time.time(), key="demo-cancel")
            scheduler.cancel("demo-cancel")
            scheduler.fire_due({"demo.tick": lambda _t, p: fired.append(p)})
            return {
                "events appended": n,
                "order.placed read back": len(placed),
                "leases completed": completed,
                "timers fired": len(fired),
                "journal position": journal.last_position(),
            }
        finally:
            store.close()


# The demo parts of the engines inside errands-core; plugins add theirs through
# ``errands_register_demos``.
from ._fanout_demo import FanOutDemo  # noqa: E402
from ._outbox_demo import OutboxDemo  # noqa: E402
from ._telemetry_demo import TelemetryDemo  # noqa: E402

CORE_DEMOS: list[type] = [StoreJournalDemo, OutboxDemo, FanOutDemo, TelemetryDemo]


def _demo_parts() -> list[Any]:
    from ._plugins import get_registry

    reg = get_registry()
    classes: list[type] = list(CORE_DEMOS)
    for impl in reg.pm.hook.errands_register_demos.get_hookimpls():
        classes.extend(cast("list[type]", impl.function() or []))
    classes.sort(key=lambda c: (getattr(c, "order", 100), getattr(c, "name", "")))
    return [cls() for cls in classes]


def run_demo(store_url: str | None = None, as_json: bool = False, size: int = 2000,
             parts: Callable[[], list[Any]] = _demo_parts) -> int:
    """Run every demo part; print a summary table (or JSON). Returns the exit status."""
    with tempfile.TemporaryDirectory(prefix="errands-demo-") as tmp:
        url = store_url or f"sqlite:///{os.path.join(tmp, 'demo.db')}"
        ctx = DemoContext(store_url=url, workdir=tmp, size=size)
        ctx.say(f"errands demo on {url}")
        summary: list[dict[str, Any]] = []
        failed = False
        for part in parts():
            ctx.say(f"== {part.name}")
            started = time.perf_counter()
            try:
                figures = part.run(ctx)
                ok = True
            except Exception as exc:  # the demo reports every part, then fails
                figures = {"error": f"{type(exc).__name__}: {exc}"}
                ok = False
                failed = True
            summary.append({"part": part.name, "ok": ok, "seconds": round(time.perf_counter() - started, 3),
                            "figures": figures})
        if as_json:
            print_json(summary)
        else:
            rows = []
            for s in summary:
                for k, v in s["figures"].items():
                    rows.append([s["part"], "ok" if s["ok"] else "FAILED", k, v])
            print_table(["part", "status", "what", "value"], rows)
            print(f"\n{'FAILED' if failed else 'all parts ok'} in {sum(s['seconds'] for s in summary):.2f}s")
        return 1 if failed else 0
