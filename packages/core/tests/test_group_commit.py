"""Group commit (``SQLStore.group_commit``): concurrent submitters share one transaction, each call returns only
once its own row is committed, and one member's failure is its own.

Run as a script, this file is a submitting process: ``python test_group_commit.py <store url> <run>`` submits effects
from eight threads and prints each key once its ``submit`` has returned, until it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import pytest
from errands.core import Effect, EffectConflictError, Journal, NewEvent, Outbox, TaskEngine, open_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


class NoopConnector:
    name: ClassVar[str] = "noop"

    def dispatch(self, effect: Any) -> Any:  # pragma: no cover - nothing is dispatched here
        raise AssertionError("not dispatched in these tests")


def _url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return (f"sqlite:///{tmp_path / 'group.db'}" if kind == "sqlite"
            else str(request.getfixturevalue("postgres_url")))


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    s = open_store(_url(request.param, tmp_path, request))
    with s.transaction() as tx:
        tx.execute("CREATE TABLE IF NOT EXISTS gc_rows (k TEXT PRIMARY KEY)")
    yield s
    s.close()


def _keys(store: Any) -> set[str]:
    with store.read() as tx:
        return {k for (k,) in tx.query("SELECT k FROM gc_rows")}


def _insert(key: str) -> Callable[[Any], str]:
    def work(tx: Any) -> str:
        tx.execute("INSERT INTO gc_rows (k) VALUES (?)", (key,))
        return key
    return work


@contextlib.contextmanager
def _counting(store: Any) -> Iterator[list[int]]:
    """Count the store's own transactions (each one commit)."""
    opened = [0]
    real = store.transaction

    def transaction(conn: Any = None) -> Any:
        opened[0] += 1
        return real(conn)

    store.transaction = transaction
    try:
        yield opened
    finally:
        del store.transaction


def _one_group(store: Any, works: list[Callable[[Any], Any]]) -> list[tuple[Any, BaseException | None]]:
    """Run ``works`` from threads of their own as one group: a first caller holds the store until every one of them
    waits behind it. Returns what each call returned or raised."""
    return _one_group_of_calls(store, [lambda work=work: store.group_commit(work) for work in works])


def _one_group_of_calls(store: Any, calls: list[Callable[[], Any]]) -> list[tuple[Any, BaseException | None]]:
    """``_one_group`` for calls that reach ``group_commit`` themselves (an outbox's ``submit``): each runs in a thread
    of its own while a first caller holds the store, until every one of them waits behind it."""
    gate = threading.Event()
    out: list[tuple[Any, BaseException | None]] = [(None, None)] * len(calls)

    def call(i: int) -> None:
        try:
            out[i] = (calls[i](), None)
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to look at
            out[i] = (None, exc)

    entered = threading.Event()

    def hold(tx: Any) -> None:
        entered.set()  # the first caller's transaction is open: whoever comes now waits behind it
        gate.wait(30)

    first = threading.Thread(target=store.group_commit, args=(hold,))
    first.start()
    entered.wait(30)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(store._committer._threads.queue) < len(calls) and time.monotonic() < deadline:
        time.sleep(0.001)
    gate.set()
    first.join()
    for t in threads:
        t.join()
    return out


def _batched(store: Any, key: str, *, own: bool = False) -> Callable[[], Any]:
    """A call whose row goes in its group's one multi-row statement (``Batch``) unless ``own``: left to its work."""
    from errands.core.store import Batch

    def work(tx: Any) -> str:
        tx.execute("INSERT INTO gc_rows (k) VALUES (?)", (key,))
        return f"{key} alone"

    return lambda: store.group_commit(work, together=Batch(_write_rows, (key, own)))

_WRITES: list[int] = []


def _write_rows(tx: Any, items: list[tuple[str, bool]]) -> list[Any]:
    from errands.core.store import Batch

    rows = [(key,) for key, own in items if not own]
    _WRITES.append(len(items))
    if any(key == "boom" for key, _ in items):
        tx.execute("INSERT INTO gc_rows (k) VALUES ('boom')")
        raise RuntimeError("the batch fails as a whole")
    tx.insert_rows("INSERT INTO gc_rows (k) VALUES ", "(?)", rows)
    return [Batch.OWN if own else f"{key} together" for key, own in items]


def test_a_groups_batched_members_are_written_in_one_call_and_the_rest_by_their_own_work(store: Any) -> None:
    _WRITES.clear()
    with _counting(store) as opened:
        out = _one_group_of_calls(store, [_batched(store, "b0"), _batched(store, "b1"), _batched(store, "b2", own=True),
                                          _batched(store, "b3"),
                                          lambda: store.group_commit(_insert("plain"))])
    assert [value for value, _ in out] == ["b0 together", "b1 together", "b2 alone", "b3 together", "plain"]
    assert _WRITES == [4]  # one call for the group's four batched members
    assert opened[0] == 2
    assert _keys(store) == {"b0", "b1", "b2", "b3", "plain"}


def test_a_failed_batch_is_undone_and_each_member_runs_its_own_work(store: Any) -> None:
    _WRITES.clear()
    with store.transaction() as tx:
        tx.execute("INSERT INTO gc_rows (k) VALUES ('taken')")
    out = _one_group_of_calls(store, [_batched(store, "c0"), _batched(store, "boom"), _batched(store, "taken"),
                                      _batched(store, "c1")])
    assert [value for value, _ in out] == ["c0 alone", "boom alone", None, "c1 alone"]
    assert out[2][1] is not None  # the member whose own work fails gets its error, alone
    assert [error is None for _, error in out] == [True, True, False, True]
    assert _keys(store) == {"taken", "c0", "boom", "c1"}  # the failed batch's 'boom' row was undone, then written alone


def test_waiting_callers_share_one_commit_and_each_returns_its_own_result(store: Any) -> None:
    with _counting(store) as opened:
        out = _one_group(store, [_insert(f"k{i}") for i in range(12)])
    assert [value for value, _ in out] == [f"k{i}" for i in range(12)]
    assert all(error is None for _, error in out)
    assert opened[0] == 2  # the holder's transaction, then one for the twelve
    assert _keys(store) == {f"k{i}" for i in range(12)}


_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="nobody")


def test_each_members_work_runs_in_its_callers_context(store: Any) -> None:
    """The leader runs the others' work in its own thread, each in its caller's context: what a work reads of the
    current context (the trace context an effect stores, a span it starts) is its caller's."""
    gate = threading.Event()
    seen: dict[str, str] = {}

    def hold(tx: Any) -> None:
        _CALLER.set("holder")
        gate.wait(30)

    def call(i: int) -> None:
        _CALLER.set(f"caller-{i}")

        def work(tx: Any) -> None:
            seen[f"caller-{i}"] = _CALLER.get()
            _CALLER.set("changed by the work")  # in the caller's copy only
            tx.execute("INSERT INTO gc_rows (k) VALUES (?)", (f"k{i}",))

        store.group_commit(work)
        assert _CALLER.get() == f"caller-{i}"

    first = threading.Thread(target=store.group_commit, args=(hold,))
    first.start()
    while not store._committer._threads.leading:
        time.sleep(0.001)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(store._committer._threads.queue) < 6 and time.monotonic() < deadline:
        time.sleep(0.001)
    gate.set()
    first.join()
    for t in threads:
        t.join()
    assert seen == {f"caller-{i}": f"caller-{i}" for i in range(6)}
    assert _keys(store) == {f"k{i}" for i in range(6)}


def test_a_members_failed_statement_is_its_own(store: Any) -> None:
    store.group_commit(_insert("taken"))
    works = [_insert("a"), _insert("taken"), _insert("b")]  # the middle one breaks the primary key
    out = _one_group(store, works)
    assert out[0] == ("a", None) and out[2] == ("b", None)
    assert out[1][0] is None and out[1][1] is not None
    assert "taken" not in str(out[0])
    assert _keys(store) == {"taken", "a", "b"}


class _Signal(BaseException):
    """An engine's control signal (a fenced-out write, a suspension): a BaseException, not an Exception."""


def test_a_members_base_exception_signal_is_its_own(store: Any) -> None:
    def signalled(tx: Any) -> None:
        tx.execute("INSERT INTO gc_rows (k) VALUES ('signalled')")
        raise _Signal("fenced out")

    out = _one_group(store, [_insert("a"), signalled, _insert("b")])
    assert [v for v, _ in out] == ["a", None, "b"]
    assert isinstance(out[1][1], _Signal)
    assert _keys(store) == {"a", "b"}


def test_a_members_error_undoes_only_its_own_statements(store: Any) -> None:
    def half(tx: Any) -> None:
        tx.execute("INSERT INTO gc_rows (k) VALUES ('half')")
        raise ValueError("bad input")

    out = _one_group(store, [_insert("x"), half, _insert("y")])
    error = out[1][1]
    assert isinstance(error, ValueError) and str(error) == "bad input"
    assert _keys(store) == {"x", "y"}


def test_a_failed_commit_fails_every_member_and_stores_nothing(store: Any) -> None:
    real = store.transaction

    @contextlib.contextmanager
    def failing(conn: Any = None) -> Iterator[Any]:
        with pytest.raises(OSError), real(conn) as tx:
            yield tx
            raise OSError("disk full")  # the transaction rolls back, as a failed commit leaves it
        raise OSError("disk full")

    gate = threading.Event()
    results: list[BaseException | None] = []

    def hold(tx: Any) -> None:
        gate.wait(30)

    first = threading.Thread(target=store.group_commit, args=(hold,))
    first.start()
    while not store._committer._threads.leading:
        time.sleep(0.001)
    store.transaction = failing

    def call(key: str) -> None:
        try:
            store.group_commit(_insert(key))
            results.append(None)
        except OSError as exc:
            results.append(exc)

    threads = [threading.Thread(target=call, args=(f"f{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    while len(store._committer._threads.queue) < 4:
        time.sleep(0.001)
    gate.set()
    for t in [first, *threads]:
        t.join()
    del store.transaction
    assert len(results) == 4 and all(isinstance(r, OSError) for r in results)
    assert _keys(store) == set()


def test_concurrent_submitters_all_get_durable_rows(store: Any) -> None:
    outbox = Outbox(store, connectors={"noop": NoopConnector()})
    returned: list[str] = []
    errors: list[BaseException] = []

    def submit(t: int) -> None:
        for i in range(60):
            key = f"t{t}-{i}"
            try:
                outbox.submit(Effect(key=key, connector="noop", payload={"i": i}))
                returned.append(key)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=submit, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(returned) == 480
    assert {r.key for r in outbox.list(limit=1000)} == set(returned)
    outbox.close()


def test_a_conflicting_submit_in_a_group_fails_alone(store: Any) -> None:
    outbox = Outbox(store, connectors={"noop": NoopConnector()})
    outbox.submit(Effect(key="dup", connector="noop", payload={"v": 1}))

    results: dict[str, Any] = {}

    def call(key: str, v: int) -> None:
        try:
            results[f"{key}/{v}"] = outbox.submit(Effect(key=key, connector="noop", payload={"v": v}))
        except EffectConflictError as exc:
            results[f"{key}/{v}"] = exc

    threads = [threading.Thread(target=call, args=args) for args in (("a", 1), ("dup", 2), ("b", 1), ("dup", 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert isinstance(results["dup/2"], EffectConflictError)
    assert results["dup/1"].payload == {"v": 1}
    assert {r.key for r in outbox.list(limit=10)} == {"dup", "a", "b"}
    outbox.close()


def test_a_groups_submits_are_written_together_each_getting_its_own_outcome(store: Any) -> None:
    outbox = Outbox(store, connectors={"noop": NoopConnector()})
    outbox.submit(Effect(key="same", connector="noop", payload={"v": 1}))
    outbox.submit(Effect(key="other", connector="noop", payload={"v": 1}))
    before = store.last_position()

    def submit(key: str, v: int) -> Callable[[], Any]:
        return lambda: outbox.submit(Effect(key=key, connector="noop", payload={"v": v}))

    out = _one_group_of_calls(store, [submit("n0", 0), submit("same", 1), submit("n1", 1), submit("other", 2),
                                      submit("twice", 3), submit("twice", 3), submit("twice", 4), submit("n2", 2)])
    values = [value for value, _ in out]
    errors = [error for _, error in out]
    assert [v.key if v is not None else None for v in values] == ["n0", "same", "n1", None, "twice", "twice", None,
                                                                  "n2"]
    assert [type(e).__name__ if e is not None else None for e in errors] == [
        None, None, None, "EffectConflictError", None, None, "EffectConflictError", None]
    assert values[1].payload == {"v": 1} and values[4].payload == values[5].payload == {"v": 3}
    assert {r.key: r.payload for r in outbox.list(limit=20)} == {
        "same": {"v": 1}, "other": {"v": 1}, "n0": {"v": 0}, "n1": {"v": 1}, "twice": {"v": 3}, "n2": {"v": 2}}
    # One submitted event per new effect, each after its row's journal position.
    events = store.read_events(after=before)
    assert sorted(e.data["key"] for e in events) == ["n0", "n1", "n2", "twice"]
    assert all(e.data["status"] == "PENDING" for e in events)
    outbox.close()


def test_async_submitters_all_get_durable_rows(store: Any) -> None:
    outbox = Outbox(store, connectors={"noop": NoopConnector()})

    async def main() -> list[Any]:
        try:
            return await asyncio.gather(*(outbox.submit_async(Effect(key=f"a{i}", connector="noop", payload={}))
                                          for i in range(40)))
        finally:
            await store.close_async()

    records = asyncio.run(main())
    assert [r.key for r in records] == [f"a{i}" for i in range(40)]
    assert {r.key for r in outbox.list(limit=100)} == {f"a{i}" for i in range(40)}
    outbox.close()


def test_a_callers_own_connection_is_never_grouped(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'own.db'}")
    outbox = Outbox(store, connectors={"noop": NoopConnector()})
    conn = store.connect()
    with _counting(store) as opened:
        outbox.submit(Effect(key="mine", connector="noop", payload={}), conn=conn)
        conn.rollback()  # the caller's transaction: rolled back, the effect with it
    assert opened[0] == 1 and not store._committer._threads.leading
    assert outbox.list() == []
    conn.close()
    outbox.close()
    store.close()


def _from_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    out: list[Any] = [None] * n

    def call(i: int) -> None:
        out[i] = fn(i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_journal_appends_share_commits_and_keep_each_stream_numbered(store: Any) -> None:
    journal = Journal(store)
    appended = _from_threads(8, lambda t: [journal.append(f"s{t % 3}", "e", {"t": t, "i": i}) for i in range(40)])
    events = [e for batch in appended for e in batch]
    stored = journal.read(0, limit=1000)
    assert sorted(e.position for e in events) == [e.position for e in stored]
    for stream in ("s0", "s1", "s2"):
        seqs = [e.seq for e in stored if e.stream == stream]
        assert seqs == list(range(1, len(seqs) + 1))


def test_concurrent_task_submits_all_get_durable_rows(store: Any) -> None:
    engine = TaskEngine(store, handlers={"noop": lambda params: None})
    ids = _from_threads(8, lambda t: [engine.submit("noop", {"t": t, "i": i}) for i in range(30)])
    assert all(engine.get(i) is not None for batch in ids for i in batch)


# -- the batcher as a property: any mix of good and failing members, any grouping --------------------------------

_MEMBER = st.sampled_from(["ok", "duplicate", "raise", "half"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(groups=st.lists(st.lists(_MEMBER, min_size=1, max_size=6), min_size=1, max_size=4))
def test_every_member_gets_its_own_outcome(tmp_path: Path, groups: list[list[str]]) -> None:
    store = open_store(f"sqlite:///{tmp_path / f'prop-{time.monotonic_ns()}.db'}")
    with store.transaction() as tx:
        tx.execute("CREATE TABLE gc_rows (k TEXT PRIMARY KEY)")
    store.group_commit(_insert("seed"))
    expected = {"seed"}
    n = 0
    for kinds in groups:
        works: list[Callable[[Any], Any]] = []
        for kind in kinds:
            key = f"m{n}"
            n += 1
            if kind == "ok":
                works.append(_insert(key))
            elif kind == "duplicate":
                works.append(_insert("seed"))
            elif kind == "raise":
                works.append(lambda tx: (_ for _ in ()).throw(ValueError("bad")))
            else:
                def half(tx: Any, key: str = key) -> None:
                    tx.execute("INSERT INTO gc_rows (k) VALUES (?)", (key,))
                    raise ValueError("half")
                works.append(half)
        out = _one_group(store, works)
        for kind, (value, error), i in zip(kinds, out, range(n - len(kinds), n)):
            if kind == "ok":
                assert error is None and value == f"m{i}"
                expected.add(f"m{i}")
            else:
                assert error is not None and value is None
        assert _keys(store) == expected
    assert not store._committer._threads.leading and store._committer._threads.queue == []
    store.close()


_SUBMIT = st.sampled_from(["new", "again", "conflict", "twice"])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(groups=st.lists(st.lists(_SUBMIT, min_size=1, max_size=6), min_size=1, max_size=3))
def test_every_submit_in_a_group_gets_its_own_outcome(tmp_path: Path, groups: list[list[str]]) -> None:
    store = open_store(f"sqlite:///{tmp_path / f'submits-{time.monotonic_ns()}.db'}")
    outbox = Outbox(store, connectors={"noop": NoopConnector()})
    outbox.submit(Effect(key="seed", connector="noop", payload={"v": 0}))
    stored = {"seed": {"v": 0}}
    n = 0
    for kinds in groups:
        calls: list[Callable[[], Any]] = []
        expect: list[tuple[str, Any] | None] = []  # (key, payload returned), or None for a conflict
        for kind in kinds:
            key, payload = f"s{n}", {"v": n}
            n += 1
            if kind == "again":
                key, payload = "seed", {"v": 0}
            elif kind == "conflict":
                key, payload = "seed", {"other": n}
            effect = Effect(key=key, connector="noop", payload=payload)
            copies = 2 if kind == "twice" else 1
            for _ in range(copies):
                calls.append(lambda effect=effect: outbox.submit(effect))
                expect.append(None if kind == "conflict" else (key, payload))
            if kind in ("new", "twice"):
                stored[key] = payload
        out = _one_group_of_calls(store, calls)
        for wanted, (value, error) in zip(expect, out):
            if wanted is None:
                assert isinstance(error, EffectConflictError) and value is None
            else:
                assert error is None and (value.key, value.payload) == wanted
        assert {r.key: r.payload for r in outbox.list(limit=100)} == stored
    events = store.read_events()
    assert sorted(e.data["key"] for e in events) == sorted(stored)  # one submitted event per effect, none twice
    outbox.close()
    store.close()


# -- a crash mid-window ---------------------------------------------------------------------------------------


def _submit_forever(url: str, run: str) -> None:
    store = open_store(url)
    outbox = Outbox(store, connectors={"noop": NoopConnector()})
    lock = threading.Lock()

    def submit(t: int) -> None:
        i = 0
        while True:
            key = f"{run}-{t}-{i}"
            outbox.submit(Effect(key=key, connector="noop", payload={"i": i}))
            with lock:
                sys.stdout.write(key + "\n")
                sys.stdout.flush()
            i += 1

    for t in range(8):
        threading.Thread(target=submit, args=(t,), daemon=True).start()
    threading.Event().wait()


@pytest.mark.crash
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_sigkill_mid_window_loses_no_submit_that_returned(kind: str, tmp_path: Path,
                                                            request: pytest.FixtureRequest) -> None:
    url = _url(kind, tmp_path, request)
    open_store(url).close()  # migrated before the submitters race to it
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    returned: list[str] = []
    for run in range(3):
        proc = subprocess.Popen([sys.executable, __file__, url, f"run{run}"], stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        for _ in range(300):  # the kill lands while groups are being written
            line = proc.stdout.readline()
            if not line:
                break
            returned.append(line.strip())
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
        returned += [k for k in rest.splitlines() if k]  # printed before the kill: those submits returned
        assert proc.returncode == -signal.SIGKILL
    store = open_store(url)
    outbox = Outbox(store, connectors={"noop": NoopConnector()})
    stored = {r.key for r in outbox.list(limit=100_000)}
    assert len(returned) >= 900
    assert set(returned) <= stored
    outbox.close()
    store.close()


if __name__ == "__main__":
    _submit_forever(sys.argv[1], sys.argv[2])


def test_a_submit_inside_the_threads_own_transaction_fails_at_once_rather_than_wait_for_a_leader(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'own-tx.db'}")
    outbox = Outbox(store, connectors={"noop": NoopConnector()})
    leader_done = threading.Event()
    errors: list[BaseException] = []
    with store.transaction():
        # Another thread becomes a group's leader and waits for this thread's transaction to end.
        leader = threading.Thread(target=lambda: (outbox.submit(Effect(key="led", connector="noop", payload={})),
                                                  leader_done.set()))
        leader.start()
        until_leading = time.monotonic() + 20
        while not store._committer._threads.leading and time.monotonic() < until_leading:
            time.sleep(0.001)
        try:
            outbox.submit(Effect(key="nested", connector="noop", payload={}))
        except Exception as exc:  # SQLite refuses a transaction inside a transaction
            errors.append(exc)
    leader.join(20)
    assert errors and leader_done.is_set()
    assert [r.key for r in outbox.list()] == ["led"]
    outbox.close()
    store.close()


# -- coroutines on PostgreSQL: grouped on their event loop ---------------------------------------------------


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[Any]:
    s = open_store(postgres_url)
    yield s
    s.close()


def test_coroutines_on_postgresql_share_commits_on_their_loop(pg_store: Any) -> None:
    outbox = Outbox(pg_store, connectors={"noop": NoopConnector()})

    async def main() -> list[Any]:
        try:
            return await asyncio.gather(*(outbox.submit_async(Effect(key=f"c{i}", connector="noop", payload={}))
                                          for i in range(40)))
        finally:
            await pg_store.close_async()

    with _counting(pg_store) as opened:
        records = asyncio.run(main())
    assert [r.key for r in records] == [f"c{i}" for i in range(40)]
    assert opened[0] < 40  # the coroutines that queued behind the first shared a transaction
    assert {r.key for r in outbox.list(limit=100)} == {f"c{i}" for i in range(40)}
    outbox.close()


@pytest.mark.parametrize("cancelled", [0, 5], ids=["the-leader", "a-follower"])
def test_a_cancelled_coroutine_fails_no_other_of_its_group(pg_store: Any, cancelled: int) -> None:
    outbox = Outbox(pg_store, connectors={"noop": NoopConnector()})

    async def main() -> list[Any]:
        try:
            tasks = [asyncio.create_task(outbox.submit_async(Effect(key=f"x{i}", connector="noop", payload={})))
                     for i in range(10)]
            await asyncio.sleep(0)  # every task has started: the first leads, the others wait in its queue
            tasks[cancelled].cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await pg_store.close_async()

    results = asyncio.run(main())
    assert isinstance(results[cancelled], asyncio.CancelledError)
    assert all(r.key == f"x{i}" for i, r in enumerate(results) if i != cancelled)
    stored = {r.key for r in outbox.list(limit=100)}
    assert stored == {f"x{i}" for i in range(10) if i != cancelled}  # the cancelled one left before it was written
    assert all(not g.leading and not g.queue for g in pg_store._committer._loops.values())
    outbox.close()


def test_a_follower_interrupted_while_it_waits_leaves_no_one_waiting(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'interrupt.db'}")
    with store.transaction() as tx:
        tx.execute("CREATE TABLE gc_rows (k TEXT PRIMARY KEY)")
    committer = store._committer
    gate = threading.Event()
    first = threading.Thread(target=store.group_commit, args=(lambda tx: gate.wait(30),))
    first.start()
    while not committer._threads.leading:
        time.sleep(0.001)

    class Interrupted(BaseException):
        pass

    class InterruptedLock:
        """A wait that is interrupted, as KeyboardInterrupt interrupts a main thread's."""

        def __init__(self, lock: Any) -> None:
            self.lock = lock

        def acquire(self) -> None:
            self.acquire = self.lock.acquire  # type: ignore[method-assign]  # the next wait is a real one
            raise Interrupted

        def release(self) -> None:
            self.lock.release()

    import errands.core.store._group as group

    real_member = group._Member

    def interrupted_member(enter: Any, work: Any, future: Any = None, together: Any = None) -> Any:
        m = real_member(enter, work, future, together)
        if work is interrupted_work:
            m.done = InterruptedLock(m.done)
        return m

    def interrupted_work(tx: Any) -> None:
        tx.execute("INSERT INTO gc_rows (k) VALUES ('interrupted')")

    group._Member = interrupted_member  # type: ignore[misc]  # this one member's wait is interrupted
    errors: list[BaseException] = []
    try:
        def call() -> None:
            try:
                store.group_commit(interrupted_work)
            except Interrupted as exc:
                errors.append(exc)

        t = threading.Thread(target=call)
        t.start()
        t.join(20)
    finally:
        group._Member = real_member  # type: ignore[misc]
    assert errors and committer._threads.queue == []  # it left the queue
    others = [threading.Thread(target=store.group_commit, args=(_insert(f"o{i}"),)) for i in range(3)]
    for o in others:
        o.start()
    while len(committer._threads.queue) < 3:
        time.sleep(0.001)
    gate.set()
    for o in [first, *others]:
        o.join(20)
        assert not o.is_alive()
    assert _keys(store) == {"o0", "o1", "o2"}
    store.close()


def test_a_caller_after_a_group_with_company_waits_for_its_writers_and_commits_once_with_them(
    store: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writers a group woke come back with their next calls: the first of them to find no group being written
    waits for as many as the last group had, so they share one commit rather than one call going alone ahead."""
    import errands.core.store._group as group

    _one_group(store, [_insert(f"a{i}") for i in range(3)])
    committer = store._committer
    assert committer._company == 2  # the last group: a leader and two more
    monkeypatch.setattr(group, "MAX_GATHER", 30.0)
    committer._took = 30.0  # here the wait lasts until the two have come
    with _counting(store) as opened:
        first = threading.Thread(target=store.group_commit, args=(_insert("b0"),))
        first.start()
        deadline = time.monotonic() + 30
        while committer._threads.gathering is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert committer._threads.gathering is not None
        others = [threading.Thread(target=store.group_commit, args=(_insert(f"b{i}"),)) for i in (1, 2)]
        for t in [*others]:
            t.start()
        for t in [first, *others]:
            t.join(30)
    assert opened[0] == 1
    assert {"b0", "b1", "b2"} <= _keys(store)
    assert committer._company == 2 and committer._threads.gathering is None and not committer._threads.leading


def test_a_caller_after_a_group_of_one_never_waits(store: Any) -> None:
    committer = store._committer
    store.group_commit(_insert("solo"))
    assert committer._company == 0
    with _counting(store) as opened:
        assert store.group_commit(_insert("next")) == "next"
    assert opened[0] == 1 and committer._threads.gathering is None


def test_a_leader_interrupted_while_it_gathers_hands_the_lead_to_whoever_queued(
    store: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errands.core.store._group as group

    _one_group(store, [_insert(f"a{i}") for i in range(3)])
    committer = store._committer

    class Interrupted(BaseException):
        pass

    queued = threading.Event()

    class InterruptingBound:
        """The bound of the gathering leader's wait: reading it interrupts the leader (as KeyboardInterrupt
        interrupts a main thread's wait) once another caller has queued behind it."""

        def __lt__(self, other: Any) -> bool:
            queued.wait(30)
            raise Interrupted

        __gt__ = __lt__

    monkeypatch.setattr(group, "MAX_GATHER", InterruptingBound())
    errors: list[BaseException] = []

    def lead() -> None:
        try:
            store.group_commit(_insert("interrupted"))
        except Interrupted as exc:
            errors.append(exc)

    first = threading.Thread(target=lead)
    first.start()
    deadline = time.monotonic() + 30
    while committer._threads.gathering is None and time.monotonic() < deadline:
        time.sleep(0.001)
    follower = threading.Thread(target=store.group_commit, args=(_insert("behind"),))
    follower.start()
    while not committer._threads.queue and time.monotonic() < deadline:
        time.sleep(0.001)
    queued.set()
    first.join(30)
    follower.join(30)
    assert not follower.is_alive() and len(errors) == 1
    keys = _keys(store)
    assert "behind" in keys and "interrupted" not in keys
    assert not committer._threads.leading and committer._threads.queue == [] and committer._threads.gathering is None


def test_a_group_of_new_submits_on_sqlite_is_four_statements(tmp_path: Path) -> None:
    """A group's new effects go in one plain multi-row INSERT and their events in one more, with no savepoint and
    no RETURNING: every statement is a step of the driver that lets the process's other threads take the
    interpreter while the leader holds the store."""
    store = open_store(f"sqlite:///{tmp_path / 'four.db'}")
    outbox = Outbox(store, connectors={"noop": NoopConnector()})
    seen: list[str] = []
    real = store._committer._commit

    def traced(batch: Any) -> None:
        store._conn.set_trace_callback(seen.append)
        try:
            real(batch)
        finally:
            store._conn.set_trace_callback(None)

    store._committer._commit = traced
    out = _one_group_of_calls(store, [lambda i=i: outbox.submit(Effect(key=f"k{i}", connector="noop",
                                                                       payload={"i": i})) for i in range(6)])
    del store._committer._commit
    assert all(error is None for _, error in out) and [v.key for v, _ in out] == [f"k{i}" for i in range(6)]
    words = [" ".join(s.split()[:3]) for s in seen]
    assert len(seen) == 4, words
    assert words[0] == "BEGIN IMMEDIATE" and words[-1] == "COMMIT"
    assert seen[1].startswith("INSERT INTO em_effects") and seen[2].startswith("INSERT INTO em_events")
    assert not any("RETURNING" in s or "SAVEPOINT" in s for s in seen)
    assert {e.data["key"] for e in store.read_events()} == {f"k{i}" for i in range(6)}
    outbox.close()
    store.close()


def test_a_groups_threads_wake_one_another_and_the_main_threads_member_is_woken_by_the_leader(store: Any) -> None:
    """Followers on threads are woken in a chain (each wakes the next once it runs); the main thread's member, the
    one a KeyboardInterrupt can stop, is never a link of it, so an interrupt there holds up no one."""
    import errands.core.store._group as group

    made: list[Any] = []
    real_member = group._Member

    def member(*args: Any, **kwargs: Any) -> Any:
        m = real_member(*args, **kwargs)
        made.append((threading.current_thread() is threading.main_thread(), m))
        return m

    gate = threading.Event()
    first = threading.Thread(target=store.group_commit, args=(lambda tx: gate.wait(30),))
    first.start()
    while not store._committer._threads.leading:
        time.sleep(0.001)
    group._Member = member  # type: ignore[misc]
    try:
        threads = [threading.Thread(target=store.group_commit, args=(_insert(f"t{i}"),)) for i in range(4)]
        for t in threads:
            t.start()
        while len(store._committer._threads.queue) < 4:
            time.sleep(0.001)
        threading.Timer(0.05, gate.set).start()
        assert store.group_commit(_insert("main")) == "main"  # queued fifth, from the main thread
    finally:
        group._Member = real_member  # type: ignore[misc]
    for t in [first, *threads]:
        t.join(20)
        assert not t.is_alive()
    assert sorted(main for main, _ in made) == [False, False, False, False, True]
    assert all(m.chained is not main and m.next is None for main, m in made)
    assert _keys(store) == {"t0", "t1", "t2", "t3", "main"}
