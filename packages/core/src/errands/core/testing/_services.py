"""Real services for tests: a throwaway PostgreSQL server (and, in plugin packages, the emulators).

A test that needs a service skips with a clear reason when its binary is missing, and fails instead
when ``ERRANDS_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


def require_services() -> bool:
    """Whether missing services must fail tests instead of skipping them."""
    return os.environ.get("ERRANDS_REQUIRE_SERVICES", "") in ("1", "true", "yes")


def service_missing(reason: str) -> Any:
    """Skip the calling test (or fail it under ``ERRANDS_REQUIRE_SERVICES=1``) with ``reason``."""
    import pytest

    if require_services():
        pytest.fail(f"required service unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a server a test starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    """Wait until something accepts connections on ``host:port``.

    Raises:
        TimeoutError: nothing did within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.1)


def find_pg_bin() -> str | None:
    """The folder holding ``initdb`` and ``pg_ctl``: ``ERRANDS_PG_BIN``, PostgreSQL 15+ under
    /usr/lib/postgresql, or the PATH."""
    env = os.environ.get("ERRANDS_PG_BIN")
    candidates = [env] if env else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    which = shutil.which("initdb")
    if which:
        candidates.append(os.path.dirname(which))
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "initdb")) and os.path.exists(os.path.join(c, "pg_ctl")):
            return c
    return None


@dataclass
class PostgresServer:
    """A running throwaway PostgreSQL cluster."""

    port: int
    datadir: str
    bindir: str
    run_as: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def create_database(self, name: str | None = None) -> str:
        """Create a fresh database; returns its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        subprocess.run(
            [*self.run_as, os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-m", "immediate", "stop"],
            capture_output=True, check=False,
        )
        shutil.rmtree(os.path.dirname(self.datadir), ignore_errors=True)


def start_postgres() -> PostgresServer:
    """Start PostgreSQL on a free port in a temporary folder (as the ``postgres`` user when root).

    Raises:
        FileNotFoundError: no PostgreSQL binaries here.
        RuntimeError: the server did not start; the message holds its log.
    """
    bindir = find_pg_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL binaries (initdb, pg_ctl) not found; set ERRANDS_PG_BIN")
    root = tempfile.mkdtemp(prefix="errands-pg-")
    datadir = os.path.join(root, "data")
    run_as: list[str] = []
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    log = os.path.join(root, "server.log")
    subprocess.run(
        [*run_as, os.path.join(bindir, "initdb"), "-D", datadir, "-U", "postgres", "--auth=trust",
         "-E", "UTF8", "--no-sync", "--no-instructions"],
        check=True, capture_output=True,
    )
    opts = f"-p {port} -h 127.0.0.1 -k {root} -F -c fsync=off -c full_page_writes=off -c max_connections=200"
    proc = subprocess.run(
        [*run_as, os.path.join(bindir, "pg_ctl"), "-D", datadir, "-o", opts, "-l", log, "-w", "-t", "60", "start"],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        text = open(log).read() if os.path.exists(log) else proc.stderr
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {text[-2000:]}")
    return PostgresServer(port=port, datadir=datadir, bindir=bindir, run_as=run_as)
