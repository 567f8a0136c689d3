from __future__ import annotations

from typing import Any, Iterator

import pytest
from errands.core import FakeClock, open_store
from errands.lro import SQLOperationStore
from errands.lro.testing import OperationStoreContract


class TestSQLiteOperationStore(OperationStoreContract):
    @pytest.fixture
    def op_store(self, clock: FakeClock, tmp_path: Any) -> Iterator[Any]:
        store = open_store(f"sqlite:///{tmp_path / 'ops.db'}", clock=clock)
        yield SQLOperationStore(store, "svc")
        store.close()


class TestMemoryOperationStore(OperationStoreContract):
    @pytest.fixture
    def op_store(self, clock: FakeClock) -> Iterator[Any]:
        store = open_store("memory://", clock=clock)
        yield SQLOperationStore(store, "svc")
        store.close()


@pytest.mark.services
class TestPostgresOperationStore(OperationStoreContract):
    @pytest.fixture
    def op_store(self, clock: FakeClock, postgres_url: str) -> Iterator[Any]:
        store = open_store(postgres_url, clock=clock)
        yield SQLOperationStore(store, "svc")
        store.close()


def test_neurons_sharing_a_store_do_not_see_each_other(tmp_path: Any) -> None:
    from errands.lro.testing import make_record

    store = open_store(f"sqlite:///{tmp_path / 'ops.db'}")
    a, b = SQLOperationStore(store, "alpha"), SQLOperationStore(store, "beta")
    a.create(make_record("operations/1"))
    b.create(make_record("operations/1"))
    b.save(make_record("operations/1", done=True), expected_version=1)
    assert not a.get("operations/1").done and b.get("operations/1").done
    assert [r.name for r in a.list(done=True)] == []
    store.close()


def test_sql_table_has_the_alis_columns(tmp_path: Any) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'ops.db'}")
    SQLOperationStore(store, "svc")
    with store.read() as tx:
        cols = [row[1] for row in tx.query("PRAGMA table_info(lro_operations)")]
    assert {"key", "Operation", "State", "ResumePoint", "UpdateTime"} <= set(cols)
    store.close()
