from __future__ import annotations

import base64
import json
import logging
import os
import time
import uuid
from datetime import datetime, timezone
from typing import Any, TypeVar

import pytest
from errands.core import (
    MAX_RETRY_AFTER,
    ConfigError,
    FakeClock,
    FanOut,
    Journal,
    MemoryStore,
    NewEvent,
    PermanentError,
    Registry,
    Route,
    RouteState,
    TransientError,
    load_config,
)
from errands.core.testing import SinkContract
from errands.sinks import WebhookGoneError, WebhookSink, WebhookVerificationError, verify_webhook
from pytest_httpserver import HTTPServer
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as SWVerificationError
from werkzeug import Request, Response

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
OLD_SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
E = TypeVar("E", bound=Exception)


def events(n: int = 3, streams: int = 1) -> list[Any]:
    return Journal(MemoryStore()).append_many(
        [NewEvent(f"orders/{i % streams}", "order.placed", {"i": i, "note": "ünïcode"}) for i in range(n)])


def refusal(url: str, error: type[E], **options: Any) -> E:
    """What publishing one event to ``url`` raises: an ``error``."""
    sink = WebhookSink(url=url, secret=SECRET, **options)
    try:
        with pytest.raises(error) as info:
            sink.publish(events(1))
    finally:
        sink.close()
    return info.value


def received(server: HTTPServer) -> list[Request]:
    # Each test serves its own path: the server may log a request of the previous test after its teardown.
    path = getattr(server, "hook_path", "/hooks")
    return [req for req, _resp in server.log if req.path == path]


def serve(server: HTTPServer) -> str:
    server.hook_path = f"/hooks/{uuid.uuid4().hex}"  # type: ignore[attr-defined]
    server.expect_request(server.hook_path, method="POST").respond_with_data("ok")  # type: ignore[attr-defined]
    return server.url_for(server.hook_path)  # type: ignore[attr-defined]


class TestWebhookSinkContract(SinkContract):
    @pytest.fixture
    def sink(self, httpserver: HTTPServer) -> Any:
        s = WebhookSink(url=serve(httpserver), secret=SECRET)
        s.server = httpserver  # type: ignore[attr-defined]
        yield s
        s.close()

    def delivered(self, sink: Any) -> list[dict[str, Any]]:
        return [json.loads(req.get_data()) for req in received(sink.server)]


@pytest.fixture
def hooks(httpserver: HTTPServer) -> HTTPServer:
    serve(httpserver)
    return httpserver


def test_deliveries_verify_with_the_helper_and_with_standardwebhooks(hooks: HTTPServer) -> None:
    sink = WebhookSink(url=hooks.url_for(hooks.hook_path), secret=SECRET)
    evs = events(3)
    sink.publish(evs)
    sink.close()
    reqs = received(hooks)
    assert len(reqs) == 3
    for req, ev in zip(reqs, evs):
        body = req.get_data()
        headers = dict(req.headers)
        assert req.headers["webhook-id"] == ev.id
        assert req.headers["content-type"].startswith("application/cloudevents+json")
        assert verify_webhook(headers, body, secrets=[SECRET]) == ev.to_cloudevent()
        assert Webhook(SECRET).verify(body, headers) == ev.to_cloudevent()


def test_tampered_body_and_stale_timestamp_fail(hooks: HTTPServer) -> None:
    sink = WebhookSink(url=hooks.url_for(hooks.hook_path), secret=SECRET)
    sink.publish(events(1))
    sink.close()
    req = received(hooks)[0]
    body, headers = req.get_data(), dict(req.headers)
    tampered = body.replace(b'"i":0', b'"i":9')
    assert tampered != body
    with pytest.raises(WebhookVerificationError, match="no webhook-signature matches"):
        verify_webhook(headers, tampered, secrets=[SECRET])
    with pytest.raises(SWVerificationError):
        Webhook(SECRET).verify(tampered, headers)
    later = time.time() + 301
    with pytest.raises(WebhookVerificationError, match="stale or replayed"):
        verify_webhook(headers, body, secrets=[SECRET], now=later)
    # A stale delivery re-signed correctly is still refused, by both implementations.
    ev = events(1)[0]
    stale_ts = int(time.time()) - 3600
    stale = WebhookSink(url="http://127.0.0.1:1/x", secret=SECRET).signed_headers(ev, body, timestamp=stale_ts)
    with pytest.raises(WebhookVerificationError, match="stale"):
        verify_webhook(stale, body, secrets=[SECRET])
    with pytest.raises(SWVerificationError):
        Webhook(SECRET).verify(body, stale)
    with pytest.raises(WebhookVerificationError, match="no webhook-signature"):
        verify_webhook(headers, body, secrets=[OLD_SECRET])
    with pytest.raises(WebhookVerificationError, match="missing header webhook-signature"):
        verify_webhook({k: v for k, v in headers.items() if k.lower() != "webhook-signature"}, body,
                       secrets=[SECRET])


def test_key_rotation_sends_one_signature_per_secret(hooks: HTTPServer) -> None:
    sink = WebhookSink(url=hooks.url_for(hooks.hook_path), secret=[SECRET, OLD_SECRET])
    sink.publish(events(1))
    sink.close()
    req = received(hooks)[0]
    body, headers = req.get_data(), dict(req.headers)
    assert len(req.headers["webhook-signature"].split()) == 2
    for secret in (SECRET, OLD_SECRET):
        assert verify_webhook(headers, body, secrets=[secret])["id"] == "orders/0/1"
        assert Webhook(secret).verify(body, headers)["id"] == "orders/0/1"


def test_the_signature_matches_standardwebhooks_sign() -> None:
    ev = events(1)[0]
    body = ev.to_json().encode()
    ts = 1_700_000_000
    sink = WebhookSink(url="http://127.0.0.1:1/x", secret=SECRET)
    ours = sink.signed_headers(ev, body, timestamp=ts)["webhook-signature"]
    sink.close()
    assert ours == Webhook(SECRET).sign(ev.id, datetime.fromtimestamp(ts, tz=timezone.utc), body.decode())


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503])
def test_retryable_statuses_raise_transient_with_retry_after(httpserver: HTTPServer, status: int) -> None:
    httpserver.expect_request("/hooks").respond_with_data("busy", status=status, headers={"Retry-After": "7"})
    error = refusal(httpserver.url_for("/hooks"), TransientError)
    assert error.retry_after == 7.0 and str(status) in str(error)


def test_retry_after_as_http_date(httpserver: HTTPServer) -> None:
    when = "Wed, 21 Oct 2015 07:28:00 GMT"
    now = datetime(2015, 10, 21, 7, 27, 30, tzinfo=timezone.utc).timestamp()
    httpserver.expect_request("/hooks").respond_with_data("", status=429, headers={"Retry-After": when})
    assert refusal(httpserver.url_for("/hooks"), TransientError, clock=lambda: now).retry_after == pytest.approx(30.0)


@pytest.mark.parametrize(("header", "expected"), [
    ("inf", None), ("Infinity", None), ("nan", None), ("-5", 0.0),
    ("1e3", None), ("0x10", None),               # not delay-seconds, though float() reads 1e3 as 1000
    (str(10 ** 12), MAX_RETRY_AFTER),
    ("Wed Oct 21 07:28:00 2015", 30.0),          # asctime: no zone, GMT by RFC 9110
    ("Wed, 21 Oct 2015 07:28:00", 30.0),         # naive IMF date: GMT
    ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),      # past: retry now
])
def test_retry_after_is_read_by_the_one_core_rule(httpserver: HTTPServer, header: str,
                                                   expected: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 27, 30, tzinfo=timezone.utc).timestamp()
    httpserver.expect_request("/hooks").respond_with_data("", status=503, headers={"Retry-After": header})
    error = refusal(httpserver.url_for("/hooks"), TransientError, clock=lambda: now)
    assert error.retry_after == (pytest.approx(expected) if expected is not None else None)


def test_retry_after_inf_does_not_stall_the_route(httpserver: HTTPServer) -> None:
    path = f"/stall/{uuid.uuid4().hex}"
    answers = [Response("busy", status=429, headers={"Retry-After": "1e999"}),
               Response("busy", status=503, headers={"Retry-After": str(10 ** 15)})]

    def handler(_req: Request) -> Response:
        return answers.pop(0) if answers else Response("ok")

    httpserver.expect_request(path).respond_with_handler(handler)
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    Journal(store).append("orders/1", "order.placed", {"n": 1})
    sink = WebhookSink(url=httpserver.url_for(path), secret=SECRET, clock=clock.now)
    fanout = FanOut(store, [Route("hooks", sink)], retry_base=1.0, retry_cap=30.0)
    assert fanout.run_once() == 0  # 429 with an unreadable Retry-After: the route's own backoff
    clock.advance(31)
    assert fanout.run_once() == 0  # 503 asking for 31,000 years: capped
    retry_at = fanout.status()[0].retry_at
    assert retry_at is not None and retry_at - clock.now() == pytest.approx(MAX_RETRY_AFTER)
    clock.advance(MAX_RETRY_AFTER + 1)
    assert fanout.run_once() == 1
    fanout.close()
    store.close()


def test_timeouts_and_refused_connections_are_transient(httpserver: HTTPServer) -> None:
    def slow(_req: Request) -> Response:
        time.sleep(0.5)
        return Response("late")

    httpserver.expect_request("/slow").respond_with_handler(slow)
    sink = WebhookSink(url=httpserver.url_for("/slow"), secret=SECRET, timeout=0.1)
    with pytest.raises(TransientError, match="timed out"):
        sink.publish(events(1))
    sink.close()
    refused = WebhookSink(url="http://127.0.0.1:9/x", secret=SECRET, timeout=1)
    with pytest.raises(TransientError, match="unreachable"):
        refused.publish(events(1))
    refused.close()


def test_other_4xx_park_the_event_and_the_route_moves_on(httpserver: HTTPServer) -> None:
    poison = {"orders/0/2"}

    def handler(req: Request) -> Response:
        if req.headers["webhook-id"] in poison:
            return Response("unprocessable", status=422)
        return Response("ok")

    path = f"/poison/{uuid.uuid4().hex}"
    httpserver.expect_request(path).respond_with_handler(handler)

    def accepted() -> list[str]:
        return [r.headers["webhook-id"] for r, resp in httpserver.log if r.path == path and resp.status_code == 200]

    store = MemoryStore()
    Journal(store).append_many([NewEvent("orders/0", "order.placed", {"i": i}) for i in range(5)])
    sink = WebhookSink(url=httpserver.url_for(path), secret=SECRET)
    fanout = FanOut(store, [Route("hooks", sink, batch_size=5)])
    assert fanout.drain() == 4
    dead = fanout.dead("hooks")
    assert [d.event.id for d in dead] == ["orders/0/2"] and "422" in dead[0].error
    assert set(accepted()) == {"orders/0/1", "orders/0/3", "orders/0/4", "orders/0/5"}
    poison.clear()
    assert fanout.redrive("hooks") == 1
    assert fanout.run_once() == 1 and fanout.dead("hooks") == []
    assert accepted().count("orders/0/2") == 1
    fanout.close()


def test_410_stops_the_route_and_says_so(httpserver: HTTPServer, caplog: Any) -> None:
    httpserver.expect_request("/hooks").respond_with_data("gone", status=410)
    store = MemoryStore()
    Journal(store).append_many([NewEvent("orders/0", "order.placed", {"i": i}) for i in range(3)])
    sink = WebhookSink(url=httpserver.url_for("/hooks"), secret=SECRET)
    with pytest.raises(WebhookGoneError):
        sink.publish(events(1))
    fanout = FanOut(store, [Route("hooks", sink)])
    with caplog.at_level(logging.ERROR, logger="errands.fanout"):
        assert fanout.run_once() == 0
    assert "route hooks stopped" in caplog.text and "410" in caplog.text
    status = fanout.status()[0]
    assert status.state is RouteState.STOPPED and "gone" in (status.reason or "")
    assert status.behind == 3 and fanout.dead("hooks") == []
    httpserver.clear()
    httpserver.expect_request("/hooks").respond_with_data("ok")
    assert fanout.run_once() == 0  # still stopped
    fanout.resume("hooks")
    assert fanout.run_once() == 3
    fanout.close()


def test_plain_400_is_permanent(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/hooks").respond_with_data("bad", status=400)
    assert not isinstance(refusal(httpserver.url_for("/hooks"), PermanentError), WebhookGoneError)


def test_bad_options_are_named_and_secrets_never_shown() -> None:
    with pytest.raises(ConfigError) as info:
        WebhookSink(url="ftp://x", secret="not-a-secret-value")
    text = str(info.value)
    assert "url must be an http(s) URL, got 'ftp://x'" in text and "whsec_" in text
    assert "not-a-secret-value" not in text
    with pytest.raises(ConfigError, match="not base64") as info2:
        WebhookSink(url="https://x.example/h", secret="whsec_***sekrit***")
    assert "sekrit" not in str(info2.value)
    with pytest.raises(ConfigError, match="secret is required"):
        WebhookSink(url="https://x.example/h")
    sink = WebhookSink(url="https://user:pw@x.example/services/T0/B0/tok3n?key=k3y", secret=SECRET)
    assert SECRET[6:] not in repr(sink) and "redacted" in repr(sink)
    assert all(s not in repr(sink) for s in ("tok3n", "k3y", "pw"))
    sink.close()


def test_errors_do_not_show_tokens_in_the_url(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/services/T0/tok3n").respond_with_data("no", status=500)
    error = refusal(httpserver.url_for("/services/T0/tok3n"), TransientError)
    assert "tok3n" not in str(error) and "answered 500" in str(error)


def test_built_from_errands_toml_with_secret_env(monkeypatch: Any) -> None:
    monkeypatch.setenv("HOOK_SECRETS", f"{SECRET} {OLD_SECRET}")
    config = load_config({"sinks": {"partners": {"type": "webhook", "url": "https://x.example/h",
                          "secret_env": "HOOK_SECRETS", "subjects": ["order.*"]}}}, registry=Registry())
    sink = config.sinks["partners"]
    assert isinstance(sink, WebhookSink) and len(sink._keys) == 2
    sink.close()
    with pytest.raises(ConfigError) as info:
        load_config({"sinks": {"p": {"type": "webhook", "url": "https://x.example/h", "secret": "whsec_@@"}}},
                    registry=Registry())
    assert info.value.field == "sinks.p.secret" and "@@" not in str(info.value)
