"""The console's JSON API and pages over HTTP: access, CSRF, the reads, actions in the journal, and resolving
effects and obligations by hand."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from errands.console import Access, check_listen
from errands.core import EffectStatus, ObligationStatus, Outbox, open_store
from errands.core.errors import ConfigError

from .conftest import OWED_KEY, TOKEN, UNKNOWN_KEYS, auth


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


def _outbox(url: str) -> tuple[Any, Outbox]:
    store = open_store(url)
    return store, Outbox(store, connectors=["lost"])


def test_resolving_a_flagged_unknown_effect_confirmed(console_url: str, demo_store: str) -> None:
    key = UNKNOWN_KEYS[0]
    api = console_url + "/api"
    before = httpx.get(f"{api}/effects/{key}", headers=auth()).json()
    assert (before["effect"]["status"], before["effect"]["flagged"]) == ("UNKNOWN", True)
    assert "resolve" in before["actions"]
    r = httpx.post(f"{api}/act/effect/resolve/{key}", headers=auth(),
                   json={"status": "CONFIRMED", "external_ref": "tx-1", "response": {"id": "tx-1"}})
    assert r.status_code == 200, r.text
    assert r.json()["message"] == f"effect {key}: resolved CONFIRMED, now CONFIRMED"
    store, outbox = _outbox(demo_store)
    try:
        record = outbox.get(key)
        assert (record.status, record.flagged, record.external_ref, record.response) == (
            EffectStatus.CONFIRMED, False, "tx-1", {"id": "tx-1"})
        last = outbox.history(key)[-1].data
        assert (last["status"], last["resolved"], last["by"]) == ("CONFIRMED", "CONFIRMED", "token"), last
    finally:
        outbox.close()
        store.close()


def test_a_refused_resolve_shows_the_engines_message_and_changes_nothing(console_url: str, demo_store: str) -> None:
    key = UNKNOWN_KEYS[2]
    api = console_url + "/api"
    store, outbox = _outbox(demo_store)
    try:
        position = store.last_position()
        r = httpx.post(f"{api}/act/effect/resolve/{key}", headers=auth(), json={"status": "DUPLICATE"})
        assert r.status_code == 400 and "needs compensate_kind" in r.json()["detail"], r.text
        r = httpx.post(f"{api}/act/effect/resolve/{key}", headers=auth(),
                       data={"status": "CONFIRMED", "response": "{not json"})
        assert r.status_code == 400 and "response is not JSON" in r.json()["detail"], r.text
        assert httpx.post(f"{api}/act/effect/resolve/{key}", headers=auth(), json={}).status_code == 400
        assert store.last_position() == position
        assert (outbox.get(key).status, outbox.get(key).flagged) == (EffectStatus.UNKNOWN, True)
    finally:
        outbox.close()
        store.close()
    with httpx.Client(base_url=console_url, headers=auth()) as client:
        form = client.get(f"/act/effect/resolve/{key}")
        assert '<select name="status"' in form.text and '<option value="DUPLICATE"' in form.text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf is not None
        page = client.post(f"/act/effect/resolve/{key}", data={"csrf": csrf.group(1), "status": "DUPLICATE",
                                                               "error": "kept in the form"})
        assert page.status_code == 400
        assert "needs compensate_kind" in page.text and 'value="kept in the form"' in page.text
        assert client.get(f"/api/effects/{key}").json()["effect"]["status"] == "UNKNOWN"


def test_approve_takes_a_json_payload(console_url: str, demo_store: str) -> None:
    api = console_url + "/api"
    r = httpx.post(f"{api}/act/effect/approve/gated-3", headers=auth(), data={"payload": "{oops"})
    assert r.status_code == 400 and "payload is not JSON" in r.json()["detail"], r.text
    assert httpx.get(f"{api}/effects/gated-3", headers=auth()).json()["effect"]["status"] == "AWAITING_APPROVAL"
    r = httpx.post(f"{api}/act/effect/approve/gated-3", headers=auth(), json={"payload": {"ticket": "T-9"}})
    assert r.status_code == 200, r.text
    effect = httpx.get(f"{api}/effects/gated-3", headers=auth()).json()["effect"]
    assert effect["status"] == "PENDING" and effect["metadata"]["errands.approval"] == {"ticket": "T-9"}
    last = [e for e in httpx.get(f"{api}/effects/gated-3", headers=auth()).json()["history"]
            if e["type"].startswith("effect.")][-1]
    assert last["data"]["by"] == "token", last


def test_resolving_an_obligation(console_url: str, demo_store: str) -> None:
    api = console_url + "/api"
    (owed,) = httpx.get(f"{api}/obligations?status=PENDING", headers=auth()).json()["items"]
    assert owed["effect_key"] == OWED_KEY and owed["actions"] == ["resolve"]
    r = httpx.post(f"{api}/act/obligation/resolve/{owed['id']}", headers=auth(), json={"status": "STUCK"})
    assert r.status_code == 200 and r.json()["message"] == f"obligation {owed['id']}: STUCK", r.text
    r = httpx.post(f"{api}/act/obligation/resolve/{owed['id']}", headers=auth(), json={"status": "STUCK"})
    assert r.status_code == 400 and "it is STUCK already" in r.json()["detail"], r.text
    r = httpx.post(f"{api}/act/obligation/resolve/{owed['id']}", headers=auth(), json={"status": "DONE"})
    assert r.status_code == 400 and "COMPENSATED, STUCK" in r.json()["detail"], r.text
    r = httpx.post(f"{api}/act/obligation/resolve/{owed['id']}", headers=auth(),
                   json={"status": "COMPENSATED", "result": {"refund": "r-1"}})
    assert r.status_code == 200, r.text
    assert httpx.post(f"{api}/act/obligation/resolve/nope", headers=auth(), json={"status": "STUCK"}).status_code == 404
    store, outbox = _outbox(demo_store)
    try:
        (done,) = outbox.obligations(effect_key=OWED_KEY)
        assert (done.status, done.response) == (ObligationStatus.COMPENSATED, {"refund": "r-1"})
        events = [e.data for e in outbox.history(OWED_KEY) if e.type.startswith("obligation.")]
        assert [(e["status"], e.get("by")) for e in events][-2:] == [("STUCK", "token"), ("COMPENSATED", "token")]
    finally:
        outbox.close()
        store.close()
