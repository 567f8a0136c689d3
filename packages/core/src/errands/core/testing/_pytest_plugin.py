"""pytest plugin (entry point ``pytest11``): fixtures for errands and its plugins.

Fixtures:
    clock: a ``FakeClock``.
    postgres_server: a throwaway PostgreSQL cluster for the session (skips, or fails under
        ``ERRANDS_REQUIRE_SERVICES=1``, when PostgreSQL is not installed).
    postgres_url: a fresh database on that server for one test.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from .._clock import FakeClock
from ._services import PostgresServer, service_missing, start_postgres


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        service_missing("psycopg is not installed: pip install 'errands-core[postgres]'")
    try:
        server = start_postgres()
    except FileNotFoundError as exc:
        service_missing(str(exc))
        raise  # unreachable: service_missing raises
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url)


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "services: needs a real service (PostgreSQL, an emulator)")
    config.addinivalue_line("markers", "crash: kills worker processes with SIGKILL")
