"""The lro part of ``errands demo``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

from ._client import LroClient
from ._config import Config
from ._operation import Operation, unmarshal_metadata
from ._resume import ResumableHandler


@dataclass
class _Progress:
    step: int = 0


class LroDemo:
    """Operations created, resumed twice by the local scheduler, then completed; one cancelled."""

    name: ClassVar[str] = "lro"
    order: ClassVar[int] = 40

    def run(self, ctx: Any) -> dict[str, Any]:
        n = max(1, min(ctx.size, 500))
        with LroClient(Config(neuron="demo", store=ctx.store_url, resume_batch=50)) as client:

            def build(op: Operation) -> None:
                state = op.decode_private_state(_Progress) or _Progress()
                meta = unmarshal_metadata(op, dict) or {}
                state.step += 1
                if state.step < 3:
                    op.set_metadata({**meta, "step": state.step}).set_private_state(state)
                    op.resume_via_tasks("build", delay=timedelta(0))
                else:
                    op.complete({"built": op.name, "steps": state.step})

            client.add_resumable_handlers(ResumableHandler("build", build))
            progress = ctx.progress("operations", n)
            for i in range(n):
                op = client.new_operation(f"operations/demo-{i}", {"step": 0}, private_state=_Progress())
                op.resume_via_tasks("build")
            cancelled = client.new_operation("operations/demo-cancelled", {"step": 0})
            client.cancel_operation(cancelled.name)
            passes = 0
            while True:
                fired = client.run_due(limit=200)
                passes += 1
                progress.update(0)
                if fired == 0:
                    break
            done, _ = client.list_operations('done = true AND name = "operations/demo-*"', page_size=1000)
            progress.update(n)
            progress.close()
            ok = sum(1 for pb in done if not pb.HasField("error"))
            return {
                "operations completed": ok,
                "operations cancelled": sum(1 for pb in done if pb.error.code == 1),
                "scheduler passes": passes,
            }
