"""CloudTasksConnector and CloudTasksScheduler against the Cloud Tasks emulator, which calls a real HTTP server."""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator

import pytest
from errands.connectors.gcp import CloudTasksConnector, CloudTasksScheduler, task_id_for
from errands.connectors.gcp.testing import EmulatorProcess
from errands.core import (
    ConfigError,
    DispatchOutcome,
    Effect,
    MissingDependencyError,
    ObservationOutcome,
    PayloadError,
    PermanentError,
    TransientError,
    capabilities_of,
)
from errands.core.testing import free_port
from pytest_httpserver import HTTPServer

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]

PROJECT = "errands-test"
LOCATION = "europe-west1"


def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture
def queue(tasks_emulator: EmulatorProcess) -> Iterator[str]:
    """A fresh queue on the emulator."""
    import grpc
    from google.cloud import tasks_v2
    from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcTransport

    client = tasks_v2.CloudTasksClient(
        transport=CloudTasksGrpcTransport(channel=grpc.insecure_channel(tasks_emulator.address))
    )
    name = f"q-{uuid.uuid4().hex[:10]}"
    client.create_queue(
        parent=f"projects/{PROJECT}/locations/{LOCATION}",
        queue=tasks_v2.Queue(name=f"projects/{PROJECT}/locations/{LOCATION}/queues/{name}"),
    )
    try:
        yield name
    finally:
        client.delete_queue(name=f"projects/{PROJECT}/locations/{LOCATION}/queues/{name}")
        client.transport.close()


def _connector(tasks_emulator: EmulatorProcess, queue: str, url: str, **kw: Any) -> CloudTasksConnector:
    return CloudTasksConnector(PROJECT, LOCATION, queue, url, emulator_host=tasks_emulator.address, **kw)


def test_effect_becomes_one_http_task(tasks_emulator: EmulatorProcess, queue: str, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/wire", method="POST").respond_with_data("ok")
    connector = _connector(tasks_emulator, queue, httpserver.url_for("/wire"), headers={"X-Api-Key": "k1"})
    effect = Effect(key="order-42", connector="bank.wire", payload={"amount": 10}, business_key="B-42",
                    run_id="run-1")
    try:
        first = connector.dispatch(effect)
        assert first.outcome is DispatchOutcome.CONFIRMED
        assert first.external_ref == connector.task_name(effect)
        assert first.external_ref.endswith("/tasks/" + task_id_for("order-42"))
        wait_until(lambda: len(httpserver.log) >= 1)
        # The same effect key again (a lost acknowledgement, a second submit): Cloud Tasks refuses the
        # name, which means delivered, and no second task exists.
        again = connector.dispatch(effect)
        assert again.outcome is DispatchOutcome.CONFIRMED
        assert again.response == {"task": first.external_ref, "already_existed": True}
        time.sleep(0.5)  # let a wrongly created second task reach the server, were there one
    finally:
        connector.close()
    assert len(httpserver.log) == 1
    request, _ = httpserver.log[0]
    assert json.loads(request.get_data()) == {"amount": 10}
    assert request.headers["Idempotency-Key"] == "order-42"
    assert request.headers["Errands-Business-Key"] == "B-42"
    assert request.headers["Errands-Run-Id"] == "run-1"
    assert request.headers["Errands-Connector"] == "bank.wire"
    assert request.headers["X-Api-Key"] == "k1"
    assert request.headers["Content-Type"] == "application/json"


def test_dispatch_at_schedule_time_oidc_and_observe(
    tasks_emulator: EmulatorProcess, queue: str, httpserver: HTTPServer
) -> None:
    httpserver.expect_request("/later").respond_with_data("ok")
    sa = "invoker@errands-test.iam.gserviceaccount.com"
    connector = _connector(tasks_emulator, queue, httpserver.url_for("/later"), service_account=sa,
                           audience="https://svc.example")
    at = datetime.now(timezone.utc) + timedelta(hours=1)
    later = Effect(key="later-1", connector="later", payload={"n": 1}, dispatch_at=at)
    now = Effect(key="now-1", connector="later", payload={"n": 2}, dispatch_at=time.time() - 1)
    try:
        assert connector.dispatch(later).outcome is DispatchOutcome.CONFIRMED
        assert connector.observe(later).outcome is ObservationOutcome.CONFIRMED
        task = connector._queue.client().get_task(name=connector.task_name(later))
        assert abs(task.schedule_time.timestamp() - at.timestamp()) < 0.001
        assert task.http_request.oidc_token.service_account_email == sa
        assert task.http_request.oidc_token.audience == "https://svc.example"
        assert connector.dispatch(now).outcome is DispatchOutcome.CONFIRMED
        wait_until(lambda: len(httpserver.log) == 1)
        # Run and removed: observe says absent, and a re-dispatch is refused by name.
        wait_until(lambda: connector.observe(now).outcome is ObservationOutcome.ABSENT)
        assert connector.dispatch(now).response["already_existed"] is True
        assert connector.observe(later).outcome is ObservationOutcome.CONFIRMED  # still waiting for its hour
    finally:
        connector.close()
    assert [json.loads(r.get_data()) for r, _ in httpserver.log] == [{"n": 2}]


def test_observe_never_created_is_absent(tasks_emulator: EmulatorProcess, queue: str) -> None:
    connector = _connector(tasks_emulator, queue, "http://127.0.0.1:9/none")
    try:
        seen = connector.observe(Effect(key="never", connector="c", payload={}))
    finally:
        connector.close()
    assert seen.outcome is ObservationOutcome.ABSENT
    assert capabilities_of(connector).can_observe is True


def test_missing_queue_fails_and_unreachable_service_is_unknown(tasks_emulator: EmulatorProcess) -> None:
    effect = Effect(key="e-1", connector="c", payload={})
    missing = _connector(tasks_emulator, "no-such-queue", "http://127.0.0.1:9/x")
    try:
        result = missing.dispatch(effect)
    finally:
        missing.close()
    assert result.outcome is DispatchOutcome.FAILED
    assert "no-such-queue" in (result.error or "")
    down = CloudTasksConnector(PROJECT, LOCATION, "q", "http://127.0.0.1:9/x",
                               emulator_host=f"127.0.0.1:{free_port()}", timeout=0.5)
    try:
        assert down.dispatch(effect).outcome is DispatchOutcome.UNKNOWN
        assert down.observe(effect).outcome is ObservationOutcome.UNKNOWN
    finally:
        down.close()


def test_scheduler_alis_shape_idempotent_and_cancel(
    tasks_emulator: EmulatorProcess, queue: str, httpserver: HTTPServer
) -> None:
    httpserver.expect_request("/resume-operation/create-agent", method="PUT").respond_with_data("ok")
    scheduler = CloudTasksScheduler(PROJECT, LOCATION, queue, httpserver.url_for("/").rstrip("/"),
                                    "/resume-operation/", emulator_host=tasks_emulator.address)
    try:
        soon = time.time() + 0.2
        assert scheduler.schedule("create-agent", {"operation": "operations/1"}, soon, key="op-1:1") == "op-1:1"
        assert scheduler.schedule("create-agent", {"operation": "operations/1"}, soon, key="op-1:1") == "op-1:1"
        later = datetime.now(timezone.utc) + timedelta(hours=1)
        scheduler.schedule("create-agent", {"operation": "operations/2"}, later, key="op-2:1")
        assert scheduler.cancel("op-2:1") is True
        assert scheduler.cancel("op-2:1") is False
        wait_until(lambda: len(httpserver.log) >= 1)
        time.sleep(0.5)
    finally:
        scheduler.close()
    assert len(httpserver.log) == 1
    request, _ = httpserver.log[0]
    assert request.method == "PUT"
    assert request.args["operation"] == "operations/1"
    assert request.headers["Errands-Timer-Key"] == "op-1:1"


def test_scheduler_json_payload(tasks_emulator: EmulatorProcess, queue: str, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/timers/wake", method="POST").respond_with_data("ok")
    scheduler = CloudTasksScheduler(PROJECT, LOCATION, queue, httpserver.url_for("/").rstrip("/"), "/timers/",
                                    method="POST", payload_as="json", emulator_host=tasks_emulator.address)
    try:
        key = scheduler.schedule("wake", {"execution": "x-1", "items": [1, 2]}, time.time())
        wait_until(lambda: len(httpserver.log) >= 1)
    finally:
        scheduler.close()
    request, _ = httpserver.log[0]
    assert json.loads(request.get_data()) == {"execution": "x-1", "items": [1, 2]}
    assert request.headers["Errands-Timer-Key"] == key


def test_scheduler_errors(tasks_emulator: EmulatorProcess) -> None:
    scheduler = CloudTasksScheduler(PROJECT, LOCATION, "no-such-queue", "https://svc.example",
                                    emulator_host=tasks_emulator.address)
    try:
        with pytest.raises(PermanentError, match="no-such-queue"):
            scheduler.schedule("p", {"operation": "operations/1"}, time.time())
        with pytest.raises(PayloadError, match="flat mapping"):
            scheduler.schedule("p", {"nested": {"a": 1}}, time.time())
        with pytest.raises(ConfigError, match="timezone-aware"):
            scheduler.schedule("p", {}, datetime(2030, 1, 1))
    finally:
        scheduler.close()
    down = CloudTasksScheduler(PROJECT, LOCATION, "q", "https://svc.example",
                               emulator_host=f"127.0.0.1:{free_port()}", timeout=0.5)
    try:
        with pytest.raises(TransientError):
            down.schedule("p", {"operation": "operations/1"}, time.time())
    finally:
        down.close()


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        CloudTasksConnector(PROJECT, LOCATION, "q", "ftp://x")
    assert info.value.field == "url"
    with pytest.raises(ConfigError, match="service_account"):
        CloudTasksConnector(PROJECT, LOCATION, "q", "https://x.example", service_account="nobody")
    with pytest.raises(ConfigError, match="queue"):
        CloudTasksConnector(PROJECT, LOCATION, "a/b", "https://x.example")
    with pytest.raises(ConfigError, match="payload_as"):
        CloudTasksScheduler(PROJECT, LOCATION, "q", "https://x.example", payload_as="xml")
    with pytest.raises(ConfigError, match="prefix"):
        CloudTasksScheduler(PROJECT, LOCATION, "q", "https://x.example", "resume")


def test_secret_headers_never_reach_errors() -> None:
    with pytest.raises(ConfigError) as info:
        CloudTasksConnector(PROJECT, LOCATION, "q", "https://x.example", headers={"Authorization": 7})  # type: ignore[dict-item]
    assert "7" not in str(info.value.value)


def test_missing_extra_raises_at_use_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "google.cloud.tasks_v2", None)
    connector = CloudTasksConnector(PROJECT, LOCATION, "q", "https://x.example")
    with pytest.raises(MissingDependencyError) as info:
        connector.dispatch(Effect(key="k", connector="c", payload={}))
    assert info.value.extra == "tasks"
    scheduler = CloudTasksScheduler(PROJECT, LOCATION, "q", "https://x.example")
    with pytest.raises(MissingDependencyError, match=r"errands\[tasks\]"):
        scheduler.schedule("p", {}, time.time())


def test_scheduler_tasks_carry_a_dispatch_deadline(tasks_emulator: EmulatorProcess, queue: str) -> None:
    # Without one, Cloud Tasks gives up on a callback after 10 minutes and delivers it again while it runs.
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    cases: list[tuple[dict[str, Any], int]] = [
        ({}, 1800), ({"dispatch_deadline": 600}, 600), ({"dispatch_deadline": timedelta(minutes=2)}, 120),
    ]
    for kwargs, seconds in cases:
        scheduler = CloudTasksScheduler(PROJECT, LOCATION, queue, "https://svc.example", "/resume-operation/",
                                        emulator_host=tasks_emulator.address, **kwargs)
        try:
            key = scheduler.schedule("create-agent", {"operation": "operations/1"}, later)
            client = scheduler._queue.client()
            task = client.get_task(name=scheduler._queue.task_path(task_id_for(key)))
            assert task.dispatch_deadline == timedelta(seconds=seconds), kwargs
        finally:
            scheduler.close()
    connector = _connector(tasks_emulator, queue, "https://svc.example/wire", dispatch_deadline=900)
    try:
        effect = Effect(key="deadline-1", connector="c", payload={}, dispatch_at=later.timestamp())
        assert connector.dispatch(effect).outcome is DispatchOutcome.CONFIRMED
        task = connector._queue.client().get_task(name=connector.task_name(effect))
        assert task.dispatch_deadline == timedelta(seconds=900)
    finally:
        connector.close()
    for bad in (5, 3600, "soon"):
        with pytest.raises(ConfigError) as info:
            CloudTasksScheduler(PROJECT, LOCATION, "q", "https://x.example", dispatch_deadline=bad)
        assert info.value.field == "dispatch_deadline"
        with pytest.raises(ConfigError):
            CloudTasksConnector(PROJECT, LOCATION, "q", "https://x.example", dispatch_deadline=bad)
