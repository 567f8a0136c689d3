"""Configuration from code and from ``errands.toml``, plugin discovery, and secret redaction."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from errands.connectors.http import HttpConnector, _plugin, is_secret_header, parse_retry_after, redact_headers
from errands.core import ConfigError, DispatchOutcome, Effect, Registry, load_config
from pytest_httpserver import HTTPServer

SECRET = "tok-VERY-SECRET-42"


def registry() -> Registry:
    return Registry(plugins=[("http", _plugin)], autoload=False)


def test_entry_point_is_declared_in_the_distribution() -> None:
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="errands.plugins") if ep.name == "http"]
    assert [ep.value for ep in eps] == ["errands.connectors.http._plugin"]
    assert eps[0].dist is not None and eps[0].dist.metadata["Name"] == "errands-connectors-http"


def test_autoloaded_registry_knows_the_http_type() -> None:
    reg = Registry()
    assert reg.connectors["http"] is HttpConnector
    assert reg.plugins["http"].distribution == "errands-connectors-http"


def test_errands_toml_builds_a_named_connector(tmp_path: Path, httpserver: HTTPServer,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANK_TOKEN", SECRET)
    config = tmp_path / "errands.toml"
    config.write_text(f'''
store = "memory://"

[connectors."bank.wire"]
type = "http"
url = "{httpserver.url_for('/pay')}"
observe_url = "{httpserver.url_for('/lookup')}"
headers = {{ Authorization = "Bearer ${{BANK_TOKEN}}", X-Team = "payments" }}
timeout = 2.5
connect_retries = 0
''')
    reg = registry()
    loaded = load_config(config, registry=reg)
    connector = reg.connector("bank.wire")
    assert loaded.connectors["bank.wire"] is connector
    assert isinstance(connector, HttpConnector)
    assert connector.timeout == 2.5
    assert connector.capabilities.can_observe is True
    httpserver.expect_request("/pay").respond_with_data("ok")
    assert connector.dispatch(Effect(key="k", connector="bank.wire", payload={})).outcome is DispatchOutcome.CONFIRMED
    request, _ = httpserver.log[0]
    assert request.headers["Authorization"] == f"Bearer {SECRET}"
    assert request.headers["X-Team"] == "payments"
    assert SECRET not in repr(connector)
    connector.close()


@pytest.mark.parametrize(("options", "field", "words"), [
    ({"url": "ftp://bank.example/x"}, 'connectors."bank.wire".url', "http(s) URL"),
    ({"url": "bank.example/x"}, 'connectors."bank.wire".url', "http(s) URL"),
    ({"url": 42}, 'connectors."bank.wire".url', "http(s) URL"),
    ({}, 'connectors."bank.wire".url', "required"),
    ({"url": "https://b.example", "observe_url": "file:///etc/x"}, 'connectors."bank.wire".observe_url', "http(s)"),
    ({"url": "https://b.example", "compensate_url": "nope"}, 'connectors."bank.wire".compensate_url', "http(s)"),
    ({"url": "https://b.example", "timeout": 0}, 'connectors."bank.wire".timeout', "> 0"),
    ({"url": "https://b.example", "timeout": "10s"}, 'connectors."bank.wire".timeout', "seconds"),
    ({"url": "https://b.example", "connect_retries": -1}, 'connectors."bank.wire".connect_retries', "integer"),
    ({"url": "https://b.example", "max_connections": 0}, 'connectors."bank.wire".max_connections', "integer"),
    ({"url": "https://b.example", "headers": ["a"]}, 'connectors."bank.wire".headers', "table"),
    ({"url": "https://b.example", "headers": {"X-N": 5}}, 'connectors."bank.wire".headers."X-N"', "string"),
    ({"url": "https://b.example", "headers": {"Idempotency-Key": "x"}},
     'connectors."bank.wire".headers."Idempotency-Key"', "set by the connector"),
    ({"url": "https://b.example", "headers": {"bad name": "x"}}, 'connectors."bank.wire".headers."bad name"',
     "not a valid header name"),
    ({"url": "https://b.example", "retries": 3}, 'connectors."bank.wire".retries', "not an http connector option"),
    ({"url": "https://b.example", "ca_bundle": "/no/such.pem"}, 'connectors."bank.wire".ca_bundle', "PEM"),
])
def test_bad_config_names_the_field(options: dict[str, Any], field: str, words: str) -> None:
    reg = registry()
    with pytest.raises(ConfigError) as info:
        load_config({"store": "memory://", "connectors": {"bank.wire": {"type": "http", **options}}}, registry=reg)
    assert info.value.field == field
    assert words in str(info.value)
    assert field in str(info.value)
    assert reg.connector_instances == {}, "a bad config registers nothing"


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        HttpConnector.from_config(name="bank.wire", options={"url": "ftp://x", "timeout": -1, "colour": "red"})
    text = str(info.value)
    assert "3 problems" in text
    for field in ('connectors."bank.wire".url', 'connectors."bank.wire".timeout', 'connectors."bank.wire".colour'):
        assert field in text
    assert len(info.value.problems) == 3


def test_missing_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ConfigError) as info:
        HttpConnector.from_config(name="crm", options={"url": "https://crm.example",
                                                        "headers": {"X-Api-Token": "${NO_SUCH_TOKEN}"}})
    assert info.value.field == 'connectors.crm.headers."X-Api-Token"' or "NO_SUCH_TOKEN" in str(info.value)
    assert "NO_SUCH_TOKEN" in str(info.value)


def test_constructor_validates_too() -> None:
    with pytest.raises(ConfigError) as info:
        HttpConnector(url="ftp://bank.example/x")
    assert info.value.field == "url"
    assert "ftp://bank.example/x" in str(info.value)


def test_url_password_never_shown() -> None:
    with pytest.raises(ConfigError) as info:
        HttpConnector(url="gopher://user:hunter2@bank.example/x")
    assert "hunter2" not in str(info.value)
    c = HttpConnector(url="https://user:hunter2@bank.example/x")
    assert "hunter2" not in repr(c)
    c.close()


def test_secret_header_value_not_in_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        HttpConnector(url="https://b.example", headers={"Authorization": f"Bearer {SECRET}\nX-Evil: 1"})
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value.value)


@pytest.mark.parametrize(("name", "secret"), [
    ("Authorization", True), ("proxy-authorization", True), ("Cookie", True), ("Set-Cookie", True),
    ("X-Api-Token", True), ("X-Api-Key", True), ("Stripe-Key", True), ("X-Client-Secret", True), ("apikey", True),
    ("Idempotency-Key", False), ("Errands-Business-Key", False), ("Content-Type", False), ("X-Team", False),
])
def test_secret_header_names(name: str, secret: bool) -> None:
    assert is_secret_header(name) is secret
    assert (redact_headers({name: "v"})[name] == "***") is secret


def test_secrets_never_reach_logs_reprs_or_errors(httpserver: HTTPServer, caplog: pytest.LogCaptureFixture) -> None:
    # A counterparty that echoes the request headers back in its error body.
    def echo(request: Any) -> Any:
        from werkzeug import Response

        return Response(f"denied for {request.headers.get('Authorization')} / {request.headers.get('X-Api-Key')}",
                        status=500)

    httpserver.expect_request("/pay").respond_with_handler(echo)
    caplog.set_level(logging.DEBUG, logger="errands.connectors.http")
    c = HttpConnector(url=httpserver.url_for("/pay"),
                      headers={"Authorization": f"Bearer {SECRET}", "X-Api-Key": "k-ABCDEF-99"})
    result = c.dispatch(Effect(key="k", connector="bank.wire", payload={}))
    assert result.outcome is DispatchOutcome.UNKNOWN
    assert "denied for" in (result.error or "")
    for text in (result.error or "", repr(c), caplog.text):
        assert SECRET not in text
        assert "k-ABCDEF-99" not in text
    assert "***" in (result.error or "")
    httpserver.clear()
    httpserver.expect_request("/pay").respond_with_data("ok")
    c.dispatch(Effect(key="k2", connector="bank.wire", payload={}))
    assert "'Idempotency-Key': 'k2'" in caplog.text, "the debug log shows the non-secret headers"
    assert SECRET not in caplog.text
    c.close()


@pytest.mark.parametrize(("value", "expected"), [
    ("0", 0.0), ("30", 30.0), ("1.5", 1.5), ("-4", 0.0), ("", None), ("later", None), (None, None), ("nan", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 10.0), ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=1445412470.0) == expected
