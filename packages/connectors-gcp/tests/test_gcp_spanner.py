"""SpannerOperationStore against the real Spanner emulator: lro's whole operation-store contract."""

from __future__ import annotations

import base64
from typing import Any, Iterator

import pytest
from errands.connectors.gcp import SpannerOperationStore
from errands.connectors.gcp.testing import (
    ALIS_OPERATIONS_DDL,
    SpannerDatabase,
    provision_alis_table,
)
from errands.connectors.gcp.testing import database_ddl as _ddl
from errands.core import FakeClock
from errands.lro.testing import OperationStoreContract, make_record

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]


# The alis module's DDL, verbatim (go.alis.build/lro/v2's Managed Operations provision exactly this table).
ALIS_DDL = (
    "CREATE TABLE {project}_{neuron}_Operations (key STRING(MAX) NOT NULL AS (Operation.name) STORED, "
    "Operation google.longrunning.Operation, State BYTES(MAX), ResumePoint STRING(MAX), "
    "UpdateTime TIMESTAMP OPTIONS (allow_commit_timestamp=true)) PRIMARY KEY (key), "
    "ROW DELETION POLICY (OLDER_THAN(UpdateTime, INTERVAL 90 DAY))"
)


def test_the_test_kit_provisions_the_alis_ddl_verbatim() -> None:
    assert ALIS_OPERATIONS_DDL == ALIS_DDL


class TestSpannerOperationStore(OperationStoreContract):
    """The contract on a table this store created (with the optional generated ``Done`` column)."""

    @pytest.fixture
    def op_store(self, clock: FakeClock, spanner_database: SpannerDatabase) -> Iterator[Any]:
        store = SpannerOperationStore(spanner_database.project, spanner_database.instance,
                                      spanner_database.database, "launchpad-v1", clock=clock)
        yield store
        store.close()


class TestSpannerOperationStoreOnTheAlisTable(OperationStoreContract):
    """The contract on the table exactly as the alis module provisions it, opened without DDL rights."""

    @pytest.fixture
    def op_store(self, clock: FakeClock, spanner_database: SpannerDatabase) -> Iterator[Any]:
        table = provision_alis_table(spanner_database)
        before = _ddl(spanner_database)
        store = SpannerOperationStore(spanner_database.project, spanner_database.instance,
                                      spanner_database.database, "launchpad-v1", table=table, clock=clock,
                                      create_table=False, purge_batch=2)
        yield store
        store.close()
        assert _ddl(spanner_database) == before  # the schema is unchanged


class TestSpannerOperationStoreOnAPlainTable(OperationStoreContract):
    """The contract where PROTO columns and generated keys are unavailable: ``Operation`` as ``BYTES``, a
    written ``key``, no commit timestamps (``done`` is then filtered page by page)."""

    @pytest.fixture
    def op_store(self, clock: FakeClock, spanner_database: SpannerDatabase) -> Iterator[Any]:
        from google.cloud import spanner

        db = spanner_database
        database = spanner.Client(project=db.project).instance(db.instance).database(db.database)
        database.update_ddl([
            "CREATE TABLE plain_Operations (key STRING(MAX) NOT NULL, Operation BYTES(MAX), State BYTES(MAX), "
            "ResumePoint STRING(MAX), UpdateTime TIMESTAMP) PRIMARY KEY (key)"
        ]).result(timeout=120)
        store = SpannerOperationStore(db.project, db.instance, db.database, "launchpad-v1", table="plain_Operations",
                                      clock=clock, create_table=False)
        layout = store.layout()
        assert not (layout.key_generated or layout.proto_operation or layout.commit_timestamp or layout.done_column)
        yield store
        store.close()

    def test_done_listing_pages_through_a_bytes_column(self, op_store: Any) -> None:
        for i in range(7):
            op_store.create(make_record(f"operations/p{i}", done=i % 3 == 0))
        assert [r.name for r in op_store.list(done=True, limit=2)] == ["operations/p0", "operations/p3"]
        assert [r.name for r in op_store.list(done=True, after="operations/p3", limit=2)] == ["operations/p6"]
        assert len(op_store.list(done=False, limit=100)) == 4


def test_table_is_the_alis_layout(spanner_database: SpannerDatabase) -> None:
    store = SpannerOperationStore(spanner_database.project, spanner_database.instance, spanner_database.database,
                                  "launchpad-v1", table_project="my-os-project")
    try:
        assert store.table == "my_os_project_launchpad_v1_Operations"
        ddl = _ddl(spanner_database)
        (bundle,) = [s for s in ddl if s.startswith("CREATE PROTO BUNDLE")]
        assert "google.longrunning.Operation" in bundle
        (table,) = [s for s in ddl if s.startswith("CREATE TABLE my_os_project_launchpad_v1_Operations")]
        for column in ("key STRING(MAX) NOT NULL AS (Operation.name) STORED", "Operation `google.longrunning.Operation`",
                       "State BYTES(MAX)", "ResumePoint STRING(MAX)", "allow_commit_timestamp = true",
                       "Done BOOL AS (IFNULL(Operation.done, FALSE)) STORED"):
            assert column in table, table
        assert "ROW DELETION POLICY (OLDER_THAN(UpdateTime, INTERVAL 90 DAY))" in table
        assert "Version" not in table and "ResumeToken" not in table
        # The operation column is a real PROTO column: Spanner SQL reads its fields.
        store.create(make_record("operations/x1", done=False))
        with store._db.snapshot() as snap:
            rows = list(snap.execute_sql(f"SELECT Operation.name, Done FROM {store.table}"))
        assert rows == [["operations/x1", False]]
        assert store.layout().done_column and store.layout().key_generated
    finally:
        store.close()


def test_alis_table_without_ddl_rights_and_commit_timestamps(spanner_database: SpannerDatabase) -> None:
    from errands.core import ConfigError

    db = spanner_database
    missing = SpannerOperationStore(db.project, db.instance, db.database, "nobody", create_table=False)
    with pytest.raises(ConfigError, match="does not exist"):
        missing.get("operations/1")
    missing.close()
    table = provision_alis_table(db)
    store = SpannerOperationStore(db.project, db.instance, db.database, "launchpad-v1", table=table,
                                  create_table=False)  # no clock: UpdateTime is the commit timestamp
    try:
        layout = store.layout()
        assert layout.key_generated and layout.proto_operation and layout.commit_timestamp and not layout.done_column
        created = store.create(make_record("operations/c1", state=b'{"a":1}'))
        got = store.get("operations/c1")
        assert got.update_time == pytest.approx(created.update_time, abs=1e-6)
        saved = store.save(make_record("operations/c1", state=b'{"a":2}'), expected_version=1)
        assert store.get("operations/c1").update_time >= got.update_time and saved.version == 2
        store.create(make_record("operations/c2", done=True))
        assert [r.name for r in store.list(done=True)] == ["operations/c2"]
        assert [r.name for r in store.list(done=False)] == ["operations/c1"]
        # Rows hold only the alis columns; the private state is the State column's tail.
        with store._db.snapshot() as snap:
            (row,) = list(snap.execute_sql(f"SELECT key, State FROM {table} WHERE key = 'operations/c1'"))
        assert base64.b64decode(row[1]).endswith(b'{"a":2}')
    finally:
        store.close()


def test_state_header_round_trip_and_foreign_rows() -> None:
    from errands.connectors.gcp._spanner_table import StateHeader, decode_state, encode_state

    h = StateHeader(7, True, "create-agent", "tok")
    assert decode_state(encode_state(b'{"x":1}', h)) == (b'{"x":1}', h)
    assert decode_state(encode_state(None, StateHeader())) == (None, StateHeader())
    assert decode_state(encode_state(b"", StateHeader())) == (b"", StateHeader())
    assert decode_state(b"raw bytes another library wrote") == (b"raw bytes another library wrote", StateHeader())


def test_two_neurons_share_a_database_not_a_table(spanner_database: SpannerDatabase) -> None:
    db = spanner_database
    a = SpannerOperationStore(db.project, db.instance, db.database, "alpha")
    b = SpannerOperationStore(db.project, db.instance, db.database, "beta")  # the bundle exists already
    try:
        a.create(make_record("operations/1"))
        b.create(make_record("operations/1"))
        b.save(make_record("operations/1", done=True), expected_version=1)
        assert not a.get("operations/1").done and b.get("operations/1").done
        assert a.create_table() is False  # opening again changes nothing
    finally:
        a.close()
        b.close()


def test_spanner_url_through_lro(spanner_database: SpannerDatabase) -> None:
    from errands.core import StoreScheduler, open_store
    from errands.lro import Config, LroClient

    db = spanner_database
    url = f"spanner://projects/{db.project}/instances/{db.instance}/databases/{db.database}"
    timers = open_store("memory://")
    client = LroClient(Config(neuron="svc-a", store=url, scheduler=StoreScheduler(timers)))
    try:
        assert isinstance(client.store, SpannerOperationStore)
        assert client.store.table == "local_svc_a_Operations"
        op = client.new_operation("operations/u1", {"step": "start"})
        op.complete({"ok": True})
        got = client.get_operation_pb("operations/u1")
        assert got.done and got.name == "operations/u1"
    finally:
        client.close()
        timers.close()


def test_from_env_uses_spanner_and_cloud_tasks(spanner_database: SpannerDatabase) -> None:
    from errands.connectors.gcp import CloudTasksScheduler
    from errands.lro import LroClient

    db = spanner_database
    env = {
        "ALIS_OS_PROJECT": "os-proj", "ALIS_PROJECT_NR": "123456", "ALIS_REGION": "europe-west1",
        "ALIS_MANAGED_SPANNER_PROJECT": db.project, "ALIS_MANAGED_SPANNER_INSTANCE": db.instance,
        "ALIS_MANAGED_SPANNER_DB": db.database,
    }
    client = LroClient.from_env("launchpad-v1", env=env)
    try:
        assert isinstance(client.store, SpannerOperationStore)
        assert client.store.table == "os_proj_launchpad_v1_Operations"
        assert isinstance(client.scheduler, CloudTasksScheduler)
        assert client.scheduler.queue_path == "projects/os-proj/locations/europe-west1/queues/launchpad-v1-operations"
        assert client.scheduler._queue.service_account == "alis-build@os-proj.iam.gserviceaccount.com"
        assert client.callback_url("operations/1", "create-agent") == (
            "https://launchpad-v1-123456.europe-west1.run.app/resume-operation/create-agent?operation=operations%2F1"
        )
    finally:
        client.close()


def test_bad_config_and_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from errands.connectors.gcp import SpannerStore
    from errands.core import ConfigError, MissingDependencyError

    with pytest.raises(ConfigError) as info:
        SpannerStore("spanner://instances/x")
    assert info.value.field == "store"
    with pytest.raises(ConfigError, match="table"):
        SpannerOperationStore("p", "i", "d", "svc", table="1bad")
    monkeypatch.setitem(sys.modules, "google.cloud.spanner", None)
    with pytest.raises(MissingDependencyError) as missing:
        SpannerOperationStore("p", "i", "d", "svc")
    assert missing.value.extra == "spanner"


def test_store_url_options_and_database_role(spanner_database: SpannerDatabase) -> None:
    from errands.connectors.gcp import SpannerStore
    from errands.core import ConfigError

    db = spanner_database
    url = f"spanner://projects/{db.project}/instances/{db.instance}/databases/{db.database}"
    parsed = SpannerStore(f"{url}?database_role=lro_reader&create_table=false")
    assert parsed.options == {"database_role": "lro_reader", "create_table": False}
    with pytest.raises(ConfigError, match="unknown"):
        SpannerStore(f"{url}?colour=blue")
    table = provision_alis_table(db)
    # The emulator accepts a session role without enforcing fine-grained access control.
    store = SpannerStore(url, create_table=False).operation_store(neuron="launchpad-v1", table=table,
                                                                  database_role="lro_reader")
    try:
        assert store.database_role == "lro_reader" and store._db.database_role == "lro_reader"
        store.create(make_record("operations/r1"))
        assert store.get("operations/r1").version == 1
    finally:
        store.close()
