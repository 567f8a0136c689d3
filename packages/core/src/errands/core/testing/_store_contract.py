"""``StoreContract``: the behaviour every errands store must show. Subclass it and supply ``store``."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from .._clock import FakeClock
from .._journal import Journal, StoreScheduler
from ..errors import ConfigError, LeaseLostError, PayloadError
from ..store._stores import NewEvent


class StoreContract:
    """Subclass and override the ``store`` fixture; it receives the ``clock`` fixture (a ``FakeClock``)
    and must return a store using it. Override ``caller_connection`` if the store supports joining the
    caller's own transaction (``conn=``) through something other than ``store.connect()``.
    """

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def store(self, clock: FakeClock) -> Any:  # pragma: no cover - must be overridden
        raise NotImplementedError("override the store fixture")

    def caller_connection(self, store: Any) -> Any:
        return store.connect()

    # -- schema ------------------------------------------------------------------------------
    def test_migrations_are_applied_once(self, store: Any) -> None:
        assert store.schema_version("core") >= 1
        assert store.migrate("core", []) >= 0
        assert store.schema_version("core") >= 1

    # -- journal -----------------------------------------------------------------------------
    def test_append_assigns_stream_seq_and_global_position(self, store: Any) -> None:
        journal = Journal(store)
        a1 = journal.append("orders/1", "order.placed", {"n": 1})
        b1 = journal.append("orders/2", "order.placed", {"n": 2})
        a2 = journal.append("orders/1", "order.shipped", {"n": 3}, subject="order.shipped.eu")
        assert (a1.id, b1.id, a2.id) == ("orders/1/1", "orders/2/1", "orders/1/2")
        assert a1.position < b1.position < a2.position
        assert a2.subject == "order.shipped.eu" and a1.subject == "order.placed"
        read = journal.read(0)
        assert [e.id for e in read] == ["orders/1/1", "orders/2/1", "orders/1/2"]
        assert read[0].data == {"n": 1}
        assert [e.id for e in journal.read(a1.position)] == ["orders/2/1", "orders/1/2"]
        assert [e.id for e in journal.read(0, limit=1)] == ["orders/1/1"]
        assert [e.id for e in journal.read(0, stream="orders/1")] == ["orders/1/1", "orders/1/2"]

    def test_append_many_is_one_batch_in_order(self, store: Any) -> None:
        journal = Journal(store)
        events = journal.append_many([NewEvent(f"s/{i % 3}", "t.x", {"i": i}) for i in range(30)])
        assert len(events) == 30
        assert [e.position for e in events] == sorted(e.position for e in events)
        per_stream = [e.seq for e in events if e.stream == "s/0"]
        assert per_stream == list(range(1, 11))
        assert journal.last_position() == events[-1].position

    def test_subject_patterns(self, store: Any) -> None:
        journal = Journal(store)
        for subject in ("order.placed", "order.placed.eu", "order.shipped", "payment.done"):
            journal.append("s", "t", None, subject=subject)
        def subjects(patterns: list[str]) -> list[str]:
            return [e.subject for e in journal.read(0, subjects=patterns)]
        assert subjects(["order.*"]) == ["order.placed", "order.shipped"]
        assert subjects(["order.**"]) == ["order.placed", "order.placed.eu", "order.shipped"]
        assert subjects(["*.done", "order.placed"]) == ["order.placed", "payment.done"]
        assert subjects(["**"]) == ["order.placed", "order.placed.eu", "order.shipped", "payment.done"]
        with pytest.raises(ConfigError):
            journal.read(0, subjects=["order..x"])
        with pytest.raises(ConfigError):
            journal.read(0, subjects=["**.x"])

    def test_scan_moves_past_filtered_rows(self, store: Any) -> None:
        journal = Journal(store)
        for _ in range(5):
            journal.append("s", "noise")
        events, last = store.scan_events(0, 10, ["signal"])
        assert events == [] and last == journal.last_position()

    def test_bad_event_input_changes_nothing(self, store: Any) -> None:
        journal = Journal(store)
        with pytest.raises(PayloadError):
            journal.append("s", "t", {"x": object()})
        with pytest.raises(ConfigError):
            journal.append("", "t", {})
        with pytest.raises(ConfigError):
            journal.append_many([NewEvent("s", "ok"), NewEvent("s", "")])
        assert journal.read(0) == []

    def test_append_joins_the_callers_transaction(self, store: Any) -> None:
        journal = Journal(store)
        conn = self.caller_connection(store)
        try:
            journal.append("tx/1", "kept", {"ok": True}, conn=conn)
            conn.commit()
            journal.append("tx/1", "dropped", {"ok": False}, conn=conn)
            conn.rollback()
        finally:
            conn.close()
        assert [e.type for e in journal.read(0)] == ["kept"]
        assert journal.append("tx/1", "next").seq == 2

    # -- leases ------------------------------------------------------------------------------
    def test_enqueue_is_idempotent_on_key(self, store: Any) -> None:
        assert store.enqueue("q", [("a", {"v": 1}), ("b", {"v": 2})]) == 2
        assert store.enqueue("q", [("a", {"v": 99})]) == 0
        assert store.queue_size("q") == 2
        leases = store.claim("q", 10)
        assert {x.key: x.payload for x in leases} == {"a": {"v": 1}, "b": {"v": 2}}

    def test_claim_batch_and_complete_batch(self, store: Any) -> None:
        store.enqueue("q", [(f"k{i}", i) for i in range(50)])
        first = store.claim("q", 20, owner="w1")
        second = store.claim("q", 100, owner="w2")
        assert len(first) == 20 and len(second) == 30
        assert not {x.key for x in first} & {x.key for x in second}
        assert store.claim("q", 10) == []
        store.complete(first + second)
        assert store.queue_size("q") == 0

    def test_items_not_due_are_not_claimed(self, store: Any, clock: FakeClock) -> None:
        store.enqueue("q", [("later", None, clock.now() + 60)])
        assert store.claim("q") == []
        clock.advance(61)
        assert [x.key for x in store.claim("q")] == ["later"]

    def test_stale_token_raises_and_changes_nothing(self, store: Any, clock: FakeClock) -> None:
        store.enqueue("q", [("a", 1), ("b", 2)])
        old = {x.key: x for x in store.claim("q", 10, lease_for=5, owner="old")}
        clock.advance(6)
        new = {x.key: x for x in store.claim("q", 10, lease_for=5, owner="new")}
        assert new["a"].token > old["a"].token
        with pytest.raises(LeaseLostError):
            store.complete([old["a"]])
        with pytest.raises(LeaseLostError):
            store.complete([new["b"], old["a"]])
        assert store.queue_size("q") == 2  # nothing changed, not even b
        with pytest.raises(LeaseLostError):
            store.release([old["b"]], delay=0)
        store.complete([new["a"], new["b"]])
        assert store.queue_size("q") == 0

    def test_release_makes_due_again_after_delay(self, store: Any, clock: FakeClock) -> None:
        store.enqueue("q", [("a", 1)])
        (lease,) = store.claim("q")
        store.release([lease], delay=30)
        assert store.claim("q") == []
        clock.advance(31)
        (again,) = store.claim("q")
        assert again.attempts == 2 and again.token > lease.token

    def test_extend_keeps_the_lease(self, store: Any, clock: FakeClock) -> None:
        store.enqueue("q", [("a", 1)])
        (lease,) = store.claim("q", lease_for=10)
        clock.advance(8)
        (lease,) = store.extend([lease], lease_for=10)
        clock.advance(8)
        assert store.claim("q") == []
        store.complete([lease])

    def test_extend_inside_a_transaction_is_fenced(self, store: Any, clock: FakeClock) -> None:
        store.enqueue("q", [("a", 1)])
        (lease,) = store.claim("q", lease_for=10)
        with store.transaction() as tx:
            (lease,) = store.extend([lease], lease_for=10, tx=tx)
        assert lease.expires_at == clock.now() + 10
        clock.advance(11)
        (again,) = store.claim("q", lease_for=10)
        with pytest.raises(LeaseLostError), store.transaction() as tx:
            store.extend([lease], lease_for=10, tx=tx)
        store.complete([again])

    def test_claim_keys_leases_only_the_named_due_free_items(self, store: Any, clock: FakeClock) -> None:
        store.enqueue("q", [("a", {"v": 1}), ("b", 2), ("c", 3), ("later", 4, clock.now() + 60)])
        (held,) = store.claim_keys("q", ["b"], owner="other")
        leases = store.claim_keys("q", ["a", "b", "later", "absent"], lease_for=5, owner="me")
        assert [(x.key, x.payload, x.owner, x.attempts) for x in leases] == [("a", {"v": 1}, "me", 1)]
        assert leases[0].token > 0 and store.claim_keys("q", []) == []
        with store.transaction() as tx:
            assert store.claim_keys("q", ["a", "c"], tx=tx)[0].key == "c"  # a is held now
        assert [x.key for x in store.claim("q", 10)] == []  # everything due is held
        clock.advance(6)
        (retaken,) = store.claim_keys("q", ["a"])  # a's lease lapsed
        assert retaken.token > leases[0].token and retaken.attempts == 2
        with pytest.raises(LeaseLostError):
            store.complete(leases)
        store.complete([held, retaken])

    def test_enqueue_claimed_gives_the_lease_a_claim_would(self, store: Any, clock: FakeClock) -> None:
        with store.transaction() as tx:
            lease = store.enqueue_claimed("q", "a", {"v": 1}, lease_for=5, owner="me", tx=tx)
        store.enqueue("q", [("b", {"v": 1})])
        (claimed,) = store.claim_keys("q", ["b"], lease_for=5, owner="me")
        assert lease is not None
        assert (lease.queue, lease.key, lease.payload, lease.owner, lease.token, lease.attempts) == (
            claimed.queue, "a", claimed.payload, claimed.owner, claimed.token, claimed.attempts)
        assert lease.expires_at == clock.now() + 5 == claimed.expires_at
        with store.transaction() as tx:
            assert store.enqueue_claimed("q", "a", None, tx=tx) is None  # queued already: unchanged
            with pytest.raises(ConfigError):
                store.enqueue_claimed("q", "", None, tx=tx)
        assert store.claim_keys("q", ["a"]) == [] and store.claim("q") == []  # held, as a claimed item is
        clock.advance(6)
        (retaken,) = store.claim_keys("q", ["a"])  # its lease lapsed
        assert retaken.token > lease.token and retaken.attempts == 2 and retaken.payload == {"v": 1}
        with pytest.raises(LeaseLostError):
            store.complete([lease])
        store.complete([retaken, claimed])

    def test_bring_forward_moves_only_a_waiting_item(self, store: Any, clock: FakeClock) -> None:
        now = clock.now()
        store.enqueue("q", [("later", None, now + 60), ("soon", None, now + 5), ("held", None)])
        (held,) = store.claim("q", lease_for=30)
        assert store.bring_forward("q", "later", now + 5)
        with store.transaction() as tx:
            assert not store.bring_forward("q", "soon", now + 10, tx=tx)  # due before that already
        assert not store.bring_forward("q", "held", now - 10)  # its holder decides when it comes back
        assert not store.bring_forward("q", "absent", now)
        assert store.next_due("q") == now + 5
        clock.advance(5)
        assert {x.key for x in store.claim("q", 10)} == {"later", "soon"}
        store.complete([held])

    def test_concurrent_claimers_never_share_an_item(self, store: Any) -> None:
        store.enqueue("q", [(f"k{i}", i) for i in range(400)])
        got: list[str] = []
        lock = threading.Lock()

        def worker(n: int) -> None:
            while True:
                leases = store.claim("q", 7, owner=f"w{n}")
                if not leases:
                    return
                store.complete(leases)
                with lock:
                    got.extend(x.key for x in leases)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == sorted(f"k{i}" for i in range(400))

    # -- key/value ---------------------------------------------------------------------------
    def test_kv_compare_and_set(self, store: Any) -> None:
        assert store.kv_put("ns", "k", {"v": 1}, expected_version=0) == 1
        with pytest.raises(LeaseLostError):
            store.kv_put("ns", "k", {"v": 2}, expected_version=0)
        assert store.kv_put("ns", "k", {"v": 2}, expected_version=1) == 2
        with pytest.raises(LeaseLostError):
            store.kv_put("ns", "k", {"v": 3}, expected_version=1)
        assert store.kv_get("ns", "k") == ({"v": 2}, 2)
        store.set_cursor("route", 42)
        assert store.get_cursor("route") == 42 and store.get_cursor("other") == 0

    # -- timers ------------------------------------------------------------------------------
    def test_scheduler_fires_once_and_cancels(self, store: Any, clock: FakeClock) -> None:
        scheduler = StoreScheduler(store)
        fired: list[Any] = []
        handlers = {"tick": lambda _topic, payload: fired.append(payload)}
        scheduler.schedule("tick", {"n": 1}, at=clock.now() + 10, key="t1")
        scheduler.schedule("tick", {"n": 1}, at=clock.now() + 10, key="t1")  # same key: no-op
        scheduler.schedule("tick", {"n": 2}, at=clock.now() + 10, key="t2")
        assert scheduler.cancel("t2") is True
        assert scheduler.fire_due(handlers) == 0
        clock.advance(11)
        assert scheduler.fire_due(handlers) == 1
        assert scheduler.fire_due(handlers) == 0
        assert fired == [{"n": 1}]
        assert scheduler.cancel("t1") is False

    def test_scheduler_refires_after_a_failed_handler(self, store: Any, clock: FakeClock) -> None:
        scheduler = StoreScheduler(store, retry_delay=5)
        calls: list[int] = []

        def flaky(_topic: str, payload: Any) -> None:
            calls.append(payload)
            if len(calls) == 1:
                raise RuntimeError("boom")

        scheduler.schedule("t", 7, at=clock.now())
        assert scheduler.fire_due({"t": flaky}) == 0
        clock.advance(6)
        assert scheduler.fire_due({"t": flaky}) == 1
        assert calls == [7, 7] and scheduler.pending() == 0
