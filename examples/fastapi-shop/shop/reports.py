"""The sales report: a long-running operation (``google.longrunning.Operation``) built by the worker.

``POST /reports`` creates the operation and schedules its first resume; the worker's lro engine runs
``build_report`` in two resumes (count the orders, then publish the report), saving progress in the
operation's metadata in between, which ``GET /operations/{id}`` shows while a client polls.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from sqlalchemy import Engine, create_engine, func, select

from . import settings
from .db import Order

HANDLER = "build-report"


@functools.lru_cache(maxsize=1)
def _reporting_engine() -> Engine:
    """A synchronous engine for the worker's threads (the API's async engine belongs to its event loop)."""
    return create_engine(settings.sync_database_url(settings.DATABASE_URL))


def _order_totals() -> dict[str, int]:
    with _reporting_engine().connect() as conn:
        count, revenue = conn.execute(select(func.count(Order.id), func.coalesce(func.sum(Order.amount_cents), 0))).one()
    return {"orders": int(count), "revenue_cents": int(revenue)}


async def build_report(op: Any) -> None:
    state = op.decode_private_state(dict) or {}
    if state.get("stage", 0) == 0:
        totals = await asyncio.to_thread(_order_totals)
        op.set_private_state({"stage": 1, **totals})
        op.set_metadata({"state": "RUNNING", "progress": 50, "orders_counted": totals["orders"]})
        await op.resume_via_tasks_async(HANDLER)          # saves the state and the metadata with the timer
        return
    op.set_metadata({"state": "DONE", "progress": 100, "orders_counted": state["orders"]})
    await op.complete_async({"orders": state["orders"], "revenue_cents": state["revenue_cents"]})
