"""The Operations API over HTTP/JSON, driven by google-api-core's own REST operations client."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from typing import Any, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from errands.core import FakeClock
from errands.lro import Config, LroClient, ResumableHandler, unmarshal_metadata
from google.api_core import exceptions, operation
from google.api_core.operations_v1 import AbstractOperationsClient, transports
from google.auth.credentials import AnonymousCredentials
from google.protobuf import struct_pb2

pytestmark = pytest.mark.timeout(60)

# The bindings of google/longrunning/operations.proto (api-core's defaults are `**/operations/*`).
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


class _Threaded(WSGIServer):
    daemon_threads = True

    def process_request(self, request: Any, client_address: Any) -> None:
        threading.Thread(target=self._one, args=(request, client_address), daemon=True).start()

    def _one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        finally:
            self.shutdown_request(request)


@pytest.fixture
def lro(tmp_path: Any) -> Iterator[LroClient]:
    client = LroClient(Config(neuron="svc", store=f"sqlite:///{tmp_path}/ops.db", allow_unauthenticated=True,
                              wait_initial=0.01, wait_maximum=0.05))
    yield client
    client.close()


def serve(app: Any) -> tuple[str, Any]:
    server = make_server("127.0.0.1", 0, app, server_class=_Threaded, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"127.0.0.1:{server.server_port}", server


@pytest.fixture
def server(lro: LroClient) -> Iterator[str]:
    # The Operations routes and the resume routes in one WSGI app.
    host, srv = serve(lro.operations_wsgi_app(fallback=lro.wsgi_app()))
    yield host
    srv.shutdown()
    srv.server_close()


def rest_client(host: str, http_options: Any = PROTO_ROUTES) -> AbstractOperationsClient:
    transport = transports.OperationsRestTransport(host=f"http://{host}", credentials=AnonymousCredentials(), url_scheme="http",
                                                   http_options=http_options)
    return AbstractOperationsClient(transport=transport)


def test_every_method_round_trips_through_the_stock_rest_client(lro: LroClient, server: str) -> None:
    ops = rest_client(server)
    for i in range(5):
        lro.new_operation(f"operations/r{i}", {"step": i, "note": "x"})
    lro.get_operation("operations/r1").complete({"agent": "agents/1"})

    got = ops.get_operation("operations/r0")
    assert got.name == "operations/r0" and not got.done
    meta = struct_pb2.Struct()
    got.metadata.Unpack(meta)
    assert meta["step"] == 0 and meta["note"] == "x"
    assert unmarshal_metadata(ops.get_operation("operations/r3"), dict) == {"step": 3, "note": "x"}  # ints stay ints

    names = [o.name for o in ops.list_operations("operations", "", page_size=2)]  # the pager follows the tokens
    assert names == [f"operations/r{i}" for i in range(5)]
    assert [o.name for o in ops.list_operations("operations", "done = true")] == ["operations/r1"]
    assert [o.name for o in ops.list_operations("operations", 'done = false AND name = "operations/r4"')] == [
        "operations/r4"
    ]

    ops.cancel_operation("operations/r2")
    cancelled = ops.get_operation("operations/r2")
    assert cancelled.done and cancelled.error.code == 1  # never scheduled: cancelled at once

    ops.delete_operation("operations/r0")
    with pytest.raises(exceptions.NotFound):
        ops.get_operation("operations/r0")
    with pytest.raises(exceptions.NotFound):
        ops.delete_operation("operations/r0")
    with pytest.raises(exceptions.BadRequest):
        list(ops.list_operations("operations", "colour = blue"))


def test_wait_and_a_future_polled_to_its_result(lro: LroClient, server: str) -> None:
    def handler(op: Any) -> None:
        op.complete({"agent": "agents/7"})

    lro.add_resumable_handler("finish", handler)
    op = lro.new_operation("operations/w1", {"step": 0})
    op.resume_via_tasks("finish")

    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            lro.run_due()
            stop.wait(0.02)

    worker = threading.Thread(target=pump, daemon=True)
    worker.start()
    try:
        request = urllib.request.Request(f"http://{server}/v1/operations/w1:wait", method="POST",
                                         data=json.dumps({"timeout": "10s"}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=15) as response:
            body = json.loads(response.read())
        assert body["name"] == "operations/w1" and body["done"] is True
        assert body["response"]["@type"] == "type.googleapis.com/google.protobuf.Struct"
        assert body["response"]["value"] == {"agent": "agents/7"} or body["response"].get("agent") == "agents/7"

        future = operation.from_gapic(lro.get_operation_pb("operations/w1"), rest_client(server), struct_pb2.Struct)
        assert future.result(timeout=10)["agent"] == "agents/7"
    finally:
        stop.set()
        worker.join(5)


def test_aip151_names_with_the_default_bindings(lro: LroClient, server: str) -> None:
    ops = rest_client(server, http_options=None)  # api-core's defaults: /v1/{name=**/operations/*}
    name = "projects/p1/locations/europe-west1/operations/job-1"
    lro.new_operation(name, {"n": 1})
    lro.new_operation("projects/p1/locations/us-east1/operations/job-2")
    lro.new_operation("operations/plain")
    assert ops.get_operation(name).name == name
    # api-core lists `{name=**}/operations`: the parent, then /operations.
    assert [o.name for o in ops.list_operations("projects/p1/locations/europe-west1", "")] == [name]
    ops.cancel_operation(name)
    assert ops.get_operation(name).done
    ops.delete_operation(name)
    with pytest.raises(exceptions.NotFound):
        ops.get_operation(name)


def test_list_filters_on_update_and_create_time(tmp_path: Any) -> None:
    from datetime import datetime, timezone

    clock = FakeClock(start=datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp())
    with LroClient(Config(neuron="svc", store=f"sqlite:///{tmp_path}/t.db"), clock=clock) as lro:
        lro.new_operation("operations/a", {"create_time": "2024-06-01T00:00:00Z"})
        clock.advance(86400)
        lro.new_operation("operations/b", {"createTime": "2025-01-02T00:00:00Z"})
        lro.new_operation("operations/c")

        def names(f: str) -> list[str]:
            return [o.name for o in lro.list_operations(f)[0]]

        assert names('update_time > "2025-01-01T12:00:00Z"') == ["operations/b", "operations/c"]
        assert names('update_time <= "2025-01-01T12:00:00Z"') == ["operations/a"]
        assert names('create_time >= "2025-01-01T00:00:00Z"') == ["operations/b"]
        assert names('create_time < "2025-01-01T00:00:00Z" AND NOT done') == ["operations/a"]
        assert names('done != true AND updateTime > "2024-01-01T00:00:00+02:00"') == ["operations/a", "operations/b",
                                                                                     "operations/c"]
        from errands.core import ConfigError

        with pytest.raises(ConfigError):
            lro.list_operations('update_time > "yesterday"')


def test_asgi_app_mounts_beside_the_resume_routes(lro: LroClient) -> None:
    app = lro.operations_asgi_app(fallback=lro.asgi_app())
    lro.new_operation("operations/a1", {"n": 1})

    async def call(method: str, path: str, query: bytes = b"", body: bytes = b"") -> tuple[int, bytes]:
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": query,
                 "headers": []}
        await app(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    status, body = asyncio.run(call("GET", "/v1/operations/a1"))
    assert status == 200 and json.loads(body)["name"] == "operations/a1"
    status, body = asyncio.run(call("GET", "/v1/operations", b"pageSize=1"))
    assert status == 200 and [o["name"] for o in json.loads(body)["operations"]] == ["operations/a1"]
    status, body = asyncio.run(call("GET", "/v1/operations/missing"))
    assert status == 404 and json.loads(body)["error"]["status"] == "NOT_FOUND"
    status, _ = asyncio.run(call("PUT", "/v1/operations/a1"))
    assert status == 405
    # Outside /v1/ the resume routes answer (a callback without its parameters is a 400 there).
    status, body = asyncio.run(call("PUT", "/resume-operation/h"))
    assert status == 400 and b"operation" in body
    status, body = asyncio.run(call("POST", "/v1/operations/a1:cancel", body=b"{}"))
    assert status == 200 and json.loads(body) == {}
    status, body = asyncio.run(call("DELETE", "/v1/operations/a1"))
    assert status == 200 and lro.list_operations()[0] == []


def test_integer_metadata_and_the_struct_double_rule(lro: LroClient) -> None:
    op = lro.new_operation("operations/i1", {"count": 3, "ratio": 0.5, "nested": {"ids": [1, 2]}, "big": 2**60})
    got = unmarshal_metadata(lro.get_operation_pb(op.name), dict)
    assert got is not None
    assert got["count"] == 3 and type(got["count"]) is int
    assert got["ratio"] == 0.5 and got["nested"] == {"ids": [1, 2]} and type(got["nested"]["ids"][0]) is int
    assert type(got["big"]) is float  # beyond 2**53 a Struct double is not an exact integer


def test_add_resumable_handler_path_and_prefix(lro: LroClient) -> None:
    from errands.core import ConfigError

    lro.add_resumable_handler("step", lambda op: op.complete())
    assert "step" in lro.handlers
    with pytest.raises(ConfigError):
        lro.add_resumable_handler("step", lambda op: None)
    with pytest.raises(ConfigError):
        lro.add_resumable_handler("other", None)
    lro.add_resumable_handler(ResumableHandler("third", lambda op: None))
    lro.register_http_at_prefix("operations")
    assert lro.config.prefix == "/operations/"
