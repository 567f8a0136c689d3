"""The outbox part of ``errands demo``."""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

from ._values import CompensationOutcome, Effect, EffectStatus, Obligation, Semantics
from ._worker import Worker
from .outbox import Outbox
from .store._stores import open_store


class OutboxDemo:
    """Effects submitted in batches, dispatched by a worker through a flaky counterparty (lost acknowledgements
    observed, a real duplicate compensated), a human-gated payment approved, and a saga rolled back."""

    name: ClassVar[str] = "outbox"
    order: ClassVar[int] = 10

    def run(self, ctx: Any) -> dict[str, Any]:
        from .testing._fakes import ChaosConnector, FakeConnector

        store = open_store(ctx.store_url)
        bank = FakeConnector("bank")
        flaky = ChaosConnector(bank, seed=7, lose_ack=0.05, fail=0.05)
        # A transport that retries on its own and loses the answer: the counterparty gets the payment twice.
        doubled = ChaosConnector(bank, seed=7, duplicate=1.0, lose_ack=1.0)
        outbox = Outbox(store, connectors={"bank": flaky, "bank-retrying": doubled}, backoff_base=0.01,
                        backoff_cap=0.05, batch_size=200, seed=7)
        refunds: list[Obligation] = []

        @outbox.compensator("refund")
        def refund(obligation: Obligation) -> CompensationOutcome:
            refunds.append(obligation)
            return CompensationOutcome.COMPENSATED

        try:
            n = ctx.size
            progress = ctx.progress("effects submitted", n)
            for start in range(0, n, 250):
                batch = [Effect(key=f"demo-pay-{i}", connector="bank", tool="transfer", payload={"cents": 100 + i})
                         for i in range(start, min(n, start + 250))]
                outbox.submit_many(batch)
                progress.update(len(batch))
            progress.close()
            outbox.submit(Effect(key="demo-big-payment", connector="bank", tool="transfer",
                                 payload={"cents": 1_000_000}, human_gate=True))
            outbox.submit(Effect(key="demo-duplicated", connector="bank-retrying", tool="transfer",
                                 payload={"cents": 42}, semantics=Semantics.NON_IDEMPOTENT))
            for i, step in enumerate(("reserve", "charge", "ship")):
                key = f"demo-saga-{step}"
                outbox.submit(Effect(key=key, connector="bank", tool=step, payload={"step": i}, run_id="demo-saga"))
                outbox.register_compensation(key, "refund", {"undo": step})

            stop = threading.Event()
            worker = Worker(store, outbox=outbox, poll_interval=0.01, max_in_flight=8)
            thread = threading.Thread(target=worker.run, kwargs={"stop": stop}, daemon=True)
            progress = ctx.progress("effects confirmed", n + 4)
            thread.start()
            confirmed = 0
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                stats = outbox.stats()
                now_confirmed = stats["effects"]["CONFIRMED"]
                progress.update(now_confirmed - confirmed)
                confirmed = now_confirmed
                if confirmed >= n + 4 and not stats["due"]:
                    break
                time.sleep(0.05)
            progress.close()
            approved = outbox.approve("demo-big-payment", by="demo operator")
            outbox.compensate_run("demo-saga")
            while time.monotonic() < deadline:
                stats = outbox.stats()
                if (outbox.get("demo-big-payment").status is EffectStatus.CONFIRMED
                        and stats["obligations"]["COMPENSATED"] >= 4 and not stats["due"]):
                    break
                time.sleep(0.05)
            stop.set()
            worker.wake()
            thread.join(timeout=10)
            stats = outbox.stats()
            return {
                "effects submitted": n + 5,
                "effects confirmed": stats["effects"]["CONFIRMED"],
                "lost acks observed": flaky.faults["lose_ack"],
                "transient failures retried": flaky.faults["fail"],
                "duplicates observed and compensated": len(bank.compensated),
                "human-gated payment": f"{approved.status.value.lower()} -> "
                                       f"{outbox.get('demo-big-payment').status.value.lower()}",
                "saga refunds (LIFO)": " ".join(o.payload["undo"] for o in refunds),
                "flagged": stats["flagged"],
            }
        finally:
            outbox.close()
            store.close()
