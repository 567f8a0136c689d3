"""Store URLs and options at the edges: bad input, durability settings, missing drivers."""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from errands.core import (
    ConfigError,
    ErrandsError,
    LeaseLostError,
    MemoryStore,
    MissingDependencyError,
    PostgresStore,
    SQLiteStore,
    SQLStore,
    is_infrastructure_error,
    open_store,
)
from errands.core.testing import faults

SYNC_LEVELS = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("app.db", "store URL must look like"),
        ("", "store URL must look like"),
        ("sqlite://host/app.db", "has a host"),
        ("sqlite:///", "names no file"),
        ("redis://localhost/0", "unknown store scheme 'redis'"),
        ("sqlite:///app.db?synchronous=SOMETIMES", "synchronous must be one of OFF, NORMAL, FULL, EXTRA"),
        ("sqlite:///app.db?busy_timeout=soon", "busy_timeout must be"),
        ("sqlite:///app.db?synchronus=FULL", "unknown store option"),
    ],
)
def test_bad_url_is_a_config_error_naming_the_value(url: str, message: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message) as info:
        open_store(url)
    err = info.value
    assert err.field is not None and err.field.startswith("store")
    assert err.value is not None
    assert str(err.value) in url or str(err.value).upper() in url.upper()
    assert not (tmp_path / "app.db").exists(), "a refused URL must create nothing"


def test_non_string_url() -> None:
    with pytest.raises(ConfigError, match="got 42") as info:
        open_store(42)  # type: ignore[arg-type]
    assert info.value.value == 42


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        open_store("mongodb://x/y")
    message = str(info.value)
    for scheme in ("memory", "postgres", "postgresql", "sqlite"):
        assert scheme in message
    assert info.value.value == "mongodb://x/y"


def test_missing_directory_is_named(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'app.db'}"
    with pytest.raises(ConfigError, match="does not exist") as info:
        open_store(url)
    assert info.value.value == url
    assert not (tmp_path / "no").exists()


def test_scheme_is_case_insensitive(tmp_path: Path) -> None:
    store = open_store(f"SQLite:///{tmp_path / 'a.db'}")
    try:
        assert isinstance(store, SQLiteStore)
    finally:
        store.close()


def _pragma(store: Any, name: str) -> Any:
    with store.read() as tx:
        row = tx.one(f"PRAGMA {name}")
    return row[0] if row else None


@pytest.mark.parametrize("level", ["FULL", "full", "EXTRA", "OFF"])
def test_synchronous_from_url_is_honoured(tmp_path: Path, level: str) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'd.db'}?synchronous={level}")
    try:
        assert store.synchronous == level.upper()
        assert _pragma(store, "synchronous") == SYNC_LEVELS[level.upper()]
        assert _pragma(store, "journal_mode") == "wal"
    finally:
        store.close()


def test_synchronous_defaults_to_full_and_normal_is_an_opt_in(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'd.db'}")
    try:
        assert store.synchronous == "FULL"
        assert _pragma(store, "synchronous") == SYNC_LEVELS["FULL"]
    finally:
        store.close()
    for opened in (open_store(f"sqlite:///{tmp_path / 'e.db'}", synchronous="normal"),
                   open_store(f"sqlite:///{tmp_path / 'f.db'}?synchronous=normal")):
        try:
            assert _pragma(opened, "synchronous") == SYNC_LEVELS["NORMAL"]
        finally:
            opened.close()


def test_statement_journals_stay_in_memory(tmp_path: Path) -> None:
    """A batched write's statement journal is not spilled to a temporary file (``temp_store = MEMORY``)."""
    store = open_store(f"sqlite:///{tmp_path / 't.db'}")
    try:
        assert _pragma(store, "temp_store") == 2
    finally:
        store.close()


def test_busy_timeout_from_url(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'b.db'}?busy_timeout=1234")
    try:
        assert _pragma(store, "busy_timeout") == 1234
    finally:
        store.close()


def test_relative_and_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = open_store("sqlite:///rel.db")
    rel.close()
    assert (tmp_path / "rel.db").exists()
    absolute = open_store(f"sqlite:///{tmp_path / 'abs.db'}")
    absolute.close()
    assert (tmp_path / "abs.db").exists()


def test_in_memory_urls() -> None:
    a, b = open_store("memory://"), open_store("memory://")
    try:
        assert isinstance(a, MemoryStore)
        a.kv_put("ns", "k", 1)
        assert b.kv_get("ns", "k") is None, "each memory:// store is private"
        joined = a.connect()
        assert joined.execute("SELECT value FROM em_kv WHERE key = 'k'").fetchone() == ("1",)
        joined.close()
    finally:
        a.close()
        b.close()
    mem = open_store("sqlite:///:memory:")
    try:
        with pytest.raises(ConfigError, match="in-memory store cannot be shared"):
            mem.connect()
    finally:
        mem.close()


def test_wrong_connection_type_for_conn(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        with pytest.raises(ConfigError, match=r"conn must be .*sqlite3\.Connection") as info:
            store.append_events([], conn=object())
        assert info.value.field == "conn"
    finally:
        store.close()


def test_migrations_are_versioned_and_applied_once(tmp_path: Path) -> None:
    from errands.core import Migration

    url = f"sqlite:///{tmp_path / 'm.db'}"
    steps = [Migration(1, "CREATE TABLE t_one (a {bigint})"), Migration(2, "ALTER TABLE t_one ADD COLUMN b {double}")]
    store = open_store(url)
    try:
        assert store.schema_version("core") >= 1
        assert store.migrate("mine", steps[:1]) == 1
    finally:
        store.close()
    store = open_store(url)
    try:
        assert store.schema_version("mine") == 1
        assert store.migrate("mine", steps) == 2
        with store.transaction() as tx:
            tx.execute("INSERT INTO t_one (a, b) VALUES (?, ?)", (1, 2.5))
        assert store.schema_version("mine") == 2
    finally:
        store.close()


def test_missing_psycopg_names_the_postgres_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # makes ``import psycopg`` raise ImportError
    with pytest.raises(MissingDependencyError) as info:
        open_store("postgresql://errands:secret@127.0.0.1:1/app")
    err = info.value
    assert err.package == "psycopg"
    assert err.extra == "postgres"
    assert "pip install 'errands[postgres]'" in str(err)
    assert "secret" not in str(err)
    assert isinstance(err, ImportError)


def test_postgres_alias_scheme_reaches_the_postgres_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(MissingDependencyError):
        open_store("postgres://u@127.0.0.1:1/app")


def test_bad_pool_size_is_a_config_error() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(ConfigError, match="pool_size") as info:
        PostgresStore("postgresql://u@127.0.0.1:1/app?pool_size=many")
    assert info.value.value == "many"


def test_password_never_shows_in_repr() -> None:
    store = SQLStore("postgresql://errands:s3cr3t@db.example:5432/app")
    assert "s3cr3t" not in repr(store)
    assert "errands:***@db.example" in repr(store)


def test_postgres_alias_and_wal_free_url_on_a_real_server(postgres_url: str) -> None:
    store = open_store(postgres_url.replace("postgresql://", "postgres://", 1) + "?pool_size=2")
    try:
        assert isinstance(store, PostgresStore)
        assert store.schema_version("core") >= 1
    finally:
        store.close()


def test_sqlite_file_survives_reopen(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}?synchronous=FULL"
    store = open_store(url)
    store.kv_put("ns", "k", {"v": 1})
    store.close()
    raw = sqlite3.connect(tmp_path / "r.db")
    assert raw.execute("SELECT value FROM em_kv").fetchone() == ('{"v":1}',)
    raw.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path, clock: Any) -> Any:
    if request.param == "sqlite":
        store = open_store(f"sqlite:///{tmp_path / 'q.db'}", clock=clock)
    else:
        store = open_store(request.getfixturevalue("postgres_url"), clock=clock)
    yield store
    store.close()


def test_large_batches_complete_in_one_call(any_store: Any) -> None:
    any_store.enqueue("q", [(f"k{i}", i) for i in range(2500)])
    leases = any_store.claim("q", 2500)
    assert len(leases) == 2500
    any_store.complete(leases)
    assert any_store.queue_size("q") == 0


def test_batch_release_and_extend_with_one_stale_lease_change_nothing(any_store: Any, clock: Any) -> None:
    any_store.enqueue("q", [(k, k) for k in "abc"])
    old = {x.key: x for x in any_store.claim("q", 10, lease_for=5)}
    any_store.release([old["b"]])
    (newer_b,) = any_store.claim("q", 10, lease_for=100)
    assert newer_b.key == "b" and newer_b.token > old["b"].token
    stale_batch = [old["a"], old["b"], old["c"]]
    with pytest.raises(LeaseLostError, match="q/b"):
        any_store.extend(stale_batch, lease_for=100)
    with pytest.raises(LeaseLostError, match="q/b"):
        any_store.release(stale_batch, delay=0)
    with pytest.raises(LeaseLostError, match="q/b"):
        any_store.complete(stale_batch)
    assert any_store.queue_size("q") == 3
    clock.advance(6)
    # a and c were not extended, so their leases lapsed; b is still held by its newer lease
    assert sorted(x.key for x in any_store.claim("q", 10)) == ["a", "c"]
    with pytest.raises(LeaseLostError):
        any_store.complete([newer_b, newer_b])
    any_store.complete([newer_b])
    assert any_store.queue_size("q") == 2


# -- the PostgreSQL connection pool ----------------------------------------------------------------


def _sessions(url: str, application_name: str) -> list[int]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                            "AND application_name = %s", (application_name,)).fetchall()
    return [int(r[0]) for r in rows]


def _backend_pid(store: Any) -> int:
    with store.transaction() as tx:
        return int(tx.one("SELECT pg_backend_pid()")[0])


def _hold_connections(store: Any, n: int) -> set[int]:
    """Run ``n`` transactions at once, so that the pool opens ``n`` connections; their backend pids."""
    barrier = threading.Barrier(n)
    pids: set[int] = set()

    def hold() -> None:
        with store.transaction() as tx:
            pids.add(int(tx.one("SELECT pg_backend_pid()")[0]))
            barrier.wait(timeout=30)

    threads = [threading.Thread(target=hold) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return pids


def test_connections_terminated_between_transactions_are_never_handed_out(postgres_url: str) -> None:
    store = open_store(postgres_url + "?pool_size=4&application_name=errands-drop")
    try:
        before = _hold_connections(store, 4)
        assert len(before) == 4
        assert faults.terminate_postgres_connections(postgres_url, application_name="errands-drop") >= 4
        for i in range(8):  # every idle connection is dead: none of them may reach a transaction
            store.kv_put("ns", f"k{i}", {"i": i})
        assert store.kv_get("ns", "k7") == ({"i": 7}, 1)
        with store.read() as tx:
            assert tx.one("SELECT count(*) FROM em_kv")[0] == 8
            assert int(tx.one("SELECT pg_backend_pid()")[0]) not in before
        after = _hold_connections(store, 4)  # concurrent use after the drop works as well
        assert not after & before
    finally:
        store.close()


def test_a_connection_that_dies_after_it_was_taken_is_replaced_at_the_first_statement(postgres_url: str) -> None:
    store = open_store(postgres_url + "?pool_size=2&application_name=errands-first")
    try:
        first = _backend_pid(store)
        with store.transaction() as tx:
            # Taken from the pool alive; dropped before the transaction said anything.
            assert faults.terminate_postgres_connections(postgres_url, application_name="errands-first") >= 1
            tx.execute("INSERT INTO em_kv (namespace, key, value, version, updated_at) VALUES ('ns', 'k', '1', 1, 0)")
            assert int(tx.one("SELECT pg_backend_pid()")[0]) != first
        assert store.kv_get("ns", "k") == (1, 1)
        assert _backend_pid(store) != first
    finally:
        store.close()


def test_a_connection_that_dies_after_a_statement_through_raw_is_never_replaced_mid_transaction(
        postgres_url: str) -> None:
    """A statement already ran on the connection (through ``tx.raw``, bypassing the transaction's first-statement
    watch): when the connection then dies, the next statement raises instead of going again on another
    connection, so nothing of the transaction commits without the rest."""
    from errands.core import is_infrastructure_error

    store = open_store(postgres_url + "?pool_size=2&application_name=errands-raw-first")
    try:
        with pytest.raises(Exception) as info, store.transaction() as tx:
            tx.raw.execute("INSERT INTO em_kv (namespace, key, value, version, updated_at) "
                           "VALUES ('ns', 'first', '1', 1, 0)")
            assert faults.terminate_postgres_connections(postgres_url, application_name="errands-raw-first") >= 1
            tx.execute("INSERT INTO em_kv (namespace, key, value, version, updated_at) VALUES ('ns', 'second', '1', 1, 0)")
        assert is_infrastructure_error(info.value), info.value
        assert store.kv_get("ns", "first") is None and store.kv_get("ns", "second") is None
    finally:
        store.close()


def test_a_statement_runs_alone_and_a_dead_connection_under_it_is_infrastructure_and_discarded(
        postgres_url: str) -> None:
    from errands.core import is_infrastructure_error
    from errands.core.errors import ErrandsError

    store = open_store(postgres_url + "?pool_size=1&application_name=errands-single")
    try:
        first = _backend_pid(store)
        # In autocommit the statement may have committed before its connection broke: it is never run again
        # by the store (its caller decides), and the dead connection goes.
        with pytest.raises(Exception) as info, store.statement() as tx:
            assert faults.terminate_postgres_connections(postgres_url, application_name="errands-single") >= 1
            tx.execute("INSERT INTO em_kv (namespace, key, value, version, updated_at) VALUES ('ns', 'a', '1', 1, 0)")
        assert is_infrastructure_error(info.value), info.value
        assert _backend_pid(store) != first
        with store.statement() as tx:
            tx.execute("INSERT INTO em_kv (namespace, key, value, version, updated_at) VALUES ('ns', 'a', '1', 1, 0)")
        assert store.kv_get("ns", "a") == (1, 1)
        with pytest.raises(ErrandsError, match="one statement"), store.statement() as tx:
            tx.execute("INSERT INTO em_kv (namespace, key, value, version, updated_at) VALUES ('ns', 'b', '1', 1, 0)")
            tx.execute("SELECT 1")
        assert store.kv_get("ns", "b") == (1, 1), "the one statement committed as it ran"
        with store.transaction() as tx:  # the connection went back to the pool out of autocommit
            tx.execute("INSERT INTO em_kv (namespace, key, value, version, updated_at) VALUES ('ns', 'c', '1', 1, 0)")
            tx.raw.rollback()
        assert store.kv_get("ns", "c") is None
    finally:
        store.close()


def test_a_connection_dropped_inside_a_transaction_is_infrastructure_and_discarded(postgres_url: str) -> None:
    from errands.core import is_infrastructure_error

    store = open_store(postgres_url + "?pool_size=2&application_name=errands-mid")
    try:
        with pytest.raises(Exception) as info:
            with store.transaction() as tx:
                dead = int(tx.one("SELECT pg_backend_pid()")[0])
                faults.terminate_postgres_connections(postgres_url, application_name="errands-mid")
                tx.execute("INSERT INTO em_kv (namespace, key, value, version, updated_at) "
                           "VALUES ('ns', 'lost', '1', 1, 0)")
        assert is_infrastructure_error(info.value), info.value
        assert _backend_pid(store) != dead
        assert store.kv_get("ns", "lost") is None
    finally:
        store.close()


def test_an_injected_dropped_connection_is_never_handed_out_again(postgres_url: str) -> None:
    store = open_store(postgres_url + "?pool_size=1")
    try:
        first = _backend_pid(store)
        plan = faults.FaultPlan(at=[1], faults=[faults.Fault(kind="dropped")])
        with faults.inject(store, plan), pytest.raises(Exception, match="closed the connection"):
            store.kv_put("ns", "k", 1)
        assert len(plan.injected) == 1
        assert _backend_pid(store) != first, "the connection the fault closed went back to no one"
        store.kv_put("ns", "k", 2)
        assert store.kv_get("ns", "k") == (2, 1)
    finally:
        store.close()


def test_pool_size_bounds_the_connections(postgres_url: str) -> None:
    store = open_store(postgres_url + "?pool_size=2&application_name=errands-size")
    try:
        pids: set[int] = set()

        def work() -> None:
            for _ in range(5):
                with store.transaction() as tx:
                    pids.add(int(tx.one("SELECT pg_backend_pid() FROM pg_sleep(0.01)")[0]))

        threads = [threading.Thread(target=work) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert 1 <= len(pids) <= 2
        assert len(_sessions(postgres_url, "errands-size")) <= 2
    finally:
        store.close()


def test_connections_past_their_max_lifetime_are_replaced(postgres_url: str) -> None:
    store = open_store(postgres_url + "?pool_size=1&pool_max_lifetime=0.2")
    try:
        first = _backend_pid(store)
        time.sleep(0.5)  # let the connection outlive its lifetime; it is retired when it comes back
        _backend_pid(store)
        assert _backend_pid(store) != first
    finally:
        store.close()


def test_close_closes_the_pool(postgres_url: str) -> None:
    store = open_store(postgres_url + "?pool_size=3&application_name=errands-close")
    _hold_connections(store, 3)
    assert len(_sessions(postgres_url, "errands-close")) >= 1
    store.close()
    deadline = time.monotonic() + 30
    while _sessions(postgres_url, "errands-close") and time.monotonic() < deadline:
        time.sleep(0.02)  # a backend leaves pg_stat_activity a moment after its client hangs up
    assert _sessions(postgres_url, "errands-close") == []
    with pytest.raises(ErrandsError, match="closed") as info:
        store.kv_put("ns", "k", 1)
    assert not is_infrastructure_error(info.value), "a closed store is a bug to fix, not a fault to retry"
    store.close()  # closing twice is harmless


@pytest.mark.parametrize(("option", "value"), [
    ("pool_size", "0"), ("pool_size", "many"), ("pool_min_size", "-1"), ("pool_min_size", "9"),
    ("pool_timeout", "soon"), ("pool_timeout", "0"), ("pool_max_lifetime", "inf"), ("pool_max_idle", "nan"),
    ("pool_reconnect_timeout", "-5"),
])
def test_bad_pool_options_are_config_errors_naming_them(option: str, value: str) -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(ConfigError, match=option) as info:
        PostgresStore(f"postgresql://u@127.0.0.1:1/app?{option}={value}")
    assert info.value.field == f"store.{option}"
    assert info.value.value == value


def test_missing_psycopg_pool_names_the_postgres_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("psycopg")
    monkeypatch.setitem(sys.modules, "psycopg_pool", None)
    with pytest.raises(MissingDependencyError) as info:
        open_store("postgresql://errands:secret@127.0.0.1:1/app")
    assert info.value.package == "psycopg-pool" and info.value.extra == "postgres"
    assert "secret" not in str(info.value)


def test_an_unreachable_server_fails_at_open_with_its_own_error() -> None:
    psycopg = pytest.importorskip("psycopg")
    from errands.core.testing._services import free_port

    with pytest.raises(psycopg.OperationalError) as info:
        open_store(f"postgresql://u@127.0.0.1:{free_port()}/app?connect_timeout=5")
    assert type(info.value).__module__.startswith("psycopg") and "PoolTimeout" not in type(info.value).__name__
    assert "refused" in str(info.value) or "connect" in str(info.value)


@pytest.mark.parametrize("count", [2, 100, 101, 250])
def test_events_appended_together_get_the_positions_they_are_read_back_at(any_store: Any, count: int) -> None:
    """Several events in one transaction: counted streams and a positioned one (the outbox's ``effects/``: seq = position), across more rows
    than one statement takes; the positions returned are the rows', in order, after what the journal held."""
    from errands.core.store import NewEvent

    any_store.append_events([NewEvent(stream="before", type="t", data={"i": -1})])
    events = [NewEvent(stream=("effects/t" if i % 3 == 0 else f"counted/{i % 2}"), type="t",
                       data={"i": i}, subject=f"s.{i}") for i in range(count)]
    with any_store.transaction() as tx:
        positions = any_store.append_engine_events(tx, events)
    stored = {e.position: e for e in any_store.read_events(after=1, limit=count + 10)}
    assert positions == sorted(stored) and len(positions) == count
    seqs: dict[str, int] = {}
    for position, sent in zip(positions, events):
        got = stored[position]
        assert (got.stream, got.type, got.subject, got.data) == (sent.stream, "t", sent.subject, sent.data)
        if sent.stream.startswith("effects/"):
            assert got.seq == position
        else:
            seqs[sent.stream] = seqs.get(sent.stream, 0) + 1
            assert got.seq == seqs[sent.stream]


def test_insert_all_or_none_inserts_every_row_or_none_and_the_transaction_goes_on(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'u.db'}")
    with store.transaction() as tx:
        tx.execute("CREATE TABLE u (k TEXT PRIMARY KEY)")
        tx.execute("INSERT INTO u (k) VALUES ('taken')")
    with store.transaction() as tx:
        assert tx.insert_all_or_none("INSERT INTO u (k) VALUES ", "(?)", [("a",), ("b",)]) is True
        assert tx.insert_all_or_none("INSERT INTO u (k) VALUES ", "(?)", [("c",), ("taken",), ("d",)]) is False
        tx.execute("INSERT INTO u (k) VALUES ('e')")  # the transaction is still open and usable
        # More rows than one statement takes: inside a savepoint, all of them or none.
        assert tx.insert_all_or_none("INSERT INTO u (k) VALUES ", "(?)",
                                     [(f"y{i}",) for i in range(150)] + [("taken",)]) is False
        assert tx.insert_all_or_none("INSERT INTO u (k) VALUES ", "(?)", [(f"x{i}",) for i in range(101)]) is True
    with store.read() as tx:
        assert {r[0] for r in tx.query("SELECT k FROM u")} == {"taken", "a", "b", "e"} | {f"x{i}" for i in range(101)}
    store.close()
