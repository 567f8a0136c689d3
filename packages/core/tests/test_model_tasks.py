"""Model-based test of the task engine: random submits, handler outcomes, held handlers, two workers,
crashes and restarts, clock jumps and injected store faults, checked against a small model.

Invariants, after every step:
- nothing lost: every task whose submit returned exists;
- a task never runs more concurrently than allowed: at most ``max_concurrency`` invocations of the limited
  type at once across both workers, at most ``concurrency`` per worker, at most one per task;
- no fault recorded as a failure: a FAILED task failed in its handler (its error is the handler's), at an
  attempt where the handler's script fails for good;
- a finished task never changes, and its handler never runs again;
and at the end, with faults paused and time moved on: every task finishes as its script says (nothing
stuck, every lease completed or lapsed).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from errands.core import (
    PermanentError,
    TaskContext,
    TaskEngine,
    TaskStatus,
    TransientError,
    is_infrastructure_error,
    open_store,
)
from errands.core.testing import faults
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

LEASE_FOR = 5.0
RETRY_MAX = 2
CONCURRENCY = 3
LIMIT = 2  # max_concurrency of the "limited" type
FINAL = (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.DEAD)
OUTCOMES = st.sampled_from(["ok", "ok", "ok", "transient", "permanent"])


class _Log(logging.Handler):
    """The engine's recent log lines, for the message of a failed check."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.threadName}: {record.getMessage()}")
        del self.messages[:-2000]


class Crashed(BaseException):
    """The worker process running this handler died (raised in the handlers of a crashed worker)."""


@dataclass
class Spec:
    type: str
    script: list[str]
    hold: bool

    def outcome(self, attempt: int) -> str:
        return self.script[min(attempt, len(self.script)) - 1]

    def expected(self, attempts: int) -> tuple[TaskStatus, str | None]:
        """The final status and error a task that finished after ``attempts`` attempts must have."""
        out = self.outcome(attempts)
        if out == "ok":
            return TaskStatus.SUCCEEDED, None
        if out == "permanent":
            return TaskStatus.FAILED, f"PermanentError: planned failure at attempt {attempts}"
        assert attempts > RETRY_MAX, f"a transient failure at attempt {attempts} ended the task"
        return TaskStatus.FAILED, f"TransientError: planned failure at attempt {attempts}"


@dataclass
class Invocation:
    task: str
    attempt: int
    worker: int
    gen: int
    release: threading.Event = field(default_factory=threading.Event)
    done: bool = False


class TaskModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="errands-model-tasks-"))
        self.url = f"sqlite:///{self.dir / 'tasks.db'}"
        self.clock = faults.JumpClock()
        self.plan: faults.FaultPlan = faults.FaultPlan()
        self.stack = contextlib.ExitStack()
        self.lock = threading.Lock()
        self.specs: dict[str, Spec] = {}
        self.unsure: set[str] = set()  # submits that failed: the task may or may not exist
        self.invocations: list[Invocation] = []
        self.executing: list[Invocation] = []
        self.violations: list[str] = []
        self.finished: dict[str, tuple[Any, ...]] = {}
        self.calls_when_finished: dict[str, int] = {}
        self.gens = [0, 0]
        self.crashed: set[tuple[int, int]] = set()
        self.stopping: set[tuple[int, int]] = set()
        self.workers: list[tuple[Any, TaskEngine] | None] = [None, None]
        self.n = 0
        self.started = False
        self.log = _Log()
        self.logger = logging.getLogger("errands.tasks")
        self.level = self.logger.level
        self.logger.addHandler(self.log)
        self.logger.setLevel(logging.INFO)

    # -- the system under test ---------------------------------------------------------------------
    def _handler(self, worker: int, gen: int) -> Any:
        def handle(params: Any, ctx: TaskContext) -> str:
            spec = self.specs[ctx.id]
            inv = Invocation(task=ctx.id, attempt=ctx.attempt, worker=worker, gen=gen)
            with self.lock:
                self.invocations.append(inv)
                running = [i for i in self.executing if not i.done]
                if any(i.task == ctx.id for i in running):
                    self.violations.append(f"task {ctx.id} runs twice at once")
                if spec.type == "limited" and sum(self.specs[i.task].type == "limited" for i in running) >= LIMIT:
                    self.violations.append(f"more than {LIMIT} limited tasks at once")
                if sum(i.worker == worker and i.gen == gen for i in running) >= CONCURRENCY:
                    self.violations.append(f"worker {worker} runs more than {CONCURRENCY} tasks")
                self.executing.append(inv)
                if (worker, gen) in self.stopping:
                    inv.release.set()
            try:
                if spec.hold:
                    inv.release.wait(30)
                if (worker, gen) in self.crashed:
                    raise Crashed()
                out = spec.outcome(ctx.attempt)
                if out == "transient":
                    raise TransientError(f"planned failure at attempt {ctx.attempt}", retry_after=0)
                if out == "permanent":
                    raise PermanentError(f"planned failure at attempt {ctx.attempt}")
                return f"result of {params['n']}"
            finally:
                with self.lock:
                    inv.done = True
                    self.executing.remove(inv)

        return handle

    def _start_worker(self, worker: int) -> None:
        with self.plan.paused():  # a process that cannot open its store is restarted: not modelled here
            store = open_store(self.url, clock=self.clock)
            self.stack.enter_context(faults.inject(store, self.plan))
            gen = self.gens[worker]
            handle = self._handler(worker, gen)
            engine = TaskEngine(store, concurrency=CONCURRENCY, lease_for=LEASE_FOR, retry_max=RETRY_MAX,
                                retry_base=0.001, retry_cap=0.002)
            engine.register("free", handle)
            engine.register("limited", handle, max_concurrency=LIMIT)
        self.workers[worker] = (store, engine)

    def _stop_worker(self, worker: int, *, crash: bool) -> None:
        got = self.workers[worker]
        if got is None:
            return
        store, engine = got
        gen = self.gens[worker]
        if crash:
            self.crashed.add((worker, gen))
        with self.lock:
            self.stopping.add((worker, gen))
            mine = [i for i in self.executing if i.worker == worker and i.gen == gen]
        for inv in mine:
            inv.release.set()
        engine.close(wait=True)  # a crashed worker's handlers die at once; the rest finish
        with self.plan.paused():
            store.close()
        self.workers[worker] = None
        self.gens[worker] += 1

    def _store(self) -> Any:
        for got in self.workers:
            if got is not None:
                return got[0]
        raise AssertionError("no worker running")

    def _rows(self) -> dict[str, tuple[Any, ...]]:
        with self.plan.paused(), self._store().read() as tx:
            return {r[0]: tuple(r[1:]) for r in tx.query(
                "SELECT id, status, attempts, result, error, owner, lease_expires, token, updated_at FROM em_tasks")}

    # -- rules -------------------------------------------------------------------------------------
    @initialize(seed=st.integers(0, 2**32 - 1), rate=st.sampled_from([0.0, 0.05, 0.15, 0.3]))
    def start(self, seed: int, rate: float) -> None:
        self.plan = faults.FaultPlan(seed=seed, rate=rate, kinds=faults.KINDS, when=faults.WHEN)
        self.started = True
        for w in (0, 1):
            self._start_worker(w)

    @rule(worker=st.integers(0, 1), limited=st.booleans(), script=st.lists(OUTCOMES, min_size=1, max_size=4),
          hold=st.booleans())
    def submit(self, worker: int, limited: bool, script: list[str], hold: bool) -> None:
        got = self.workers[worker]
        if got is None:
            return
        self.n += 1
        task_id = str(uuid.UUID(int=self.n))
        self.specs[task_id] = Spec(type="limited" if limited else "free", script=script, hold=hold)
        try:
            got[1].submit(self.specs[task_id].type, {"n": self.n}, id=task_id)
        except Exception as exc:
            assert is_infrastructure_error(exc), repr(exc)
            self.unsure.add(task_id)

    @rule(worker=st.integers(0, 1))
    def run_once(self, worker: int) -> None:
        """A pass of one worker. A worker with a free slot starts a due task, unless a fault hit the pass."""
        got = self.workers[worker]
        if got is None:
            return
        engine = got[1]
        with self.plan.paused(), got[0].read() as tx:
            row = tx.one("SELECT COUNT(*) FROM em_tasks WHERE type = 'free' AND status = 'PENDING' "
                         "AND available_at <= ?", (self.clock.now(),))
        due = int(row[0]) if row else 0
        faults_before = len(self.plan.injected)
        free = CONCURRENCY - engine.in_flight
        started = engine.run_once()
        if due and free > 0 and len(self.plan.injected) == faults_before:
            assert started > 0, f"worker {worker} has {free} free slot(s) and {due} due task(s) but started none"

    @rule(pick=st.integers(0, 7))
    def release(self, pick: int) -> None:
        """Let one held handler finish (if one is held)."""
        with self.lock:
            held = [i for i in self.executing if not i.release.is_set()]
        if held:
            held[pick % len(held)].release.set()

    @rule()
    def let_handlers_finish(self) -> None:
        """Wait until every worker runs only handlers that are held (the others finished and wrote). Then,
        after one pass of each worker without faults, a task RUNNING under a live worker's name is one it
        runs now: a fault never leaves a live worker sitting on a task until its lease lapses."""
        self._quiesce()
        with self.plan.paused():
            for got in self.workers:
                if got is not None:
                    got[1].run_once()
            self._quiesce()
            live = {got[1].owner for got in self.workers if got is not None}
            with self.lock:
                running = {i.task for i in self.executing}
            for task_id, row in self._rows().items():
                if row[0] == "RUNNING" and row[4] in live:
                    assert task_id in running, (
                        f"task {task_id} is RUNNING under {row[4]} but runs nowhere: {row}; engines: "
                        f"{[(g[1].owner, g[1].in_flight, g[1]._abandoned) for g in self.workers if g]}; "
                        f"log: {[m for m in self.log.messages if task_id in m][-8:]}; faults: {self.plan.injected[-6:]}")

    def _quiesce(self) -> None:
        deadline = time.monotonic() + 30
        while not all(self._quiet(w) for w in (0, 1)):
            assert time.monotonic() < deadline, "a worker still runs unheld tasks after 30 s"
            time.sleep(0.001)

    def _quiet(self, worker: int) -> bool:
        got = self.workers[worker]
        if got is None:
            return True
        gen = self.gens[worker]
        with self.lock:
            holding = sum(1 for i in self.executing
                          if i.worker == worker and i.gen == gen and self.specs[i.task].hold and not i.release.is_set())
        return got[1].in_flight == holding

    @rule(worker=st.integers(0, 1), crash=st.booleans())
    def restart(self, worker: int, crash: bool) -> None:
        """Stop a worker (SIGKILL-like when ``crash``: its running handlers die and write nothing) and start
        a new process on the same database."""
        self._stop_worker(worker, crash=crash)
        self._start_worker(worker)

    @rule()
    def jump(self) -> None:
        """Every handler finishes, then time passes: leases left by dead workers lapse. (Jumping while a live
        worker runs a handler would let its lease lapse under it: another worker may then run the task too,
        which is at-least-once, not a fault of the engine.)"""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with self.lock:
                for inv in self.executing:
                    inv.release.set()
                busy = bool(self.executing)
            if not busy and all(w is None or w[1].in_flight == 0 for w in self.workers):
                break
            time.sleep(0.001)
        self.clock.jump(LEASE_FOR + 1)

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def holds(self) -> None:
        assert not self.violations, self.violations
        rows = self._rows()
        for task_id, spec in self.specs.items():
            row = rows.get(task_id)
            if row is None:
                assert task_id in self.unsure, f"task {task_id} was lost"
                continue
            status, attempts, result, error = TaskStatus(row[0]), int(row[1]), row[2], row[3]
            calls = sum(1 for i in self.invocations if i.task == task_id)
            if task_id in self.finished:
                assert (status, attempts, result, error) == self.finished[task_id][:4], f"{task_id} changed"
                assert calls == self.calls_when_finished[task_id], f"finished task {task_id} ran again"
            elif status in FINAL:
                want, want_error = spec.expected(attempts)
                assert (status, error) == (want, want_error), (task_id, spec, status, attempts, error)
                self.finished[task_id] = (status, attempts, result, error)
                self.calls_when_finished[task_id] = calls
            else:
                assert error is None or "planned failure" in error, f"a fault was recorded on {task_id}: {error}"

    def teardown(self) -> None:
        try:
            if self.started:
                self._settle()
        finally:
            for inv in list(self.executing):
                inv.release.set()
            for w in (0, 1):
                got = self.workers[w]
                if got is not None:
                    got[1].close(wait=True)
            self.stack.close()
            for w in (0, 1):
                got = self.workers[w]
                if got is not None:
                    got[0].close()
            shutil.rmtree(self.dir, ignore_errors=True)
            self.logger.removeHandler(self.log)
            self.logger.setLevel(self.level)

    def _settle(self) -> None:
        """Faults stop, every handler is let go, time passes: every task must finish as its script says."""
        with self.plan.paused():
            for task_id in sorted(self.unsure):
                spec = self.specs[task_id]
                engine = next(w[1] for w in self.workers if w is not None)
                engine.submit(spec.type, {"n": int(uuid.UUID(task_id))}, id=task_id)  # same id: same task
            self.unsure.clear()
            self.jump()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with self.lock:
                    for inv in self.executing:
                        inv.release.set()
                for got in self.workers:
                    if got is not None:
                        got[1].run_once()
                rows = self._rows()
                if all(r[0] in {s.value for s in FINAL} for r in rows.values()) and not self.executing:
                    break
                time.sleep(0.002)
            self.holds()
            rows = self._rows()
            stuck = {t: r for t, r in rows.items() if TaskStatus(r[0]) not in FINAL}
            assert not stuck, f"tasks stuck: {stuck}"
            assert all(r[4] is None and r[5] is None for r in rows.values()), "a lease neither completed nor lapsed"
            assert set(rows) == set(self.specs), "tasks lost or made up"


TaskModel.TestCase.settings = faults.model_settings()
test_task_engine_model = TaskModel.TestCase
