"""The root ``errands`` meta distribution: its extras pull exactly the packages of DESIGN §1 that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# DESIGN §1: package folder -> (distribution, {meta extra: extras of that distribution it asks for, or
# None when the package decides}).
DESIGN: dict[str, tuple[str, dict[str, set[str] | None]]] = {
    "core": ("errands-core", {"postgres": {"postgres"}, "cel": {"cel"}}),
    "connectors-http": ("errands-connectors-http", {"http": None}),
    "sinks": ("errands-sinks", {"sinks": None}),
    "connectors-gcp": (
        "errands-connectors-gcp",
        {"gcp": None, "pubsub": {"pubsub"}, "tasks": {"tasks"}, "spanner": {"spanner"}},
    ),
    "lro": ("errands-lro", {"lro": None}),
    "durable": ("errands-durable", {"durable": None}),
    "console": ("errands-console", {"console": None}),
}
PRESENT = {d: spec for d, spec in DESIGN.items() if (ROOT / "packages" / d / "pyproject.toml").exists()}


def _project(folder: str) -> dict[str, object]:
    data = tomllib.loads((ROOT / "packages" / folder / "pyproject.toml").read_text())
    project: dict[str, object] = data["project"]
    version = project.get("version")
    if version is None:
        about = ROOT / "packages" / folder / data["tool"]["hatch"]["version"]["path"]
        match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", about.read_text())
        assert match, f"{about} holds no __version__"
        version = match.group(1)
    return {**project, "version": version}


@pytest.fixture(scope="module")
def metadata(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Requirement]]:
    """The built meta wheel's requirements: ``""`` for the base, then one list per extra."""
    out = tmp_path_factory.mktemp("meta")
    uv = shutil.which("uv")
    if uv:
        cmd = [uv, "build", "--wheel", "--out-dir", str(out), str(ROOT)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("errands-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert not [n for n in zf.namelist() if ".dist-info/" not in n], "the meta wheel must hold no code"
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    assert meta["Name"] == "errands"
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    by_extra: dict[str, list[Requirement]] = {"": [r for r in reqs if r.marker is None]}
    for extra in meta.get_all("Provides-Extra") or []:
        by_extra[extra] = [r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": extra})]
    return by_extra


def test_base_is_core_alone(metadata: dict[str, list[Requirement]]) -> None:
    assert [(r.name, r.extras) for r in metadata[""]] == [("errands-core", set())]


def test_extras_are_exactly_those_of_present_packages(metadata: dict[str, list[Requirement]]) -> None:
    expected = {extra for _, extras in PRESENT.values() for extra in extras} | {"all"}
    assert set(metadata) - {""} == expected


@pytest.mark.parametrize(
    ("folder", "extra"), [(f, e) for f, (_, extras) in PRESENT.items() for e in extras], ids=lambda v: str(v)
)
def test_extra_pulls_exactly_its_package(metadata: dict[str, list[Requirement]], folder: str, extra: str) -> None:
    distribution, extras = PRESENT[folder]
    wanted = extras[extra]
    project = _project(folder)
    (req,) = metadata[extra]
    assert req.name == distribution == project["name"]
    declared = set(project.get("optional-dependencies", {}))  # type: ignore[arg-type]
    assert req.extras <= declared, f"errands[{extra}] asks {distribution} for extras it lacks"
    if wanted is not None:
        assert req.extras == wanted
    assert req.specifier.contains(Version(str(project["version"]))), (
        f"errands[{extra}] pins {req.specifier}, which excludes {distribution} {project['version']}"
    )


def test_all_pulls_every_present_package_with_all_its_extras(metadata: dict[str, list[Requirement]]) -> None:
    got = {r.name: r for r in metadata["all"]}
    assert set(got) == {dist for dist, _ in PRESENT.values()}
    for folder, (dist, _) in PRESENT.items():
        project = _project(folder)
        declared = set(project.get("optional-dependencies", {}))  # type: ignore[arg-type]
        assert got[dist].extras == declared, f"errands[all] misses extras of {dist}"
        assert got[dist].specifier.contains(Version(str(project["version"])))
