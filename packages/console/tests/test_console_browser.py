"""The console in a real headless Chromium (the system's ``/usr/bin/chromium``, driven by Playwright):
every page renders from a store the demo filled, a filter narrows the effects list, approving a gated effect
from its page changes it in the store, and so does resolving a flagged effect through its form; the screenshots
of the overview and an execution page are written to the test artifacts directory (``$ERRANDS_TEST_ARTIFACTS``,
default ``build/test-artifacts/console/``)."""

from __future__ import annotations

import os
import shutil
from typing import Any, Iterator

import pytest
from errands.core import EffectStatus, Outbox, open_store

from .conftest import UNKNOWN_KEYS, artifacts_dir, auth

CHROMIUM = os.environ.get("ERRANDS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


# Module scope: Playwright's sync API keeps an event loop running in this thread while it is open, and every
# later test calling asyncio.run would fail; the browser closes with this module's last test.
@pytest.fixture(scope="module")
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
    page.goto(console_url + "/")
    page.screenshot(path=str(artifacts_dir() / "overview.png"), full_page=True)
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
    page.screenshot(path=str(artifacts_dir() / "execution.png"), full_page=True)


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


def test_resolving_a_flagged_effect_through_its_form(page: Any, console_url: str, demo_store: str) -> None:
    key = UNKNOWN_KEYS[1]
    page.goto(console_url + f"/effects/{key}")
    assert "UNKNOWN" in page.locator("#effect-status").inner_text()
    page.click("text=Resolve")
    assert page.locator("select[name=status] option").all_inner_texts()[1:] == [
        "CONFIRMED", "FAILED", "ABSENT", "DUPLICATE"]
    page.select_option("select[name=status]", "DUPLICATE")
    page.click("#confirm")
    assert "compensate_kind" in page.locator("#error").inner_text()
    assert page.locator("select[name=status]").input_value() == "DUPLICATE"
    page.select_option("select[name=status]", "CONFIRMED")
    page.fill("input[name=external_ref]", "tx-77")
    page.fill("textarea[name=response]", '{"id": "tx-77"}')
    page.click("#confirm")
    page.wait_for_url(f"**/effects/{key}?done=**")
    assert "CONFIRMED" in page.locator("#effect-status").inner_text()
    store = open_store(demo_store)
    outbox = Outbox(store, connectors=["lost"])
    try:
        record = outbox.get(key)
        assert (record.status, record.flagged, record.external_ref, record.response) == (
            EffectStatus.CONFIRMED, False, "tx-77", {"id": "tx-77"})
        last = outbox.history(key)[-1].data
        assert (last["resolved"], last["by"]) == ("CONFIRMED", "token"), last
    finally:
        outbox.close()
        store.close()
