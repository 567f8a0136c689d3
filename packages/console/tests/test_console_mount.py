"""``errands.App(...).console()``: the console mounted in the user's own ASGI application at a prefix."""

from __future__ import annotations

from errands.console._views import _timeline, _tree, redact
import httpx
from errands.core import App
from starlette.applications import Starlette
from starlette.routing import Mount

from .conftest import TOKEN, auth, serve


def test_app_console_mounts_at_a_prefix(demo_store: str) -> None:
    app = App(demo_store)
    outer = Starlette(routes=[Mount("/ops", app=app.console(token=TOKEN, neurons=["demo"]))])
    try:
        with serve(outer) as url, httpx.Client(base_url=url) as client:
            assert client.get("/ops/").status_code == 401
            page = client.get("/ops/", headers=auth())
            assert page.status_code == 200
            assert 'href="/ops/effects"' in page.text and 'href="/ops/effects/gated-2"' in page.text
            assert client.get("/ops/effects/gated-2", headers=auth()).status_code == 200
            assert client.get("/ops/api/overview", headers=auth()).json()["operations"]["demo"]["done"] >= 1
    finally:
        app.close()


def test_secrets_are_redacted_at_any_depth() -> None:
    value = {"user": "a", "Password": "p", "nested": [{"api_key": "k", "ok": 1}], "auth": {"Authorization": "x"}}
    assert redact(value) == {"user": "a", "Password": "••••••", "nested": [{"api_key": "••••••", "ok": 1}],
                             "auth": {"Authorization": "••••••"}}


def test_the_operation_tree_nests_children_under_parents_and_the_timeline_spans_them() -> None:
    steps = [{"id": "a", "parent_id": None, "name": "a", "type": "CONTEXT", "status": "SUCCEEDED", "start": 0.0, "end": 4.0},
             {"id": "b", "parent_id": "a", "name": "b", "type": "STEP", "status": "SUCCEEDED", "start": 1.0, "end": 2.0},
             {"id": "c", "parent_id": None, "name": "c", "type": "WAIT", "status": "PENDING", "start": 3.0, "end": None}]
    tree = _tree(steps)
    assert [(n["id"], n["depth"]) for n in tree] == [("a", 0), ("b", 1), ("c", 0)]
    assert tree[0]["children"] == ["b"]
    bars = {b["id"]: b for b in _timeline(steps, now=5.0)}
    assert bars["a"]["left"] == 0 and bars["a"]["width"] == 80.0
    assert bars["b"]["left"] == 20.0 and bars["c"]["width"] == 40.0
