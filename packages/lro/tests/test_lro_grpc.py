"""The stock google-api-core client against our google.longrunning.Operations server on a real channel."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import grpc
import pytest
from errands.lro import Config, LroClient, Operation, ResumableHandler
from google.api_core import exceptions, operation, operations_v1
from google.api_core.future.polling import DEFAULT_POLLING
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2, struct_pb2
from google.rpc import code_pb2

FAST = DEFAULT_POLLING.with_delay(initial=0.05, maximum=0.2, multiplier=1.5)


@pytest.fixture
def lro(tmp_path: Any) -> Iterator[LroClient]:
    client = LroClient(Config(neuron="svc", store=f"sqlite:///{tmp_path / 'ops.db'}", wait_maximum=0.05))
    yield client
    client.close()


@pytest.fixture
def channel(lro: LroClient) -> Iterator[grpc.Channel]:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    lro.register_grpc(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield ch
    ch.close()
    server.stop(grace=None).wait()


def _worker(lro: LroClient, stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        while not stop.is_set():
            if lro.run_due() == 0:
                time.sleep(0.02)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def test_stock_client_polls_an_operation_to_its_unpacked_response(lro: LroClient, channel: grpc.Channel) -> None:
    def provision(op: Operation) -> None:
        state = op.decode_private_state() or {"step": 0}
        state["step"] += 1
        if state["step"] < 3:
            op.set_private_state(state).set_metadata({"progress": state["step"]})
            op.resume_via_tasks("provision", delay=0.1)
        else:
            op.complete({"agent": "agents/7", "ready": True})

    lro.add_resumable_handlers(ResumableHandler("provision", provision))
    op = lro.new_operation("operations/grpc-1", {"progress": 0})
    op.resume_via_tasks("provision", delay=0.2)
    stop = threading.Event()
    worker = _worker(lro, stop)
    try:
        ops_client = operations_v1.OperationsClient(channel)
        future = operation.from_gapic(
            op.operation_pb(), ops_client, struct_pb2.Struct, metadata_type=struct_pb2.Struct, polling=FAST
        )
        assert not future.done()
        result = future.result(timeout=30)
    finally:
        stop.set()
        worker.join()
    assert isinstance(result, struct_pb2.Struct)
    assert dict(result) == {"agent": "agents/7", "ready": True}
    assert dict(future.metadata) == {"progress": 2.0}
    assert future.done() and not future.cancelled()


def test_stock_client_raises_with_the_code_of_a_failed_operation(lro: LroClient, channel: grpc.Channel) -> None:
    op = lro.new_operation("operations/grpc-fail")
    threading.Timer(0.2, lambda: lro.get_operation(op.name).fail("no capacity in %s", "eu", code=code_pb2.RESOURCE_EXHAUSTED)).start()
    future = operation.from_gapic(op.operation_pb(), operations_v1.OperationsClient(channel), struct_pb2.Struct,
                                  polling=FAST)
    with pytest.raises(exceptions.GoogleAPICallError) as err:
        future.result(timeout=30)
    assert err.value.grpc_status_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no capacity in eu" in str(err.value)


def test_stock_client_reports_a_cancelled_operation(lro: LroClient, channel: grpc.Channel) -> None:
    seen: list[bool] = []

    def long_job(op: Operation) -> None:
        seen.append(op.cancel_requested)
        op.resume_via_tasks("long-job", delay=0.05)

    lro.add_resumable_handlers(ResumableHandler("long-job", long_job))
    op = lro.new_operation("operations/grpc-cancel")
    op.resume_via_tasks("long-job")
    idle = lro.new_operation("operations/grpc-idle")
    stop = threading.Event()
    worker = _worker(lro, stop)
    try:
        ops_client = operations_v1.OperationsClient(channel)
        future = operation.from_gapic(op.operation_pb(), ops_client, struct_pb2.Struct, polling=FAST)
        while not seen:
            time.sleep(0.01)
        assert future.cancel() is True
        deadline = time.monotonic() + 30
        while not future.cancelled() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert future.cancelled()
        idle_future = operation.from_gapic(idle.operation_pb(), ops_client, struct_pb2.Struct, polling=FAST)
        idle_future.cancel()
        assert idle_future.cancelled()
    finally:
        stop.set()
        worker.join()
    pb = lro.get_operation_pb("operations/grpc-cancel")
    assert pb.done and pb.error.code == code_pb2.CANCELLED


def test_list_delete_and_errors_through_the_stock_client(lro: LroClient, channel: grpc.Channel) -> None:
    for i in range(5):
        op = lro.new_operation(f"operations/l{i}")
        if i % 2 == 0:
            op.complete({"i": i})
    ops_client = operations_v1.OperationsClient(channel)
    assert [o.name for o in ops_client.list_operations("operations", "")] == [f"operations/l{i}" for i in range(5)]
    stub = operations_pb2_grpc.OperationsStub(channel)
    names, token, pages = [], "", 0
    while True:
        page = stub.ListOperations(operations_pb2.ListOperationsRequest(name="operations", page_size=2, page_token=token))
        names += [o.name for o in page.operations]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert names == [f"operations/l{i}" for i in range(5)] and pages == 3
    done = [o.name for o in ops_client.list_operations("operations", "done = true")]
    assert done == ["operations/l0", "operations/l2", "operations/l4"]
    with pytest.raises(exceptions.InvalidArgument):
        list(ops_client.list_operations("operations", "colour = blue"))
    ops_client.delete_operation("operations/l1")
    with pytest.raises(exceptions.NotFound):
        ops_client.get_operation("operations/l1")
    with pytest.raises(exceptions.NotFound):
        ops_client.delete_operation("operations/l1")
    assert ops_client.get_operation("operations/l0").done


def test_wait_operation_returns_the_latest_state_at_its_timeout(lro: LroClient, channel: grpc.Channel) -> None:
    stub = operations_pb2_grpc.OperationsStub(channel)
    lro.new_operation("operations/wait", {"step": 1})
    pb = stub.WaitOperation(
        operations_pb2.WaitOperationRequest(name="operations/wait", timeout=duration_pb2.Duration(nanos=200_000_000))
    )
    assert not pb.done and pb.name == "operations/wait"
    threading.Timer(0.2, lambda: lro.get_operation("operations/wait").complete()).start()
    pb = stub.WaitOperation(
        operations_pb2.WaitOperationRequest(name="operations/wait", timeout=duration_pb2.Duration(seconds=20))
    )
    assert pb.done
    with pytest.raises(grpc.RpcError) as err:
        stub.WaitOperation(operations_pb2.WaitOperationRequest(name="operations/none"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_aip151_names_over_grpc(lro: LroClient, channel: grpc.Channel) -> None:
    from google.api_core import operations_v1

    ops = operations_v1.OperationsClient(channel)
    name = "projects/p1/locations/europe-west1/operations/job-1"
    lro.new_operation(name, {"n": 1})
    lro.new_operation("projects/p1/locations/us-east1/operations/job-2")
    lro.new_operation("operations/plain")
    assert ops.get_operation(name).name == name
    assert [o.name for o in ops.list_operations("projects/p1/locations/europe-west1/operations", "")] == [name]
    assert [o.name for o in ops.list_operations("operations", "")] == ["operations/plain"]
    ops.cancel_operation(name)
    assert ops.get_operation(name).done
    ops.delete_operation(name)
