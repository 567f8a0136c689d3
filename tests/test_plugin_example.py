"""The example plugin in examples/plugin-example, installed for real and found through its entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin-example"


def _pip_install_target(project: Path, target: Path) -> None:
    """``pip install --no-deps --target`` with whichever installer this environment has."""
    uv = shutil.which("uv")
    if uv:
        cmd = [uv, "pip", "install", "--quiet", "--no-deps", "--python", sys.executable, "--target", str(target)]
    else:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
    proc = subprocess.run([*cmd, str(project)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("plugin-site")
    _pip_install_target(EXAMPLE, target)
    assert (target / "errands_ledger" / "__init__.py").exists()
    assert list(target.glob("errands_ledger-1.2.0.dist-info"))
    return target


def _errands_cmd() -> list[str]:
    script = Path(sys.executable).parent / "errands"
    return [str(script)] if script.exists() else [sys.executable, "-m", "errands.core"]


def _run(args: list[str], site: Path | None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ERRANDS_DISABLE")}
    environ.pop("PYTHONPATH", None)
    if site is not None:
        environ["PYTHONPATH"] = str(site)
    environ.update(env)
    return subprocess.run(args, capture_output=True, text=True, env=environ, timeout=120, check=False)


def _plugins(site: Path | None, **env: str) -> dict[str, dict[str, Any]]:
    proc = _run([*_errands_cmd(), "plugins", "--json"], site, **env)
    assert proc.returncode == 0, proc.stderr
    return {p["name"]: p for p in json.loads(proc.stdout)}


def test_not_listed_before_install() -> None:
    assert "ledger" not in _plugins(None)


def test_installed_plugin_is_listed_with_distribution_version_and_connector(site: Path) -> None:
    plugins = _plugins(site)
    assert plugins["ledger"] == {
        "name": "ledger",
        "distribution": "errands-ledger",
        "version": "1.2.0",
        "connectors": ["ledger"],
        "sinks": [],
        "stores": [],
        "schedulers": [],
    }
    assert plugins["core"]["distribution"] == "errands-core"


def test_table_output_lists_plugin(site: Path) -> None:
    proc = _run([*_errands_cmd(), "plugins"], site)
    assert proc.returncode == 0, proc.stderr
    row = next(line.split() for line in proc.stdout.splitlines() if line.startswith("ledger "))
    assert row[:4] == ["ledger", "errands-ledger", "1.2.0", "ledger"]


def test_disable_plugins_hides_it_by_name(site: Path) -> None:
    plugins = _plugins(site, ERRANDS_DISABLE_PLUGINS="unrelated, ledger")
    assert "ledger" not in plugins
    assert "core" in plugins


def test_disable_autoload_loads_none(site: Path) -> None:
    plugins = _plugins(site, ERRANDS_DISABLE_PLUGIN_AUTOLOAD="1")
    assert list(plugins) == ["core"]


def test_named_instance_from_config_dispatches_once(site: Path, tmp_path: Path) -> None:
    ledger = tmp_path / "audit.jsonl"
    config = tmp_path / "errands.toml"
    config.write_text(f'[connectors."audit.ledger"]\ntype = "ledger"\npath = "{ledger.as_posix()}"\n')
    script = textwrap.dedent(
        f"""
        from errands.core import Effect, get_registry, load_config
        load_config({str(config)!r})
        conn = get_registry().connector("audit.ledger")
        effect = Effect(key="k-1", connector="audit.ledger", payload={{"amount": 5}})
        other = Effect(key="k-2", connector="audit.ledger", payload={{}})
        print(type(conn).__module__, conn.dispatch(effect).outcome, conn.dispatch(effect).outcome,
              conn.observe(effect).outcome, conn.observe(other).outcome)
        """
    )
    proc = _run([sys.executable, "-c", script], site)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["errands_ledger", "CONFIRMED", "CONFIRMED", "CONFIRMED", "ABSENT"]
    assert [json.loads(line) for line in ledger.read_text().splitlines()] == [
        {"key": "k-1", "payload": {"amount": 5}}
    ]


def test_outbox_delivers_through_the_plugin_once(site: Path, tmp_path: Path) -> None:
    ledger = tmp_path / "payments.jsonl"
    config = tmp_path / "errands.toml"
    config.write_text(
        f'store = "sqlite:///{(tmp_path / "app.db").as_posix()}"\n'
        f'[connectors."bank.ledger"]\ntype = "ledger"\npath = "{ledger.as_posix()}"\n'
    )
    script = textwrap.dedent(
        f"""
        from errands.core import Effect, Outbox, load_config, open_store
        config = load_config({str(config)!r})
        outbox = Outbox(open_store(config.store))  # connectors: the registry's named instances
        effect = Effect(key="order-42", connector="bank.ledger", payload={{"cents": 500}})
        outbox.submit(effect)
        outbox.submit(effect)
        while outbox.dispatch_once():
            pass
        print(outbox.get("order-42").status)
        """
    )
    proc = _run([sys.executable, "-c", script], site)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["CONFIRMED"]
    assert [json.loads(line)["key"] for line in ledger.read_text().splitlines()] == ["order-42"]


def test_disabled_plugin_type_is_a_config_error(site: Path, tmp_path: Path) -> None:
    config = tmp_path / "errands.toml"
    config.write_text('[connectors."audit.ledger"]\ntype = "ledger"\n')
    proc = _run(
        [sys.executable, "-c", f"from errands.core import load_config; load_config({str(config)!r})"],
        site, ERRANDS_DISABLE_PLUGINS="ledger",
    )
    assert proc.returncode != 0
    assert "ConfigError" in proc.stderr
    assert "connectors.\"audit.ledger\".type 'ledger' is not a known connector type" in proc.stderr
