"""The real Google Cloud emulators for tests: Pub/Sub, Spanner and Cloud Tasks, each a process on a free port.

Every emulator runs as its own process on ``127.0.0.1`` and is always stopped (its whole process group).
A missing binary calls ``service_missing(reason)``: the test skips, or fails under
``ERRANDS_REQUIRE_SERVICES=1``.

- Pub/Sub: ``cloud-pubsub-emulator`` of the Google Cloud SDK (``ERRANDS_PUBSUB_EMULATOR`` overrides the
  path). The fixture sets ``PUBSUB_EMULATOR_HOST`` for the clients.
- Spanner: ``emulator_main`` of the SDK (``ERRANDS_SPANNER_EMULATOR``). The fixture sets
  ``SPANNER_EMULATOR_HOST`` and ``GOOGLE_CLOUD_SPANNER_MULTIPLEXED_SESSIONS_FOR_RW=false`` and creates one
  instance; ``spanner_database`` gives each test a fresh database.
- Cloud Tasks: ``gcloud-tasks-emulator==0.6.2`` pins ``protobuf<5``, so it lives in its own virtualenv,
  built once and cached under ``~/.cache/errands/`` (``ERRANDS_CACHE_DIR`` overrides). It is started
  through a short launcher that adds what real Cloud Tasks does and 0.6.2 lacks: task-name de-duplication
  (``ALREADY_EXISTS`` for a name seen before), ``GetTask`` and ``DeleteTask``. It dispatches HTTP tasks for
  real.

Use the fixtures from a ``conftest.py``::

    from errands.connectors.gcp.testing import pubsub_emulator, spanner_emulator, tasks_emulator  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest
from errands.core.testing import service_missing

from ._emulators import (
    SPANNER_INSTANCE,
    TASKS_EMULATOR_VERSION,
    TEST_PROJECT,
    EmulatorProcess,
    start_pubsub_emulator,
    start_spanner_emulator,
    start_tasks_emulator,
    tasks_emulator_python,
)
from ._spanner_table import ALIS_OPERATIONS_DDL, PROTO_BUNDLE_DDL

__all__ = [
    "ALIS_OPERATIONS_DDL",
    "TASKS_EMULATOR_VERSION",
    "EmulatorProcess",
    "SpannerDatabase",
    "database_ddl",
    "provision_alis_table",
    "pubsub_emulator",
    "spanner_database",
    "spanner_emulator",
    "start_pubsub_emulator",
    "start_spanner_emulator",
    "start_tasks_emulator",
    "tasks_emulator",
    "tasks_emulator_python",
]


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _running(start: Callable[[], EmulatorProcess], unavailable: type[Exception],
             reason: str = "") -> Iterator[EmulatorProcess]:
    """An emulator from ``start``, stopped afterwards; one that raises ``unavailable`` cannot run here, and
    the test calls ``service_missing`` (with ``reason`` before the error)."""
    try:
        emulator = start()
    except unavailable as exc:
        service_missing(f"{reason}{exc}")
        raise
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[EmulatorProcess]:
    """The Pub/Sub emulator for the session, with ``PUBSUB_EMULATOR_HOST`` set."""
    with _running(start_pubsub_emulator, FileNotFoundError) as emulator, _environ(
        PUBSUB_EMULATOR_HOST=emulator.address
    ):
        yield emulator


@pytest.fixture(scope="session")
def spanner_emulator() -> Iterator[EmulatorProcess]:
    """The Spanner emulator for the session, with one instance (``errands-test``) created."""
    with _running(start_spanner_emulator, FileNotFoundError) as emulator, _environ(
        SPANNER_EMULATOR_HOST=emulator.address, GOOGLE_CLOUD_SPANNER_MULTIPLEXED_SESSIONS_FOR_RW="false"
    ):
        _create_spanner_instance()
        yield emulator


def _create_spanner_instance() -> None:
    from google.cloud import spanner

    client = spanner.Client(project=TEST_PROJECT)
    config = f"projects/{TEST_PROJECT}/instanceConfigs/emulator-config"
    # google-cloud-spanner's Client.instance carries no annotations.
    instance = client.instance(SPANNER_INSTANCE, configuration_name=config, node_count=1)  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + 30
    while True:
        try:
            instance.create().result(timeout=30)
            return
        except Exception:
            # The emulator accepts connections a moment before it serves the admin API.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass
class SpannerDatabase:
    """A fresh, empty database on the Spanner emulator."""

    project: str
    instance: str
    database: str


@pytest.fixture
def spanner_database(spanner_emulator: EmulatorProcess) -> Iterator[SpannerDatabase]:
    """A fresh database on the emulator for one test, dropped afterwards."""
    from google.cloud import spanner

    name = f"db{uuid.uuid4().hex[:12]}"
    client = spanner.Client(project=TEST_PROJECT)
    # google-cloud-spanner's Client.instance carries no annotations.
    database = client.instance(SPANNER_INSTANCE).database(name)  # type: ignore[no-untyped-call]
    database.create().result(timeout=60)
    try:
        yield SpannerDatabase(project=TEST_PROJECT, instance=SPANNER_INSTANCE, database=name)
    finally:
        with contextlib.suppress(Exception):
            database.drop()


def _database(db: SpannerDatabase) -> Any:
    from google.cloud import spanner

    # google-cloud-spanner's Client.instance carries no annotations.
    return spanner.Client(project=db.project).instance(db.instance).database(db.database)  # type: ignore[no-untyped-call]


def provision_alis_table(db: SpannerDatabase, project: str = "os_proj", neuron: str = "launchpad_v1") -> str:
    """Create ``{project}_{neuron}_Operations`` in ``db`` as the alis module does: ``CREATE PROTO BUNDLE
    (google.longrunning.Operation)`` and ``ALIS_OPERATIONS_DDL``. Returns the table name."""
    from ._spanner_table import operations_descriptor_set

    _database(db).update_ddl(
        [PROTO_BUNDLE_DDL, ALIS_OPERATIONS_DDL.format(project=project, neuron=neuron)],
        proto_descriptors=operations_descriptor_set(),
    ).result(timeout=120)
    return f"{project}_{neuron}_Operations"


def database_ddl(db: SpannerDatabase) -> list[str]:
    """The DDL statements of ``db`` as Spanner reports them."""
    database = _database(db)
    database.reload()
    return list(database.ddl_statements)


@pytest.fixture(scope="session")
def tasks_emulator() -> Iterator[EmulatorProcess]:
    """The Cloud Tasks emulator for the session (its virtualenv is built and cached on first use)."""
    with _running(start_tasks_emulator, RuntimeError, "Cloud Tasks emulator unavailable: ") as emulator:
        yield emulator

