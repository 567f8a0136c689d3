"""The hatch workspace covers every package: each env installs it with all its extras, lint checks it,
and every bench script it names exists."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
HATCH = tomllib.loads((ROOT / "hatch.toml").read_text())
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
ENVS = ["default", "hatch-test", "lint", "bench"]


def _members(env: str) -> dict[str, set[str]]:
    out = {}
    for member in HATCH["envs"][env]["workspace"]["members"]:
        spec: dict[str, Any] = {"path": member} if isinstance(member, str) else member
        out[Path(spec["path"]).name] = set(spec.get("features", []))
    return out


def _extras(package: str) -> set[str]:
    project = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())["project"]
    return set(project.get("optional-dependencies", {}))


@pytest.mark.parametrize("env", ENVS)
def test_every_package_is_a_member_with_all_its_extras(env: str) -> None:
    members = _members(env)
    assert sorted(members) == PACKAGES
    for package, features in members.items():
        assert features == _extras(package), f"[envs.{env}] installs {package} with {features or 'no extras'}"


def test_lint_covers_every_package() -> None:
    scripts = HATCH["envs"]["lint"]["scripts"]
    for package in PACKAGES:
        src = ROOT / "packages" / package / "src"
        leaf = next(p.parent for p in sorted(src.rglob("__about__.py")))
        assert f"packages/{package}/src" in scripts["style"], f"ruff skips {package}"
        assert leaf.relative_to(ROOT).as_posix() in scripts["typing"], f"mypy skips {package}"



def test_bench_scripts_exist() -> None:
    for name, command in HATCH["envs"]["bench"]["scripts"].items():
        match = re.fullmatch(r"python (bench/\w+\.py) \{args\}", command)
        assert match, f"bench:{name} runs {command!r}"
        assert (ROOT / match.group(1)).exists(), f"bench:{name}: {match.group(1)} is missing"
