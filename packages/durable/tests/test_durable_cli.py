"""``errands executions ...`` and the durable part of ``errands demo``."""

from __future__ import annotations

import json
from typing import Any

import pytest
from errands.core._cli import main
from errands.durable import DurableContext, DurableRunner


def _seed(url: str) -> tuple[str, str]:
    def pipeline(event: Any, ctx: DurableContext) -> Any:
        a = ctx.step("extract", lambda _: 1)
        return ctx.step("load", lambda _: a + 1)

    def waiting(event: Any, ctx: DurableContext) -> Any:
        ctx.wait("forever", 10**6)

    runner = DurableRunner(url, functions={"pipeline": pipeline, "waiting": waiting})
    done = runner.run("pipeline", {}, execution_id="done-1").execution_id
    pending = runner.run("waiting", {}, execution_id="wait-1").execution_id
    runner.close()
    return done, pending


def test_executions_list_history_terminate_rerun(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    done, pending = _seed(url)

    assert main(["executions", "list", "--store", url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(e["execution_id"], e["status"]) for e in listed} == {(done, "SUCCEEDED"), (pending, "PENDING")}

    assert main(["executions", "list", "--store", url, "--status", "PENDING"]) == 0
    table = capsys.readouterr().out
    assert "EXECUTION" in table and pending in table and done not in table

    assert main(["executions", "history", done, "--store", url, "--json"]) == 0
    ops = json.loads(capsys.readouterr().out)
    assert [o["Name"] for o in ops] == ["extract", "load"]
    assert ops[0]["StepDetails"]["Result"] == "1"

    assert main(["executions", "history", done, "--store", url]) == 0
    assert "extract" in capsys.readouterr().out

    assert main(["executions", "terminate", pending, "--store", url, "--reason", "cleanup"]) == 0
    assert "TERMINATED" in capsys.readouterr().out

    assert main(["executions", "rerun", done, "load", "--store", url, "--new-id", "done-2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["execution_id"] == "done-2"
    runner = DurableRunner(url)
    assert [o.name for o in runner.history("done-2")] == ["extract"]
    runner.close()

    assert main(["executions", "history", "missing", "--store", url]) == 1
    assert "NotFoundError" in capsys.readouterr().err


def test_executions_signal_sends_a_signal_by_name(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"

    def gate(event: Any, ctx: DurableContext) -> Any:
        return ctx.wait_for_signal("open")

    runner = DurableRunner(url, functions={"gate": gate})
    eid = runner.start("gate", {}, execution_id="gate-1")
    assert main(["executions", "signal", eid, "open", "--payload", '{"by": "ops"}', "--store", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"execution_id": eid, "name": "open", "taken": False}
    assert runner.wait(eid, timeout=30).result == {"by": "ops"}

    assert main(["executions", "signal", eid, "open", "--store", url]) == 1  # finished: refused
    assert "SignalRefusedError" in capsys.readouterr().err
    assert main(["executions", "signal", eid, "open", "--payload", "{nope", "--store", url]) == 1
    assert "--payload must be JSON" in capsys.readouterr().err
    assert main(["executions", "signal", "missing", "open", "--store", url]) == 1
    assert "NotFoundError" in capsys.readouterr().err

    other = runner.start("gate", {}, execution_id="gate-2")
    runner.drain()
    assert main(["executions", "signal", other, "open", "--store", url]) == 0
    assert "taken by a waiting wait_for_signal" in capsys.readouterr().out
    assert runner.wait(other, timeout=30).result is None
    runner.close()


def test_executions_find_their_store_as_every_errands_command_does(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from errands.core._cli import build_parser

    urls = {name: f"sqlite:///{tmp_path / name}.db" for name in ("flag", "config", "env")}
    for name, url in urls.items():
        runner = DurableRunner(url, functions={"f": lambda e, c: None})
        runner.run("f", execution_id=f"in-{name}")
        runner.close()

    def listed(*argv: str) -> list[str]:
        assert main(["executions", "list", "--json", *argv]) == 0
        return [e["execution_id"] for e in json.loads(capsys.readouterr().out)]

    monkeypatch.chdir(tmp_path)
    parser = build_parser()  # the environment is read when a command runs, not when its parser is built
    monkeypatch.setenv("ERRANDS_STORE", urls["env"])
    assert parser.parse_args(["executions", "list"]).store is None
    assert listed() == ["in-env"]
    (tmp_path / "errands.toml").write_text(f'store = "{urls["config"]}"\n')
    assert listed() == ["in-config"]  # ./errands.toml comes before $ERRANDS_STORE
    other = tmp_path / "other.toml"
    other.write_text(f'store = "{urls["env"]}"\n')
    assert listed("--config", str(other)) == ["in-env"]
    assert listed("--store", urls["flag"]) == ["in-flag"]  # --store comes first


def test_demo_part_runs_end_to_end(tmp_path: Any) -> None:
    from errands.core._demo import DemoContext
    from errands.durable._demo import DurableDemo

    ctx = DemoContext(store_url=f"sqlite:///{tmp_path / 'demo.db'}", workdir=str(tmp_path), size=100, quiet=False)
    figures = DurableDemo().run(ctx)
    assert figures["workflows succeeded"] == "10/10"
    assert figures["map values"] == 20
    assert figures["callback execution"] == "SUCCEEDED: approved by ops"


def test_plugin_registers_cli_and_demo() -> None:
    from errands.durable import _plugin

    assert _plugin.errands_register_demos()[0].name == "durable"
