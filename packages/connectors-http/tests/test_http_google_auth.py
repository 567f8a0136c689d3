"""``HttpConnector(..., auth=GoogleIdToken())``: OIDC ID tokens on every request, cached until shortly before
they expire, renewed once on a 401, never logged; against a local server (pytest-httpserver) and an injected
token source."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any, Callable

import pytest
from errands.connectors.http import AsyncHttpConnector, GoogleIdToken, HttpConnector, TokenError
from errands.connectors.http._auth import audience_of, token_expiry
from errands.core import ConfigError, DispatchOutcome, Effect, MissingDependencyError
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def jwt(exp: float, n: int) -> str:
    """A JWT-shaped token with an ``exp`` claim (unsigned: the connector never checks tokens it sends)."""
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'none'})}.{part({'exp': exp, 'n': n, 'aud': 'x'})}.c2lnbmF0dXJl"


class Source:
    """A token source that hands out a new JWT, valid an hour, on every call and records the audiences."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.audiences: list[str] = []

    def __call__(self, audience: str) -> str:
        self.audiences.append(audience)
        return jwt(self.clock() + 3600, len(self.audiences))


def bearer(request: Request) -> str:
    header = request.headers.get("Authorization", "")
    assert header.startswith("Bearer "), header
    return header[len("Bearer "):]


def _effect(key: str = "e-1") -> Effect:
    return Effect(key=key, connector="svc", payload={"n": 1})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def source(clock: Clock) -> Source:
    return Source(clock)


def test_every_request_carries_a_cached_bearer_token_for_the_targets_audience(
        httpserver: HTTPServer, clock: Clock, source: Source) -> None:
    seen: list[str] = []

    def handler(request: Request) -> Response:
        seen.append(bearer(request))
        return Response("{}", status=200, content_type="application/json")

    httpserver.expect_request("/pay", method="POST").respond_with_handler(handler)
    with HttpConnector(url=httpserver.url_for("/pay"), auth=GoogleIdToken(token_source=source, clock=clock)) as c:
        for i in range(3):
            assert c.dispatch(_effect(f"e-{i}")).outcome is DispatchOutcome.CONFIRMED
    assert source.audiences == [audience_of(httpserver.url_for("/pay"))]  # one fetch, for scheme + host
    assert source.audiences[0] == f"http://{httpserver.host}:{httpserver.port}"
    assert len(set(seen)) == 1 and token_expiry(seen[0]) == T0 + 3600


def test_a_token_is_renewed_shortly_before_it_expires(httpserver: HTTPServer, clock: Clock, source: Source) -> None:
    seen: list[str] = []
    httpserver.expect_request("/pay").respond_with_handler(lambda r: (seen.append(bearer(r)), Response("ok"))[1])
    auth = GoogleIdToken("https://svc-abc-uc.a.run.app", token_source=source, clock=clock, refresh_margin=300)
    with HttpConnector(url=httpserver.url_for("/pay"), auth=auth) as c:
        c.dispatch(_effect())
        clock.now = T0 + 3600 - 301  # still fresh
        c.dispatch(_effect())
        clock.now = T0 + 3600 - 299  # inside the margin: a new one
        c.dispatch(_effect())
    assert source.audiences == ["https://svc-abc-uc.a.run.app"] * 2  # the audience given wins
    assert seen[0] == seen[1] != seen[2]


def test_a_401_gets_one_more_try_with_a_new_token(httpserver: HTTPServer, clock: Clock, source: Source) -> None:
    seen: list[str] = []

    def handler(request: Request) -> Response:
        seen.append(bearer(request))
        return Response("denied", status=401) if len(seen) == 1 else Response("ok", status=200)

    httpserver.expect_request("/pay").respond_with_handler(handler)
    with HttpConnector(url=httpserver.url_for("/pay"), auth=GoogleIdToken(token_source=source, clock=clock)) as c:
        assert c.dispatch(_effect()).outcome is DispatchOutcome.CONFIRMED
        assert len(seen) == 2 and seen[0] != seen[1] and len(source.audiences) == 2
        c.dispatch(_effect())  # the new token is kept
    assert seen[2] == seen[1] and len(source.audiences) == 2


def test_a_second_401_is_the_answer(httpserver: HTTPServer, clock: Clock, source: Source) -> None:
    httpserver.expect_request("/pay").respond_with_data("denied", status=401)
    with HttpConnector(url=httpserver.url_for("/pay"), auth=GoogleIdToken(token_source=source, clock=clock)) as c:
        result = c.dispatch(_effect())
    assert result.outcome is DispatchOutcome.FAILED and "HTTP 401" in (result.error or "")
    assert len(httpserver.log) == 2, "refreshed once, not more"


def test_no_token_means_the_request_was_not_sent(httpserver: HTTPServer) -> None:
    def broken(audience: str) -> str:
        raise RuntimeError("metadata server unreachable")

    with HttpConnector(url=httpserver.url_for("/pay"), auth=GoogleIdToken(token_source=broken)) as c:
        result = c.dispatch(_effect())
    assert result.outcome is DispatchOutcome.UNKNOWN
    assert "the request was not sent" in (result.error or "") and "metadata server unreachable" in (result.error or "")
    assert httpserver.log == []
    with pytest.raises(TokenError):
        GoogleIdToken(token_source=lambda a: "").token("https://x.example")


def test_the_token_never_reaches_a_log_or_an_error(httpserver: HTTPServer, clock: Clock, source: Source,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    def echo(request: Request) -> Response:  # a server that echoes the credentials it got back
        return Response(json.dumps({"got": request.headers.get("Authorization")}), status=500,
                        content_type="application/json")

    httpserver.expect_request("/pay").respond_with_handler(echo)
    httpserver.expect_request("/lookup").respond_with_data("no", status=401)
    caplog.set_level(logging.DEBUG)
    with HttpConnector(url=httpserver.url_for("/pay"), observe_url=httpserver.url_for("/lookup"),
                       auth=GoogleIdToken(token_source=source, clock=clock)) as c:
        result = c.dispatch(_effect())
        c.observe(_effect())
        shown = repr(c)
    tokens = [bearer(request) for request, _ in httpserver.log]
    assert len(set(tokens)) == 2  # the observe's 401 brought a second token
    assert result.outcome is DispatchOutcome.UNKNOWN and "***" in (result.error or "")
    for token in tokens:
        for part in (token, *token.split(".")[1:]):
            assert part not in caplog.text and part not in (result.error or "") and part not in shown
    assert "GoogleIdToken(audience=None)" in shown


def test_the_async_connector_sends_and_renews_tokens_too(httpserver: HTTPServer, clock: Clock,
                                                         source: Source) -> None:
    seen: list[str] = []

    def handler(request: Request) -> Response:
        seen.append(bearer(request))
        return Response("denied", status=401) if len(seen) == 2 else Response("ok")

    httpserver.expect_request("/pay").respond_with_handler(handler)

    async def main() -> list[DispatchOutcome]:
        async with AsyncHttpConnector(url=httpserver.url_for("/pay"),
                                      auth=GoogleIdToken(token_source=source, clock=clock)) as c:
            return [(await c.dispatch(_effect())).outcome for _ in range(2)]

    assert asyncio.run(main()) == [DispatchOutcome.CONFIRMED] * 2
    assert seen[0] == seen[1] != seen[2] and len(source.audiences) == 2


def test_a_source_may_give_the_expiry_itself(clock: Clock) -> None:
    calls: list[str] = []

    def source(audience: str) -> tuple[str, float]:
        calls.append(audience)
        return f"opaque-{len(calls)}", clock() + 600

    auth = GoogleIdToken(token_source=source, clock=clock, refresh_margin=60)
    assert auth.headers("https://a.example/x") == {"Authorization": "Bearer opaque-1"}
    assert auth.token("https://a.example/y") == "opaque-1"
    assert auth.token("https://b.example:8443/y") == "opaque-2"  # another audience
    clock.now += 541
    assert auth.token("https://a.example/x") == "opaque-3"
    assert calls == ["https://a.example", "https://b.example:8443", "https://a.example"]


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError) as bad:
        GoogleIdToken("", token_source="nope", refresh_margin=-1)  # type: ignore[arg-type]
    assert {p.field for p in bad.value.problems} == {"auth.audience", "auth.token_source", "auth.refresh_margin"}
    with pytest.raises(ConfigError) as wrong:
        HttpConnector(url="https://x.example", auth="Bearer x")  # type: ignore[arg-type]
    assert wrong.value.field == "auth" and "Bearer x" not in str(wrong.value)
    with pytest.raises(ConfigError, match="Authorization") as both:
        HttpConnector(url="https://x.example", headers={"authorization": "Bearer s3cret"},
                      auth=GoogleIdToken(token_source=lambda a: "t"))
    assert both.value.field == "auth" and "s3cret" not in str(both.value)


def test_from_config_takes_an_auth_table(monkeypatch: pytest.MonkeyPatch) -> None:
    c = HttpConnector.from_config(name="svc", options={"url": "https://svc.example/pay",
                                                       "auth": {"type": "google-id-token",
                                                                "audience": "https://svc.example"}})
    assert isinstance(c.auth, GoogleIdToken) and c.auth.audience == "https://svc.example"
    with pytest.raises(ConfigError) as bad:
        HttpConnector.from_config(name="svc", options={"url": "https://svc.example/pay", "auth": {"type": "basic"}})
    assert bad.value.field == 'connectors."svc".auth'


def test_without_google_auth_the_default_source_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real: Callable[..., Any] = builtins.__import__

    def no_google(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("google"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_google)
    with pytest.raises(MissingDependencyError, match=r"errands-connectors-http\[google\]"):
        GoogleIdToken()


def test_the_default_source_is_google_auths_fetch_id_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from google.oauth2 import id_token

    asked: list[tuple[Any, str]] = []

    def fetch(request: Any, audience: str) -> str:
        asked.append((request, audience))
        return jwt(T0 + 3600, 1)

    monkeypatch.setattr(id_token, "fetch_id_token", fetch)
    auth = GoogleIdToken(clock=Clock())
    assert auth.token("https://svc-abc-uc.a.run.app/pay") == jwt(T0 + 3600, 1)
    request, audience = asked[0]
    assert audience == "https://svc-abc-uc.a.run.app"
    from google.auth import transport

    assert isinstance(request, transport.Request)


def test_a_client_of_your_own_gets_the_token_too(httpserver: HTTPServer, clock: Clock, source: Source) -> None:
    import httpx

    seen: list[str] = []
    httpserver.expect_request("/pay").respond_with_handler(lambda r: (seen.append(bearer(r)), Response("ok"))[1])
    with httpx.Client() as client:
        c = HttpConnector(url=httpserver.url_for("/pay"), client=client,
                          auth=GoogleIdToken(token_source=source, clock=clock))
        assert c.dispatch(_effect()).outcome is DispatchOutcome.CONFIRMED
    assert seen and token_expiry(seen[0]) == T0 + 3600
