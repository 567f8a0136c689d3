"""The fan-out, reactions and tasks part of ``errands demo``."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from ._fanout import FanOut, Route
from ._journal import Journal
from ._reactor import Reactor
from ._tasks import TaskEngine, TaskStatus, typed_handler
from ._values import Event
from ._worker import Worker
from .store import NewEvent, open_store


@dataclass
class _Report:
    title: str
    orders: int


class FanOutDemo:
    """Events relayed by a worker to a JSON-lines log file and to a partner sink that refuses one event (parked,
    then redriven), shipped orders turned into reaction tasks, and a typed task run."""

    name: ClassVar[str] = "fanout+tasks"
    order: ClassVar[int] = 20

    def run(self, ctx: Any) -> dict[str, Any]:
        from ._plugins import get_registry
        from .testing._sinks import InMemorySink

        store = open_store(ctx.store_url)
        log_path = os.path.join(ctx.workdir, "audit.jsonl")
        log_cls = get_registry().sinks.get("log")
        # Core knows no plugin: the log sink comes from errands-sinks when it is installed.
        audit: Any = log_cls(path=log_path) if log_cls is not None else InMemorySink()
        try:
            n = ctx.size
            poison = f"shop/7/{max(1, n // 40)}"
            partner = InMemorySink(poison=[poison])
            # The routes and the reaction start at the end of the journal: this part relays its own events.
            fanout = FanOut(store, [
                Route("audit", audit, subjects=["order.**"], batch_size=500, start="end"),
                Route("partner", partner, subjects=["order.*"], batch_size=100, max_in_flight=4, start="end"),
            ])
            reacted: list[str] = []
            lock = threading.Lock()

            def on_shipped(event: Event) -> None:
                with lock:
                    reacted.append(event.id)

            @typed_handler
            def report(params: _Report) -> str:
                return f"{params.title}: {params.orders} orders"

            engine = TaskEngine(store, handlers={"report": report}, concurrency=4)
            reactor = Reactor(store, engine)
            reactor.on("order.shipped", on_shipped, max_concurrency=4, name="demo.shipped", start="end")
            fanout.status()
            reactor.submit_once()
            journal = Journal(store)
            progress = ctx.progress("domain events appended", n)
            for start in range(0, n, 500):
                journal.append_many([
                    NewEvent(f"shop/{i % 20}", "order.shipped" if i % 10 == 0 else "order.placed", {"order": i})
                    for i in range(start, min(n, start + 500))
                ])
                progress.update(min(500, n - start))
            progress.close()
            task_id = engine.submit("report", {"title": "daily", "orders": n})

            stop = threading.Event()
            worker = Worker(store, fanout=fanout, jobs=[reactor.run_once], poll_interval=0.01)
            thread = threading.Thread(target=worker.run, kwargs={"stop": stop}, daemon=True)
            progress = ctx.progress("events relayed", 2 * n)
            thread.start()
            shipped = (n + 9) // 10
            deadline = time.monotonic() + 120
            done = 0
            while time.monotonic() < deadline:
                status = {s.name: s for s in fanout.status()}
                now_done = 2 * n - status["audit"].behind - status["partner"].behind
                progress.update(now_done - done)
                done = now_done
                with lock:
                    reactions = len(reacted)
                task = engine.get(task_id)
                if done >= 2 * n and reactions >= shipped and task is not None and task.status is TaskStatus.SUCCEEDED:
                    break
                time.sleep(0.02)
            progress.close()
            parked = [d.event.id for d in fanout.dead("partner")]
            partner.accept(poison)
            fanout.redrive("partner")
            while fanout.dead("partner") and time.monotonic() < deadline:
                time.sleep(0.02)
            stop.set()
            thread.join()
            reactor.close()
            lines = 0
            distinct: set[str] = set()
            if log_cls is not None:
                import json

                with open(log_path, encoding="utf-8") as fh:
                    for line in fh:
                        lines += 1
                        distinct.add(json.loads(line)["id"])
            else:
                distinct = set(audit.ids)
                lines = len(audit.ids)
            task = engine.get(task_id)
            return {
                "events appended": n,
                "log sink": f"{lines} lines in audit.jsonl" if log_cls is not None
                else "errands-sinks not installed: in-memory sink",
                "distinct event ids logged": len(distinct),
                "partner events accepted": len(set(partner.ids)),
                "parked by partner": ", ".join(parked) or "none",
                "redriven and delivered": partner.ids.count(poison),
                "reactions run (order.shipped)": len(reacted),
                "task result": task.result if task is not None else None,
            }
        finally:
            store.close()
