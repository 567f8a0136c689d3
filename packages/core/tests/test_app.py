"""``errands.App``: the API process submits by connector name, never building a connector; the worker
(``errands worker --app module:app``) builds it and delivers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import errands
import errands.core
from errands.core import App, ConfigError, Effect, EffectStatus

SERVICE = textwrap.dedent('''
    """A service module: the API and its worker import the same app."""
    import json
    import os

    from errands.core import App, DispatchOutcome, DispatchResult


    class Ledger:
        """Writes each effect to a file; needs LEDGER_PATH, the "secret" only the worker holds."""

        name = "ledger"

        def __init__(self) -> None:
            self.path = os.environ["LEDGER_PATH"]

        def dispatch(self, effect):
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"key": effect.key, "payload": effect.payload}) + "\\n")
            return DispatchResult(DispatchOutcome.CONFIRMED, external_ref=f"L-{effect.key}")


    app = App(os.environ["ERRANDS_STORE"], connectors={"ledger": Ledger})

    sent = []


    @app.task("notify")
    def notify(params):
        with open(os.environ["LEDGER_PATH"] + ".tasks", "a") as fh:
            fh.write(json.dumps(params) + "\\n")
''')


@pytest.fixture()
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "svc_app.py").write_text(SERVICE)
    store = f"sqlite:///{tmp_path / 'app.db'}"
    monkeypatch.setenv("ERRANDS_STORE", store)
    monkeypatch.delenv("LEDGER_PATH", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("svc_app", None)
    yield tmp_path
    sys.modules.pop("svc_app", None)


def test_an_api_process_submits_by_name_and_the_worker_delivers(service: Path) -> None:
    import svc_app  # the API process: no LEDGER_PATH, so building the connector would fail

    app = svc_app.app
    rec = app.outbox.submit(Effect(key="pay-1", connector="ledger", payload={"amount": 5}))
    assert rec.status is EffectStatus.PENDING
    task_id = app.tasks.submit("notify", {"to": "ops"})
    assert task_id
    with pytest.raises(ConfigError) as err:
        app.outbox.submit(Effect(key="pay-2", connector="bank", payload={}))
    assert "bank" in str(err.value) and "ledger" in str(err.value)
    app.close()

    ledger = service / "ledger.jsonl"
    env = {**os.environ, "LEDGER_PATH": str(ledger), "PYTHONPATH": str(service)}
    proc = subprocess.run([sys.executable, "-m", "errands.core", "worker", "--app", "svc_app:app", "--drain"],
                          cwd=service, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "drained:" in proc.stdout
    assert [json.loads(line) for line in ledger.read_text().splitlines()] == [
        {"key": "pay-1", "payload": {"amount": 5}}]
    assert [json.loads(line) for line in (service / "ledger.jsonl.tasks").read_text().splitlines()] == [
        {"to": "ops"}]
    again = App(os.environ["ERRANDS_STORE"])
    try:
        done = again.store
        from errands.core import Outbox

        got = Outbox(done, connectors={}).get("pay-1")
        assert got.status is EffectStatus.CONFIRMED and got.external_ref == "L-pay-1"
    finally:
        again.close()


def test_app_is_reachable_from_the_namespace() -> None:
    assert errands.App is errands.core.App  # type: ignore[attr-defined]


def test_bad_parts_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="connectors 'x' must be an object with dispatch"):
        App("memory://", connectors={"x": 42})
    app = App("memory://", connectors={"x": lambda: object()})
    with pytest.raises(ConfigError, match="factory of connectors 'x' returned object"):
        app.worker()
    with pytest.raises(ConfigError, match="--app must look like"):
        from errands.core._app import load_app

        load_app("nocolon")


def test_the_config_names_connectors_without_building_them(tmp_path: Path) -> None:
    config = tmp_path / "errands.toml"
    config.write_text(textwrap.dedent(f'''
        store = "sqlite:///{tmp_path / 'c.db'}"
        [connectors.audit]
        type = "log"
    '''))
    app = App(config=config)
    try:
        assert app.connector_names == ["audit"]
        assert app.outbox.submit(Effect(key="a-1", connector="audit", payload={})).status is EffectStatus.PENDING
        worker = app.worker()
        try:
            assert worker.drain() >= 1
        finally:
            worker.close()
        assert app.outbox.get("a-1").status is EffectStatus.CONFIRMED
    finally:
        app.close()
