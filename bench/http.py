"""HTTP dispatch: effects through the outbox and ``HttpConnector`` beside raw httpx, against one local server.

The server is uvicorn in its own process: an ASGI app that deduplicates on ``Idempotency-Key`` (a dict of
keys it has performed) and answers ``201`` with a small JSON body after ``--latency`` seconds (the
counterparty's own service time; 0 by default).

- ``raw httpx``: one ``httpx.Client`` shared by ``--concurrency`` threads POSTing the same JSON bodies with an
  ``Idempotency-Key`` header. No durability: nothing is recorded anywhere.
- ``errands outbox``: ``outbox.submit_many`` (batches of 500) into a fresh SQLite file (WAL,
  the store's default ``synchronous=FULL``), then a ``Worker`` draining it with ``max_in_flight=--concurrency`` through an
  ``HttpConnector``: every effect leased, POSTed, recorded CONFIRMED and journalled. Submitting is timed too.

Each side runs ``--rounds`` times, alternating, against the same server; the best round of each is compared
(the least disturbed by the other processes on the machine). The ratio is errands throughput / raw
throughput.

Run: ``hatch run bench:http`` (options: ``--effects``, ``--concurrency``, ``--latency``, ``--rounds``).
"""

from __future__ import annotations

import os
import sys

# This file is named like the standard library's ``http`` package, which httpx imports: run as a script,
# its own folder must not shadow it.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import argparse
import asyncio
import json
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import httpx
from errands.connectors.http import HttpConnector
from errands.core import Effect, EffectStatus, Outbox, Worker, open_store


# -- the server (run in a child process) ------------------------------------------------------------
def make_app(latency: float) -> Callable[..., Awaitable[None]]:
    performed: dict[str, int] = {}

    async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                  send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/stats":
            status, answer = 200, {"performed": len(performed), "duplicates": sum(performed.values()) - len(performed)}
        else:
            key = dict(scope["headers"]).get(b"idempotency-key", b"").decode()
            if latency:
                await asyncio.sleep(latency)
            if key in performed:
                status, answer = 200, {"id": key, "replayed": True}
            else:
                performed[key] = 1
                json.loads(body)
                status, answer = 201, {"id": key, "replayed": False}
        data = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    return app


def serve(port: int, latency: float) -> None:
    import uvicorn

    uvicorn.run(make_app(latency), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                backlog=2048)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server on port {port} did not start")


# -- the two clients --------------------------------------------------------------------------------
def payload(i: int) -> dict[str, Any]:
    return {"order": i, "amount_cents": 1000 + i, "currency": "EUR", "note": "bench"}


def raw_httpx(url: str, n: int, concurrency: int, tag: str) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(limits=limits, timeout=30.0) as client:
        def post(i: int) -> int:
            response = client.post(url, content=json.dumps(payload(i), separators=(",", ":")).encode(),
                                   headers={"Idempotency-Key": f"{tag}-{i}", "Content-Type": "application/json"})
            return response.status_code

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            statuses = list(pool.map(post, range(n)))
        elapsed = time.perf_counter() - started
    assert all(s == 201 for s in statuses), sorted(set(statuses))
    return elapsed


def errands_outbox(url: str, n: int, concurrency: int, tag: str, tmp: str) -> float:
    store = open_store(f"sqlite:///{os.path.join(tmp, tag + '.db')}")
    connector = HttpConnector(url=url, timeout=30.0, max_connections=concurrency)
    outbox = Outbox(store, {"bench": connector}, batch_size=500)
    worker = Worker(store, outbox=outbox, max_in_flight=concurrency)
    effects = [Effect(key=f"{tag}-{i}", connector="bench", payload=payload(i)) for i in range(n)]
    started = time.perf_counter()
    for i in range(0, n, 500):
        outbox.submit_many(effects[i:i + 500])
    worker.drain()
    elapsed = time.perf_counter() - started
    stats = outbox.stats()
    assert stats["effects"][EffectStatus.CONFIRMED.value] == n, stats
    worker.runner.close()
    outbox.close()
    connector.close()
    store.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--effects", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.0, help="server service time per request, seconds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.latency)
        return
    n, c = args.effects, args.concurrency
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--latency", str(args.latency)])
    try:
        wait_for(port)
        url = f"http://127.0.0.1:{port}/effects"
        raw_httpx(url, 200, c, "warmup")
        raw: list[float] = []
        ours: list[float] = []
        with tempfile.TemporaryDirectory(prefix="errands-bench-http-") as tmp:
            for r in range(args.rounds):
                raw.append(raw_httpx(url, n, c, f"raw{r}"))
                ours.append(errands_outbox(url, n, c, f"outbox{r}", tmp))
        stats = httpx.get(f"http://127.0.0.1:{port}/stats").json()
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert stats["duplicates"] == 0, stats
    best_raw, best_ours = min(raw), min(ours)
    ratio = best_raw / best_ours
    print(f"{n} POSTs to a local uvicorn server (deduplicating on Idempotency-Key, {args.latency * 1000:g} ms "
          f"service time), concurrency {c}, best of {args.rounds}\n")
    print(f"| {'client':<54} | {'seconds':>8} | {'requests/s':>10} | {'vs raw':>7} |")
    print(f"|{'-' * 56}|{'-' * 10}|{'-' * 12}|{'-' * 9}|")
    print(f"| {'raw httpx (threads, one pooled Client, no durability)':<54} | {best_raw:>8.2f} | "
          f"{n / best_raw:>10.0f} | {1.0:>6.2f}x |")
    print(f"| {'errands outbox + HttpConnector (SQLite, Worker)':<54} | {best_ours:>8.2f} | "
          f"{n / best_ours:>10.0f} | {ratio:>6.2f}x |")
    print(f"\nrounds (s): raw {', '.join(f'{x:.2f}' for x in raw)}; outbox {', '.join(f'{x:.2f}' for x in ours)}; "
          f"server saw {stats['performed']} keys, {stats['duplicates']} duplicates")
    print(f"http dispatch vs raw httpx: {ratio:.2f} (goal >= 0.7)")


if __name__ == "__main__":
    main()
