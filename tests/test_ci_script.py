"""``.ci/run``: runs the README's test command with every service required, and never passes on no tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "run"


def _run_ci(tmp_path: Path, output: str, status: int) -> tuple[int, str, str]:
    """Run .ci/run with stand-ins for ``python3`` (pip) and ``hatch`` that print ``output``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    (bin_dir / "python3").write_text(f'#!/bin/sh\necho "python3 $*" >> {calls}\n')
    (bin_dir / "hatch").write_text(
        f'#!/bin/sh\necho "hatch $* REQUIRE=$ERRANDS_REQUIRE_SERVICES" >> {calls}\n'
        f"cat <<'OUT'\n{output}\nOUT\nexit {status}\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("ERRANDS_REQUIRE_SERVICES", None)
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60, check=False)
    return proc.returncode, proc.stderr, calls.read_text()


@pytest.mark.parametrize(
    ("output", "status", "expected"),
    [
        ("===== 545 passed, 4 skipped in 70.01s =====", 0, 0),
        ("===== 1 failed, 544 passed in 70.01s =====", 1, 1),
        ("===== no tests ran in 0.01s =====", 5, 5),
        ("===== 12 skipped in 0.50s =====", 0, 1),
        ("", 0, 1),
    ],
    ids=["passed", "failed", "collected-nothing", "all-skipped", "silent"],
)
def test_exit_status(tmp_path: Path, output: str, status: int, expected: int) -> None:
    code, stderr, calls = _run_ci(tmp_path, output, status)
    assert code == expected
    if expected == 1 and status == 0:
        assert "no test ran" in stderr
    lines = calls.splitlines()
    assert lines[0].startswith("python3 -m pip install") and "hatch>=1.18" in lines[0]
    assert lines[1] == "hatch test REQUIRE=1"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "hatch test" in readme
    assert "\nhatch test 2>&1" in SCRIPT.read_text()
