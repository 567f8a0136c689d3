"""Crash tests: a relay process is SIGKILLed at random moments while it copies the journal to a log sink, and
(on PostgreSQL) a relay's connections are dropped again and again while it runs.

Run as a script, this file is the relay: ``python test_crash_fanout.py <store url> <log path> [drain]``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

EVENTS = 50_000
STREAMS = 20
KILLS = 20


def relay(url: str, path: str, drain: bool) -> None:
    from errands.core import FanOut, Route, is_infrastructure_error, open_store
    from errands.core._fanout import PASS_WINDOWS
    from errands.sinks import LogSink

    store = open_store(url)
    fanout = FanOut(store, [Route("crash", LogSink(path=path), batch_size=50, max_in_flight=4)])
    print("ready", flush=True)
    while True:
        try:
            n = fanout.run_once()
            if drain and n == 0 and fanout.status()[0].behind == 0:
                break
        except Exception as exc:  # a dropped connection: the pass is retried, as the worker does
            if not is_infrastructure_error(exc):
                raise
        # A short pause per window of a pass stretches the relay out so that the kills land mid-delivery.
        time.sleep(0.01 * PASS_WINDOWS)
    fanout.close()
    store.close()


def start_relay(url: str, path: Path, drain: bool = False) -> subprocess.Popen[str]:
    args = [sys.executable, __file__, url, str(path)] + (["drain"] if drain else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def read_log(path: Path) -> list[str]:
    ids: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            envelope: dict[str, Any] = json.loads(line)  # every line whole: torn tails are cut on open
            ids.append(envelope["id"])
    return ids


def check_order(ids: list[str]) -> None:
    """At least once, in order per stream: a stream never gets an event before its predecessor."""
    last: dict[str, int] = {}
    for event_id in ids:
        stream, _, seq = event_id.rpartition("/")
        assert int(seq) <= last.get(stream, 0) + 1, f"{event_id} arrived before its predecessor"
        last[stream] = int(seq)


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


@pytest.mark.crash
def test_relay_survives_sigkill_at_random_moments(tmp_path: Path) -> None:
    from errands.core import Journal, NewEvent, open_store

    url = f"sqlite:///{tmp_path / 'crash.db'}"
    log_path = tmp_path / "events.jsonl"
    store = open_store(url)
    journal = Journal(store)
    rng = random.Random(int(os.environ.get("ERRANDS_CRASH_SEED", "0")) or None)
    per_round = EVENTS // KILLS
    appended = 0
    killed_behind = 0
    for _ in range(KILLS):
        batch = [NewEvent(f"orders/{(appended + i) % STREAMS}", "order.placed", {"n": appended + i})
                 for i in range(per_round)]
        for i in range(0, len(batch), 1000):
            journal.append_many(batch[i:i + 1000])
        appended += len(batch)
        proc = start_relay(url, log_path)
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        if count_lines(log_path) < appended:
            killed_behind += 1
    assert appended == EVENTS
    proc = start_relay(url, log_path, drain=True)
    assert proc.wait(timeout=120) == 0
    assert proc.stdout is not None
    proc.stdout.close()
    store.close()

    ids = read_log(log_path)
    distinct = set(ids)
    assert len(distinct) == EVENTS
    expected = {f"orders/{s}/{q}" for s in range(STREAMS) for q in range(1, EVENTS // STREAMS + 1)}
    assert distinct == expected
    check_order(ids)
    # The kills must have interrupted real work, or this test proves nothing.
    assert killed_behind >= KILLS // 4, f"only {killed_behind} kills landed while the relay was behind"
    print(f"{len(ids)} lines, {len(ids) - EVENTS} redelivered, {killed_behind} kills mid-delivery")


@pytest.mark.crash
@pytest.mark.services
def test_relay_on_postgresql_survives_dropped_connections(tmp_path: Path, postgres_url: str) -> None:
    """A relay runs while every connection it holds is dropped (``pg_terminate_backend``) again and again:
    every event still arrives, in order per stream, nothing is parked and the route is not stopped."""
    from errands.core import FanOut, Journal, NewEvent, Route, RouteState, open_store
    from errands.core.testing import faults
    from errands.sinks import LogSink

    events = EVENTS // 2
    store = open_store(postgres_url)
    journal = Journal(store)
    for start in range(0, events, 1000):
        journal.append_many([NewEvent(f"orders/{(start + i) % STREAMS}", "order.placed", {"n": start + i})
                             for i in range(1000)])
    log_path = tmp_path / "events.jsonl"
    app = "errands-drop-relay"
    relay_url = postgres_url + ("&" if "?" in postgres_url else "?") + f"application_name={app}"
    proc = start_relay(relay_url, log_path, drain=True)
    rng = random.Random(int(os.environ.get("ERRANDS_CRASH_SEED", "0")) or None)
    drops = mid_run = 0
    while proc.poll() is None:
        time.sleep(rng.uniform(0.05, 0.25))
        dropped = faults.terminate_postgres_connections(postgres_url, application_name=app)
        drops += dropped
        if dropped and count_lines(log_path) < events:
            mid_run += 1
    assert proc.wait(timeout=120) == 0
    assert proc.stdout is not None
    proc.stdout.close()
    ids = read_log(log_path)
    assert set(ids) == {f"orders/{s}/{q}" for s in range(STREAMS) for q in range(1, events // STREAMS + 1)}
    check_order(ids)
    fanout = FanOut(store, [Route("crash", LogSink(path=str(tmp_path / "unused.jsonl")))])
    assert fanout.dead("crash") == []
    [status] = fanout.status()
    assert status.state is RouteState.RUNNING and status.behind == 0
    assert mid_run >= 5, f"only {mid_run} rounds of drops landed while the relay was behind"
    print(f"{len(ids)} lines, {len(ids) - events} redelivered, {drops} connections dropped in {mid_run} rounds")
    fanout.close()
    store.close()


if __name__ == "__main__":
    relay(sys.argv[1], sys.argv[2], len(sys.argv) > 3 and sys.argv[3] == "drain")
