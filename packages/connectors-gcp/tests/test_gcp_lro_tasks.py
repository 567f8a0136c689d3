"""End to end over the Cloud Tasks emulator: lro operations resumed by real HTTP callbacks, and the outbox
delivering effects as Cloud Tasks."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Iterator

import pytest
from errands.connectors.gcp import CloudTasksConnector, CloudTasksScheduler
from errands.connectors.gcp.testing import EmulatorProcess
from errands.core import Effect, EffectStatus, Outbox, open_store
from errands.core.testing import free_port, wait_for_port
from pytest_httpserver import HTTPServer

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]

PROJECT = "errands-test"
LOCATION = "europe-west1"


@pytest.fixture
def queue(tasks_emulator: EmulatorProcess) -> Iterator[str]:
    import grpc
    from google.cloud import tasks_v2
    from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

    client = tasks_v2.CloudTasksClient(
        transport=CloudTasksGrpcTransport(channel=grpc.insecure_channel(tasks_emulator.address))
    )
    parent = f"projects/{PROJECT}/locations/{LOCATION}"
    name = f"q-{uuid.uuid4().hex[:10]}"
    client.create_queue(parent=parent, queue=tasks_v2.Queue(name=f"{parent}/queues/{name}"))
    try:
        yield name
    finally:
        client.delete_queue(name=f"{parent}/queues/{name}")
        client.transport.close()


class Uvicorn:
    """An ASGI app served by uvicorn on a free port, in a thread."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.port = port
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off", ws="none"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Uvicorn:
        self.thread.start()
        wait_for_port(self.port, timeout=20)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_lro_handler_rescheduled_twice_over_cloud_tasks(
    tasks_emulator: EmulatorProcess, queue: str, tmp_path: Any
) -> None:
    from errands.lro import Config, LroClient, ResumableHandler

    port = free_port()
    scheduler = CloudTasksScheduler(PROJECT, LOCATION, queue, emulator_host=tasks_emulator.address)
    # The emulator does not mint OIDC tokens, so the callback app runs unauthenticated here.
    client = LroClient(Config(neuron="launchpad-v1", store=f"sqlite:///{tmp_path / 'ops.db'}",
                              host=f"http://127.0.0.1:{port}", scheduler=scheduler, allow_unauthenticated=True))
    calls: list[int] = []

    def step(op: Any) -> None:
        state = op.decode_private_state(dict) or {"n": 0}
        calls.append(state["n"])
        if state["n"] < 2:
            op.set_private_state({"n": state["n"] + 1})
            op.resume_via_tasks("step", delay=0.2)
        else:
            op.complete({"calls": state["n"] + 1})

    client.add_resumable_handlers(ResumableHandler("step", step))
    try:
        with Uvicorn(client.asgi_app(prefix="/resume-operation/"), port):
            op = client.new_operation("operations/e2e-1", {"step": "start"}, private_state={"n": 0})
            op.resume_via_tasks("step", delay=0)
            result = client.wait_operation("operations/e2e-1", timeout=60)
    finally:
        client.close()
        scheduler.close()
    assert result.done, "the operation did not complete over Cloud Tasks"
    assert not result.HasField("error")
    assert calls == [0, 1, 2]
    from google.protobuf import json_format, struct_pb2

    response = struct_pb2.Struct()
    result.response.Unpack(response)
    assert json_format.MessageToDict(response) == {"calls": 3.0}


def test_a_task_that_cannot_be_created_leaves_the_operation_resumable(
    tasks_emulator: EmulatorProcess, tmp_path: Any
) -> None:
    import grpc
    from errands.core import PermanentError
    from errands.lro import Config, LroClient, ResumableHandler
    from google.cloud import tasks_v2
    from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

    port = free_port()
    name = f"q-{uuid.uuid4().hex[:10]}"  # not created yet: Cloud Tasks refuses the task
    scheduler = CloudTasksScheduler(PROJECT, LOCATION, name, emulator_host=tasks_emulator.address)
    client = LroClient(Config(neuron="svc", store=f"sqlite:///{tmp_path / 'ops.db'}", host=f"http://127.0.0.1:{port}",
                              scheduler=scheduler, allow_unauthenticated=True))
    client.add_resumable_handlers(ResumableHandler("finish", lambda op: op.complete({"ok": True})))
    admin = tasks_v2.CloudTasksClient(
        transport=CloudTasksGrpcTransport(channel=grpc.insecure_channel(tasks_emulator.address))
    )
    parent = f"projects/{PROJECT}/locations/{LOCATION}"
    try:
        with Uvicorn(client.asgi_app(), port):
            op = client.new_operation("operations/nq", {"step": 0})
            before = client.store.get("operations/nq")
            with pytest.raises(PermanentError):
                op.resume_via_tasks("finish")
            after = client.store.get("operations/nq")
            assert after.resume_token == before.resume_token, "the operation waits for a task that does not exist"
            admin.create_queue(parent=parent, queue=tasks_v2.Queue(name=f"{parent}/queues/{name}"))
            op.resume_via_tasks("finish")  # the same object retries once the queue exists
            result = client.wait_operation("operations/nq", timeout=60)
        assert result.done and not result.HasField("error")
    finally:
        client.close()
        scheduler.close()
        admin.delete_queue(name=f"{parent}/queues/{name}")
        admin.transport.close()


def test_outbox_same_effect_key_twice_is_one_task(
    tasks_emulator: EmulatorProcess, queue: str, httpserver: HTTPServer, tmp_path: Any
) -> None:
    httpserver.expect_request("/wire", method="POST").respond_with_data("ok")
    effect = Effect(key="wire-7", connector="bank.wire", payload={"amount": 7})
    deliveries = []
    for attempt in ("first", "second"):
        # Two stores: the second stands for a process that lost the first's record; only Cloud Tasks knows.
        store = open_store(f"sqlite:///{tmp_path / attempt}.db")
        connector = CloudTasksConnector(PROJECT, LOCATION, queue, httpserver.url_for("/wire"),
                                        emulator_host=tasks_emulator.address)
        outbox = Outbox(store, connectors={"bank.wire": connector})
        try:
            outbox.submit(effect)
            outbox.submit(effect)  # the same key again: the same record
            outbox.dispatch_once()
            record = outbox.get("wire-7")
            assert record.status is EffectStatus.CONFIRMED
            deliveries.append(record.response)
        finally:
            connector.close()
            store.close()
    assert deliveries[0]["already_existed"] is False
    assert deliveries[1]["already_existed"] is True
    deadline = time.monotonic() + 20
    while not httpserver.log and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert len(httpserver.log) == 1
