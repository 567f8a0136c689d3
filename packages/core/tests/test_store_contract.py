from __future__ import annotations

from typing import Any, Iterator

import pytest

from errands.core import FakeClock, open_store
from errands.core.testing import StoreContract


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def store(self, clock: FakeClock, tmp_path: Any) -> Iterator[Any]:
        s = open_store(f"sqlite:///{tmp_path / 'contract.db'}", clock=clock)
        yield s
        s.close()


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self, clock: FakeClock) -> Iterator[Any]:
        s = open_store("memory://", clock=clock)
        yield s
        s.close()


class TestPostgresStore(StoreContract):
    @pytest.fixture
    def store(self, clock: FakeClock, postgres_url: str) -> Iterator[Any]:
        s = open_store(postgres_url, clock=clock)
        yield s
        s.close()
