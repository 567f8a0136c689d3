"""lro on the Spanner table exactly as the alis module provisions it: a service already on alis
infrastructure adopts errands without DDL rights, and the stock gRPC and REST operations clients poll it."""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from errands.connectors.gcp import SpannerOperationStore
from errands.connectors.gcp.testing import SpannerDatabase, provision_alis_table
from errands.connectors.gcp.testing import database_ddl as _ddl
from errands.core import LeaseLostError, StoreScheduler, open_store
from errands.lro import Config, LroClient

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]


# The bindings of google/longrunning/operations.proto (api-core's defaults want `**/operations/*`, which a
# top-level `operations/{id}` name does not match).
PROTO_ROUTES = {
    "google.longrunning.Operations.ListOperations": [{"method": "get", "uri": "/v1/{name=operations}"}],
    "google.longrunning.Operations.GetOperation": [{"method": "get", "uri": "/v1/{name=operations/**}"}],
    "google.longrunning.Operations.DeleteOperation": [{"method": "delete", "uri": "/v1/{name=operations/**}"}],
    "google.longrunning.Operations.CancelOperation": [
        {"method": "post", "uri": "/v1/{name=operations/**}:cancel", "body": "*"}
    ],
}


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def alis_table(spanner_database: SpannerDatabase) -> Iterator[tuple[SpannerDatabase, str, list[str]]]:
    table = provision_alis_table(spanner_database, project="os_proj", neuron="launchpad_v1")
    yield spanner_database, table, _ddl(spanner_database)


def _store(db: SpannerDatabase, table: str) -> SpannerOperationStore:
    return SpannerOperationStore(db.project, db.instance, db.database, "launchpad-v1", table=table,
                                 create_table=False)


def test_a_service_on_the_alis_table(alis_table: tuple[SpannerDatabase, str, list[str]]) -> None:
    import grpc
    from google.api_core import operation, operations_v1
    from google.api_core.operations_v1 import AbstractOperationsClient, transports
    from google.auth.credentials import AnonymousCredentials
    from google.protobuf import struct_pb2

    db, table, schema = alis_table
    timers = open_store("memory://")
    writer = LroClient(Config(neuron="launchpad-v1", store=_store(db, table), scheduler=StoreScheduler(timers)))
    # The Operations server: a read-only process on the same table, with no scheduler at all.
    reader = LroClient(Config(neuron="launchpad-v1", store=_store(db, table)))
    assert reader.scheduler is None

    def step(op: Any) -> None:
        state = op.decode_private_state(dict) or {}
        state["step"] = state.get("step", 0) + 1
        if state["step"] < 2:
            op.set_private_state(state).set_resume_point(f"after-{state['step']}")
            op.save_metadata({"step": state["step"]})
            op.resume_via_tasks("step")
        else:
            op.set_private_state(state).complete({"agent": "agents/1", "steps": state["step"]})

    writer.add_resumable_handler("step", step)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    reader.register_grpc(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    http = make_server("127.0.0.1", 0, reader.operations_wsgi_app(), handler_class=_Quiet)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            writer.run_due()
            stop.wait(0.05)

    try:
        # Create, then a stale writer is refused.
        op = writer.new_operation("operations/agent-1", {"step": 0}, private_state={"step": 0})
        first, second = writer.get_operation(op.name), writer.get_operation(op.name)
        first.set_resume_point("p1").save_private_state({"step": 0})
        with pytest.raises(LeaseLostError):
            second.save_metadata({"step": -1})
        assert writer.get_operation(op.name).resume_point == "p1"

        grpc_ops = operations_v1.OperationsClient(grpc.insecure_channel(f"127.0.0.1:{port}"))
        rest_ops = AbstractOperationsClient(transport=transports.OperationsRestTransport(
            host=f"http://127.0.0.1:{http.server_port}", credentials=AnonymousCredentials(), url_scheme="http",
            http_options=PROTO_ROUTES))
        pb = grpc_ops.get_operation(op.name)
        assert pb.name == op.name and not pb.done
        assert rest_ops.get_operation(op.name).name == op.name

        writer.get_operation(op.name).resume_via_tasks("step")
        threading.Thread(target=pump, daemon=True).start()
        by_grpc = operation.from_gapic(pb, grpc_ops, struct_pb2.Struct, metadata_type=struct_pb2.Struct)
        by_rest = operation.from_gapic(pb, rest_ops, struct_pb2.Struct, metadata_type=struct_pb2.Struct)
        assert by_grpc.result(timeout=60)["agent"] == "agents/1"
        assert by_rest.result(timeout=60)["steps"] == 2

        done = writer.get_operation(op.name)
        assert done.done and done.resume_point == "after-1" and done.decode_private_state(dict) == {"step": 2}
        with pytest.raises(LeaseLostError):
            done.save_metadata({"step": 9})  # done is final
        assert [o.name for o in grpc_ops.list_operations("operations", "done = true")] == [op.name]

        # Only the alis columns hold the row; the schema is as provisioned.
        store = reader.store
        assert isinstance(store, SpannerOperationStore)
        with store._db.snapshot() as snap:
            (row,) = list(snap.execute_sql(f"SELECT key, Operation.done, ResumePoint, UpdateTime FROM {table}"))
        assert row[:3] == [op.name, True, "after-1"] and row[3] is not None
        assert _ddl(db) == schema
    finally:
        stop.set()
        http.shutdown()
        http.server_close()
        server.stop(0)
        writer.close()
        reader.close()
        timers.close()
