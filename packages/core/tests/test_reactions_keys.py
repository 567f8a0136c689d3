"""Reactions with a CEL predicate and an ordering key, on SQLite and PostgreSQL: what a predicate lets
through, tasks of one key one at a time in journal order (several keys at once, across two workers),
debounce per key, ``off``, ``reactions()``, refused expressions, ``dlq_after`` and ``errands reactions list``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Callable

import pytest
from errands.core import (
    ConfigError,
    Event,
    FakeClock,
    Journal,
    MissingDependencyError,
    NewEvent,
    NotFoundError,
    Reactor,
    TaskEngine,
    TaskStatus,
    open_store,
)
from errands.core._cli import main

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.services)]


@pytest.fixture(params=BACKENDS)
def url(request: Any, tmp_path: Any) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'reactions.db'}"


def run_until(reactors: list[Reactor], done: Callable[[], bool], timeout: float = 20) -> None:
    """Pass every reactor until ``done()`` (or ``timeout``: the assertions after it then say what is wrong)."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        if sum(r.run_once() for r in reactors) == 0:
            time.sleep(0.005)


def test_a_predicate_filters_events(url: str) -> None:
    store = open_store(url)
    got: list[int] = []
    reactor = Reactor(store, TaskEngine(store, concurrency=4))
    reactor.on("order.placed", lambda e: got.append(e.data["amount"]), predicate="data.amount > 100",
               max_concurrency=None, name="big")
    reactor.on("order.**", lambda e: got.append(-1), predicate="subject == 'order.placed.eu' && type == "
               "'order.placed' && time > timestamp('2000-01-01T00:00:00Z')", name="eu")
    journal = Journal(store)
    journal.append_many([NewEvent(f"orders/{i}", "order.placed", {"amount": amount})
                         for i, amount in enumerate([50, 150, 100, 250, 7])])
    journal.append("orders/9", "order.placed", {"amount": 1}, subject="order.placed.eu")
    journal.append("orders/10", "order.placed", {"total": 500})  # no amount: the predicate is false there
    try:
        assert reactor.submit_once() == 3
        run_until([reactor], lambda: len(got) == 3)
        reactor.engine.drain(timeout=10)
        assert sorted(got) == [-1, 150, 250]
    finally:
        reactor.close()
        store.close()


def test_five_keys_of_four_events_run_in_order_per_key_several_keys_at_once(url: str) -> None:
    """Two workers (each its own store connection, reactor and engine) share the tasks; tasks of one key
    never overlap and run in journal order; tasks of different keys do overlap."""
    lock = threading.Condition()
    active: dict[str, str] = {}
    runs: dict[str, list[int]] = {}
    overlapped: list[str] = []
    clashes: list[str] = []
    most = [0]

    def handle(event: Event) -> None:
        key = event.data["customer"]
        with lock:
            if key in active:
                clashes.append(f"{event.id} ran while {active[key]} of the same key did")
            active[key] = event.id
            most[0] = max(most[0], len(active))
            lock.notify_all()
            # Hold the first run of each key until another key runs too (bounded: the assertion tells).
            if not runs.get(key):
                lock.wait_for(lambda: len(active) > 1, timeout=5)
                if len(active) > 1:
                    overlapped.append(key)
            runs.setdefault(key, []).append(event.data["n"])
        time.sleep(0.001)
        with lock:
            del active[key]

    stores = [open_store(url), open_store(url)]
    reactors = []
    for s in stores:
        reactor = Reactor(s, TaskEngine(s, concurrency=4), batch_size=7)
        reactor.on("order.placed", handle, key="data.customer", max_concurrency=None, name="ordered")
        reactors.append(reactor)
    Journal(stores[0]).append_many([NewEvent(f"orders/{n}", "order.placed", {"customer": f"c{n % 5}", "n": n})
                                    for n in range(20)])
    stop = threading.Event()
    done = lambda: sum(len(v) for v in runs.values()) >= 20  # noqa: E731

    def work(reactor: Reactor) -> None:
        run_until([reactor], lambda: done() or stop.is_set())

    threads = [threading.Thread(target=work, args=(r,)) for r in reactors]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for r in reactors:
            r.engine.drain(timeout=10)
        assert clashes == []
        assert runs == {f"c{k}": [n for n in range(20) if n % 5 == k] for k in range(5)}
        assert most[0] > 1 and overlapped, "no two keys ever ran at once"
        rows = reactors[0].engine.recent(50, type="reaction:ordered")
        assert len(rows) == 20 and all(r.status is TaskStatus.SUCCEEDED for r in rows)
    finally:
        stop.set()
        for r in reactors:
            r.close()
        for s in stores:
            s.close()


def test_a_cel_key_orders_and_a_dotted_path_needs_no_cel(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(url)
    order: list[tuple[str, int]] = []
    reactor = Reactor(store, TaskEngine(store, concurrency=4))
    reaction = reactor.on("item.*", lambda e: order.append((e.data["region"], e.data["n"])),
                          key="data.region + '/' + string(data.n % 2)", max_concurrency=None, name="cel-key")
    journal = Journal(store)
    events = journal.append_many([NewEvent("items", "item.added", {"region": r, "n": n})
                                  for n in range(6) for r in ("eu", "us")])
    assert reaction.entity(events[0]) == "eu/0" and reaction.entity(events[3]) == "us/1"
    try:
        run_until([reactor], lambda: len(order) == 12)
        reactor.engine.drain(timeout=10)
        for key in {(r, n % 2) for r, n in order}:
            seen = [n for r, n in order if (r, n % 2) == key]
            assert seen == sorted(seen)
        # A dotted path is read from the event: it works without cel-python.
        monkeypatch.setitem(sys.modules, "celpy", None)
        plain = reactor.on("item.*", lambda e: None, key="data.region", name="path-key")
        assert plain.entity(events[0]) == "eu"
        with pytest.raises(MissingDependencyError, match=r"errands\[cel\]"):
            reactor.on("item.*", lambda e: None, predicate="data.n > 1", name="needs-cel")
    finally:
        reactor.close()
        store.close()


def test_debounce_merges_events_of_the_same_key_only(url: str) -> None:
    clock = FakeClock()
    store = open_store(url, clock=clock)
    got: list[tuple[str, int]] = []
    reactor = Reactor(store, TaskEngine(store, concurrency=4))
    reactor.on("cart.changed", lambda e: got.append((e.data["customer"], e.data["rev"])), key="data.customer",
               debounce_ms=500, max_concurrency=None, name="carts")
    journal = Journal(store)
    try:
        for rev in range(4):  # one stream, two customers: the key, not the stream, decides what merges
            journal.append("carts", "cart.changed", {"customer": "ann", "rev": rev})
            journal.append("carts", "cart.changed", {"customer": "bob", "rev": rev * 10})
            reactor.submit_once()
            clock.advance(0.1)
        assert reactor.run_once() == 0  # inside the window
        clock.advance(0.5)
        run_until([reactor], lambda: len(got) == 2)
        reactor.engine.drain(timeout=10)
        assert sorted(got) == [("ann", 3), ("bob", 30)]
        assert len(reactor.engine.recent(50, type="reaction:carts")) == 2
    finally:
        reactor.close()
        store.close()


def test_off_stops_new_events_and_on_again_goes_on_from_the_cursor(url: str) -> None:
    store = open_store(url)
    got: list[int] = []
    reactor = Reactor(store)
    first = reactor.on("tick", lambda e: got.append(e.data["n"]), name="ticks", predicate="data.n >= 0")
    other = reactor.on("tock", lambda e: None, name="tocks")
    journal = Journal(store)
    try:
        assert [r.name for r in reactor.reactions()] == ["ticks", "tocks"]
        assert reactor.reactions()[0] is first and first.predicate == "data.n >= 0"
        journal.append("t", "tick", {"n": 1})
        run_until([reactor], lambda: got == [1])
        assert reactor.off("ticks") is first
        assert reactor.reactions() == [other]
        with pytest.raises(NotFoundError, match="no reaction named 'ticks'"):
            reactor.off("ticks")
        journal.append("t", "tick", {"n": 2})
        assert reactor.submit_once() == 0
        reactor.on("tick", lambda e: got.append(e.data["n"]), name="ticks")
        run_until([reactor], lambda: got == [1, 2])
        assert got == [1, 2]
    finally:
        reactor.close()
        store.close()


def test_bad_cel_is_refused_at_registration_naming_it(url: str) -> None:
    store = open_store(url)
    reactor = Reactor(store)
    try:
        with pytest.raises(ConfigError, match=r"predicate 'data.amount >' is not a valid CEL") as info:
            reactor.on("a", print, predicate="data.amount >", name="bad")
        assert info.value.field == "predicate" and info.value.value == "data.amount >"
        with pytest.raises(ConfigError, match="2 problems") as both:
            reactor.on("a", print, predicate="amount > 1", key="data.x +", name="bad")
        assert [(p.field, p.value) for p in both.value.problems] == [("predicate", "amount > 1"), ("key", "data.x +")]
        assert "unknown name(s) amount" in str(both.value.problems[0])
        with pytest.raises(ConfigError, match="retry_backoff_ms"):
            reactor.on("a", print, retry_backoff_ms=0, name="bad")
        assert reactor.reactions() == []
    finally:
        reactor.close()
        store.close()


def test_a_dead_task_lets_its_key_go_on(url: str) -> None:
    """A failing task holds its key's later tasks back while it retries; once it is dead (``dlq_after``) they
    run. Other keys are not held back."""
    store = open_store(url)
    calls: list[str] = []
    lock = threading.Lock()

    def handle(event: Event) -> None:
        with lock:
            calls.append(f"{event.data['k']}{event.data['n']}")
        if event.data["n"] == 0 and event.data["k"] == "a":
            raise RuntimeError("downstream refused a0")

    reactor = Reactor(store, TaskEngine(store, concurrency=4, retry_cap=0.01))
    reactor.on("job", handle, key="data.k", max_concurrency=None, retry_max=10, dlq_after=3, retry_backoff_ms=1,
               name="jobs")
    Journal(store).append_many([NewEvent("jobs", "job", {"k": k, "n": n}) for n in range(3) for k in ("a", "b")])
    try:
        run_until([reactor], lambda: len(calls) == 8)
        reactor.engine.drain(timeout=10)
        mine = [c for c in calls if c.startswith("a")]
        assert mine == ["a0", "a0", "a0", "a1", "a2"]
        assert [c for c in calls if c.startswith("b")] == ["b0", "b1", "b2"]
        dead = reactor.dead("jobs")
        assert len(dead) == 1 and dead[0].attempts == 3 and "refused a0" in (dead[0].error or "")
    finally:
        reactor.close()
        store.close()


def test_reactions_list_shows_each_reaction(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(url)
    reactor = Reactor(store)
    reactor.on("order.placed", lambda e: None, predicate="data.amount > 100", key="data.customer",
               max_concurrency=4, dlq_after=2, name="big-orders")
    journal = Journal(store)
    journal.append_many([NewEvent("orders", "order.placed", {"amount": a, "customer": "c"}) for a in (50, 500)])
    try:
        run_until([reactor], lambda: reactor.engine.recent(5, status="SUCCEEDED") != [])
        reactor.engine.drain(timeout=10)
        journal.append("orders", "order.placed", {"amount": 1, "customer": "c"})
        assert main(["reactions", "list", "--store", url, "--json"]) == 0
        [row] = json.loads(capsys.readouterr().out)
        assert row["name"] == "big-orders" and row["subject_pattern"] == "order.placed"
        assert (row["predicate"], row["key"], row["behind"], row["succeeded"], row["dead"]) == (
            "data.amount > 100", "data.customer", 1, 1, 0)
        assert row["options"]["max_concurrency"] == 4 and row["options"]["dlq_after"] == 2
        assert main(["reactions", "list", "--store", url]) == 0
        out = capsys.readouterr().out
        assert "big-orders" in out and "data.amount > 100" in out and "data.customer" in out
    finally:
        reactor.close()
        store.close()


def test_a_claim_takes_heads_of_keys_by_priority_held_back_by_retries_cancels_and_held_runs(url: str) -> None:
    from errands.core import _tasks_table as table

    store = open_store(url)
    try:
        TaskEngine(store)  # the tasks tables
        now = store.clock.now()

        def claim(owner: str = "w1", held: tuple[str, ...] = (), at: float = now) -> list[str]:
            with store.transaction() as tx:
                return sorted(c.id for c in table.claim(tx, "x", owner, list(held), 10, at + 1000, at))

        def status(task_id: str) -> str:
            with store.transaction() as tx:
                record = table.get(tx, task_id)
            assert record is not None
            return str(record.status)

        with store.transaction() as tx:
            for task_id, priority, key, seq in (("a1", 0, "k1", 1), ("a2", 9, "k1", 2), ("p", 5, None, None),
                                                ("b1", 1, "k2", 3), ("b2", 0, "k2", 4)):
                table.insert(tx, task_id, "x", None, now, None, now, priority=priority, order_key=key, order_seq=seq)
            # the order of types a pass plans by leaves out tasks that are not the head of their key
            assert table.due_order(tx, ["x", "y"], [], 10, now) == ["x", "x", "x"]
        # the heads, highest priority first; a2 waits for a1 whatever its priority
        with store.transaction() as tx:
            assert [c.id for c in table.claim(tx, "x", "w1", [], 2, now + 1000, now)] in (["p", "b1"], ["b1", "p"])
        assert claim() == ["a1"]
        assert {status(t) for t in ("p", "b1", "a1")} == {"RUNNING"} and status("a2") == "PENDING"
        assert claim() == []  # a1 and b1 run: their keys are held
        # b1's attempt failed and retries later: it holds k2; a1 asked to cancel runs on and holds k1
        with store.transaction() as tx:
            token = int(tx.one("SELECT token FROM em_tasks WHERE id = 'p'")[0])  # type: ignore[index]
            assert table.finish(tx, "p", token, {"status": "SUCCEEDED", "finished_at": now}, now)
            token = int(tx.one("SELECT token FROM em_tasks WHERE id = 'b1'")[0])  # type: ignore[index]
            assert table.finish(tx, "b1", token, {"status": "PENDING", "available_at": now + 100}, now)
            assert table.cancel(tx, "a1", now) is TaskStatus.RUNNING
        assert claim() == []
        # the retry is due: b1 again, not b2
        assert claim(at=now + 101) == ["b1"]
        # a1's run ends cancelled: a2 is the head of k1 now
        with store.transaction() as tx:
            token = int(tx.one("SELECT token FROM em_tasks WHERE id = 'a1'")[0])  # type: ignore[index]
            assert table.finish(tx, "a1", token, {"status": "CANCELLED", "finished_at": now}, now)
        # a2's lease lapses while its handler runs on past a time limit on w1: w1 holds it, another worker takes it
        assert claim(at=now + 102) == ["a2"]
        assert claim(owner="w1", held=("a2",), at=now + 2000) == ["b1"]  # b1's lease lapsed too: not held by w1
        assert claim(owner="w2", at=now + 2000) == ["a2"]
        assert status("b2") == "PENDING"
    finally:
        store.close()
