"""The fault kit: real and injected infrastructure faults for testing engines and plugins.

Everything here breaks the *infrastructure* under an engine, never the user's code, so a test can assert
the engine's promise: nothing lost, nothing performed twice beyond its semantics, no fault recorded as a
business failure.

- :func:`inject` puts a :class:`FaultPlan` between a store and its database: chosen or random statements
  fail with the dialect's own error (a locked SQLite file, a PostgreSQL serialization failure or lock
  timeout, a dropped connection), before the statement runs, at commit (rolled back) or after commit (done,
  but the caller never hears so).
- :func:`sqlite_write_lock` is a real second writer holding a SQLite file's write lock.
- :func:`terminate_postgres_connections` drops other sessions' connections with ``pg_terminate_backend``.
- :class:`JumpClock` is a wall clock that can jump forward (lease expiry, timers due) without sleeping.
- :class:`WorkerProcess` starts a worker in a child process, SIGKILLs it and starts it again.
- :func:`model_settings` sizes hypothesis' stateful (model-based) tests: 200 examples by default,
  ``ERRANDS_MODEL_EXAMPLES=5000`` for a long profile.

Example::

    from errands.core.testing import faults

    plan = faults.FaultPlan(seed=7, rate=0.05, kinds=("locked", "dropped"))
    with faults.inject(store, plan):
        outbox = Outbox(store, connectors=...)
        outbox.dispatch_once()          # some statements fail as the database would make them fail
    assert plan.injected                # what was injected, statement by statement
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from .._clock import Clock, SystemClock
from ..store._sql import POSTGRES, SQLITE

__all__ = [
    "Fault",
    "FaultPlan",
    "Injected",
    "JumpClock",
    "WorkerProcess",
    "fault_error",
    "inject",
    "kill_at_random",
    "model_settings",
    "python_worker",
    "retry_through_faults",
    "sqlite_write_lock",
    "terminate_postgres_connections",
]

T = TypeVar("T")

KINDS = ("locked", "serialization", "dropped")
WHEN = ("before", "commit", "after_commit")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """One fault: ``kind`` is ``locked``, ``serialization`` or ``dropped``; ``when`` is ``before`` (the
    statement does not run), ``commit`` (the transaction is rolled back) or ``after_commit`` (the
    transaction is committed, then the caller gets the error: an acknowledgement lost on the wire)."""

    kind: str = "locked"
    when: str = "before"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault kind must be one of {KINDS}, got {self.kind!r}")
        if self.when not in WHEN:
            raise ValueError(f"fault when must be one of {WHEN}, got {self.when!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Injected:
    """A fault that was injected: the statement's number (from 1), the fault and the statement."""

    index: int
    fault: Fault
    sql: str


def fault_error(fault: Fault, dialect: str) -> BaseException:
    """The error the database itself raises for ``fault`` on ``dialect``."""
    if dialect == SQLITE:
        text = {"locked": "database is locked", "serialization": "database is locked",
                "dropped": "disk I/O error"}[fault.kind]
        return sqlite3.OperationalError(text)
    import psycopg
    from psycopg import errors

    if fault.kind == "locked":
        return errors.LockNotAvailable("canceling statement due to lock timeout")
    if fault.kind == "serialization":
        return errors.SerializationFailure("could not serialize access due to concurrent update")
    return psycopg.OperationalError("server closed the connection unexpectedly")


class FaultPlan:
    """Which statements fail, and how.

    Args:
        seed: seeds the random choices (reproducible runs).
        rate: the chance that any one matching statement fails (0 to 1).
        kinds: the fault kinds drawn from at random.
        when: the moments drawn from at random (``before``, ``commit``, ``after_commit``).
        match: a regular expression; only statements it finds are eligible.
        at: statement numbers (from 1, counting every statement the store runs) that fail for certain,
            with ``faults[i]`` (default: the first kind and moment) as their fault.
        limit: at most this many faults in all.
    """

    def __init__(self, *, seed: int | None = None, rate: float = 0.0, kinds: Sequence[str] = ("locked",),
                 when: Sequence[str] = ("before",), match: str | None = None, at: Iterable[int] = (),
                 faults: Sequence[Fault] = (), limit: int | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be between 0 and 1, got {rate!r}")
        for kind in kinds:
            Fault(kind=kind)
        for moment in when:
            Fault(when=moment)
        self.rate = rate
        self.kinds = tuple(kinds)
        self.when = tuple(when)
        self.match = re.compile(match) if match else None
        self.at = sorted(set(at))
        self.faults = list(faults)
        self.limit = limit
        self.injected: list[Injected] = []
        self.statements = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._paused = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No faults inside this block (for checking state between steps)."""
        with self._lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1

    def decide(self, sql: str) -> Fault | None:
        """The fault for the next statement, or None. Counts the statement either way."""
        with self._lock:
            self.statements += 1
            if self._paused or (self.limit is not None and len(self.injected) >= self.limit):
                return None
            index = self.statements
            fault: Fault | None = None
            if index in self.at:
                i = self.at.index(index)
                fault = self.faults[i] if i < len(self.faults) else Fault(kind=self.kinds[0], when=self.when[0])
            elif self.rate and (self.match is None or self.match.search(sql)) and self._rng.random() < self.rate:
                fault = Fault(kind=self._rng.choice(self.kinds), when=self._rng.choice(self.when))
            if fault is not None:
                self.injected.append(Injected(index=index, fault=fault, sql=sql))
            return fault


class _FaultyCursor:
    def __init__(self, cursor: Any, conn: _FaultyConnection) -> None:
        self._cursor = cursor
        self._conn = conn

    def execute(self, sql: str, params: Any = (), **kwargs: Any) -> Any:
        self._conn._before(sql)
        self._cursor.execute(sql, params, **kwargs)
        return self

    def executemany(self, sql: str, rows: Any, **kwargs: Any) -> Any:
        # psycopg's executemany(..., returning=True) feeds the store's batched event inserts
        self._conn._before(sql)
        self._cursor.executemany(sql, rows, **kwargs)
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cursor)


class _FaultyConnection:
    """A DB-API connection that consults the plan before each statement; a fault due at commit is kept
    for the transaction's end."""

    def __init__(self, raw: Any, plan: FaultPlan, dialect: str) -> None:
        self._raw = raw
        self._plan = plan
        self._dialect = dialect
        self.pending: Fault | None = None

    def _before(self, sql: str) -> None:
        fault = self._plan.decide(sql)
        if fault is None:
            return
        if fault.when != "before":
            if self.pending is None:
                self.pending = fault
            return
        if fault.kind == "dropped" and self._dialect == POSTGRES:
            with contextlib.suppress(Exception):
                self._raw.close()  # the connection really is gone: the pool must not hand it out again
        raise fault_error(fault, self._dialect)

    def execute(self, sql: str, params: Any = (), **kwargs: Any) -> Any:
        self._before(sql)
        return self._raw.execute(sql, params, **kwargs)

    def executemany(self, sql: str, rows: Any, **kwargs: Any) -> Any:
        self._before(sql)
        return self._raw.executemany(sql, rows, **kwargs)

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        return _FaultyCursor(self._raw.cursor(*args, **kwargs), self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _FaultyTransaction:
    def __init__(self, inner: Any, plan: FaultPlan, dialect: str) -> None:
        self._inner = inner
        self._plan = plan
        self._dialect = dialect
        self._conn: _FaultyConnection | None = None

    def __enter__(self) -> Any:
        tx = self._inner.__enter__()
        self._conn = _FaultyConnection(tx.raw, self._plan, self._dialect)
        tx.raw = self._conn
        return tx

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> Any:
        fault = self._conn.pending if self._conn is not None else None
        if kind is not None or fault is None:
            return self._inner.__exit__(kind, exc, tb)
        error = fault_error(fault, self._dialect)
        if fault.when == "commit":
            self._inner.__exit__(type(error), error, None)  # rolls back
            raise error
        self._inner.__exit__(None, None, None)  # committed; the acknowledgement is lost
        raise error


@contextlib.contextmanager
def inject(store: Any, plan: FaultPlan) -> Iterator[FaultPlan]:
    """Run every statement of ``store`` (its transactions and reads) past ``plan`` inside this block.

    Build the engines inside the block, or at least after it starts: an engine that saved a bound
    ``store.transaction`` before would not see the faults. The store is itself again afterwards.
    """
    dialect = store.dialect
    originals = {name: getattr(store, name) for name in ("transaction", "read")}

    def transaction(conn: Any = None) -> Any:
        return _FaultyTransaction(originals["transaction"](conn), plan, dialect)

    def read() -> Any:
        return _FaultyTransaction(originals["read"](), plan, dialect)

    store.transaction = transaction
    store.read = read
    # One statement is a transaction like any other here: its faults (at commit too) keep their meaning.
    store.statement = lambda: _FaultyTransaction(originals["transaction"](), plan, dialect)
    try:
        yield plan
    finally:
        for name in (*originals, "statement"):
            with contextlib.suppress(AttributeError):
                delattr(store, name)


@contextlib.contextmanager
def sqlite_write_lock(target: Any) -> Iterator[None]:
    """Hold the write lock of a SQLite file from a second connection, as another process's writer would,
    for the duration of the block. ``target`` is the file's path or a store opened on it."""
    path = str(getattr(target, "path", target))
    if path.startswith("file:"):
        raise ValueError("sqlite_write_lock needs a file on disk, not an in-memory database")
    holder = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            holder.execute("ROLLBACK")
        holder.close()


def terminate_postgres_connections(url: str, *, application_name: str | None = None) -> int:
    """``pg_terminate_backend`` every other session connected to ``url``'s database (or only those with
    ``application_name``); returns how many were dropped. Their next statement fails with a dropped
    connection, as after a failover or a server restart."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        sql = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
               "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        params: tuple[Any, ...] = ()
        if application_name is not None:
            sql += " AND application_name = %s"
            params = (application_name,)
        row = conn.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


class JumpClock:
    """The wall clock plus an offset that only grows: ``jump(seconds)`` moves time forward at once, so that
    leases lapse and timers fall due without the test sleeping. ``sleep`` really sleeps."""

    def __init__(self, base: Clock | None = None) -> None:
        self._base = base or SystemClock()
        self._offset = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._base.now() + self._offset

    def sleep(self, seconds: float) -> None:
        self._base.sleep(seconds)

    def jump(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` (never back) and return the new time."""
        if seconds < 0:
            raise ValueError(f"a clock only jumps forward, got {seconds!r}")
        with self._lock:
            self._offset += seconds
        return self.now()


@dataclass
class WorkerProcess:
    """A worker in a child process that prints ``ready`` (a line of its own) once it runs.

    Args:
        argv: the command (``[sys.executable, "worker.py", url]``).
        env: extra environment variables.
        ready: the line the child prints when it is ready; ``None`` to not wait for one.
    """

    argv: Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    ready: str | None = "ready"
    timeout: float = 60.0
    proc: subprocess.Popen[str] | None = None
    kills: int = 0

    def start(self) -> WorkerProcess:
        """Start the child (again) and wait until it is ready."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the worker is running already: kill() or stop() it first")
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(list(self.argv), stdout=subprocess.PIPE, text=True, env=env)
        if self.ready is not None:
            assert self.proc.stdout is not None
            deadline = time.monotonic() + self.timeout
            while True:
                line = self.proc.stdout.readline()
                if line.strip() == self.ready:
                    break
                if not line or time.monotonic() > deadline:
                    code = self.proc.poll()
                    raise RuntimeError(f"worker {self.argv} never printed {self.ready!r} (exit {code})")
        return self

    def kill(self) -> None:
        """SIGKILL the child: no cleanup, no goodbye, leases left held."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.kills += 1
        self.proc.wait()
        self._close()

    def restart(self) -> WorkerProcess:
        self.kill()
        return self.start()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the child and wait for a clean exit; returns its exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._close()
        return code

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit by itself; returns its exit status."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


def kill_at_random(workers: Sequence[WorkerProcess], *, kills: int, between: tuple[float, float] = (0.05, 0.3),
                   seed: int | None = None) -> None:
    """SIGKILL a random worker ``kills`` times, restarting it each time, waiting a random time between."""
    rng = random.Random(seed)
    for _ in range(kills):
        time.sleep(rng.uniform(*between))
        rng.choice(list(workers)).restart()


def python_worker(script: Path | str, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
    """A :class:`WorkerProcess` running ``script`` with this interpreter."""
    return WorkerProcess([sys.executable, str(script), *args], env=dict(env or {}))


def model_settings(examples: int | None = None, *, steps: int = 40) -> Any:
    """hypothesis ``settings`` for a model-based test of an engine: ``examples`` runs (default 200, or
    ``ERRANDS_MODEL_EXAMPLES``) of up to ``steps`` operations each, no deadline (faults and restarts make
    single steps slow), and no health check against slow data generation."""
    from hypothesis import HealthCheck, settings

    if examples is None:
        text = os.environ.get("ERRANDS_MODEL_EXAMPLES", "200")
        try:
            examples = int(text)
        except ValueError:
            raise ValueError(f"ERRANDS_MODEL_EXAMPLES must be a whole number, got {text!r}") from None
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


def retry_through_faults(call: Callable[[], T], *, attempts: int = 20, pause: float = 0.05) -> T:
    """``call()``, tried again on a fresh connection after each infrastructure error, up to ``attempts``
    times: for the checking side of a test whose own connections are dropped too."""
    from .._leases import is_infrastructure_error

    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:
            if not is_infrastructure_error(exc) or attempt == attempts - 1:
                raise
            time.sleep(pause)
    raise AssertionError("attempts must be at least 1")
