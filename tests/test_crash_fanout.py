"""Crash test: a relay process is SIGKILLed at random moments while it copies the journal to a log sink.

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
    from errands.core import FanOut, Route, open_store
    from errands.sinks import LogSink

    store = open_store(url)
    fanout = FanOut(store, [Route("crash", LogSink(path=path), batch_size=50, max_in_flight=4)])
    print("ready", flush=True)
    while True:
        n = fanout.run_once()
        if drain and n == 0 and fanout.status()[0].behind == 0:
            break
        # A short pause per pass stretches the relay out so that the kills land mid-delivery.
        time.sleep(0.01)
    fanout.close()
    store.close()


def start_relay(url: str, path: Path, drain: bool = False) -> subprocess.Popen[str]:
    args = [sys.executable, __file__, url, str(path)] + (["drain"] if drain else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


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

    ids: list[str] = []
    with open(log_path, encoding="utf-8") as fh:
        for line in fh:
            envelope: dict[str, Any] = json.loads(line)  # every line whole: torn tails are cut on open
            ids.append(envelope["id"])
    distinct = set(ids)
    assert len(distinct) == EVENTS
    expected = {f"orders/{s}/{q}" for s in range(STREAMS) for q in range(1, EVENTS // STREAMS + 1)}
    assert distinct == expected
    # In order per stream, at least once: a stream never gets an event before its predecessor.
    last: dict[str, int] = {}
    for event_id in ids:
        stream, _, seq = event_id.rpartition("/")
        assert int(seq) <= last.get(stream, 0) + 1, f"{event_id} arrived before its predecessor"
        last[stream] = int(seq)
    # The kills must have interrupted real work, or this test proves nothing.
    assert killed_behind >= KILLS // 4, f"only {killed_behind} kills landed while the relay was behind"
    print(f"{len(ids)} lines, {len(ids) - EVENTS} redelivered, {killed_behind} kills mid-delivery")


if __name__ == "__main__":
    relay(sys.argv[1], sys.argv[2], len(sys.argv) > 3 and sys.argv[3] == "drain")
