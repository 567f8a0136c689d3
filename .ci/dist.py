"""Build the errands distributions, and the one a release tag names.

    python .ci/dist.py wheels [--out dist] [--sdist] [--deps "errands[http,sinks]" [--python python3.12]]
    python .ci/dist.py release errands-core-v0.1.0 [--out dist]
    python .ci/dist.py list [--json]

``wheels`` runs ``hatch build`` for the meta distribution and every package under ``packages/`` and writes
the wheels (and with ``--sdist`` the source archives) to one folder. ``--deps`` also downloads, as wheels,
the third-party distributions that requirement needs, so that ``pip install --no-index --find-links dist``
works on a machine with no index at all. ``release`` checks that a tag ``<distribution>-v<version>`` names a
distribution of this repository at its current version and builds that one alone, as the release workflow
does before it publishes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TAG = re.compile(r"(?P<name>errands(?:-[a-z]+)*)-v(?P<version>\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.post\d+)?)")


class DistError(Exception):
    """A request this script cannot carry out; the message says why and what to do."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Project:
    name: str
    version: str
    path: Path
    version_file: Path


def projects() -> list[Project]:
    """The meta distribution first, then every package, in folder order."""
    out = []
    for path in [ROOT, *sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())]:
        data = tomllib.loads((path / "pyproject.toml").read_text())
        project = data["project"]
        version, version_file = project.get("version"), path / "pyproject.toml"
        if version is None:
            about = path / data["tool"]["hatch"]["version"]["path"]
            match = re.search(r"__version__\s*=\s*[\"']([^\"']+)[\"']", about.read_text())
            if match is None:
                raise DistError(f"{about.relative_to(ROOT)} holds no __version__ = '…'")
            version, version_file = match.group(1), about
        out.append(Project(name=project["name"], version=version, path=path, version_file=version_file))
    return out


def project_for_tag(tag: str) -> Project:
    """The project a release tag names; the tag's version must be the project's current version."""
    match = TAG.fullmatch(tag)
    known = projects()
    if match is None:
        raise DistError(f"release tag {tag!r} is not <distribution>-v<version>, e.g. {known[1].name}-v{known[1].version}")
    by_name = {p.name: p for p in known}
    project = by_name.get(match["name"])
    if project is None:
        raise DistError(f"release tag {tag!r} names {match['name']!r}, which is not one of {sorted(by_name)}")
    if project.version != match["version"]:
        raise DistError(f"release tag {tag!r} says version {match['version']} but {project.name} is at "
                        f"{project.version}: bump it in {project.version_file.relative_to(ROOT)} first, or tag the version it has")
    return project


def build(chosen: list[Project], out: Path, *, sdist: bool) -> list[Path]:
    """``hatch build`` each project into ``out``; returns the files written."""
    hatch = shutil.which("hatch")
    if hatch is None:
        raise DistError("hatch is not on PATH: pip install 'hatch>=1.18'")
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    env = {k: v for k, v in os.environ.items() if not k.startswith("HATCH_ENV")}
    for project in chosen:
        targets = ["-t", "wheel"] + (["-t", "sdist"] if sdist else [])
        proc = subprocess.run([hatch, "build", *targets, str(out)], cwd=project.path, env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise DistError(f"hatch build of {project.name} failed:\n{proc.stdout}{proc.stderr}")
        sys.stderr.write(f"built {project.name} {project.version}\n")
    return sorted(set(out.iterdir()) - before)


def third_party_requirements(requirement: str, wheels: Path, python_version: str | None = None) -> list[str]:
    """What ``requirement`` (e.g. ``errands[http,sinks]``) needs from outside this repository on
    ``python_version`` (default: this interpreter's), read from the metadata of the wheels in ``wheels``,
    following our own distributions and their extras."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {} if python_version is None else {"python_version": python_version,
                                             "python_full_version": f"{python_version}.0"}
    metadata = {}
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            meta = Parser().parsestr(zf.read(name).decode())
        metadata[canonicalize_name(meta["Name"])] = meta.get_all("Requires-Dist") or []
    needed: list[str] = []
    seen: set[tuple[str, str]] = set()
    todo = [Requirement(requirement)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name not in metadata:
            if name.startswith("errands"):
                raise DistError(f"{req.name} is needed but no wheel of it is in {wheels}: build it first")
            req.marker = None  # evaluated above, for the target Python rather than pip's own
            needed.append(str(req))
            continue
        for extra in ["", *sorted(req.extras)]:
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for line in metadata[name]:
                dep = Requirement(line)
                if dep.marker is None or dep.marker.evaluate({**env, "extra": extra}):
                    todo.append(dep)
    return sorted(set(needed))


def download(requirement: str, out: Path, python: str | None = None) -> None:
    """Download into ``out``, beside our wheels, the third-party wheels ``requirement`` needs on the
    interpreter ``python`` (default: this one), with that interpreter's pip so markers are its own."""
    python = python or sys.executable
    asked = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True, check=False)
    if asked.returncode != 0:
        raise DistError(f"--python {python} does not run: {asked.stderr.strip()}")
    reqs = third_party_requirements(requirement, out, asked.stdout.strip())
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(reqs) + "\n")
    try:
        proc = subprocess.run([python, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                               "--only-binary", ":all:", "--dest", str(out), "-r", f.name], capture_output=True, text=True, check=False)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise DistError(f"downloading what {requirement} needs failed:\n{proc.stdout}{proc.stderr}")
    sys.stderr.write(f"downloaded {len(reqs)} direct third-party requirements of {requirement} and theirs\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dist", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wheels", help="build every distribution of the repository")
    w.add_argument("--out", default=str(ROOT / "dist"), help="where to write them (default: ./dist)")
    w.add_argument("--sdist", action="store_true", help="also build source archives")
    w.add_argument("--deps", metavar="REQUIREMENT", action="append", default=[],
                   help='also download the third-party wheels this requirement needs, e.g. "errands[http,sinks]"')
    w.add_argument("--python", metavar="PATH", default=None,
                   help="the interpreter the --deps wheels are for; its pip downloads them (default: this one)")
    r = sub.add_parser("release", help="build the distribution a release tag names")
    r.add_argument("tag", help="<distribution>-v<version>, e.g. errands-core-v0.1.0")
    r.add_argument("--out", default=str(ROOT / "dist"))
    ls = sub.add_parser("list", help="the distributions, their versions and release tags")
    ls.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            rows = [{"name": p.name, "version": p.version, "tag": f"{p.name}-v{p.version}",
                     "path": p.path.relative_to(ROOT).as_posix()} for p in projects()]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                width = max(len(r["name"]) for r in rows)
                print(f"{'distribution':<{width}}  version  path")
                for row in rows:
                    print(f"{row['name']:<{width}}  {row['version']:<7}  {row['path']}")
        elif args.command == "wheels":
            out = Path(args.out)
            for path in build(projects(), out, sdist=args.sdist):
                print(path)
            for requirement in args.deps:
                download(requirement, out, args.python)
        else:
            project = project_for_tag(args.tag)
            for path in build([project], Path(args.out), sdist=True):
                print(path)
    except DistError as exc:
        sys.stderr.write(f"dist: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
