"""``errands operations list|get|wait|cancel`` and the lro part of ``errands demo``, through core's CLI."""

from __future__ import annotations

import json
from typing import Any

import pytest
from errands.core import reset_registry
from errands.core._cli import main
from errands.lro import Config, LroClient
from google.rpc import code_pb2


@pytest.fixture(autouse=True)
def fresh_registry() -> Any:
    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def db(tmp_path: Any) -> str:
    url = f"sqlite:///{tmp_path / 'ops.db'}"
    with LroClient(Config(neuron="svc", store=url)) as client:
        client.new_operation("operations/run-1", {"step": 1})
        client.new_operation("operations/run-2")
        client.new_operation("operations/ok-1").complete({"agent": "a1"})
        client.new_operation("operations/bad-1").fail("no quota", code=code_pb2.RESOURCE_EXHAUSTED)
    return url


def test_operations_list_as_table_and_json(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operations", "list", "--store", db, "--neuron", "svc"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "METADATA", "ERROR"]
    assert "operations/bad-1  FAILED(RESOURCE_EXHAUSTED)" in out.replace("   ", "  ")
    assert any(line.startswith("operations/run-1") and "RUNNING" in line and "Struct" in line for line in lines)
    assert any(line.startswith("operations/ok-1") and "SUCCEEDED" in line for line in lines)

    assert main(["operations", "list", "--store", db, "--neuron", "svc", "--json", "--filter", "done = false"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [o["name"] for o in data["operations"]] == ["operations/run-1", "operations/run-2"]
    assert data["operations"][0]["metadata"]["value"] == {"step": 1}
    assert data["next_page_token"] == ""

    assert main(["operations", "list", "--store", db, "--neuron", "svc", "--json", "--limit", "3"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert len(first["operations"]) == 3 and first["next_page_token"]
    assert main(["operations", "list", "--store", db, "--neuron", "svc", "--json", "--limit", "3",
                 "--page-token", first["next_page_token"]]) == 0
    assert [o["name"] for o in json.loads(capsys.readouterr().out)["operations"]] == ["operations/run-2"]


def test_operations_get_wait_cancel(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["operations", "get", "--store", db, "--neuron", "svc", "operations/ok-1", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["done"] is True and got["response"]["value"] == {"agent": "a1"}

    assert main(["operations", "wait", "--store", db, "--neuron", "svc", "operations/run-1", "--timeout", "0.2"]) == 3
    assert "RUNNING" in capsys.readouterr().out
    assert main(["operations", "wait", "--store", db, "--neuron", "svc", "operations/ok-1", "--json"]) == 0
    capsys.readouterr()

    assert main(["operations", "cancel", "--store", db, "--neuron", "svc", "operations/run-2", "--json"]) == 0
    cancelled = json.loads(capsys.readouterr().out)
    assert cancelled["done"] is True and cancelled["error"]["code"] == code_pb2.CANCELLED

    assert main(["operations", "get", "--store", db, "--neuron", "svc", "operations/missing"]) == 1
    assert "NotFoundError" in capsys.readouterr().err
    assert main(["operations", "list", "--store", db, "--neuron", "svc", "--filter", "colour = red"]) == 1
    assert "filter" in capsys.readouterr().err


def test_the_store_resolves_as_for_every_errands_command(
    db: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ERRANDS_STORE", db)
    assert main(["operations", "list", "--neuron", "svc", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["operations"]) == 4
    (tmp_path / "errands.toml").write_text(f'store = "sqlite:///{tmp_path / "other.db"}"\n')
    assert main(["operations", "list", "--neuron", "svc", "--json"]) == 0  # the config's store comes first
    assert json.loads(capsys.readouterr().out)["operations"] == []
    assert main(["operations", "get", "--store", db, "--neuron", "svc", "operations/ok-1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["done"] is True  # and --store before it


def test_demo_includes_the_lro_part(tmp_path: Any) -> None:
    from errands.core._demo import DemoContext, _demo_parts
    from errands.lro._demo import LroDemo

    parts = [p for p in _demo_parts() if isinstance(p, LroDemo)]
    assert len(parts) == 1 and parts[0].name == "lro"
    ctx = DemoContext(store_url=f"sqlite:///{tmp_path / 'demo.db'}", workdir=str(tmp_path), size=60)
    figures = parts[0].run(ctx)
    assert figures["operations completed"] == 60
    assert figures["operations cancelled"] == 1
