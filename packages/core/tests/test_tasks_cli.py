"""``errands tasks list|show|cancel|dead|redrive|schedules`` on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from errands.core import PermanentError, TaskContext, TaskEngine, TaskStatus, open_store
from errands.core._cli import main


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def url(request: Any, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cli.db'}"
    return str(request.getfixturevalue("postgres_url"))


def out_json(capsys: Any, argv: list[str]) -> Any:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_list_show_dead_and_redrive(url: str, capsys: Any) -> None:
    store = open_store(url)

    def handler(params: Any) -> Any:
        if params == "bad":
            raise PermanentError("refused")
        return params

    engine = TaskEngine(store)
    engine.register("t", handler, dlq_after=1)
    ok = engine.submit("t", "good", priority=4)
    bad = engine.submit("t", "bad")
    engine.drain()
    waiting = engine.submit("t", "later", delay=3600)

    assert main(["tasks", "list", "--store", url]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["ID", "TYPE", "STATUS", "PRIORITY"]
    assert ok in table and bad in table and "DEAD" in table and "SUCCEEDED" in table

    listed = out_json(capsys, ["tasks", "list", "--store", url, "--json", "--status", "pending"])
    assert [t["id"] for t in listed] == [waiting]
    shown = out_json(capsys, ["tasks", "show", ok, "--store", url, "--json"])
    assert shown["status"] == "SUCCEEDED" and shown["result"] == "good" and shown["priority"] == 4
    assert main(["tasks", "show", ok, "--store", url]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out

    dead = out_json(capsys, ["tasks", "dead", "--store", url, "--json"])
    assert [t["id"] for t in dead] == [bad] and "refused" in dead[0]["error"]
    assert out_json(capsys, ["tasks", "redrive", "--store", url, "--json", "--type", "t"]) == {"queued": 1}
    assert engine.get(bad).status is TaskStatus.PENDING  # type: ignore[union-attr]
    assert main(["tasks", "redrive", bad, "--store", url]) == 0
    assert "queued 0 task(s)" in capsys.readouterr().out  # pending: not dead nor failed

    assert main(["tasks", "show", "0b0e8c2e-0000-4000-8000-000000000000", "--store", url]) == 1
    assert "NotFoundError" in capsys.readouterr().err
    engine.close()
    store.close()


def test_cancel_pending_and_running(url: str, capsys: Any) -> None:
    store = open_store(url)
    started = threading.Event()

    def slow(params: Any, ctx: TaskContext) -> None:
        started.set()
        ctx.wait_cancelled(30)

    worker = TaskEngine(store, handlers={"slow": slow})
    pending = worker.submit("slow", None, delay=3600)
    running = worker.submit("slow", None)
    worker.run_once()
    assert started.wait(10)
    got = out_json(capsys, ["tasks", "cancel", pending, running, "--store", url, "--json"])
    assert got == [{"id": pending, "cancelled": True, "status": "CANCELLED"},
                   {"id": running, "cancelled": True, "status": "RUNNING"}]
    assert worker.wait(running, timeout=15).status is TaskStatus.CANCELLED
    assert main(["tasks", "cancel", running, "--store", url]) == 0
    assert "had ended already (CANCELLED)" in capsys.readouterr().out
    listed = out_json(capsys, ["tasks", "list", "--store", url, "--json", "--status", "CANCELLED"])
    assert {t["id"] for t in listed} == {pending, running}
    worker.close()
    store.close()


def test_schedules(url: str, capsys: Any) -> None:
    store = open_store(url)
    engine = TaskEngine(store, handlers={"report": lambda p: p})
    engine.schedule("reports", "report", cron="*/5 * * * *", params={"k": 1})
    got = out_json(capsys, ["tasks", "schedules", "--store", url, "--json"])
    assert [(s["name"], s["type"], s["cron"], s["params"]) for s in got] == [
        ("reports", "report", "*/5 * * * *", {"k": 1})]
    assert main(["tasks", "schedules", "--store", url]) == 0
    assert "reports" in capsys.readouterr().out
    engine.close()
    store.close()
