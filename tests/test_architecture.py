"""The layers of ARCHITECTURE.md, checked: the import-linter contracts of the root ``pyproject.toml``,
their list of private core modules kept complete, and SQL only where the store layer and each engine's
``*_table``/``*_schema`` module keep it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "packages"

# A statement, not a word in prose: the verb at the start and the clause that makes it SQL.
SQL = re.compile(
    r"^\s*(SELECT\s.+\sFROM\s|INSERT\s+INTO\s|UPDATE\s+\w+\s+SET\s|DELETE\s+FROM\s|CREATE\s+(UNIQUE\s+)?"
    r"(TABLE|INDEX)\s|ALTER\s+TABLE\s|DROP\s+(TABLE|INDEX)\s|WITH\s+\w+\s+AS\s*\()",
    re.IGNORECASE | re.DOTALL,
)

# Where SQL may live besides the store layer and ``*_table``/``*_schema`` modules, and why.
SQL_ALLOWED = {
    # The fault kit ends PostgreSQL sessions on purpose (pg_terminate_backend): a test tool, not a table.
    "core/src/errands/core/testing/faults.py",
}


def _lint_imports() -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("lint-imports")
    if not script.exists():
        pytest.fail("import-linter is not installed in the test environment (hatch.toml: hatch-test "
                    "extra-dependencies)")
    return subprocess.run([str(script), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold() -> None:
    proc = _lint_imports()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout, proc.stdout


def _private_core_modules() -> list[str]:
    src = PACKAGES / "core" / "src"
    out = []
    for path in sorted((src / "errands" / "core").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") and not p.startswith("__") for p in parts[2:]):
            out.append(".".join(parts))
    return out


def test_the_public_core_contract_lists_every_private_module() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"] if c["id"] == "public-core")
    listed = set(contract["forbidden_modules"])
    missing = [m for m in _private_core_modules() if m not in listed and not any(
        m.startswith(f"{parent}.") for parent in listed)]
    assert not missing, f"add these private modules to the public-core contract in pyproject.toml: {missing}"
    gone = [m for m in listed if m not in _private_core_modules()]
    assert not gone, f"these modules no longer exist; drop them from the public-core contract: {gone}"


def _holds_sql(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
            lines.append(node.lineno)
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
            if SQL.search(text):
                lines.append(node.lineno)
    return sorted(set(lines))


def _may_hold_sql(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return ("/errands/core/store/" in rel or name.endswith(("_table.py", "_schema.py")) or rel in SQL_ALLOWED)


def test_sql_lives_in_the_store_layer_and_table_modules() -> None:
    found = {}
    for path in sorted(PACKAGES.glob("*/src/**/*.py")):
        rel = path.relative_to(PACKAGES).as_posix()
        if not _may_hold_sql(rel):
            lines = _holds_sql(path)
            if lines:
                found[rel] = lines
    assert not found, ("SQL outside the store layer and *_table/*_schema modules (move it into the engine's "
                       f"table module): {found}")


def test_the_sql_check_sees_sql() -> None:
    assert SQL.search("SELECT a FROM t WHERE b = ?")
    assert SQL.search("\n  INSERT INTO em_tasks (id) VALUES (?)")
    assert SQL.search("UPDATE em_queue SET lease_expires = ?")
    assert not SQL.search("select the connector, then update the record")
