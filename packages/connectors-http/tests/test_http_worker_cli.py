"""The user's path: ``errands.toml`` with ``type = "http"``, effects submitted by the app, and the
``errands worker`` command (a separate process, plugin found by entry point) delivering them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from errands.connectors.http import HttpConnector
from errands.connectors.http.testing import LedgerServer
from errands.core import Effect, EffectStatus, Outbox, open_store


def test_errands_worker_delivers_through_a_configured_http_connector(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    config = tmp_path / "errands.toml"
    with LedgerServer() as server:
        config.write_text(f'''
store = "sqlite:///{db.as_posix()}"

[connectors."bank.wire"]
type = "http"
url = "{server.url('/effects')}"
observe_url = "{server.url('/observe')}"
headers = {{ Authorization = "Bearer ${{BANK_TOKEN}}" }}
''')
        store = open_store(f"sqlite:///{db.as_posix()}")
        submitter = HttpConnector(url=server.url("/effects"), observe_url=server.url("/observe"))
        outbox = Outbox(store, {"bank.wire": submitter})
        outbox.submit_many([Effect(key=f"wire-{i}", connector="bank.wire", payload={"cents": i}) for i in range(20)])
        env = {**os.environ, "BANK_TOKEN": "tok-from-env", "ERRANDS_DISABLE_PLUGINS": ""}
        proc = subprocess.run([sys.executable, "-m", "errands.core", "worker", "--config", str(config), "--drain"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "tok-from-env" not in proc.stdout + proc.stderr
        assert sorted(server.performed) == sorted(f"wire-{i}" for i in range(20))
        assert {r.status for r in outbox.list(limit=50)} == {EffectStatus.CONFIRMED}
        outbox.close()
        submitter.close()
        store.close()
