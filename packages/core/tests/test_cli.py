"""The ``errands`` command line: ``plugins`` (table and ``--json``, DESIGN §11) and ``demo``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, ClassVar, Iterator

import pytest
from errands.core import Registry, hookimpl, reset_registry
from errands.core._cli import main

PLUGIN_KEYS = ["name", "distribution", "version", "connectors", "sinks", "stores", "schedulers"]


class DemoConnector:
    name: ClassVar[str] = "demo-wire"

    def dispatch(self, effect: Any) -> Any:
        return None


class ZSink:
    name: ClassVar[str] = "zsink"

    def publish(self, events: Any) -> None:
        return None


class ASink:
    name: ClassVar[str] = "asink"

    def publish(self, events: Any) -> None:
        return None


def _plugin() -> types.ModuleType:
    mod = types.ModuleType("demo_plugin")

    @hookimpl
    def errands_register_connectors() -> list[type]:
        return [DemoConnector]

    @hookimpl
    def errands_register_sinks() -> list[type]:
        return [ZSink, ASink]

    mod.errands_register_connectors = errands_register_connectors  # type: ignore[attr-defined]
    mod.errands_register_sinks = errands_register_sinks  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    monkeypatch.delenv("ERRANDS_DISABLE_PLUGINS", raising=False)
    reg = Registry([("demo", _plugin())], autoload=False)
    reset_registry(reg)
    yield reg
    reset_registry()


def test_plugins_json_shape(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list)
    for item in out:
        assert list(item) == PLUGIN_KEYS
        for kind in ("connectors", "sinks", "stores", "schedulers"):
            assert isinstance(item[kind], list) and all(isinstance(x, str) for x in item[kind])
            assert item[kind] == sorted(item[kind])
    by_name = {p["name"]: p for p in out}
    assert by_name["demo"] == {
        "name": "demo", "distribution": None, "version": None, "connectors": ["demo-wire"],
        "sinks": ["asink", "zsink"], "stores": [], "schedulers": [],
    }
    core = by_name["core"]
    assert core["distribution"] == "errands-core"
    assert core["stores"] == ["memory", "postgres", "postgresql", "sqlite"]
    assert core["schedulers"] == ["store"]


def test_plugins_table(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    from errands.core import __version__

    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["PLUGIN", "DISTRIBUTION", "VERSION", "CONNECTORS", "SINKS", "STORES", "SCHEDULERS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["core"] == ["core", "errands-core", __version__, "-", "-", "memory,postgres,postgresql,sqlite",
                            "store"]
    assert rows["demo"] == ["demo", "-", "-", "demo-wire", "asink,zsink", "-", "-"]
    # columns line up under their headers
    assert lines[1].index("errands-core") == lines[0].index("DISTRIBUTION")


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str], registry: Registry) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "plugins" in out and "demo" in out


def test_version(capsys: pytest.CaptureFixture[str], registry: Registry) -> None:
    from errands.core import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"errands-core {__version__}"


def test_demo_prints_a_summary(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size", "120"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["PART", "STATUS", "WHAT", "VALUE"]
    figures = {" ".join(line.split()[2:-1]): line.split()[-1] for line in lines[1:] if line.startswith("store+journal")}
    assert figures["events appended"] == "120"
    assert figures["order.placed read back"] == "60"
    assert figures["leases completed"] == "120"
    assert figures["timers fired"] == "1"
    assert lines[-1].startswith("all parts ok in ")
    assert "errands demo on sqlite:///" in captured.err


def test_demo_json(registry: Registry, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    assert main(["demo", "--size", "50", "--json", "--store", url]) == 0
    parts = json.loads(capsys.readouterr().out)
    assert all(list(p) == ["part", "ok", "seconds", "figures"] for p in parts)
    assert all(p["ok"] is True for p in parts)
    core = next(p for p in parts if p["part"] == "store+journal")
    assert core["figures"] == {
        "events appended": 50, "order.placed read back": 25, "leases completed": 50, "timers fired": 1,
        "journal position": 50,
    }
    assert (tmp_path / "demo.db").exists()


def test_demo_reports_a_failing_part_and_exits_1(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size", "10", "--json", "--store", "nosuch://x"]) == 1
    parts = json.loads(capsys.readouterr().out)
    core = next(p for p in parts if p["part"] == "store+journal")
    assert core["ok"] is False
    assert core["figures"]["error"].startswith("ConfigError: unknown store scheme 'nosuch'")


def test_demo_includes_parts_from_plugins(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    class EchoDemo:
        name: ClassVar[str] = "echo"
        order: ClassVar[int] = 999

        def run(self, ctx: Any) -> dict[str, Any]:
            return {"size seen": ctx.size, "store is sqlite": ctx.store_url.startswith("sqlite:///")}

    mod = types.ModuleType("echo_plugin")

    @hookimpl
    def errands_register_demos() -> list[type]:
        return [EchoDemo]

    mod.errands_register_demos = errands_register_demos  # type: ignore[attr-defined]
    reset_registry(Registry([("echo", mod)], autoload=False))
    try:
        assert main(["demo", "--size", "20", "--json"]) == 0
    finally:
        reset_registry()
    parts = json.loads(capsys.readouterr().out)
    assert parts[-1] == {"part": "echo", "ok": True, "seconds": parts[-1]["seconds"],
                         "figures": {"size seen": 20, "store is sqlite": True}}


def test_installed_console_script() -> None:
    script = Path(sys.executable).parent / "errands"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "errands.core"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERRANDS_DISABLE")}
    proc = subprocess.run([*cmd, "plugins", "--json"], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    plugins = json.loads(proc.stdout)
    assert all(list(p) == PLUGIN_KEYS for p in plugins)
    assert "core" in {p["name"] for p in plugins}


def test_plugin_subcommand_and_error_exit(capsys: pytest.CaptureFixture[str]) -> None:
    from errands.core import ConfigError

    def boom(args: Any) -> int:
        raise ConfigError(f"store must be a store URL, got {args.store!r}", field="store", value=args.store)

    mod = types.ModuleType("cli_plugin")

    @hookimpl
    def errands_register_cli(group: Any) -> None:
        p = group.add_parser("boom", help="always fails")
        p.add_argument("--store", default="x")
        p.set_defaults(func=boom)

    mod.errands_register_cli = errands_register_cli  # type: ignore[attr-defined]
    reset_registry(Registry([("cli", mod)], autoload=False))
    try:
        assert main(["boom", "--store", "app.db"]) == 1
    finally:
        reset_registry()
    assert capsys.readouterr().err == "errands: ConfigError: store must be a store URL, got 'app.db'\n"
