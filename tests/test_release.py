"""Releasable: every distribution builds with ``hatch build``, installs from the wheels alone into a clean
virtual environment with no index, carries complete metadata, and a release tag builds exactly its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest
from errands.core.testing import service_missing
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / ".ci" / "dist.py"
OURS = {
    "errands", "errands-core", "errands-sinks", "errands-connectors-http", "errands-connectors-gcp",
    "errands-lro", "errands-durable", "errands-console",
}
FULL = "errands[http,sinks,lro,durable]"


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS")
            and not k.startswith(("ERRANDS_", "HATCH_ENV"))}


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), timeout=600, check=False,  # type: ignore[call-overload, no-any-return]
                          **kwargs)


def _dist(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("hatch") is None:
        service_missing("hatch is not on PATH (pip install 'hatch>=1.18'): the release build runs hatch build")
    return _run([sys.executable, str(DIST), *args])


def _metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(zf.read(name).decode())


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dist:wheels`` with the third-party wheels ``errands[http,sinks,lro,durable]`` needs beside ours."""
    out = tmp_path_factory.mktemp("dist")
    proc = _dist("wheels", "--out", str(out), "--deps", FULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _venv(where: Path, requirement: str, wheelhouse: Path) -> Path:
    venv = where / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    proc = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--no-index", "--find-links", str(wheelhouse), requirement])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return venv


def _installed(venv: Path) -> set[str]:
    proc = _run([str(venv / "bin" / "python"), "-c",
                 "import importlib.metadata as m; print('\\n'.join(d.metadata['Name'] for d in m.distributions()))"])
    assert proc.returncode == 0, proc.stderr
    return {canonicalize_name(n) for n in proc.stdout.split()}


@pytest.fixture(scope="module")
def full_venv(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv(tmp_path_factory.mktemp("full"), FULL, wheelhouse)


def test_wheels_writes_one_wheel_per_distribution(wheelhouse: Path) -> None:
    ours = {canonicalize_name(_metadata(w)["Name"]) for w in wheelhouse.glob("errands*.whl")}
    assert ours == OURS


def test_every_wheel_has_complete_metadata(wheelhouse: Path) -> None:
    core_version = Version(_metadata(next(wheelhouse.glob("errands_core-*.whl")))["Version"])
    for wheel in wheelhouse.glob("errands*.whl"):
        meta = _metadata(wheel)
        name = meta["Name"]
        assert meta["Summary"], f"{name} has no description"
        assert meta["License-Expression"] == "Apache-2.0", name
        assert meta.get_all("License-File") == ["LICENSE"], name
        assert meta["Requires-Python"] == ">=3.10", name
        assert meta["Author"], f"{name} names no author"
        assert "errands" in (meta.get_payload() or ""), f"{name} has no README as its long description"
        classifiers = set(meta.get_all("Classifier") or [])
        for minor in (10, 11, 12, 13):
            assert f"Programming Language :: Python :: 3.{minor}" in classifiers, f"{name} lacks 3.{minor}"
        assert "Development Status :: 3 - Alpha" in classifiers, name
        if name != "errands":
            assert "Typing :: Typed" in classifiers, name
        urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
        assert set(urls) >= {"Homepage", "Source", "Issues", "Changelog", "Documentation"}, name
        assert all(u.startswith("https://") for u in urls.values()), urls
        with zipfile.ZipFile(wheel) as zf:
            license_text = next(zf.read(n) for n in zf.namelist() if n.endswith(".dist-info/licenses/LICENSE"))
        assert license_text == (ROOT / "LICENSE").read_bytes(), f"{name} ships a different LICENSE"
        if name in ("errands", "errands-core"):
            continue
        cores = [Requirement(r) for r in meta.get_all("Requires-Dist") or [] if r.startswith("errands-core")]
        assert cores, f"{name} does not declare the errands-core range it supports"
        for req in cores:
            assert req.specifier.contains(core_version), f"{name} excludes errands-core {core_version}"
            assert any(s.operator == "<" for s in req.specifier), f"{name} must cap errands-core ({req.specifier})"


def test_package_license_files_are_the_root_license() -> None:
    for package in (ROOT / "packages").iterdir():
        if (package / "pyproject.toml").exists():
            assert (package / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes(), package.name


def test_no_index_install_takes_exactly_what_was_asked(full_venv: Path) -> None:
    installed = _installed(full_venv)
    assert installed & OURS == OURS - {"errands-connectors-gcp", "errands-console"}


def test_installed_namespace_is_pep_420(full_venv: Path) -> None:
    proc = _run([str(full_venv / "bin" / "python"), "-c",
                 "import errands, errands.core, errands.lro, errands.durable, errands.sinks, errands.connectors.http\n"
                 "print(errands.__file__, list(errands.__path__)[0].endswith('site-packages/errands'))"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "True"]


def test_plugins_lists_every_installed_plugin(full_venv: Path) -> None:
    proc = _run([str(full_venv / "bin" / "errands"), "plugins", "--json"])
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert set(plugins) == {"core", "http", "sinks", "lro", "durable"}
    assert plugins["http"]["distribution"] == "errands-connectors-http"
    assert "http" in plugins["http"]["connectors"]
    assert {"log", "webhook"} <= set(plugins["sinks"]["sinks"])
    assert all(p["version"] == "0.1.0" for p in plugins.values())


def test_http_and_sinks_install_exactly_core_and_those_two(wheelhouse: Path, tmp_path: Path) -> None:
    venv = _venv(tmp_path, "errands[http,sinks]", wheelhouse)
    assert _installed(venv) & OURS == {"errands", "errands-core", "errands-connectors-http", "errands-sinks"}
    proc = _run([str(venv / "bin" / "errands"), "plugins", "--json"])
    assert proc.returncode == 0, proc.stderr
    assert {p["name"] for p in json.loads(proc.stdout)} == {"core", "http", "sinks"}


def _interpreter(version: str) -> str:
    """An installed CPython ``version``: on PATH, or under pyenv (whose shims answer only the selected one)."""
    candidates = [shutil.which(f"python{version}")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += sorted(str(p) for p in pyenv.glob(f"{version}.*/bin/python{version}"))
    for candidate in filter(None, candidates):
        proc = _run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        if proc.returncode == 0 and proc.stdout.strip() == version:
            return candidate
    return service_missing(f"Python {version} is not installed: the classifiers promise it")  # type: ignore[no-any-return]


@pytest.mark.parametrize("version", ["3.10", "3.12", "3.13"])
def test_every_supported_python_installs_and_runs_the_demo(version: str, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    made = _run([_interpreter(version), "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    python = str(venv / "bin" / "python")
    built = _dist("wheels", "--out", str(tmp_path / "dist"), "--deps", FULL, "--python", python)
    assert built.returncode == 0, built.stdout + built.stderr
    proc = _run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
                 "--find-links", str(tmp_path / "dist"), FULL])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plugins = _run([str(venv / "bin" / "errands"), "plugins", "--json"])
    assert plugins.returncode == 0, plugins.stderr
    assert {p["name"] for p in json.loads(plugins.stdout)} == {"core", "http", "sinks", "lro", "durable"}
    demo = _run([str(venv / "bin" / "errands"), "demo", "--size", "100", "--json"])
    assert demo.returncode == 0, demo.stderr
    parts = json.loads(demo.stdout)
    assert parts and all(p["ok"] for p in parts), parts


def test_release_tag_builds_its_distribution_alone(tmp_path: Path) -> None:
    listed = _dist("list", "--json")
    assert listed.returncode == 0, listed.stderr
    core = next(p for p in json.loads(listed.stdout) if p["name"] == "errands-core")
    proc = _dist("release", core["tag"], "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"errands_core-{core['version']}-py3-none-any.whl", f"errands_core-{core['version']}.tar.gz"]
    with tarfile.open(tmp_path / f"errands_core-{core['version']}.tar.gz") as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "src/errands/core/__init__.py"} <= names
    assert "src/errands/__init__.py" not in names


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("errands-core-v9.9.9", "bump it in packages/core/src/errands/core/__about__.py"),
        ("errands-nope-v0.1.0", "'errands-nope', which is not one of"),
        ("errands-core-0.1.0", "is not <distribution>-v<version>"),
        ("v0.1.0", "is not <distribution>-v<version>"),
    ],
)
def test_release_refuses_a_tag_that_is_not_a_current_version(tag: str, message: str, tmp_path: Path) -> None:
    proc = _run([sys.executable, str(DIST), "release", tag, "--out", str(tmp_path)])
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not list(tmp_path.iterdir())


def test_release_workflow_publishes_with_trusted_publishing() -> None:
    workflow = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    assert "id-token: write" in workflow
    assert "pypa/gh-action-pypi-publish" in workflow
    assert "python .ci/dist.py release" in workflow
    assert "password" not in workflow, "trusted publishing needs no API token"


def test_the_old_name_is_gone() -> None:
    old = "emis" "sary"  # in two halves, so that this file does not name it
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True).stdout
    hits = []
    for rel in files.decode().split("\0"):
        path = ROOT / rel
        if not rel or not path.is_file():
            continue
        if old in rel.lower():
            hits.append(f"{rel}: the path names it")
        for n, line in enumerate(path.read_bytes().decode(errors="replace").splitlines(), 1):
            if old in line.lower():
                hits.append(f"{rel}:{n}: {line.strip()}")
    assert len(hits) == 1 and hits[0].startswith("CHANGELOG.md:"), "\n".join(hits)
