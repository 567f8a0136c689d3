from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from errands.core import FanOut, Journal, NewEvent, Route, open_store
from errands.core._cli import main
from errands.core.cli import add_command_group, add_store_command
from errands.core.testing import InMemorySink


def setup_store(tmp_path: Path) -> tuple[str, Any]:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    store = open_store(url)
    Journal(store).append_many(
        [NewEvent(f"orders/{i % 2}", "order.placed" if i % 3 else "order.shipped", {"i": i}) for i in range(30)])
    return url, store


def test_events_tail_table_and_json(tmp_path: Path, capsys: Any) -> None:
    url, store = setup_store(tmp_path)
    store.close()
    assert main(["events", "tail", "--store", url, "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "POSITION" in out.splitlines()[0] and "orders/1/14" in out and "orders/1/15" in out
    assert "orders/0/14" not in out
    assert main(["events", "tail", "--store", url, "-n", "4", "--subject", "order.shipped", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [e["type"] for e in got] == ["order.shipped"] * 4
    assert [e["data"]["i"] for e in got] == [18, 21, 24, 27]
    assert got[0]["specversion"] == "1.0" and "position" in got[0]
    assert main(["events", "tail", "--store", url, "--stream", "orders/0", "-n", "2", "--json"]) == 0
    assert [e["id"] for e in json.loads(capsys.readouterr().out)] == ["orders/0/14", "orders/0/15"]


def test_dead_list_redrive_and_routes(tmp_path: Path, capsys: Any) -> None:
    url, store = setup_store(tmp_path)
    sink = InMemorySink(poison=["orders/0/3", "orders/1/2"])
    fanout = FanOut(store, [Route("audit", sink, batch_size=10)])
    fanout.drain()
    assert main(["dead", "list", "--store", url]) == 0
    out = capsys.readouterr().out
    assert "audit" in out and "orders/0/3" in out and "refused" in out
    assert main(["dead", "list", "--store", url, "--json", "--route", "audit"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert sorted(d["event"]["id"] for d in got) == ["orders/0/3", "orders/1/2"] and got[0]["redrive"] is False
    assert main(["dead", "redrive", "--store", url, "audit", "orders/1/2"]) == 0
    assert "queued 1 parked event" in capsys.readouterr().out
    assert main(["dead", "redrive", "--store", url, "audit", "nope/1"]) == 1
    assert "no parked event 'nope/1'" in capsys.readouterr().err
    sink.accept("orders/1/2")
    assert fanout.run_once() == 1
    assert [d.event.id for d in fanout.dead("audit")] == ["orders/0/3"]
    assert main(["routes", "list", "--store", url, "--json"]) == 0
    routes = json.loads(capsys.readouterr().out)
    assert routes == [{"route": "audit", "cursor": 30, "behind": 0, "state": "RUNNING", "reason": None, "dead": 1}]
    sink.gone = True
    Journal(store).append("x", "y")
    fanout.run_once()
    assert main(["routes", "list", "--store", url]) == 0
    assert "STOPPED" in capsys.readouterr().out
    assert main(["routes", "resume", "--store", url, "audit"]) == 0
    assert "resumed" in capsys.readouterr().out
    fanout.close()
    store.close()


def test_command_groups_and_store_commands_parse_as_every_engine_adds_them() -> None:
    def run(args: argparse.Namespace) -> int:
        return 0

    parser = argparse.ArgumentParser(prog="errands")
    group = add_command_group(parser.add_subparsers(dest="command"), "things", "thing commands")
    add_store_command(group, "list", "list things", run, kind="all").add_argument("--limit", type=int, default=5)
    args = parser.parse_args(["things", "list", "--store", "memory://", "--json", "--limit", "2"])
    assert (args.things_command, args.func, args.kind, args.store, args.json, args.limit) == (
        "list", run, "all", "memory://", True, 2)
    assert parser.parse_args(["things", "list"]).json is False
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["things"])  # an action is required
    assert info.value.code == 2
