"""Test kit for errands plugin authors: contract suites to subclass, fakes and service fixtures.

The contract suites need pytest and are imported lazily:

    from errands.core.testing import StoreContract

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store(self, clock):
            return MyStore("mystore://...", clock=clock)
"""

from __future__ import annotations

from typing import Any

from .._clock import FakeClock
from ._fakes import ChaosConnector, FakeConnector
from ._services import (
    PostgresServer,
    free_port,
    require_services,
    service_missing,
    start_postgres,
    wait_for_port,
)
from ._sinks import InMemorySink

__all__ = [
    "ChaosConnector",
    "ConnectorContract",
    "FakeClock",
    "FakeConnector",
    "InMemorySink",
    "PostgresServer",
    "SinkContract",
    "StoreContract",
    "free_port",
    "require_services",
    "service_missing",
    "start_postgres",
    "wait_for_port",
]

_LAZY = {
    "ConnectorContract": "._connector_contract",
    "SinkContract": "._sink_contract",
    "StoreContract": "._store_contract",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
