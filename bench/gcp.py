"""Pub/Sub relay: ``FanOut`` + ``PubSubSink`` beside the raw publisher client, against the Pub/Sub emulator.

Both sides publish the same messages (the events' JSON data with their ``ce-*`` attributes) to their own
fresh topic on one emulator, in requests of at most 1,000 messages, and wait until Pub/Sub has acknowledged
every message:

- ``errands``: events already in a SQLite journal (WAL) are relayed by ``FanOut.drain()`` to a
  ``PubSubSink``: reading the journal, building the messages, publishing up to ``--in-flight`` batches at once
  (one per lane of streams, the journal read ahead meanwhile; each batch as ``Publish`` requests of its own on
  the client's channel), and committing the route's cursor as the batches are acknowledged.
- ``raw publisher``: a bare ``PublisherClient`` publishes the pre-built messages in one go (its ``publish``,
  which batches them into requests on its threads, 1,000 messages or 10 ms) and waits for every future: no
  store, no cursor, no per-batch wait.

Each side runs ``--repeat`` times, alternating, on fresh topics; the best run counts. Rows with ordering
off and on (ordering key = stream); both rows are printed, and the goal line shows the lower of the two.

Run: ``hatch run bench:gcp`` (options: ``--events``, ``--streams``, ``--batch``, ``--repeat``).
"""

from __future__ import annotations

import os
import sys

# ``python bench/gcp.py`` puts bench/ first on sys.path, where bench/http.py would shadow the standard
# library's ``http`` that gRPC and google-api-core import.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

from errands.connectors.gcp import PubSubSink  # noqa: E402
from errands.connectors.gcp._emulators import start_pubsub_emulator  # noqa: E402
from errands.core import FanOut, NewEvent, Route, open_store  # noqa: E402

PROJECT = "errands-bench"
CLIENT_BATCH = 1000
CLIENT_LATENCY = 0.01


def new_topic(publisher: Any) -> str:
    topic = f"bench-{uuid.uuid4().hex[:10]}"
    publisher.create_topic(name=publisher.topic_path(PROJECT, topic))
    return topic


def errands_run(journal: str, topic: str, ordering: bool, batch: int, in_flight: int) -> float:
    store = open_store(f"sqlite:///{journal}")
    sink = PubSubSink(PROJECT, topic, ordering=ordering, batch_max_messages=CLIENT_BATCH,
                      batch_max_latency=CLIENT_LATENCY)
    fanout = FanOut(store, routes=[Route(name=f"r-{topic}", sink=sink, batch_size=batch, max_in_flight=in_flight)])
    sink._pub.client()  # build the client outside the timing, as the raw side does
    start = time.perf_counter()
    delivered = fanout.drain()
    elapsed = time.perf_counter() - start
    fanout.close()
    store.close()
    return delivered / elapsed


def raw_run(messages: list[tuple[bytes, dict[str, str], str]], topic: str, ordering: bool) -> float:
    from google.cloud import pubsub_v1

    client = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=CLIENT_BATCH, max_latency=CLIENT_LATENCY),
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=ordering),
    )
    path = client.topic_path(PROJECT, topic)
    start = time.perf_counter()
    futures = [client.publish(path, data, ordering_key=key if ordering else "", **attrs)
               for data, attrs, key in messages]
    concurrent.futures.wait(futures)
    elapsed = time.perf_counter() - start
    assert all(f.exception() is None for f in futures)
    client.stop()
    return len(messages) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1000, help="FanOut route batch_size")
    parser.add_argument("--in-flight", type=int, default=4, help="FanOut route max_in_flight")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    emulator = start_pubsub_emulator()
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.address
    tmp = tempfile.mkdtemp(prefix="errands-bench-gcp-")
    try:
        from google.cloud import pubsub_v1

        admin = pubsub_v1.PublisherClient()
        for _ in range(50):  # the emulator listens a moment before it serves
            try:
                new_topic(admin)
                break
            except Exception:
                time.sleep(0.2)
        journal = os.path.join(tmp, "journal.db")
        store = open_store(f"sqlite:///{journal}")
        events = []
        for start in range(0, args.events, 1000):
            events += store.append_events([
                NewEvent(f"orders/{i % args.streams}", "order.updated", {"order": i % args.streams, "n": i},
                         "order.updated")
                for i in range(start, min(start + 1000, args.events))
            ])
        store.close()
        messages = [(*PubSubSink.message(e), e.stream) for e in events]

        rows = []
        ratios = []
        for ordering in (False, True):
            ours, raw = 0.0, 0.0
            for _ in range(args.repeat):
                ours = max(ours, errands_run(journal, new_topic(admin), ordering, args.batch, args.in_flight))
                raw = max(raw, raw_run(messages, new_topic(admin), ordering))
            ratios.append(ours / raw)
            rows.append((f"ordering {'on' if ordering else 'off'}", ours, raw, ours / raw))
        admin.stop()
    finally:
        emulator.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"Pub/Sub emulator, {args.events} events over {args.streams} streams, FanOut batch {args.batch} x "
          f"{args.in_flight} in flight, client batches of {CLIENT_BATCH}; best of {args.repeat}")
    print()
    print("| run | errands (FanOut + PubSubSink) msg/s | raw PublisherClient msg/s | errands/raw |")
    print("|---|---:|---:|---:|")
    for name, ours, raw, ratio in rows:
        print(f"| {name} | {ours:,.0f} | {raw:,.0f} | {ratio:.2f} |")
    print()
    print(f"pubsub sink vs raw publisher: {min(ratios):.2f} (goal >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
