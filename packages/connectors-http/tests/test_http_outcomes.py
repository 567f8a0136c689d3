"""The outcome mapping of DESIGN §7, row by row, against a real HTTP server (pytest-httpserver)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any, Callable, Iterator

import httpx
import pytest
from errands.connectors.http import HttpConnector
from errands.connectors.http.testing import LedgerServer
from errands.core import (
    MAX_RETRY_AFTER,
    CompensationOutcome,
    DispatchOutcome,
    Effect,
    Obligation,
    ObservationOutcome,
)
from errands.core.testing import free_port
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

MODES = ["sync", "async"]


def run(connector: HttpConnector, mode: str, method: str, arg: Any, **kw: Any) -> Any:
    if mode == "sync":
        return getattr(connector, method)(arg, **kw)

    async def go() -> Any:
        try:
            return await getattr(connector, "a" + method)(arg, **kw)
        finally:
            await connector.aclose()

    return asyncio.run(go())


@pytest.fixture
def connector(httpserver: HTTPServer) -> Iterator[HttpConnector]:
    c = HttpConnector(
        url=httpserver.url_for("/pay"),
        observe_url=httpserver.url_for("/lookup"),
        compensate_url=httpserver.url_for("/refund"),
        headers={"Authorization": "Bearer tok-SECRET-123"},
        timeout=2.0,
    )
    yield c
    c.close()


def effect(key: str = "order-1", **kw: Any) -> Effect:
    return Effect(key=key, connector="bank.wire", payload={"amount": 5, "to": "ada"}, **kw)


DISPATCH_ROWS = [
    (200, DispatchOutcome.CONFIRMED),
    (201, DispatchOutcome.CONFIRMED),
    (202, DispatchOutcome.CONFIRMED),
    (204, DispatchOutcome.CONFIRMED),
    (299, DispatchOutcome.CONFIRMED),
    (300, DispatchOutcome.UNKNOWN),
    (301, DispatchOutcome.UNKNOWN),
    (302, DispatchOutcome.UNKNOWN),
    (303, DispatchOutcome.UNKNOWN),
    (307, DispatchOutcome.UNKNOWN),
    (308, DispatchOutcome.UNKNOWN),
    (400, DispatchOutcome.FAILED),
    (401, DispatchOutcome.FAILED),
    (403, DispatchOutcome.FAILED),
    (404, DispatchOutcome.FAILED),
    (405, DispatchOutcome.FAILED),
    (408, DispatchOutcome.UNKNOWN),
    (409, DispatchOutcome.FAILED),
    (410, DispatchOutcome.FAILED),
    (422, DispatchOutcome.FAILED),
    (425, DispatchOutcome.UNKNOWN),
    (429, DispatchOutcome.UNKNOWN),
    (451, DispatchOutcome.FAILED),
    (500, DispatchOutcome.UNKNOWN),
    (501, DispatchOutcome.UNKNOWN),
    (502, DispatchOutcome.UNKNOWN),
    (503, DispatchOutcome.UNKNOWN),
    (504, DispatchOutcome.UNKNOWN),
    (599, DispatchOutcome.UNKNOWN),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("status", "expected"), DISPATCH_ROWS)
def test_dispatch_status_maps_to_outcome(httpserver: HTTPServer, connector: HttpConnector, mode: str,
                                         status: int, expected: DispatchOutcome) -> None:
    headers = {"Location": "https://elsewhere.example/pay"} if 300 <= status < 400 else {}
    httpserver.expect_request("/pay", method="POST").respond_with_data(
        json.dumps({"status": status}), status=status, headers=headers, content_type="application/json")
    result = run(connector, mode, "dispatch", effect())
    assert result.outcome is expected
    assert result.response["status"] == status
    assert len(httpserver.log) == 1, "an HTTP answer is never retried inside the connector"
    if expected is DispatchOutcome.CONFIRMED:
        assert result.error is None
    else:
        assert str(status) in (result.error or "")


@pytest.mark.parametrize("mode", MODES)
def test_dispatch_sends_json_and_protocol_headers(httpserver: HTTPServer, connector: HttpConnector,
                                                  mode: str) -> None:
    httpserver.expect_request("/pay", method="POST").respond_with_json({"id": "wire-77"}, status=201)
    e = effect("order-9", business_key="invoice-3", run_id="run-5", metadata={"attempt": 3})
    result = run(connector, mode, "dispatch", e)
    assert result.outcome is DispatchOutcome.CONFIRMED
    assert result.response == {"status": 201, "body": {"id": "wire-77"}}
    assert result.external_ref == "wire-77"
    request, _ = httpserver.log[0]
    assert json.loads(request.get_data()) == {"amount": 5, "to": "ada"}
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Idempotency-Key"] == "order-9"
    assert request.headers["Errands-Business-Key"] == "invoice-3"
    assert request.headers["Errands-Run-Id"] == "run-5"
    assert request.headers["Errands-Attempt"] == "3"
    assert request.headers["Authorization"] == "Bearer tok-SECRET-123"


def test_attempt_keyword_wins_and_optional_headers_are_omitted(httpserver: HTTPServer,
                                                               connector: HttpConnector) -> None:
    httpserver.expect_request("/pay", method="POST").respond_with_data("ok")
    connector.dispatch(effect(metadata={"attempt": 2}), attempt=4)
    connector.dispatch(effect("order-2"))
    first, second = (req for req, _ in httpserver.log)
    assert first.headers["Errands-Attempt"] == "4"
    assert second.headers["Errands-Attempt"] == "1"
    assert "Errands-Business-Key" not in second.headers
    assert "Errands-Run-Id" not in second.headers


def test_location_header_is_the_external_ref(httpserver: HTTPServer, connector: HttpConnector) -> None:
    httpserver.expect_request("/pay").respond_with_data("", status=201, headers={"Location": "/wires/12"})
    result = connector.dispatch(effect())
    assert result.external_ref == "/wires/12"
    assert result.response == {"status": 201, "body": None}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds(httpserver: HTTPServer, connector: HttpConnector, mode: str, status: int) -> None:
    httpserver.expect_request("/pay").respond_with_data("slow down", status=status, headers={"Retry-After": "7"})
    result = run(connector, mode, "dispatch", effect())
    assert result.outcome is DispatchOutcome.UNKNOWN
    assert result.retry_after == 7.0


def test_retry_after_http_date(httpserver: HTTPServer, connector: HttpConnector) -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=120)
    httpserver.expect_request("/pay").respond_with_data(
        "", status=503, headers={"Retry-After": format_datetime(when, usegmt=True)})
    result = connector.dispatch(effect())
    assert result.retry_after is not None
    assert 100 <= result.retry_after <= 121


def test_unreadable_retry_after_is_ignored(httpserver: HTTPServer, connector: HttpConnector) -> None:
    httpserver.expect_request("/pay").respond_with_data("", status=429, headers={"Retry-After": "soon"})
    result = connector.dispatch(effect())
    assert result.outcome is DispatchOutcome.UNKNOWN
    assert result.retry_after is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("header", "expected"), [
    ("inf", None), ("1e999", None), ("nan", None), ("-30", 0.0),
    ("1e3", None), ("+5", 5.0),               # 1e3 is not delay-seconds, though float() reads it as 1000
    ("Wed, 21 Oct 2015 07:28:00", 0.0),       # a naive date is GMT (long past), not ignored
    (str(10 ** 12), MAX_RETRY_AFTER), ("9" * 400, MAX_RETRY_AFTER),
])
def test_retry_after_inf_nan_and_absurd_values(httpserver: HTTPServer, connector: HttpConnector, mode: str,
                                               header: str, expected: float | None) -> None:
    httpserver.expect_request("/pay").respond_with_data("", status=503, headers={"Retry-After": header})
    result = run(connector, mode, "dispatch", effect())
    assert result.outcome is DispatchOutcome.UNKNOWN
    assert result.retry_after == expected


def test_retry_after_asctime_date_without_a_zone_is_gmt(httpserver: HTTPServer, connector: HttpConnector) -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=120)
    httpserver.expect_request("/pay").respond_with_data(
        "", status=429, headers={"Retry-After": time.asctime(when.utctimetuple())})
    result = connector.dispatch(effect())
    assert result.retry_after is not None
    assert 100 <= result.retry_after <= 121


@pytest.mark.parametrize("mode", MODES)
def test_compensate_retry_after_uses_the_same_rule(httpserver: HTTPServer, connector: HttpConnector,
                                                   mode: str) -> None:
    httpserver.expect_request("/refund").respond_with_data("", status=503, headers={"Retry-After": "inf"})
    result = run(connector, mode, "compensate", Obligation(effect_key="k", kind="refund", payload={}, attempt=1))
    assert result.outcome is CompensationOutcome.PENDING
    assert result.retry_after is None


def test_redirect_is_not_followed(httpserver: HTTPServer, connector: HttpConnector) -> None:
    httpserver.expect_request("/pay").respond_with_data("", status=307, headers={"Location": "/other"})
    httpserver.expect_request("/other").respond_with_data("moved here")
    result = connector.dispatch(effect())
    assert result.outcome is DispatchOutcome.UNKNOWN
    assert "/other" in (result.error or "")
    assert [req.path for req, _ in httpserver.log] == ["/pay"]


@pytest.mark.parametrize("mode", MODES)
def test_read_timeout_is_unknown_and_not_retried(httpserver: HTTPServer, mode: str) -> None:
    def slow(request: Request) -> Response:
        time.sleep(0.6)
        return Response("late")

    httpserver.expect_request("/pay").respond_with_handler(slow)
    c = HttpConnector(url=httpserver.url_for("/pay"), timeout=0.2)
    try:
        result = run(c, mode, "dispatch", effect())
    finally:
        c.close()
    assert result.outcome is DispatchOutcome.UNKNOWN
    assert "may have been sent" in (result.error or "")
    time.sleep(0.6)
    assert len(httpserver.log) == 1, "a request that may have been sent is never retried by the connector"


@pytest.mark.parametrize("mode", MODES)
def test_connection_refused_is_unknown_and_says_not_sent(mode: str) -> None:
    c = HttpConnector(url=f"http://127.0.0.1:{free_port()}/pay", connect_retries=1, timeout=1.0)
    result = run(c, mode, "dispatch", effect())
    c.close()
    assert result.outcome is DispatchOutcome.UNKNOWN
    assert "ConnectError" in (result.error or "")
    assert "was not sent" in (result.error or "")


def _flaky_transport(fail_first: int, exc: Callable[[httpx.Request], Exception],
                     calls: list[httpx.Request]) -> Callable[[httpx.Request], httpx.Response]:
    # A connect failure followed by success cannot be produced on demand by a real server, so these
    # two tests inject the fault at httpx's transport seam.
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) <= fail_first:
            raise exc(request)
        return httpx.Response(200, json={"ok": True})

    return handler


def test_connect_errors_are_retried_with_stamina_then_succeed() -> None:
    calls: list[httpx.Request] = []
    handler = _flaky_transport(2, lambda r: httpx.ConnectError("connection refused", request=r), calls)
    client = httpx.Client(transport=httpx.MockTransport(handler))
    c = HttpConnector(url="https://bank.example/pay", client=client, connect_retries=2)
    result = c.dispatch(effect())
    assert result.outcome is DispatchOutcome.CONFIRMED
    assert len(calls) == 3
    assert {r.headers["Idempotency-Key"] for r in calls} == {"order-1"}
    client.close()


@pytest.mark.parametrize("exc", [
    lambda r: httpx.ReadTimeout("timed out", request=r),
    lambda r: httpx.WriteTimeout("timed out", request=r),
    lambda r: httpx.RemoteProtocolError("Server disconnected without sending a response.", request=r),
    lambda r: httpx.ReadError("connection reset", request=r),
], ids=["read-timeout", "write-timeout", "disconnected", "read-error"])
def test_errors_after_sending_are_never_retried(exc: Callable[[httpx.Request], Exception]) -> None:
    calls: list[httpx.Request] = []
    client = httpx.Client(transport=httpx.MockTransport(_flaky_transport(5, exc, calls)))
    c = HttpConnector(url="https://bank.example/pay", client=client, connect_retries=5)
    result = c.dispatch(effect())
    assert result.outcome is DispatchOutcome.UNKNOWN
    assert len(calls) == 1
    client.close()


def test_payload_that_is_not_json_fails_without_a_request(httpserver: HTTPServer,
                                                          connector: HttpConnector) -> None:
    result = connector.dispatch(Effect(key="k", connector="bank.wire", payload={"when": object()}))
    assert result.outcome is DispatchOutcome.FAILED
    assert "JSON" in (result.error or "")
    assert httpserver.log == []


# -- observe ---------------------------------------------------------------------------------------

OBSERVE_ROWS: list[tuple[int, Any, ObservationOutcome]] = [
    (200, {"count": 0}, ObservationOutcome.ABSENT),
    (200, {"count": 1}, ObservationOutcome.CONFIRMED),
    (200, {"count": 2}, ObservationOutcome.DUPLICATE),
    (200, {"count": 7}, ObservationOutcome.DUPLICATE),
    (200, {"count": -1}, ObservationOutcome.UNKNOWN),
    (200, {"count": "1"}, ObservationOutcome.UNKNOWN),
    (200, {"count": True}, ObservationOutcome.UNKNOWN),
    (200, {"found": True}, ObservationOutcome.UNKNOWN),
    (200, [1], ObservationOutcome.UNKNOWN),
    (201, {"count": 1}, ObservationOutcome.UNKNOWN),
    (404, {"count": 0}, ObservationOutcome.UNKNOWN),
    (500, {"count": 1}, ObservationOutcome.UNKNOWN),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("status", "body", "expected"), OBSERVE_ROWS)
def test_observe_maps_count(httpserver: HTTPServer, connector: HttpConnector, mode: str, status: int,
                            body: Any, expected: ObservationOutcome) -> None:
    httpserver.expect_request("/lookup", method="POST").respond_with_json(body, status=status)
    observation = run(connector, mode, "observe", effect(business_key="inv-1"))
    assert observation.outcome is expected
    request, _ = httpserver.log[0]
    assert json.loads(request.get_data()) == {
        "idempotency_key": "order-1", "business_key": "inv-1", "payload": {"amount": 5, "to": "ada"}}
    assert request.headers["Idempotency-Key"] == "order-1"


def test_observe_plain_text_answer_is_unknown(httpserver: HTTPServer, connector: HttpConnector) -> None:
    httpserver.expect_request("/lookup").respond_with_data("count: 1")
    assert connector.observe(effect()).outcome is ObservationOutcome.UNKNOWN


def test_observe_transport_error_is_unknown() -> None:
    c = HttpConnector(url="http://127.0.0.1:1/pay", observe_url=f"http://127.0.0.1:{free_port()}/lookup",
                      connect_retries=0)
    assert c.observe(effect()).outcome is ObservationOutcome.UNKNOWN
    c.close()


def test_without_observe_url_the_connector_cannot_observe(httpserver: HTTPServer) -> None:
    c = HttpConnector(url=httpserver.url_for("/pay"))
    assert c.capabilities.can_observe is False
    assert c.capabilities.can_compensate is False
    assert c.observe(effect()).outcome is ObservationOutcome.UNKNOWN
    assert httpserver.log == []


# -- compensate ------------------------------------------------------------------------------------

COMPENSATE_ROWS = [
    (200, CompensationOutcome.COMPENSATED),
    (204, CompensationOutcome.COMPENSATED),
    (302, CompensationOutcome.PENDING),
    (400, CompensationOutcome.FAILED),
    (404, CompensationOutcome.FAILED),
    (408, CompensationOutcome.PENDING),
    (425, CompensationOutcome.PENDING),
    (429, CompensationOutcome.PENDING),
    (500, CompensationOutcome.PENDING),
    (503, CompensationOutcome.PENDING),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("status", "expected"), COMPENSATE_ROWS)
def test_compensate_status_maps_to_outcome(httpserver: HTTPServer, connector: HttpConnector, mode: str,
                                           status: int, expected: CompensationOutcome) -> None:
    httpserver.expect_request("/refund", method="POST").respond_with_data(
        "", status=status, headers={"Retry-After": "3"})
    obligation = Obligation(effect_key="order-1", kind="refund", payload={"amount": 5}, run_id="run-1",
                            attempt=1)
    result = run(connector, mode, "compensate", obligation)
    assert result.outcome is expected
    if expected is CompensationOutcome.PENDING:
        assert result.retry_after == 3.0
    request, _ = httpserver.log[0]
    assert json.loads(request.get_data()) == {
        "effect_key": "order-1", "kind": "refund", "payload": {"amount": 5}, "run_id": "run-1"}
    assert request.headers["Idempotency-Key"] == "order-1:compensate:refund"
    assert request.headers["Errands-Attempt"] == "1"


def test_compensate_without_url_is_stuck(httpserver: HTTPServer) -> None:
    c = HttpConnector(url=httpserver.url_for("/pay"))
    result = c.compensate(Obligation(effect_key="k", kind="refund", payload={}))
    assert result.outcome is CompensationOutcome.STUCK
    assert "compensate_url" in (result.error or "")
    assert httpserver.log == []


def test_compensate_transport_error_is_pending() -> None:
    c = HttpConnector(url="http://127.0.0.1:1/pay", compensate_url=f"http://127.0.0.1:{free_port()}/refund",
                      connect_retries=0)
    result = c.compensate(Obligation(effect_key="k", kind="refund", payload={}))
    assert result.outcome is CompensationOutcome.PENDING
    c.close()


# -- pooling ---------------------------------------------------------------------------------------

def test_one_pooled_client_per_connector() -> None:
    with LedgerServer() as server, HttpConnector(url=server.url("/effects")) as c:
        for i in range(20):
            assert c.dispatch(effect(f"k{i}")).outcome is DispatchOutcome.CONFIRMED
        assert len(server.client_ports) == 1, "sequential dispatches reuse one keep-alive connection"


def test_async_client_is_reused_within_a_loop() -> None:
    async def go(url: str) -> list[DispatchOutcome]:
        async with HttpConnector(url=url) as c:
            return [(await c.adispatch(effect(f"k{i}"))).outcome for i in range(10)]

    with LedgerServer() as server:
        assert asyncio.run(go(server.url("/effects"))) == [DispatchOutcome.CONFIRMED] * 10
        assert len(server.client_ports) == 1


def test_attempt_comes_from_the_outbox_metadata(httpserver: HTTPServer, connector: HttpConnector) -> None:
    httpserver.expect_request("/pay").respond_with_data("ok")
    connector.dispatch(effect(metadata={"errands.attempt": 5, "attempt": 2}))
    request, _ = httpserver.log[0]
    assert request.headers["Errands-Attempt"] == "5"


def test_async_connector_methods_are_coroutines(httpserver: HTTPServer) -> None:
    from errands.connectors.http import AsyncHttpConnector

    httpserver.expect_request("/pay").respond_with_data("", status=503, headers={"Retry-After": "2"})
    httpserver.expect_request("/lookup").respond_with_json({"count": 0})
    httpserver.expect_request("/refund").respond_with_data("done")
    c = AsyncHttpConnector(url=httpserver.url_for("/pay"), observe_url=httpserver.url_for("/lookup"),
                           compensate_url=httpserver.url_for("/refund"))

    async def go() -> tuple[Any, Any, Any]:
        try:
            return (await c.dispatch(effect()), await c.observe(effect()),
                    await c.compensate(Obligation(effect_key="order-1", kind="refund", payload={})))
        finally:
            await c.aclose()

    dispatched, observed, compensated = asyncio.run(go())
    assert dispatched.outcome is DispatchOutcome.UNKNOWN and dispatched.retry_after == 2.0
    assert observed.outcome is ObservationOutcome.ABSENT
    assert compensated.outcome is CompensationOutcome.COMPENSATED
    assert repr(c).startswith("AsyncHttpConnector(")


def test_async_pool_closes_with_its_event_loop() -> None:
    from errands.connectors.http import AsyncHttpConnector

    with LedgerServer() as server:
        c = AsyncHttpConnector(url=server.url("/effects"))
        pools: list[httpx.AsyncClient] = []

        async def go(key: str) -> Any:
            result = await c.dispatch(effect(key))
            pools.append(await c._aclient())
            assert "close" not in vars(asyncio.get_running_loop()), "the loop is left as it is"
            return result

        first = asyncio.run(go("a"))
        assert pools[0].is_closed and not c._async_pools, "the pool is closed when the loop that owns it closes"
        second = asyncio.run(go("b"))
        assert pools[1] is not pools[0] and pools[1].is_closed
        assert (first.outcome, second.outcome) == (DispatchOutcome.CONFIRMED, DispatchOutcome.CONFIRMED)
        assert len(server.client_ports) == 2


def test_async_pool_on_a_call_runner_loop_closes_with_the_runner() -> None:
    from errands.connectors.http import AsyncHttpConnector
    from errands.core.runtime import CallRunner

    with LedgerServer() as server:
        c = AsyncHttpConnector(url=server.url("/effects"))
        runner = CallRunner(1)
        assert runner.call(c.dispatch, effect("a")).outcome is DispatchOutcome.CONFIRMED
        (pool,) = c._async_pools.values()
        runner.close()  # the connector is never closed: the runner's loop shutdown closes its pool
        assert pool.client.is_closed and not c._async_pools


def test_close_runs_a_loop_that_is_not_running_until_its_pool_is_closed() -> None:
    with LedgerServer() as server:
        c = HttpConnector(url=server.url("/effects"))
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(c.adispatch(effect("a"))).outcome is DispatchOutcome.CONFIRMED
            (pool,) = c._async_pools.values()
            c.close()
            assert pool.client.is_closed and not c._async_pools
        finally:
            loop.close()


def test_close_from_another_thread_closes_each_loops_pool_on_its_loop() -> None:
    from errands.connectors.http import AsyncHttpConnector
    from errands.core.runtime import CallRunner

    with LedgerServer() as server:
        c = AsyncHttpConnector(url=server.url("/effects"))
        runners = [CallRunner(1), CallRunner(1)]
        try:
            for i, runner in enumerate(runners):
                assert runner.call(c.dispatch, effect(f"k{i}")).outcome is DispatchOutcome.CONFIRMED
            pools = list(c._async_pools.values())
            assert len(pools) == 2 and len(server.client_ports) == 2, "one pool per event loop"
            c.close()
            assert all(p.client.is_closed for p in pools) and not c._async_pools
            assert runners[0].call(c.dispatch, effect("again")).outcome is DispatchOutcome.CONFIRMED
            assert len(c._async_pools) == 1, "a closed connector opens a new pool when used again"
        finally:
            for runner in runners:
                runner.close()
