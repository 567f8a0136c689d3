"""The durable part of ``errands demo``."""

from __future__ import annotations

from typing import Any, ClassVar

from ._context import DurableContext
from ._runner import DurableRunner
from ._values import Duration, MapConfig


def _order(event: Any, ctx: DurableContext) -> dict[str, Any]:
    reserved = ctx.step("reserve", lambda _: {"order": event["order"], "reserved": True})
    charged = ctx.step("charge", lambda _: event["order"] * 10)
    shipped = ctx.step("ship", lambda _: f"parcel-{event['order']}")
    return {"reserved": reserved["reserved"], "charged": charged, "parcel": shipped}


def _fan_out(event: Any, ctx: DurableContext) -> dict[str, Any]:
    doubled = ctx.map("double", event["items"], lambda c, item, i, items: item * 2,
                      config=MapConfig(max_concurrency=4))
    return {"success": doubled.success_count, "total": doubled.total_count, "values": doubled.results()}


def _approval(event: Any, ctx: DurableContext) -> str:
    ctx.wait("cooldown", Duration(seconds=0.05))
    answer = ctx.wait_for_callback("approval", lambda callback_id, _s: None)
    return f"approved by {answer}"


class DurableDemo:
    """Durable functions: three-step orders, a map, a timer and a callback, all through checkpoints."""

    name: ClassVar[str] = "durable"
    order: ClassVar[int] = 70

    def run(self, ctx: Any) -> dict[str, Any]:
        runner = DurableRunner(ctx.store_url, functions={"order": _order, "fan-out": _fan_out,
                                                         "approval": _approval})
        try:
            n = max(ctx.size // 10, 10)
            progress = ctx.progress("3-step workflows", n)
            ok = 0
            for i in range(n):
                if runner.run("order", {"order": i}).status.value == "SUCCEEDED":
                    ok += 1
                progress.update()
            progress.close()
            fan = runner.run("fan-out", {"items": list(range(20))})
            approval = runner.start("approval", {})
            runner.drain()
            import time

            callback_id = None
            for _ in range(200):
                runner.drain()
                ops = [o for o in runner.history(approval) if o.callback_id]
                if ops:
                    callback_id = ops[0].callback_id
                    break
                time.sleep(0.01)
            if callback_id is not None:
                runner.complete_callback(callback_id, "ops")
            final = runner.wait(approval, timeout=30)
            return {
                "workflows succeeded": f"{ok}/{n}",
                "map values": len(fan.result["values"]) if fan.result else 0,
                "callback execution": f"{final.status.value}: {final.result}",
                "executions stored": len(runner.list(limit=100_000)),
            }
        finally:
            runner.close()
