from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from errands.core import (
    ConfigError,
    Event,
    FakeClock,
    Journal,
    MemoryStore,
    NewEvent,
    Reactor,
    TaskEngine,
    TaskStatus,
    Worker,
    open_store,
)


@pytest.fixture
def store() -> Any:
    s = MemoryStore()
    yield s
    s.close()


def settle(reactor: Reactor, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = reactor.run_once()
        if n == 0 and reactor.engine.in_flight == 0 and reactor.engine.drain(timeout=0.5) == 0:
            return
        time.sleep(0.01)


def test_matching_events_become_tasks_run_once_each(store: Any) -> None:
    journal = Journal(store)
    seen: list[str] = []
    lock = threading.Lock()

    def on_placed(event: Event) -> str:
        with lock:
            seen.append(event.id)
        return event.type

    reactor = Reactor(store)
    reaction = reactor.on("order.*", on_placed, max_concurrency=2)
    journal.append_many([NewEvent(f"orders/{i}", "order.placed", {"i": i}) for i in range(5)])
    journal.append("pay/1", "payment.done", {})
    settle(reactor)
    assert sorted(seen) == sorted(f"orders/{i}/1" for i in range(5))
    # Reading again finds nothing new; the same event always maps to the same task.
    assert reactor.submit_once() == 0
    rec = reactor.engine.get(reaction.task_id(journal.read(0, limit=1)[0]))
    assert rec is not None and rec.status is TaskStatus.SUCCEEDED and rec.result == "order.placed"
    assert rec.type == reaction.task_type
    reactor.close()


def test_handler_gets_the_event(store: Any) -> None:
    got: list[Event] = []
    reactor = Reactor(store)
    reactor.on("user.**", got.append)
    Journal(store).append("users/7", "user.created", {"name": "Ada"}, subject="user.created.eu")
    settle(reactor)
    assert len(got) == 1
    ev = got[0]
    assert (ev.id, ev.stream, ev.seq, ev.subject, ev.type, ev.data) == (
        "users/7/1", "users/7", 1, "user.created.eu", "user.created", {"name": "Ada"})
    reactor.close()


def test_debounce_runs_a_burst_once_with_its_last_event(store: Any) -> None:
    clock = FakeClock()
    s = MemoryStore(clock=clock)
    got: list[Any] = []
    reactor = Reactor(s)
    reactor.on("doc.edited", lambda e: got.append((e.stream, e.data["rev"])), debounce_ms=500,
                max_concurrency=2)
    journal = Journal(s)
    for rev in range(5):
        journal.append("docs/a", "doc.edited", {"rev": rev})
        journal.append("docs/b", "doc.edited", {"rev": rev * 10})
        reactor.submit_once()
        clock.advance(0.1)
    assert reactor.run_once() == 0  # still inside the window
    clock.advance(0.5)
    assert reactor.run_once() == 2
    reactor.engine.drain(timeout=5)
    assert sorted(got) == [("docs/a", 4), ("docs/b", 40)]
    assert len(reactor.engine.recent(50)) == 2
    reactor.close()
    s.close()


def test_failing_reaction_retries_then_parks_and_redrives(store: Any) -> None:
    attempts: list[int] = []
    fail = [True]

    def flaky(event: Event) -> None:
        attempts.append(1)
        if fail[0]:
            raise RuntimeError("downstream is down")

    engine = TaskEngine(store, retry_base=0.001, retry_cap=0.01)
    reactor = Reactor(store, engine)
    reactor.on("job.ready", flaky, retry_max=5, dlq_after=3, name="flaky")
    Journal(store).append("jobs/1", "job.ready", {})
    settle(reactor)
    dead = reactor.dead("flaky")
    assert len(dead) == 1 and dead[0].attempts == 3 and "downstream is down" in (dead[0].error or "")
    assert len(attempts) == 3
    fail[0] = False
    assert reactor.redrive("flaky") == 1
    settle(reactor)
    assert reactor.dead() == [] and len(attempts) == 4
    reactor.close()


def test_retry_max_bounds_attempts(store: Any) -> None:
    calls: list[int] = []

    def boom(event: Event) -> None:
        calls.append(1)
        raise RuntimeError("no")

    reactor = Reactor(store, TaskEngine(store, retry_base=0.001, retry_cap=0.01))
    reactor.on("x", boom, retry_max=1, dlq_after=5)
    Journal(store).append("s", "x")
    settle(reactor)
    assert len(calls) == 2 and len(reactor.dead()) == 1
    reactor.close()


def test_max_concurrency_and_rate_limit_are_passed_to_tasks(store: Any) -> None:
    clock = FakeClock()
    s = MemoryStore(clock=clock)
    reactor = Reactor(s)
    reactor.on("tick", lambda e: None, rate_limit_per_s=1, name="slow")
    Journal(s).append_many([NewEvent("s", "tick") for _ in range(3)])
    assert reactor.submit_once() == 3
    assert reactor.engine.run_once() == 1
    assert reactor.engine.run_once() == 0
    clock.advance(1)
    assert reactor.engine.run_once() == 1
    reactor.close()
    s.close()


def test_bad_options_are_named(store: Any) -> None:
    reactor = Reactor(store)
    with pytest.raises(ConfigError) as info:
        reactor.on("a..b", print, debounce_ms=-1)
    assert "malformed" in str(info.value) and "debounce_ms must be an integer >= 0, got -1" in str(info.value)
    with pytest.raises(ConfigError, match="max_concurrency must be an integer >= 1"):
        reactor.on("a", print, max_concurrency=0)
    reactor.on("a", print, name="p")
    with pytest.raises(ConfigError, match="exists already"):
        reactor.on("b", print, name="p")


def test_cursor_survives_restart(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    store = open_store(url)
    got: list[str] = []
    reactor = Reactor(store)
    reactor.on("e", lambda ev: got.append(ev.id), name="r")
    Journal(store).append_many([NewEvent("s", "e") for _ in range(3)])
    settle(reactor)
    reactor.close()
    Journal(store).append("s", "e")
    again = Reactor(store)
    again.on("e", lambda ev: got.append(ev.id), name="r")
    settle(again)
    assert sorted(got) == ["s/1", "s/2", "s/3", "s/4"]
    again.close()
    store.close()


def test_runs_in_the_worker(store: Any) -> None:
    got: list[str] = []
    reactor = Reactor(store)
    reactor.on("w", lambda ev: got.append(ev.id))
    Journal(store).append_many([NewEvent("s", "w") for _ in range(5)])
    worker = Worker(store, jobs=[reactor.run_once], poll_interval=0.01)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"stop": stop})
    thread.start()
    deadline = time.monotonic() + 10
    while len(got) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join()
    assert sorted(got) == [f"s/{i}" for i in range(1, 6)]
    reactor.close()


def test_debounce_never_merges_distinct_effects_of_one_connector() -> None:
    # The outbox writes one stream per connector (effects/<connector>): a burst of three distinct effects
    # confirmed together is three entities, and each gets its reaction.
    from errands.core import Effect, Outbox
    from errands.core.testing import FakeConnector

    clock = FakeClock()
    s = MemoryStore(clock=clock)
    got: list[str] = []
    reactor = Reactor(s)
    reactor.on("effect.confirmed.**", lambda e: got.append(e.data["key"]), debounce_ms=500, name="confirmed")
    outbox = Outbox(s, connectors={"bank": FakeConnector("bank")})
    for key in ("a", "b", "c"):
        outbox.submit(Effect(key=key, connector="bank", payload={"n": key}))
    outbox.dispatch_once()
    reactor.submit_once()
    clock.advance(1)
    reactor.run_once()
    reactor.engine.drain(timeout=5)
    assert sorted(got) == ["a", "b", "c"]
    reactor.close()
    s.close()


def test_debounce_key_names_the_entity() -> None:
    clock = FakeClock()
    s = MemoryStore(clock=clock)
    got: list[Any] = []
    reactor = Reactor(s)
    reactor.on("order.changed", lambda e: got.append((e.data.get("order"), e.data["rev"])), debounce_ms=500,
               key="data.order", max_concurrency=4)
    journal = Journal(s)
    for rev in range(3):
        journal.append("shop", "order.changed", {"order": 1, "rev": rev})
        journal.append("shop", "order.changed", {"order": 2, "rev": rev})
    journal.append("shop", "order.changed", {"rev": 9})  # no order: its own entity, never merged
    journal.append("shop", "order.changed", {"rev": 10})
    reactor.submit_once()
    clock.advance(1)
    reactor.run_once()
    reactor.engine.drain(timeout=5)
    assert sorted(got, key=repr) == sorted([(1, 2), (2, 2), (None, 9), (None, 10)], key=repr)
    reactor.close()
    s.close()


def test_a_bad_debounce_key_is_named(store: Any) -> None:
    reactor = Reactor(store)
    with pytest.raises(ConfigError, match="uses unknown name") as info:
        reactor.on("a", print, debounce_ms=10, key="order")
    assert info.value.field == "key" and info.value.value == "order"
    reaction = reactor.on("a", print, debounce_ms=10, key=lambda e: e.data["id"], name="fn")
    ev = Journal(store).append("s", "a", {"id": 7})
    assert reaction.entity(ev) == "7"
