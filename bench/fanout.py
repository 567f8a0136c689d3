"""Fan-out throughput: a route relaying the journal to a file ``LogSink`` and to a ``WebhookSink``, beside
raw loops doing the same work, measured in the same run.

- ``log``: 100,000 events over 20 streams in a SQLite file (WAL, the store's default ``synchronous=FULL``).
  errands relays them with ``FanOut`` + ``LogSink`` (batches of 1,000, the cursor committed per window of
  acknowledged batches). The raw loop reads the
  same rows with ``sqlite3`` in pages of 1,000 and writes the same CloudEvents JSON lines; the two files
  are checked to be byte-identical.
- ``webhook``: events POSTed to a local uvicorn server (in its own process) at the same concurrency:
  errands with ``WebhookSink`` (signed, Standard Webhooks) on a route with ``max_in_flight`` lanes; raw
  with that many threads, each an ``httpx.Client`` posting the same bodies.

- ``reactions``: 20,000 events over 100 customers in a SQLite file, each the input of two reactions run
  to completion by a ``Reactor`` with an 8-slot ``TaskEngine``: once with a CEL ``predicate``
  (``data.total >= 0 && type == 'order.placed'``, true for every event, so both runs do the same tasks) and a
  ``key`` (``data.customer``: each customer's tasks one at a time, in journal order), once plain (neither).
  Each run starts from a copy of the same file. The ratio is plain time / keyed time.

Ratios are errands throughput / raw throughput (higher is better; 1.0 = as fast as raw).

Run: ``hatch run bench:fanout`` (options: ``--events``, ``--hooks``, ``--reaction-events``, ``--concurrency``,
``--repeat``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

# A sibling benchmark named like a standard-library package (bench/http.py) must not shadow it here.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from errands.core import FanOut, Journal, NewEvent, Reactor, Route, TaskEngine, open_store  # noqa: E402
from errands.sinks import LogSink, WebhookSink  # noqa: E402

STREAMS = 20
SECRET = "whsec_" + base64.b64encode(b"errands-bench-secret-0123456789").decode()

SERVER = """
import sys, uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(url: str, n: int) -> None:
    store = open_store(url)
    journal = Journal(store)
    for start in range(0, n, 2000):
        journal.append_many([NewEvent(f"orders/{i % STREAMS}", "order.placed", {"order": i, "total": i * 3 % 997,
                                                                               "currency": "EUR"})
                             for i in range(start, min(n, start + 2000))])
    store.close()


def raw_log(db: str, out: str, page: int = 1000) -> int:
    conn = sqlite3.connect(db)
    after = 0
    n = 0
    with open(out, "a", encoding="utf-8") as fh:
        while True:
            rows = conn.execute(
                "SELECT position, stream, seq, subject, type, data, time FROM em_events WHERE position > ? "
                "ORDER BY position LIMIT ?", (after, page)).fetchall()
            if not rows:
                break
            lines = []
            for position, stream, seq, subject, type_, data, t in rows:
                lines.append(json.dumps({
                    "specversion": "1.0", "id": f"{stream}/{seq}", "source": "errands", "type": type_,
                    "subject": subject,
                    "time": datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z"),
                    "datacontenttype": "application/json", "data": json.loads(data),
                }, separators=(",", ":")) + "\n")
                after = position
            fh.write("".join(lines))
            fh.flush()
            n += len(rows)
    conn.close()
    return n


def errands_log(url: str, out: str, name: str) -> int:
    store = open_store(url)
    fanout = FanOut(store, [Route(name, LogSink(path=out), batch_size=1000)])
    n = fanout.drain()
    fanout.close()
    store.close()
    return n


def bench_log(tmp: str, events: int, repeat: int) -> tuple[float, float]:
    db = os.path.join(tmp, "log.db")
    url = f"sqlite:///{db}"
    fill(url, events)
    best_raw = best_em = float("inf")
    for r in range(repeat):
        raw_out, em_out = os.path.join(tmp, f"raw{r}.jsonl"), os.path.join(tmp, f"em{r}.jsonl")
        t = time.perf_counter()
        assert raw_log(db, raw_out) == events
        best_raw = min(best_raw, time.perf_counter() - t)
        t = time.perf_counter()
        assert errands_log(url, em_out, f"bench{r}") == events
        best_em = min(best_em, time.perf_counter() - t)
        with open(raw_out, "rb") as a, open(em_out, "rb") as b:
            assert a.read() == b.read(), "errands and raw wrote different lines"
    return best_raw, best_em


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"http://127.0.0.1:{port}/hooks"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the benchmark webhook server did not start")


def raw_webhook(url: str, bodies: list[tuple[str, bytes]], concurrency: int) -> None:
    import httpx

    def post(part: list[tuple[str, bytes]]) -> None:
        with httpx.Client(timeout=10) as client:
            for event_id, body in part:
                r = client.post(url, content=body, headers={"content-type": "application/cloudevents+json",
                                                            "webhook-id": event_id})
                r.raise_for_status()

    # Split by stream, as the route's lanes do, so that each stream is posted in order.
    parts: list[list[tuple[str, bytes]]] = [[] for _ in range(concurrency)]
    for event_id, body in bodies:
        parts[hash(event_id.rpartition("/")[0]) % concurrency].append((event_id, body))
    threads = [threading.Thread(target=post, args=(p,)) for p in parts]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def bench_webhook(tmp: str, hooks: int, concurrency: int, repeat: int) -> tuple[float, float]:
    url = f"sqlite:///{os.path.join(tmp, 'hooks.db')}"
    fill(url, hooks)
    store = open_store(url)
    bodies = [(e.id, e.to_json().encode()) for e in store.read_events(0, hooks)]
    proc, endpoint = start_server()
    try:
        raw_webhook(endpoint, bodies[:200], concurrency)  # warm up the server
        best_raw = best_em = float("inf")
        for r in range(repeat):
            t = time.perf_counter()
            raw_webhook(endpoint, bodies, concurrency)
            best_raw = min(best_raw, time.perf_counter() - t)
            sink = WebhookSink(url=endpoint, secret=SECRET)
            fanout = FanOut(store, [Route(f"hooks{r}", sink, batch_size=50, max_in_flight=concurrency)])
            t = time.perf_counter()
            n = fanout.drain()
            best_em = min(best_em, time.perf_counter() - t)
            fanout.close()
            assert n == hooks, f"delivered {n} of {hooks}"
    finally:
        proc.terminate()
        proc.wait()
        store.close()
    return best_raw, best_em


CUSTOMERS = 100
REACTIONS = ("receipt", "audit")


def run_reactions(url: str, n: int, keyed: bool, concurrency: int) -> float:
    """Seconds for two reactions to run every one of ``n`` events to completion."""
    store = open_store(url)
    done = [0]
    lock = threading.Lock()

    def handle(event: object) -> None:
        with lock:
            done[0] += 1

    reactor = Reactor(store, TaskEngine(store, concurrency=concurrency))
    for name in REACTIONS:
        options = {"predicate": "data.total >= 0 && type == 'order.placed'", "key": "data.customer"} if keyed else {}
        reactor.on("order.placed", handle, max_concurrency=None, name=name, **options)
    expected = n * len(REACTIONS)
    t = time.perf_counter()
    while done[0] < expected or reactor.engine.in_flight:
        if reactor.run_once() == 0:
            time.sleep(0.0005)
    elapsed = time.perf_counter() - t
    reactor.close()
    store.close()
    assert done[0] == expected, f"ran {done[0]} of {expected}"
    return elapsed


def bench_reactions(tmp: str, events: int, concurrency: int, repeat: int) -> tuple[float, float]:
    source = os.path.join(tmp, "reactions.db")
    store = open_store(f"sqlite:///{source}")
    journal = Journal(store)
    for start in range(0, events, 2000):
        journal.append_many([NewEvent(f"orders/{i % STREAMS}", "order.placed",
                                      {"order": i, "total": i * 3 % 997, "customer": f"c{i % CUSTOMERS}"})
                             for i in range(start, min(events, start + 2000))])
    store.close()
    best_plain = best_keyed = float("inf")
    for r in range(repeat):
        for keyed in (False, True):
            db = os.path.join(tmp, f"reactions-{r}-{int(keyed)}.db")
            shutil.copyfile(source, db)
            took = run_reactions(f"sqlite:///{db}", events, keyed, concurrency)
            if keyed:
                best_keyed = min(best_keyed, took)
            else:
                best_plain = min(best_plain, took)
    return best_plain, best_keyed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--hooks", type=int, default=5_000)
    parser.add_argument("--reaction-events", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="errands-bench-fanout-") as tmp:
        raw_l, em_l = bench_log(tmp, args.events, args.repeat)
        raw_w, em_w = bench_webhook(tmp, args.hooks, args.concurrency, args.repeat)
        plain_r, keyed_r = bench_reactions(tmp, args.reaction_events, args.concurrency, args.repeat)
    rows = [
        ("log sink (file)", args.events, "raw sqlite3 + json lines", raw_l, em_l),
        (f"webhook (x{args.concurrency})", args.hooks, "raw httpx threads", raw_w, em_w),
        ("reactions cel+key", args.reaction_events, "plain reactions (x2)", plain_r, keyed_r),
    ]
    header = f"{'workload':<18} {'events':>8} {'baseline':<26} {'raw ev/s':>10} {'errands ev/s':>14} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for name, n, base, raw_t, em_t in rows:
        print(f"{name:<18} {n:>8} {base:<26} {n / raw_t:>10,.0f} {n / em_t:>14,.0f} {raw_t / em_t:>6.2f}")
    print(f"fanout webhook vs raw httpx: {raw_w / em_w:.2f}")
    print(f"fanout log sink vs raw: {raw_l / em_l:.2f} (goal >= 0.5)")
    print(f"keyed reactions vs plain reactions: {plain_r / keyed_r:.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
