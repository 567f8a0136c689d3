"""``google.longrunning.Operations`` on a ``grpc.aio`` server, driven by google-api-core's async client."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest
from errands.core import LeaseLostError
from errands.lro import Config, LroClient, Operation, ResumableHandler
from errands.lro._grpc import AsyncOperationsServicer, status_code
from google.api_core import exceptions, operation_async, operations_v1
from google.api_core.future.async_future import DEFAULT_RETRY
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2, struct_pb2
from google.rpc import code_pb2

pytestmark = pytest.mark.timeout(60)

FAST = DEFAULT_RETRY.with_delay(initial=0.05, maximum=0.2, multiplier=1.5)


@pytest.fixture
def lro(tmp_path: Any) -> Iterator[LroClient]:
    client = LroClient(Config(neuron="svc", store=f"sqlite:///{tmp_path / 'ops.db'}", wait_initial=0.01,
                              wait_maximum=0.05))
    yield client
    client.close()


async def _serving(lro: LroClient) -> tuple[grpc.aio.Server, grpc.aio.Channel]:
    server = grpc.aio.server()
    servicer = lro.register_grpc_async(server)
    assert isinstance(servicer, AsyncOperationsServicer)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def _run(lro: LroClient, body: Callable[[grpc.aio.Channel], Awaitable[None]]) -> None:
    async def main() -> None:
        server, channel = await _serving(lro)
        try:
            await body(channel)
        finally:
            await channel.close()
            await server.stop(None)

    asyncio.run(main())


def _worker(lro: LroClient, stop: threading.Event) -> threading.Thread:
    def loop() -> None:
        while not stop.is_set():
            if lro.run_due() == 0:
                time.sleep(0.02)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


async def _names(pager: AsyncIterator[operations_pb2.Operation]) -> list[str]:
    return [o.name async for o in pager]


def test_async_client_polls_an_operation_to_its_unpacked_response(lro: LroClient) -> None:
    async def provision(op: Operation) -> None:
        state = op.decode_private_state() or {"step": 0}
        state["step"] += 1
        if state["step"] < 3:
            op.set_private_state(state).set_metadata({"progress": state["step"]})
            await op.resume_via_tasks_async("provision", delay=0.1)
        else:
            await op.complete_async({"agent": "agents/7"})

    lro.add_resumable_handlers(ResumableHandler("provision", provision))

    async def body(channel: grpc.aio.Channel) -> None:
        op = await lro.new_operation_async("operations/agrpc-1", {"progress": 0})
        await op.resume_via_tasks_async("provision", delay=0.2)
        stop = threading.Event()
        worker = _worker(lro, stop)
        try:
            ops = operations_v1.OperationsAsyncClient(channel)
            future = operation_async.from_gapic(
                op.operation_pb(), ops, struct_pb2.Struct, metadata_type=struct_pb2.Struct, retry=FAST
            )
            assert not await future.done()
            result = await future.result()
        finally:
            stop.set()
            worker.join()
        assert dict(result) == {"agent": "agents/7"}
        assert dict(future.metadata) == {"progress": 2.0}

    _run(lro, body)


def test_async_client_gets_lists_cancels_and_deletes(lro: LroClient) -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        for i in range(5):
            op = await lro.new_operation_async(f"operations/l{i}")
            if i % 2 == 0:
                await op.complete_async({"i": i})
        ops = operations_v1.OperationsAsyncClient(channel)
        assert (await ops.get_operation("operations/l0")).done
        assert await _names(await ops.list_operations("operations", "")) == [f"operations/l{i}" for i in range(5)]
        assert await _names(await ops.list_operations("operations", "done = true")) == [
            "operations/l0", "operations/l2", "operations/l4"]
        stub = operations_pb2_grpc.OperationsStub(channel)
        page = await stub.ListOperations(operations_pb2.ListOperationsRequest(name="operations", page_size=2))
        assert [o.name for o in page.operations] == ["operations/l0", "operations/l1"] and page.next_page_token

        await ops.cancel_operation("operations/l1")
        pb = await ops.get_operation("operations/l1")
        assert pb.done and pb.error.code == code_pb2.CANCELLED
        await ops.delete_operation("operations/l3")
        with pytest.raises(exceptions.NotFound):
            await ops.get_operation("operations/l3")

    _run(lro, body)


def test_async_service_maps_errors_as_the_sync_one(lro: LroClient) -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        ops = operations_v1.OperationsAsyncClient(channel)
        with pytest.raises(exceptions.NotFound):
            await ops.get_operation("operations/none")
        with pytest.raises(exceptions.NotFound):
            await ops.delete_operation("operations/none")
        with pytest.raises(exceptions.NotFound):
            await ops.cancel_operation("operations/none")
        with pytest.raises(exceptions.InvalidArgument):
            await _names(await ops.list_operations("operations", "colour = blue"))
        stub = operations_pb2_grpc.OperationsStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.WaitOperation(operations_pb2.WaitOperationRequest(name="operations/none"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListOperations(operations_pb2.ListOperationsRequest(name="operations", page_token="bad"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    _run(lro, body)


def test_async_service_answers_a_lost_race_with_aborted(lro: LroClient, monkeypatch: pytest.MonkeyPatch) -> None:
    def racing(name: str) -> None:
        raise LeaseLostError(f"operation {name!r} kept changing while it was being cancelled; try again")

    monkeypatch.setattr(lro, "cancel_operation", racing)

    async def body(channel: grpc.aio.Channel) -> None:
        with pytest.raises(exceptions.Aborted):
            await operations_v1.OperationsAsyncClient(channel).cancel_operation("operations/race")

    _run(lro, body)


def test_the_error_mapping_both_servicers_use() -> None:
    from errands.core import AlreadyExistsError, ConfigError, NotFoundError

    assert status_code(NotFoundError("x")) == grpc.StatusCode.NOT_FOUND
    assert status_code(ConfigError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(AlreadyExistsError("x")) == grpc.StatusCode.ALREADY_EXISTS
    assert status_code(LeaseLostError("x")) == grpc.StatusCode.ABORTED


def test_wait_operation_does_not_hold_up_the_server(lro: LroClient) -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        stub = operations_pb2_grpc.OperationsStub(channel)
        await lro.new_operation_async("operations/wait", {"step": 1})
        pb = await stub.WaitOperation(operations_pb2.WaitOperationRequest(
            name="operations/wait", timeout=duration_pb2.Duration(nanos=200_000_000)))
        assert not pb.done and pb.name == "operations/wait"

        started = time.monotonic()
        waiting = asyncio.ensure_future(stub.WaitOperation(operations_pb2.WaitOperationRequest(
            name="operations/wait", timeout=duration_pb2.Duration(seconds=20))))
        await asyncio.sleep(0.1)
        got = await stub.GetOperation(operations_pb2.GetOperationRequest(name="operations/wait"))
        assert not got.done and time.monotonic() - started < 1.0  # answered while the wait polls
        assert not waiting.done()
        await (await lro.get_operation_async("operations/wait")).complete_async()
        assert (await waiting).done

        # The call's own deadline cuts the wait short: the latest state, not DEADLINE_EXCEEDED.
        await lro.new_operation_async("operations/wait-2")
        pb = await stub.WaitOperation(operations_pb2.WaitOperationRequest(name="operations/wait-2"), timeout=0.5)
        assert not pb.done

    _run(lro, body)
