"""``ConnectorContract`` against a real local HTTP counterparty that deduplicates on ``Idempotency-Key``."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from errands.connectors.http import AsyncHttpConnector, HttpConnector
from errands.connectors.http.testing import LedgerServer
from errands.core.testing import ConnectorContract


@pytest.fixture
def ledger() -> Iterator[LedgerServer]:
    with LedgerServer() as server:
        yield server


class TestHttpConnectorContract(ConnectorContract):
    @pytest.fixture
    def connector(self, ledger: LedgerServer) -> Iterator[Any]:
        with HttpConnector(url=ledger.url("/effects"), observe_url=ledger.url("/observe"),
                           compensate_url=ledger.url("/compensate")) as connector:
            yield connector


class TestHttpConnectorWithoutObserveContract(ConnectorContract):
    @pytest.fixture
    def connector(self, ledger: LedgerServer) -> Iterator[Any]:
        with HttpConnector(url=ledger.url("/effects")) as connector:
            yield connector


class TestAsyncHttpConnectorContract(ConnectorContract):
    @pytest.fixture
    def connector(self, ledger: LedgerServer) -> Iterator[Any]:
        connector = AsyncHttpConnector(url=ledger.url("/effects"), observe_url=ledger.url("/observe"),
                                       compensate_url=ledger.url("/compensate"))
        yield connector
        connector.close()
