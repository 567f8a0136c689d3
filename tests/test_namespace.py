"""``errands`` is a PEP 420 namespace shared by every distribution: none may ship its ``__init__.py``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())
FORBIDDEN = ("errands/__init__.py", "errands/connectors/__init__.py")


def _build_wheel(project: Path, out: Path) -> Path:
    uv = shutil.which("uv")
    if uv:
        cmd = [uv, "build", "--wheel", "--out-dir", str(out), str(project)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(project)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"building {project.name} failed:\n{proc.stdout}{proc.stderr}"
    (wheel,) = out.glob("*.whl")
    return wheel


def test_there_are_packages() -> None:
    assert {p.name for p in PACKAGES} >= {"core"}


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_source_tree_has_no_namespace_init(package: Path) -> None:
    src = package / "src"
    assert (src / "errands").is_dir(), f"{package.name} must keep its code under src/errands/"
    for rel in FORBIDDEN:
        assert not (src / rel).exists(), f"{package.name} ships {rel}: errands is a PEP 420 namespace"
    leaves = [p for p in (src / "errands").rglob("__init__.py") if p.parent.parent in (src / "errands",
              src / "errands" / "connectors")]
    assert leaves, f"{package.name} has no errands.<area> package"


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_built_wheel_has_no_namespace_init(package: Path, tmp_path: Path) -> None:
    wheel = _build_wheel(package, tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for rel in FORBIDDEN:
        assert rel not in names, f"{wheel.name} ships {rel}: errands is a PEP 420 namespace"
    code = [n for n in names if ".dist-info/" not in n]
    assert code, f"{wheel.name} holds no code"
    outside = [n for n in code if not n.startswith("errands/")]
    assert not outside, f"{wheel.name} installs files outside the errands namespace: {outside}"
    assert any(n.endswith("/py.typed") for n in code), f"{wheel.name} has no py.typed marker"


def test_installed_namespace_has_no_file() -> None:
    import errands
    import errands.core

    assert getattr(errands, "__file__", None) is None
    assert errands.core.__file__ is not None
