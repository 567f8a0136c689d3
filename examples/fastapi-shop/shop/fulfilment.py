"""The fulfilment workflow: a durable function with ``async def`` steps.

Each step's result is checkpointed before the next starts; a worker killed mid-way replays the function
from its checkpoints, so no finished step runs again. The label and the invoice are made concurrently
(``asyncio.gather`` over two steps).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any


def _ref(prefix: str, order_id: str) -> str:
    return f"{prefix}_{hashlib.blake2b(order_id.encode(), digest_size=6).hexdigest()}"


async def fulfil(order: dict[str, Any], ctx: Any) -> dict[str, Any]:
    order_id = order["order_id"]

    async def reserve_stock(step: Any) -> dict[str, Any]:
        await asyncio.sleep(0.01)  # the warehouse's API, say
        return {"reservation": _ref("rsv", order_id), "items": order["items"]}

    async def print_label(step: Any) -> str:
        await asyncio.sleep(0.01)
        return _ref("lbl", order_id)

    async def make_invoice(step: Any) -> str:
        await asyncio.sleep(0.01)
        return _ref("inv", order_id)

    reservation = await ctx.step("reserve-stock", reserve_stock)
    label, invoice = await asyncio.gather(ctx.step("print-label", print_label),
                                          ctx.step("make-invoice", make_invoice))

    async def hand_to_carrier(step: Any) -> str:
        await asyncio.sleep(0.01)
        return _ref("trk", f"{order_id}/{label}")

    tracking = await ctx.step("hand-to-carrier", hand_to_carrier)
    return {"order_id": order_id, "reservation": reservation["reservation"], "label": label,
            "invoice": invoice, "tracking": tracking}
