"""Test kit for operation stores: ``OperationStoreContract``, the behaviour every ``OperationStore`` shows.

Subclass it and supply an ``op_store`` fixture (and ``clock`` if the store takes one)::

    from errands.lro.testing import OperationStoreContract

    class TestSpannerOperationStore(OperationStoreContract):
        @pytest.fixture
        def op_store(self, clock):
            return SpannerOperationStore(..., clock=clock)

Needs pytest.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from errands.core import AlreadyExistsError, FakeClock, LeaseLostError, NotFoundError
from google.longrunning import operations_pb2  # type: ignore[import-untyped]

from ._operation_table import OperationDoneError, OperationRecord

__all__ = ["OperationStoreContract", "make_record"]


def make_record(name: str, *, done: bool = False, state: bytes | None = None) -> OperationRecord:
    """A record for ``name`` holding a minimal ``google.longrunning.Operation``."""
    pb = operations_pb2.Operation(name=name, done=done)
    return OperationRecord(name=name, operation=pb.SerializeToString(), state=state, done=done)


class OperationStoreContract:
    """Subclass and override ``op_store``; it receives ``clock`` (a ``FakeClock``) to build the store on."""

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def op_store(self, clock: FakeClock) -> Any:  # pragma: no cover - overridden by every subclass
        pytest.fail("OperationStoreContract needs an op_store fixture: override it in the subclass")

    def test_create_then_get_round_trips_every_column(self, op_store: Any) -> None:
        rec = make_record("operations/a", state=b'{"n":1}')
        created = op_store.create(rec)
        assert created.version == 1
        got = op_store.get("operations/a")
        assert got.name == "operations/a" and got.version == 1 and not got.done
        assert operations_pb2.Operation.FromString(got.operation).name == "operations/a"
        assert got.state == b'{"n":1}' and got.resume_point == "" and not got.cancel_requested
        assert got.update_time == pytest.approx(op_store.now())

    def test_create_twice_is_already_exists_and_keeps_the_first(self, op_store: Any) -> None:
        op_store.create(make_record("operations/a", state=b"1"))
        with pytest.raises(AlreadyExistsError):
            op_store.create(make_record("operations/a", state=b"2"))
        assert op_store.get("operations/a").state == b"1"

    def test_get_missing_is_not_found(self, op_store: Any) -> None:
        with pytest.raises(NotFoundError):
            op_store.get("operations/nope")

    def test_save_is_compare_and_set_on_version(self, op_store: Any) -> None:
        rec = op_store.create(make_record("operations/a"))
        saved = op_store.save(
            OperationRecord(name=rec.name, operation=rec.operation, state=b"2", resume_point="p2",
                            resume_path="h", resume_token="t1"),
            expected_version=1,
        )
        assert saved.version == 2
        with pytest.raises(LeaseLostError):
            op_store.save(OperationRecord(name=rec.name, operation=rec.operation, state=b"stale"), expected_version=1)
        got = op_store.get("operations/a")
        assert (got.version, got.state, got.resume_point, got.resume_path, got.resume_token) == (2, b"2", "p2", "h", "t1")

    def test_save_of_missing_is_not_found(self, op_store: Any) -> None:
        with pytest.raises(NotFoundError):
            op_store.save(make_record("operations/ghost"), expected_version=1)

    def test_done_is_final(self, op_store: Any) -> None:
        op_store.create(make_record("operations/a"))
        op_store.save(make_record("operations/a", done=True), expected_version=1)
        with pytest.raises(OperationDoneError):
            op_store.save(make_record("operations/a", done=False), expected_version=2)
        assert op_store.get("operations/a").done and op_store.get("operations/a").version == 2

    def test_concurrent_saves_on_one_version_one_wins(self, op_store: Any) -> None:
        op_store.create(make_record("operations/a"))
        results: list[str] = []
        barrier = threading.Barrier(4)

        def writer(i: int) -> None:
            barrier.wait()
            try:
                op_store.save(make_record("operations/a", state=str(i).encode()), expected_version=1)
                results.append("won")
            except LeaseLostError:
                results.append("lost")

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["lost", "lost", "lost", "won"]
        assert op_store.get("operations/a").version == 2

    def test_request_cancel_keeps_the_version(self, op_store: Any) -> None:
        op_store.create(make_record("operations/a"))
        rec = op_store.request_cancel("operations/a")
        assert rec.cancel_requested and rec.version == 1
        saved = op_store.save(make_record("operations/a", state=b"x"), expected_version=1)
        assert saved.cancel_requested and op_store.get("operations/a").cancel_requested
        with pytest.raises(NotFoundError):
            op_store.request_cancel("operations/nope")

    def test_delete(self, op_store: Any) -> None:
        op_store.create(make_record("operations/a"))
        assert op_store.delete("operations/a") is True
        assert op_store.delete("operations/a") is False
        with pytest.raises(NotFoundError):
            op_store.get("operations/a")

    def test_list_filters_orders_and_pages(self, op_store: Any) -> None:
        for i in range(7):
            op_store.create(make_record(f"operations/b{i}"))
        op_store.create(make_record("operations/a0"))
        for i in (1, 3):
            op_store.save(make_record(f"operations/b{i}", done=True), expected_version=1)
        names = [r.name for r in op_store.list(limit=100)]
        assert names == sorted(names) and len(names) == 8
        assert [r.name for r in op_store.list(done=True)] == ["operations/b1", "operations/b3"]
        assert len(op_store.list(done=False)) == 6
        assert [r.name for r in op_store.list(prefix="operations/a")] == ["operations/a0"]
        first = [r.name for r in op_store.list(prefix="operations/b", limit=3)]
        rest = [r.name for r in op_store.list(prefix="operations/b", after=first[-1], limit=100)]
        assert first + rest == [f"operations/b{i}" for i in range(7)]

    def test_purge_removes_rows_not_saved_since(self, op_store: Any, clock: FakeClock) -> None:
        op_store.create(make_record("operations/old"))
        clock.advance(1000)
        op_store.create(make_record("operations/new"))
        assert op_store.purge(op_store.now() - 500) == 1
        assert [r.name for r in op_store.list()] == ["operations/new"]

    def test_purge_in_bounded_batches(self, op_store: Any, clock: FakeClock) -> None:
        for i in range(5):
            op_store.create(make_record(f"operations/old{i}"))
        clock.advance(1000)
        op_store.create(make_record("operations/new"))
        cutoff = op_store.now() - 500
        assert op_store.purge(cutoff, limit=2) == 2
        assert op_store.purge(cutoff, limit=2) == 2
        assert op_store.purge(cutoff, limit=2) == 1
        assert op_store.purge(cutoff, limit=2) == 0
        assert [r.name for r in op_store.list()] == ["operations/new"]
