"""A store the demo filled, plus one effect awaiting approval, and the console serving it on a free port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from errands.console import Access, console_app
from errands.core import Effect, Outbox, open_store
from errands.core._cli import main as errands_main

TOKEN = "console-test-token"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('console') / 'demo.db'}"
    assert errands_main(["demo", "--store", url, "--size", "40"]) == 0
    store = open_store(url)
    outbox = Outbox(store, connectors=["bank"])
    try:
        for i in range(3):
            outbox.submit(Effect(key=f"gated-{i}", connector="bank", tool="transfer",
                                 payload={"cents": 5000 + i, "api_key": "never-shown"}, human_gate=True))
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
