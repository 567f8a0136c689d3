"""``pip install ./packages/core`` alone, into a clean virtual environment, gives a working ``errands``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("ERRANDS_")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding errands-core and its dependencies, nothing else."""
    path = tmp_path_factory.mktemp("clean") / "venv"
    uv = shutil.which("uv")
    python = path / "bin" / "python"
    if uv:
        made = _run([uv, "venv", "--quiet", "--python", sys.executable, str(path)])
        assert made.returncode == 0, made.stderr
        proc = _run([uv, "pip", "install", "--quiet", "--python", str(python), str(ROOT / "packages" / "core")])
    else:
        made = _run([sys.executable, "-m", "venv", str(path)])
        assert made.returncode == 0, made.stderr
        proc = _run([str(python), "-m", "pip", "install", "--quiet", str(ROOT / "packages" / "core")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


def test_errands_command_works(venv: Path) -> None:
    proc = _run([str(venv / "bin" / "errands"), "plugins", "--json"])
    assert proc.returncode == 0, proc.stderr
    plugins = json.loads(proc.stdout)
    assert [p["name"] for p in plugins] == ["core"]
    assert plugins[0]["distribution"] == "errands-core"
    assert plugins[0]["stores"] == ["memory", "postgres", "postgresql", "sqlite"]


def test_only_core_and_its_dependencies_are_installed(venv: Path) -> None:
    proc = _run([str(venv / "bin" / "python"), "-c",
                 "import importlib.metadata as m; print('\\n'.join(sorted(d.metadata['Name'].lower() "
                 "for d in m.distributions())))"])
    assert proc.returncode == 0, proc.stderr
    installed = set(proc.stdout.split())
    assert "errands-core" in installed
    assert not {n for n in installed if n.startswith("errands") and n != "errands-core"}
    assert "psycopg" not in installed  # the postgres extra was not asked for


def test_errands_is_a_namespace_package(venv: Path) -> None:
    proc = _run([str(venv / "bin" / "python"), "-c",
                 "import errands, errands.core; print(errands.__file__, errands.core.__version__)"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "None"


def test_postgres_url_without_the_extra_names_it(venv: Path) -> None:
    proc = _run([str(venv / "bin" / "python"), "-c",
                 "from errands.core import open_store\nopen_store('postgresql://u@127.0.0.1:1/db')"])
    assert proc.returncode != 0
    assert "MissingDependencyError" in proc.stderr
    assert "pip install 'errands[postgres]'" in proc.stderr


def test_demo_runs(venv: Path) -> None:
    proc = _run([str(venv / "bin" / "errands"), "demo", "--size", "200", "--json"])
    assert proc.returncode == 0, proc.stderr
    parts = {p["part"]: p for p in json.loads(proc.stdout)}
    assert parts["store+journal"]["ok"] is True
