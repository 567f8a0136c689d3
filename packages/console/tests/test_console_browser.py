"""The console in a real headless Chromium (the system's ``/usr/bin/chromium``, driven by Playwright):
every page renders from a store the demo filled, a filter narrows the effects list, approving a gated effect
from its page changes it in the store, and the screenshots of the overview and an execution page are kept
in ``packages/console/artifacts/``."""

from __future__ import annotations

import os
import shutil
from typing import Any, Iterator

import pytest
from errands.core import EffectStatus, Outbox, open_store

from .conftest import ARTIFACTS, auth

CHROMIUM = os.environ.get("ERRANDS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover
        if os.environ.get("ERRANDS_REQUIRE_SERVICES") == "1":
            pytest.fail("playwright is not installed (hatch.toml: hatch-test extra-dependencies)")
        pytest.skip("playwright is not installed")
    if not os.path.exists(CHROMIUM):
        if os.environ.get("ERRANDS_REQUIRE_SERVICES") == "1":
            pytest.fail(f"no chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does)")
        pytest.skip(f"no chromium at {CHROMIUM}")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(extra_http_headers=auth(), viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    yield pg
    context.close()


def test_every_page_renders(page: Any, console_url: str) -> None:
    for path, heading in [("/", "Overview"), ("/effects", "Effects"), ("/obligations", "Obligations"),
                          ("/routes", "Routes"), ("/tasks", "Tasks"), ("/operations", "Operations of demo"),
                          ("/executions", "Durable executions"), ("/effects/gated-0", "Effect gated-0")]:
        response = page.goto(console_url + path)
        assert response is not None and response.status == 200, path
        assert heading in page.locator("h1").inner_text(), path
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(console_url + "/")
    page.screenshot(path=str(ARTIFACTS / "overview.png"), full_page=True)
    page.goto(console_url + "/operations")
    first = page.locator("table a").first
    first.click()
    assert page.locator("h1").inner_text().startswith("Operation ")


def test_an_execution_page_shows_the_operation_tree(page: Any, console_url: str) -> None:
    page.goto(console_url + "/executions?status=SUCCEEDED")
    page.locator("#executions a").first.click()
    assert page.locator("h1").inner_text().startswith("Execution ")
    assert page.locator("#operations .op-row").count() >= 1
    assert page.locator("#timeline .tl-bar").count() >= 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "execution.png"), full_page=True)


def test_a_filter_narrows_the_effects_list(page: Any, console_url: str) -> None:
    page.goto(console_url + "/effects?size=500")
    everything = page.locator("#effects .effect-row").count()
    page.select_option("select[name=status]", "AWAITING_APPROVAL")
    page.click("#effect-filters button")
    page.wait_for_url("**status=AWAITING_APPROVAL**")
    narrowed = page.locator("#effects .effect-row").count()
    assert 0 < narrowed < everything
    assert all("AWAITING_APPROVAL" in t for t in page.locator("#effects .effect-row td:nth-child(2)").all_inner_texts())


def test_approving_a_gated_effect_changes_it_in_the_store(page: Any, console_url: str, demo_store: str) -> None:
    page.goto(console_url + "/effects/gated-0")
    assert "never-shown" not in page.content()
    page.click("text=Approve")
    page.click("#confirm")
    page.wait_for_url("**/effects/gated-0?done=**")
    assert "PENDING" in page.locator("#effect-status").inner_text()
    store = open_store(demo_store)
    outbox = Outbox(store, connectors=["bank"])
    try:
        assert outbox.get("gated-0").status is EffectStatus.PENDING
        history = outbox.history("gated-0")
        assert any("token" in str(e.data) for e in history), [(e.type, e.data) for e in history]
    finally:
        outbox.close()
        store.close()
