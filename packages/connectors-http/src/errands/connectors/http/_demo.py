"""The ``http`` part of ``errands demo``: effects delivered through a faulty local HTTP counterparty."""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

from errands.core import Effect, Outbox, Worker, open_store

from ._connector import HttpConnector
from .testing import LedgerServer


class HttpDemo:
    """Effects dispatched by a worker to a local server that fails 10% of requests with 500 and drops the
    answer of another 5% after doing the work; every effect ends CONFIRMED, each performed once."""

    name: ClassVar[str] = "http connector"
    order: ClassVar[int] = 15

    def run(self, ctx: Any) -> dict[str, Any]:
        n = max(10, min(int(ctx.size), 500))
        store = open_store(ctx.store_url)
        try:
            with LedgerServer(error_rate=0.10, drop_rate=0.05, seed=1) as server:
                connector = HttpConnector(url=server.url("/effects"), timeout=10.0)
                outbox = Outbox(store, {"demo.ledger": connector}, backoff_base=0.01, backoff_cap=0.1,
                                max_attempts=25)
                # The store may hold other parts' effects: count only what this part confirms.
                already = outbox.stats()["effects"]["CONFIRMED"]
                outbox.submit_many([Effect(key=f"demo-http-{i}", connector="demo.ledger", payload={"i": i})
                                    for i in range(n)])
                worker = Worker(store, outbox=outbox, poll_interval=0.01)
                stop = threading.Event()
                thread = threading.Thread(target=worker.run, kwargs={"stop": stop}, daemon=True)
                thread.start()
                progress = ctx.progress("http dispatch", n)
                confirmed = 0
                deadline = time.monotonic() + 120
                try:
                    while confirmed < n and time.monotonic() < deadline:
                        time.sleep(0.05)
                        now = outbox.stats()["effects"]["CONFIRMED"] - already
                        progress.update(now - confirmed)
                        confirmed = now
                finally:
                    progress.close()
                    connector.close()
                    stop.set()
                    worker.wake()
                    thread.join(timeout=30)
                if confirmed < n:
                    raise RuntimeError(f"only {confirmed} of {n} effects confirmed within 120s")
                twice = sum(1 for count in server.performed.values() if count > 1)
                return {
                    "effects confirmed": confirmed,
                    "requests sent": sum(1 for r in server.requests if r.endpoint == "effects"),
                    "answered 500 (injected)": server.faults["error"],
                    "answers dropped (injected)": server.faults["drop"],
                    "keys performed twice": twice,
                }
        finally:
            store.close()
