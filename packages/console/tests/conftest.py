"""A store the demo filled, plus effects awaiting approval, effects whose outcome is unknown (flagged for a
human), an obligation owed, and the console serving it on a free port."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from errands.console import Access, console_app
from errands.core import (
    ConnectorCapabilities,
    DispatchOutcome,
    DispatchResult,
    Effect,
    Outbox,
    Semantics,
    open_store,
)
from errands.core._cli import main as errands_main

TOKEN = "console-test-token"
#: Where the browser tests write their screenshots (never into the work tree's committed files).
REPO = Path(__file__).resolve().parents[3]


def artifacts_dir() -> Path:
    """``$ERRANDS_TEST_ARTIFACTS`` if set, else ``<repo>/build/test-artifacts/console/`` (git ignores it)."""
    path = Path(os.environ.get("ERRANDS_TEST_ARTIFACTS") or REPO / "build" / "test-artifacts" / "console")
    path.mkdir(parents=True, exist_ok=True)
    return path
#: Effects ``demo_store`` leaves ``UNKNOWN`` and flagged, and the effect whose compensation is owed.
UNKNOWN_KEYS = ("lost-0", "lost-1", "lost-2")
OWED_KEY = "refunded-0"


class LostAcks:
    """A counterparty whose acknowledgements never arrive and that cannot be asked: a ``NON_IDEMPOTENT``
    effect it takes is ``UNKNOWN`` and flagged for a human at once."""

    name = "lost"
    capabilities = ConnectorCapabilities(can_observe=False, can_compensate=True,
                                         default_semantics=Semantics.NON_IDEMPOTENT)

    def dispatch(self, effect: Effect) -> DispatchResult:
        return DispatchResult(outcome=DispatchOutcome.UNKNOWN)


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('console') / 'demo.db'}"
    assert errands_main(["demo", "--store", url, "--size", "40"]) == 0
    store = open_store(url)
    outbox = Outbox(store, connectors=["bank"])
    try:
        for i in range(4):
            outbox.submit(Effect(key=f"gated-{i}", connector="bank", tool="transfer",
                                 payload={"cents": 5000 + i, "api_key": "never-shown"}, human_gate=True))
    finally:
        outbox.close()
    outbox = Outbox(store, connectors={"lost": LostAcks()})
    try:
        for key in UNKNOWN_KEYS:
            outbox.submit(Effect(key=key, connector="lost", tool="transfer", payload={"cents": 700},
                                 semantics=Semantics.NON_IDEMPOTENT))
        outbox.submit(Effect(key=OWED_KEY, connector="lost", tool="transfer", payload={"cents": 800},
                             semantics=Semantics.NON_IDEMPOTENT))
        outbox.dispatch_once()
        outbox.resolve(OWED_KEY, "CONFIRMED", by="setup")
        outbox.register_compensation(OWED_KEY, "refund", {"cents": 800}, due=True)
    finally:
        outbox.close()
        store.close()
    return url


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the console did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def console_url(demo_store: str) -> Iterator[str]:
    with serve(console_app(demo_store, access=Access(token=TOKEN), neurons=["demo"])) as url:
        yield url


def auth() -> dict[str, Any]:
    return {"Authorization": f"Bearer {TOKEN}"}
