"""The shop: one module for the API process and its worker.

    uvicorn shop.app:api --port 8000              # the API
    errands worker --app shop.app:app             # the worker: payments, fulfilment, reports, webhooks

or, with ``SHOP_WORKER_IN_PROCESS=1``, the API process alone, running the worker on its event loop.

``app`` is the ``errands.App``: the API process submits effects, appends events and starts workflows
through it, inside the request's own SQLAlchemy transaction; the worker builds the payment connector and
the webhook sink and runs every engine. ``api`` is the FastAPI application.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any, AsyncIterator

import errands.core
from errands.core import Effect, Journal, NotFoundError
from errands.durable import DurableRunner
from errands.lro import Config, LroClient, ResumableHandler
from errands.sinks import WebhookSink, WebhookVerificationError, verify_webhook
from fastapi import FastAPI, HTTPException, Request, Response
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, Field
from sqlalchemy import select

from . import settings
from .db import Base, Order, Session, WebhookDelivery, engine
from .fulfilment import fulfil
from .payments import PaymentConnector
from .reports import HANDLER, build_report

# -- errands: the same wiring in both processes; only the worker builds connectors and sinks --------------
app = errands.App(
    settings.STORE_URL,
    connectors={"payments": lambda: PaymentConnector(settings.PROVIDER_URL)},
    outbox_options={"lease_for": settings.LEASE_FOR},
    worker_in_process=settings.WORKER_IN_PROCESS,  # the lifespan runs the worker on the API's loop
)
app.route("order-webhooks", lambda: WebhookSink(url=f"{settings.PUBLIC_URL}/webhooks/orders",
                                                secret=settings.WEBHOOK_SECRET),
          subjects=["order.placed"])
journal = Journal(app.store)
runner = app.attach(DurableRunner(app.store, functions={"fulfil": fulfil}, lease_for=settings.LEASE_FOR))
reports = app.attach(LroClient(Config(neuron="shop", store=app.store, lease_for=settings.LEASE_FOR)))
reports.add_resumable_handlers(ResumableHandler(HANDLER, build_report))


# -- the API --------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def lifespan(api: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    try:
        # Opens (and migrates) the errands store, and with SHOP_WORKER_IN_PROCESS=1 starts the worker; at
        # shutdown it stops the worker and closes the store.
        async with app.lifespan(api):
            # Build the outbox now: building it migrates its tables, which must not wait for the write lock
            # a request's transaction holds on SQLite.
            await asyncio.to_thread(lambda: app.outbox)
            yield
    finally:
        await engine.dispose()


api = FastAPI(title="errands shop", lifespan=lifespan)


class Item(BaseModel):
    sku: str
    quantity: int = Field(gt=0)
    price_cents: int = Field(ge=0)


class OrderIn(BaseModel):
    customer: str
    items: list[Item] = Field(min_length=1)
    currency: str = Field(default="EUR", min_length=3, max_length=3)


def charge_key(order_id: str) -> str:
    return f"charge-{order_id}"


def fulfilment_id(order_id: str) -> str:
    return f"fulfil-{order_id}"


@api.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@api.post("/orders", status_code=201)
async def place_order(body: OrderIn) -> dict[str, Any]:
    """Write the order, submit its charge, journal ``order.placed`` and start its fulfilment: one
    transaction. If any part fails, none of it happened; once it commits, all of it will."""
    order_id = uuid.uuid4().hex
    amount = sum(i.quantity * i.price_cents for i in body.items)
    items = [i.model_dump() for i in body.items]
    async with Session() as session, session.begin():
        session.add(Order(id=order_id, customer=body.customer, amount_cents=amount, currency=body.currency))
        await session.flush()
        await app.outbox.submit_async(Effect(
            key=charge_key(order_id), connector="payments", business_key=order_id,
            payload={"order_id": order_id, "amount_cents": amount, "currency": body.currency}), conn=session)
        await journal.append_async(f"orders/{order_id}", "order.placed",
                                   {"order_id": order_id, "customer": body.customer, "amount_cents": amount,
                                    "currency": body.currency, "items": items}, conn=session)
        await runner.start_async("fulfil", {"order_id": order_id, "items": items},
                                 execution_id=fulfilment_id(order_id), conn=session)
    if app.running_worker is not None:  # the worker runs in this process: its next pass starts now
        app.running_worker.wake()
    return {"id": order_id, "amount_cents": amount, "currency": body.currency}


@api.get("/orders/{order_id}")
async def get_order(order_id: str) -> dict[str, Any]:
    async with Session() as session:
        order = await session.get(Order, order_id)
    if order is None:
        raise HTTPException(404, f"no order {order_id}")
    payment = await app.store.run_async(app.outbox.get, charge_key(order_id))
    workflow = await runner.get_async(fulfilment_id(order_id))
    return {
        "id": order.id, "customer": order.customer, "amount_cents": order.amount_cents, "currency": order.currency,
        "payment": {"status": str(payment.status), "charge": payment.external_ref, "attempts": payment.attempts},
        "fulfilment": {"status": str(workflow.status), "result": workflow.result},
    }


class ReportIn(BaseModel):
    kind: str = "sales"


def _operation_json(op: Any) -> dict[str, Any]:
    """The operation in the JSON shape of ``google.longrunning.Operation``: name, done, metadata and, once
    done, response or error (``Any`` fields carry their ``@type``)."""
    out = MessageToDict(op.operation_pb())
    out.setdefault("done", False)
    return out


@api.post("/reports", status_code=202)
async def start_report(body: ReportIn) -> dict[str, Any]:
    op = await reports.new_operation_async(metadata={"state": "QUEUED", "kind": body.kind, "progress": 0},
                                           private_state={"stage": 0})
    await op.resume_via_tasks_async(HANDLER)
    return _operation_json(op)


@api.get("/operations/{operation_id}")
async def get_operation(operation_id: str) -> dict[str, Any]:
    try:
        op = await reports.get_operation_async(f"operations/{operation_id}")
    except NotFoundError:
        raise HTTPException(404, f"no operation operations/{operation_id}") from None
    return _operation_json(op)


# -- the receiver of the order webhooks (a partner's endpoint, here in the same app) ------------------------
@api.post("/webhooks/orders", status_code=204)
async def receive_order_webhook(request: Request) -> Response:
    body = await request.body()
    try:
        event = verify_webhook(request.headers, body, [settings.WEBHOOK_SECRET])
    except WebhookVerificationError as exc:
        raise HTTPException(401, str(exc)) from None
    event_id = request.headers["webhook-id"]  # the event's stable id: deliveries are at least once
    async with Session() as session, session.begin():
        seen = await session.get(WebhookDelivery, event_id)
        if seen is not None:
            seen.deliveries += 1
        else:
            session.add(WebhookDelivery(event_id=event_id, type=event["type"],
                                        order_id=(event.get("data") or {}).get("order_id")))
    return Response(status_code=204)


@api.get("/webhooks/orders")
async def received_order_webhooks() -> dict[str, Any]:
    async with Session() as session:
        rows = (await session.execute(select(WebhookDelivery))).scalars().all()
    return {"events": len(rows), "deliveries": sum(r.deliveries for r in rows),
            "order_ids": sorted(r.order_id for r in rows if r.order_id)}
