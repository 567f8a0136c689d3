"""How fresh effects reach the dispatcher: through the outbox's own table, never through the journal.

An effect submitted due at once is in the due index from its first write, like any effect a worker may take;
the journal only records what happened. These tests hold that path to its promise: every fresh effect is
claimed once, whatever else the journal holds, whoever submitted it, and effects written before the upgrade
are claimed too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from errands.core import (
    ConfigError,
    Effect,
    EffectStatus,
    FakeClock,
    Journal,
    NewEvent,
    Outbox,
    open_store,
)
from errands.core.testing import FakeConnector


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Any:
    url = f"sqlite:///{tmp_path / 'fresh.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    s = open_store(url, clock=clock)
    yield s
    s.close()


def effect(key: str, connector: str = "bank") -> Effect:
    return Effect(key=key, connector=connector, payload={"n": key})


def test_fresh_effect_is_due_in_the_index_and_claimed_once(store: Any) -> None:
    bank = FakeConnector("bank")
    outbox = Outbox(store, connectors={"bank": bank})
    rec = outbox.submit(effect("a"))
    assert rec.status is EffectStatus.PENDING
    assert rec.next_attempt_at == rec.created_at
    with store.read() as tx:
        assert tx.one("SELECT next_attempt_at FROM em_effects WHERE key = 'a'")[0] == rec.created_at.timestamp()
    assert outbox.get("a").next_attempt_at == rec.created_at
    assert outbox.stats()["due"] == 1
    assert [o.key for o in outbox.dispatch_once()] == ["a"]
    assert outbox.dispatch_once() == []
    assert bank.deliveries("a") == 1
    assert outbox.get("a").status is EffectStatus.CONFIRMED
    outbox.close()


def test_long_runs_of_other_events_do_not_hold_fresh_effects_back(store: Any) -> None:
    outbox = Outbox(store, connectors={"bank": FakeConnector("bank")}, batch_size=50)
    journal = Journal(store)
    outbox.submit(effect("before"))
    # More unrelated events than one scan window holds, then more fresh effects than one batch.
    journal.append_many([NewEvent(f"orders/{i}", "order.placed", {"i": i}) for i in range(12_000)])
    outbox.submit_many([effect(f"after-{i}") for i in range(120)])
    assert outbox.drain() == 121
    assert outbox.stats()["effects"]["CONFIRMED"] == 121
    with store.read() as tx:
        assert tx.one("SELECT COUNT(*) FROM em_kv WHERE namespace = 'outbox'")[0] == 0  # no cursor into the journal
    outbox.close()


def test_work_is_found_in_the_effect_table_not_in_the_journal(store: Any) -> None:
    bank = FakeConnector("bank")
    outbox = Outbox(store, connectors={"bank": bank})
    outbox.submit_many([effect(f"k{i}") for i in range(3)])
    with store.transaction() as tx:
        tx.execute("DELETE FROM em_events")  # what the journal holds plays no part in finding work
    assert sorted(o.key for o in outbox.dispatch_once()) == ["k0", "k1", "k2"]
    assert all(bank.deliveries(f"k{i}") == 1 for i in range(3))
    outbox.close()


def test_unknown_connector_is_handed_to_a_worker_that_knows_it(store: Any) -> None:
    both = Outbox(store, connectors={"bank": FakeConnector("bank"), "mail": FakeConnector("mail")})
    both.submit(effect("pay", "bank"))
    both.submit(effect("note", "mail"))
    banks_only = Outbox(store, connectors={"bank": FakeConnector("bank")})
    assert [o.key for o in banks_only.dispatch_once()] == ["pay"]
    assert banks_only.dispatch_once() == []
    # The mail effect was not dropped when the cursor moved past it: the index carries it now.
    with store.read() as tx:
        assert tx.one("SELECT next_attempt_at FROM em_effects WHERE key = 'note'")[0] is not None
    mail_only = Outbox(store, connectors={"mail": FakeConnector("mail")})
    assert [o.key for o in mail_only.dispatch_once()] == ["note"]
    assert both.get("note").status is EffectStatus.CONFIRMED
    for ob in (both, banks_only, mail_only):
        ob.close()


def test_cancelled_and_deferred_fresh_effects(store: Any, clock: FakeClock) -> None:
    outbox = Outbox(store, connectors={"bank": FakeConnector("bank")})
    outbox.submit(effect("gone"))
    outbox.cancel("gone", reason="changed my mind")
    later = Effect(key="later", connector="bank", payload={}, dispatch_at=clock.now() + 60)
    assert outbox.submit(later).status is EffectStatus.PENDING
    outbox.submit(effect("now"))
    assert [o.key for o in outbox.dispatch_once()] == ["now"]
    assert outbox.get("gone").status is EffectStatus.CANCELLED
    clock.advance(61)
    assert [o.key for o in outbox.dispatch_once()] == ["later"]
    outbox.close()


def test_effects_submitted_in_the_callers_transaction(tmp_path: Path, clock: FakeClock) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'caller.db'}", clock=clock)
    outbox = Outbox(store, connectors={"bank": FakeConnector("bank")})
    conn = store.connect()
    with conn:
        outbox.submit(effect("rolled-back"), conn=conn)
        conn.rollback()
    with conn:
        outbox.submit(effect("kept"), conn=conn)
    conn.close()
    assert [o.key for o in outbox.dispatch_once()] == ["kept"]
    assert {r.key for r in outbox.list()} == {"kept"}
    outbox.close()
    store.close()


def test_fresh_effects_written_under_schema_version_2_are_claimed_after_the_upgrade(store: Any) -> None:
    from errands.core.outbox import _effect_table

    store.migrate("outbox", _effect_table.migrations(store.dialect)[:2])
    now = store.clock.now()
    with store.transaction() as tx:
        # What version 2 wrote: a fresh effect with no next_attempt_at, announced to a cursor in em_kv.
        tx.execute(
            "INSERT INTO em_effects (key, connector, tool, payload, semantics, human_gate, not_before, status, "
            "max_attempts, created_at, updated_at) VALUES ('old', 'bank', '', '{}', 'IDEMPOTENT', 0, ?, 'PENDING', "
            "5, ?, ?)", (now + 5, now, now))
        tx.execute("INSERT INTO em_kv (namespace, key, value, version, updated_at) VALUES ('outbox', 'fresh', '0', "
                   "1, 0)")
    upgraded = open_store(store.url, clock=store.clock)
    outbox = Outbox(upgraded, connectors={"bank": FakeConnector("bank")})
    assert upgraded.schema_version("outbox") == 3
    assert outbox.dispatch_once() == []  # due at its dispatch_at, not before
    store.clock.advance(5)
    assert [o.key for o in outbox.dispatch_once()] == ["old"]
    with upgraded.read() as tx:
        assert tx.one("SELECT COUNT(*) FROM em_kv WHERE namespace = 'outbox'")[0] == 0
    outbox.close()
    upgraded.close()


def test_effect_streams_are_numbered_by_position_and_reserved(store: Any) -> None:
    outbox = Outbox(store, connectors={"bank": FakeConnector("bank")})
    journal = Journal(store)
    journal.append("orders/1", "order.placed", {})
    outbox.submit(effect("a"))
    outbox.drain()
    events = [e for e in journal.read(0) if e.stream == "effects/bank"]
    assert [e.type for e in events] == ["effect.pending", "effect.dispatching", "effect.confirmed"]
    assert all(e.seq == e.position and e.id == f"effects/bank/{e.position}" for e in events)
    assert journal.read(0)[0].id == "orders/1/1"
    before = len(journal.read(0))
    with pytest.raises(ConfigError, match="belongs to the outbox"):
        journal.append("effects/bank", "effect.confirmed", {"key": "a"})
    assert len(journal.read(0)) == before
    outbox.close()


def test_submitted_record_equals_the_stored_one(store: Any) -> None:
    outbox = Outbox(store, connectors={"bank": FakeConnector("bank")})
    rec = outbox.submit(Effect(key="r", connector="bank", tool="pay", payload={"n": 1}, business_key="b-1",
                               run_id="run-1", metadata={"who": "me"}))
    assert rec == outbox.get("r")
    assert rec.to_dict() == outbox.get("r").to_dict()
    outbox.close()


def test_circular_payload_is_a_payload_error_and_nothing_is_stored(store: Any) -> None:
    from errands.core import PayloadError

    outbox = Outbox(store, connectors={"bank": FakeConnector("bank")})
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(PayloadError, match="JSON"):
        outbox.submit(Effect(key="loop", connector="bank", payload={"x": loop}))
    assert outbox.list() == []
    outbox.close()


def test_a_failed_commit_leaves_the_store_usable(tmp_path: Path, clock: FakeClock) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}", clock=clock)
    outbox = Outbox(store, connectors={"bank": FakeConnector("bank")})
    # A deferred foreign key violation fails at COMMIT, not at the statement.
    with store.transaction() as tx:
        tx.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        tx.execute("CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(Exception, match="FOREIGN KEY"):
        with store.transaction() as tx:
            tx.execute("INSERT INTO child (p) VALUES (1)")
    assert outbox.submit(effect("after")).status is EffectStatus.PENDING
    with store.read() as tx:
        assert tx.one("SELECT COUNT(*) FROM child")[0] == 0
    outbox.close()
    store.close()


def test_submit_event_is_what_the_general_builder_writes(store: Any) -> None:
    from errands.core.outbox._transitions import effect_event

    outbox = Outbox(store, connectors={"bank": FakeConnector("bank")})
    outbox.submit(Effect(key="s-1", connector="bank", tool="pay", payload={}, run_id="run-7"))
    outbox.submit(Effect(key="s-2", connector="bank", payload={}))
    for key, tool, run_id in (("s-1", "pay", "run-7"), ("s-2", "", None)):
        (event,) = outbox.history(key)
        expected = effect_event(key, "bank", tool, "PENDING", semantics="IDEMPOTENT", run_id=run_id)
        assert (event.stream, event.type, event.subject, event.data) == (
            expected.stream, expected.type, expected.subject, json.loads(expected.data))
    outbox.close()


def test_fresh_effect_with_a_past_dispatch_at_is_due_since_it_was_submitted(store: Any, clock: FakeClock) -> None:
    outbox = Outbox(store, connectors={"bank": FakeConnector("bank")})
    rec = outbox.submit(Effect(key="past", connector="bank", payload={}, dispatch_at=clock.now() - 60))
    assert rec.next_attempt_at == rec.created_at
    assert outbox.get("past") == rec
    outbox.close()
