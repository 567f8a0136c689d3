"""A fake payment provider: ``uvicorn shop.provider:app --port 8001``.

It charges idempotently by the ``Idempotency-Key`` header, as real providers do: a second request with a key
already charged answers the first charge again and charges nothing. It counts what it saw, so a test can
check that every order was charged exactly once however often the shop's worker asked.

``PROVIDER_CHAOS=0.1`` makes it misbehave on that share of charge requests: half of them fail with 503
before charging, half charge and then answer 502 (the acknowledgement is lost; the shop must find out).
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Response
from pydantic import BaseModel

app = FastAPI(title="fake payment provider")

CHAOS = float(os.environ.get("PROVIDER_CHAOS", "0"))
_random = random.Random(os.environ.get("PROVIDER_SEED", "7"))
_lock = asyncio.Lock()
_charges: dict[str, dict[str, Any]] = {}
_stats = {"requests": 0, "replays": 0, "refused": 0, "lost_acks": 0}


class ChargeRequest(BaseModel):
    order_id: str
    amount_cents: int
    currency: str = "EUR"


@app.post("/charges", status_code=201)
async def charge(body: ChargeRequest, response: Response,
                 idempotency_key: str = Header(..., alias="Idempotency-Key")) -> dict[str, Any]:
    async with _lock:
        _stats["requests"] += 1
        if idempotency_key in _charges:
            _stats["replays"] += 1
            response.status_code = 200
            return _charges[idempotency_key]
        roll = _random.random()
        if roll < CHAOS / 2:
            _stats["refused"] += 1
            raise HTTPException(503, "try again later")
        _charges[idempotency_key] = {"id": f"ch_{uuid.uuid4().hex[:16]}", "key": idempotency_key,
                                     "order_id": body.order_id, "amount_cents": body.amount_cents,
                                     "currency": body.currency}
        if roll < CHAOS:
            _stats["lost_acks"] += 1
            raise HTTPException(502, "bad gateway")  # charged, but the caller never hears it
        return _charges[idempotency_key]


@app.get("/charges/{key}")
async def get_charge(key: str) -> dict[str, Any]:
    found = _charges.get(key)
    if found is None:
        raise HTTPException(404, "no such charge")
    return found


@app.get("/charges")
async def list_charges() -> dict[str, Any]:
    return {"charges": list(_charges.values()), **_stats}
