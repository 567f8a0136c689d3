"""The ``payments`` connector: charges an order at the payment provider, exactly once in effect.

The effect key is the provider's ``Idempotency-Key``, so a repeated delivery (a worker killed after the
provider charged but before the outbox recorded it) charges nothing twice. An answer that leaves the charge
in doubt (a timeout, a 502) is ``UNKNOWN``: the outbox then asks ``observe`` before any retry.
"""

from __future__ import annotations

import asyncio

import httpx
from errands.core import (
    ConnectorCapabilities,
    DispatchOutcome,
    DispatchResult,
    Effect,
    Observation,
    ObservationOutcome,
    Semantics,
    TransientError,
)


class PaymentConnector:
    name = "payments"
    capabilities = ConnectorCapabilities(can_observe=True, default_semantics=Semantics.IDEMPOTENT)

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _http(self) -> httpx.AsyncClient:
        # The worker calls async connectors on its own event loop; a client belongs to the loop it was made on.
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client, self._loop = httpx.AsyncClient(timeout=self.timeout), loop
        return self._client

    async def dispatch(self, effect: Effect) -> DispatchResult:
        try:
            response = await self._http().post(f"{self.url}/charges", json=effect.payload,
                                               headers={"Idempotency-Key": effect.key})
        except httpx.ConnectError as exc:  # the request never left: nothing was charged
            raise TransientError(f"payment provider unreachable: {exc}") from exc
        except httpx.HTTPError as exc:  # it may have been charged
            return DispatchResult(DispatchOutcome.UNKNOWN, error=f"{type(exc).__name__}: {exc}")
        if response.is_success:
            charge = response.json()
            return DispatchResult(DispatchOutcome.CONFIRMED, response=charge, external_ref=charge["id"])
        if response.status_code == 503:  # refused before charging
            raise TransientError("payment provider busy", retry_after=_retry_after(response))
        if response.status_code >= 500 or response.status_code in (408, 429):
            return DispatchResult(DispatchOutcome.UNKNOWN, error=f"HTTP {response.status_code}")
        return DispatchResult(DispatchOutcome.FAILED, error=f"HTTP {response.status_code}: {response.text[:200]}")

    async def observe(self, effect: Effect) -> Observation:
        try:
            response = await self._http().get(f"{self.url}/charges/{effect.key}")
        except httpx.HTTPError:
            return Observation(ObservationOutcome.UNKNOWN)
        if response.status_code == 404:
            return Observation(ObservationOutcome.ABSENT)
        if response.is_success:
            charge = response.json()
            return Observation(ObservationOutcome.CONFIRMED, response=charge, external_ref=charge["id"])
        return Observation(ObservationOutcome.UNKNOWN)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
