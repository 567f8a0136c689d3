"""The console's JSON API and pages over HTTP: access, CSRF, the reads, and an action in the journal."""

from __future__ import annotations

import re

import httpx
import pytest
from errands.console import Access, check_listen
from errands.core import open_store
from errands.core.errors import ConfigError

from .conftest import TOKEN, auth


def test_a_request_without_credentials_gets_401(console_url: str) -> None:
    for path in ("/", "/api/overview", "/effects", "/api/executions"):
        r = httpx.get(console_url + path)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(console_url + "/", headers={"Authorization": "Bearer wrong-token"}).status_code == 401


def test_basic_credentials_are_accepted() -> None:
    access = Access(users={"alice": "s3cret-pass"})
    assert access.operator("Basic " + __import__("base64").b64encode(b"alice:s3cret-pass").decode()) == "alice"
    assert access.operator("Basic " + __import__("base64").b64encode(b"alice:nope").decode()) is None
    assert access.operator(None) is None


def test_it_refuses_a_public_address_without_credentials() -> None:
    with pytest.raises(ConfigError, match="without credentials"):
        check_listen("0.0.0.0", Access())
    check_listen("127.0.0.1", Access())
    check_listen("::1", Access())
    check_listen("0.0.0.0", Access(token=TOKEN))


def test_the_token_comes_from_the_environment_or_the_config() -> None:
    assert Access.from_settings({}, {"ERRANDS_CONSOLE_TOKEN": "from-the-env"}).token == "from-the-env"
    assert Access.from_settings({"token": "from-the-toml"}, {}).token == "from-the-toml"
    assert Access.from_settings({}, {}).open


def test_every_api_read_answers(console_url: str) -> None:
    api = console_url + "/api"
    overview = httpx.get(api + "/overview", headers=auth()).json()
    assert overview["effects"]["CONFIRMED"] > 0 and overview["effects"]["AWAITING_APPROVAL"] >= 1
    assert httpx.get(api + "/effects?status=CONFIRMED&size=5", headers=auth()).json()["page"]["next"] == 2
    gated = httpx.get(api + "/effects/gated-2", headers=auth()).json()
    assert gated["effect"]["payload"]["api_key"] != "never-shown" and "approve" in gated["actions"]
    for path in ("/obligations", "/routes", "/tasks", "/operations", "/executions"):
        r = httpx.get(api + path, headers=auth())
        assert r.status_code == 200, (path, r.text)
    executions = httpx.get(api + "/executions", headers=auth()).json()["items"]
    assert executions
    detail = httpx.get(api + f"/executions/{executions[0]['execution_id']}", headers=auth()).json()
    assert "tree" in detail and "timeline" in detail
    assert httpx.get(api + "/effects/no-such-effect", headers=auth()).status_code == 404


def test_an_action_needs_the_csrf_token_and_is_journalled(console_url: str, demo_store: str) -> None:
    with httpx.Client(base_url=console_url, headers=auth()) as client:
        page = client.get("/act/effect/reject/gated-1")
        assert page.status_code == 200
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        assert client.post("/act/effect/reject/gated-1", data={"reason": "x"}).status_code == 403
        assert client.post("/act/effect/reject/gated-1", data={"reason": "x", "csrf": "forged"}).status_code == 403
        done = client.post("/act/effect/reject/gated-1", data={"csrf": csrf.group(1), "reason": "not today"})
        assert done.status_code == 303, done.text
    assert httpx.get(console_url + "/api/effects/gated-1", headers=auth()).json()["effect"]["status"] == "CANCELLED"
    store = open_store(demo_store)
    try:
        events = store.read_events(0, 100_000, ["console.**"])
    finally:
        store.close()
    assert any(e.data["target"] == "gated-1" and e.data["by"] == "token" and e.data["action"] == "effect.reject"
               for e in events)


def test_a_bearer_api_post_needs_no_csrf(console_url: str) -> None:
    r = httpx.post(console_url + "/api/act/effect/redrive/gated-1", headers=auth())
    assert r.status_code == 200, r.text
    assert r.json()["by"] == "token"


def test_task_and_execution_actions_through_the_api(console_url: str, demo_store: str) -> None:
    from errands.core import TaskEngine
    from errands.durable import DurableRunner

    store = open_store(demo_store)
    try:
        task = TaskEngine(store).submit("console.check", {"n": 1})
        runner = DurableRunner(store, functions={"console-waits": lambda event, ctx: None})
        execution = runner.start("console-waits", {"n": 1})
    finally:
        store.close()
    task_id = getattr(task, "id", task)
    api = console_url + "/api"
    r = httpx.post(f"{api}/act/task/cancel/{task_id}", headers=auth())
    assert r.status_code == 200 and "cancelled" in r.json()["message"], r.text
    assert httpx.get(f"{api}/tasks/{task_id}", headers=auth()).json()["task"]["status"] == "CANCELLED"
    assert "signal" in httpx.get(f"{api}/executions/{execution}", headers=auth()).json()["actions"]
    r = httpx.post(f"{api}/act/execution/signal/{execution}", headers=auth(), json={"signal": "go", "payload": {"ok": 1}})
    assert r.status_code == 200 and "kept" in r.json()["message"], r.text
    r = httpx.post(f"{api}/act/execution/terminate/{execution}", headers=auth(), json={"reason": "test"})
    assert r.status_code == 200, r.text
    assert httpx.get(f"{api}/executions/{execution}", headers=auth()).json()["execution"]["status"] == "TERMINATED"
    assert httpx.post(f"{api}/act/execution/launch/{execution}", headers=auth()).status_code == 404
