"""The example in examples/fastapi-shop, run as it is deployed: the API under uvicorn, the payment provider
under uvicorn, and ``errands worker --app shop.app:app`` as a separate process, all on one SQLite file.

50 orders are placed concurrently over HTTP while the worker is SIGKILLed twice (and restarted each time),
and the provider loses some acknowledgements and refuses some charges. Afterwards every order was charged
exactly once (counted at the provider, and the charge the shop recorded is the provider's), every
fulfilment workflow succeeded, the report operation completed with every order counted, and the webhook
receiver got every ``order.placed``. The same runs on PostgreSQL (SQLAlchemy on psycopg 3), and a third
test runs the shop with the worker inside the API process (``SHOP_WORKER_IN_PROCESS=1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, AsyncIterator

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fastapi-shop"
ORDERS = 50
LEASE_FOR = 2.0  # how soon the work a killed worker held is taken up again


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _errands_cmd() -> list[str]:
    script = Path(sys.executable).parent / "errands"
    return [str(script)] if script.exists() else [sys.executable, "-m", "errands.core"]


class _Process:
    """A child process of the example, its output in a log file; ``kill()`` is SIGKILL."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.argv, self.env, self.logs = name, argv, env, logs
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.kills = 0

    def start(self) -> _Process:
        self._log = open(self.logs / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(self.argv, cwd=EXAMPLE, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} died early: {self.tail()}"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1
        self._close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, n: int = 4000) -> str:
        path = self.logs / f"{self.name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""


async def _until(check: Any, timeout: float, what: str, procs: list[_Process], every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        await asyncio.sleep(every)


class _Shop:
    """The running example: its processes and a client of the shop and of the payment provider."""

    def __init__(self, procs: list[_Process], shop: httpx.AsyncClient, bank: httpx.AsyncClient,
                 worker: _Process | None) -> None:
        self.procs, self.shop, self.bank, self.worker = procs, shop, bank, worker

    async def charged(self) -> int:
        return len((await self.bank.get("/charges")).json()["charges"])

    async def until(self, check: Any, timeout: float, what: str, every: float = 0.1) -> None:
        await _until(check, timeout, what, self.procs, every=every)


@contextlib.asynccontextmanager
async def _running_shop(tmp_path: Path, *, worker_in_process: bool,
                        database_url: str | None = None) -> AsyncIterator[_Shop]:
    api_port, provider_port = _free_port(), _free_port()
    api_url, provider_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{provider_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ERRANDS_", "SHOP_", "PROVIDER_"))}
    env.pop("PYTHONPATH", None)
    env.update({
        "SHOP_DATABASE_URL": database_url or f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}",
        "SHOP_PROVIDER_URL": provider_url,
        "SHOP_PUBLIC_URL": api_url,
        "SHOP_LEASE_FOR": str(LEASE_FOR),
        "SHOP_WORKER_IN_PROCESS": "1" if worker_in_process else "0",
        "PROVIDER_CHAOS": "0.2",  # 10% refused before charging, 10% charged with the answer lost
        "PROVIDER_SEED": "shop",
        "PYTHONUNBUFFERED": "1",
    })
    uvicorn = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLE), "--host", "127.0.0.1",
               "--log-level", "warning"]
    provider = _Process("provider", [*uvicorn, "--port", str(provider_port), "shop.provider:app"], env, tmp_path)
    api = _Process("api", [*uvicorn, "--port", str(api_port), "shop.app:api"], env, tmp_path)
    worker = None if worker_in_process else _Process(
        "worker", [*_errands_cmd(), "worker", "--app", "shop.app:app", "--poll-interval", "0.02"], env, tmp_path)
    procs = [provider, api] + ([worker] if worker else [])
    try:
        provider.start()
        api.start()
        async with httpx.AsyncClient(base_url=api_url, timeout=30) as shop, \
                httpx.AsyncClient(base_url=provider_url, timeout=30) as bank:
            running = _Shop(procs, shop, bank, worker)

            async def up() -> bool:
                return (await shop.get("/healthz")).status_code == 200 and \
                    (await bank.get("/charges")).status_code == 200

            await running.until(up, 30, "the API and the provider to start")
            if worker is not None:
                worker.start()  # after the API created the shop's tables
            yield running
    finally:
        for p in reversed(procs):
            p.stop()


async def _place_orders(shop: _Shop, n: int, *, concurrency: int, pause: float) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(concurrency)

    async def place(i: int) -> dict[str, Any]:
        async with gate:
            r = await shop.shop.post("/orders", json={
                "customer": f"customer-{i}",
                "items": [{"sku": "tea", "quantity": 1 + i % 3, "price_cents": 450},
                          {"sku": "cup", "quantity": 1, "price_cents": 1200 + i}]})
            assert r.status_code == 201, r.text
            await asyncio.sleep(pause)
            return dict(r.json())

    placed = await asyncio.gather(*(place(i) for i in range(n)))
    assert len({o["id"] for o in placed}) == n
    return placed


async def _settled(shop: _Shop, placed: list[dict[str, Any]], report: dict[str, Any]) -> None:
    """Wait until everything that follows from the orders and the report has happened, then check it."""
    ids = {o["id"] for o in placed}
    n = len(placed)

    async def all_done() -> bool:
        if await shop.charged() < n:
            return False
        if (await shop.shop.get("/webhooks/orders")).json()["events"] < n:
            return False
        if not (await shop.shop.get(f"/{report['name']}")).json().get("done"):
            return False
        states = await asyncio.gather(*(shop.shop.get(f"/orders/{i}") for i in ids))
        return all(s.json()["payment"]["status"] == "CONFIRMED"
                   and s.json()["fulfilment"]["status"] == "SUCCEEDED" for s in states)

    await shop.until(all_done, 45, "every order charged and fulfilled, the report and the webhooks", every=0.25)

    # Charged exactly once each, at the provider, and the shop recorded the provider's charge.
    book = (await shop.bank.get("/charges")).json()
    print("provider:", {k: v for k, v in book.items() if k != "charges"})
    charges = book["charges"]
    assert len(charges) == n
    assert sorted(c["order_id"] for c in charges) == sorted(ids)
    by_order = {c["order_id"]: c for c in charges}
    for o in placed:
        state = (await shop.shop.get(f"/orders/{o['id']}")).json()
        charge = by_order[o["id"]]
        assert charge["key"] == f"charge-{o['id']}"
        assert charge["amount_cents"] == o["amount_cents"] == state["amount_cents"]
        assert state["payment"]["charge"] == charge["id"], state
        assert state["fulfilment"]["status"] == "SUCCEEDED", state
        assert state["fulfilment"]["result"]["tracking"].startswith("trk_"), state
    assert book["requests"] >= n  # the redeliveries the idempotency key absorbed are on top

    # The report: a finished google.longrunning.Operation with every order counted.
    op = (await shop.shop.get(f"/{report['name']}")).json()
    assert op["name"] == report["name"] and op["done"] is True and "error" not in op, op
    assert op["metadata"]["value"]["state"] == "DONE", op
    assert op["response"]["value"] == {"orders": n, "revenue_cents": sum(o["amount_cents"] for o in placed)}, op
    assert (await shop.shop.get("/operations/does-not-exist")).status_code == 404

    # Every order.placed reached the webhook receiver (at least once; deduplicated on webhook-id).
    hooks = (await shop.shop.get("/webhooks/orders")).json()
    assert hooks["events"] == n and hooks["order_ids"] == sorted(ids), hooks
    assert hooks["deliveries"] >= n


async def _kill_twice(shop: _Shop, worker: _Process) -> None:
    """SIGKILL the worker twice, restarting it each time. Each kill comes once the worker running then has
    charged a few orders: mid-work, with orders still arriving."""
    for _ in range(2):
        at = await shop.charged() + 5
        await shop.until(lambda at=at: _at_least(shop.charged, at), 40, f"{at} charges", every=0.01)
        print(f"SIGKILL the worker at {await shop.charged()} charges")
        worker.kill()
        worker.start()


async def _start_report(shop: _Shop) -> dict[str, Any]:
    report = dict((await shop.shop.post("/reports", json={"kind": "sales"})).json())
    assert report["name"].startswith("operations/") and not report["done"], report
    return report


@pytest.mark.crash
@pytest.mark.timeout(150)
def test_fifty_orders_survive_two_worker_kills(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _running_shop(tmp_path, worker_in_process=False) as shop:
            worker = shop.worker
            assert worker is not None

            killer = asyncio.create_task(_kill_twice(shop, worker))
            # 4 at a time with a pause: the orders arrive over about 3 s, across the kills.
            placed = await _place_orders(shop, ORDERS, concurrency=4, pause=0.2)
            report = await _start_report(shop)  # after the last order: the report must count every one
            await killer
            assert worker.kills == 2
            await _settled(shop, placed, report)

    asyncio.run(scenario())


@pytest.mark.timeout(120)
def test_worker_in_the_api_process(tmp_path: Path) -> None:
    """``SHOP_WORKER_IN_PROCESS=1``: no ``errands worker``; the API's lifespan runs the worker on its loop."""
    async def scenario() -> None:
        async with _running_shop(tmp_path, worker_in_process=True) as shop:
            placed = await _place_orders(shop, 20, concurrency=10, pause=0.0)
            report = await _start_report(shop)
            await _settled(shop, placed, report)

    asyncio.run(scenario())


@pytest.mark.crash
@pytest.mark.services
@pytest.mark.timeout(150)
def test_fifty_orders_survive_two_worker_kills_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    """The same shop on PostgreSQL: SQLAlchemy on psycopg 3's async connections, errands joining them."""
    database_url = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)

    async def scenario() -> None:
        async with _running_shop(tmp_path, worker_in_process=False, database_url=database_url) as shop:
            worker = shop.worker
            assert worker is not None
            killer = asyncio.create_task(_kill_twice(shop, worker))
            placed = await _place_orders(shop, ORDERS, concurrency=4, pause=0.2)
            report = await _start_report(shop)
            await killer
            assert worker.kills == 2
            await _settled(shop, placed, report)

    asyncio.run(scenario())


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count() >= n)
